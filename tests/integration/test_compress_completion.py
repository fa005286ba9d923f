"""A completion teacher compressed for real (issue 18): trained on a tiny generated prompt/completion set and
registered in a SQLite MLflow store, distilled on its completion tokens into a 1-layer student by the compress
flow, scored in test ROUGE-L beside the generation speed, and gated on ROUGE-L's direction (a fall is a drop).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forgeline.flows import stages
from forgeline.flows.compress import compress_flow
from forgeline.flows.stages import RunContext
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.tracking import store
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

TEACHER = "complete-teacher"
WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _write_pairs(path: Path, n: int = 90) -> None:
    # swap(a b) -> "b a": completions drawn from eight words, so even a tiny model scores some ROUGE-L.
    rows = [
        {
            "question": f"swap({WORDS[i % 8]} {WORDS[(i * 3 + 1) % 8]}) #{i}",
            "answer": f"{WORDS[(i * 3 + 1) % 8]} {WORDS[i % 8]}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _config() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "complete-compress",
            "seed": 3,
            "task": {"kind": "completion"},
            "data": {
                "sources": [{"kind": "files", "paths": ["pairs.jsonl"]}],
                "prompt_column": "question",
                "completion_column": "answer",
                "fractions": {"train": 0.7, "validation": 0.15, "test": 0.15},
            },
            "tokenizer": {"kind": "char"},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48, "dropout": 0.0},
            "train": {
                "max_steps": 60,
                "batch_size": 8,
                "eval_interval": 30,
                "log_interval": 10,
                "checkpoint_interval": 60,
                "warmup_steps": 2,
                "learning_rate": 0.01,
            },
            "eval": {"max_new_tokens": 16, "max_examples": 8, "prompts": ["swap(alpha beta) #1\n"]},
            "tracking": {"log_system_metrics": False},
            "registry": {"model_name": TEACHER},
            "compress": {
                "max_steps": 8,
                "layers_from_teacher": [1],
                "latency_requests": 2,
                "latency_new_tokens": 8,
                "max_quality_drop": 0.0,
            },
        }
    )


def _registered_teacher(project: Project, cfg: PipelineConfig) -> str:
    from forgeline.tasks.data.cleaning import clean_dataset
    from forgeline.tasks.registry.versions import register_version
    from forgeline.tasks.tracking.registry_store import MlflowRegistry

    store.setup_tracking(cfg.tracking, project.root)
    experiment_id = store.ensure_experiment(cfg.name, cfg.tracking, project.root)
    cleaned = clean_dataset(cfg.data, base_dir=project.root)
    ctx = RunContext(experiment_id=experiment_id, base_dir=str(project.root))
    outcome = stages.run_training(cfg, cleaned.dataset_dir, cleaned.fingerprint, ctx, fresh=False)
    version, _ = register_version(MlflowRegistry(), TEACHER, outcome.model_uri, outcome.lineage, {})
    project.client().set_registered_model_alias(TEACHER, "champion", str(version.version))
    return str(version.version)


def test_a_completion_teacher_becomes_a_student_gated_on_rouge_l(project: Project) -> None:
    torch.set_num_threads(1)
    _write_pairs(project.root / "pairs.jsonl")
    cfg = _config()
    teacher_version = _registered_teacher(project, cfg)

    outcome = compress_flow(cfg)

    reg = outcome.registered
    assert outcome.teacher_uri == f"models:/{TEACHER}/{teacher_version}"
    assert (reg.model_name, reg.version, reg.metric, reg.higher_is_better) == (
        f"{TEACHER}-small",
        "1",
        "test/rougeL",
        True,
    )
    rows = dict(
        zip(
            outcome.table["quantity"], zip(outcome.table["teacher"], outcome.table["student"], strict=True), strict=True
        )
    )
    assert {"rougeL", "bleu", "exact_match", "tokens_per_sec", "latency_p50_ms"} <= set(rows)
    assert "bits_per_byte" not in rows and "records_per_sec" not in rows
    assert rows["n_layer"] == (2, 1) and rows["parameters"][1] < rows["parameters"][0]
    assert rows["tokens_per_sec"][1] > 0 and rows["bytes_on_disk"][1] < rows["bytes_on_disk"][0]
    t_rouge, s_rouge = rows["rougeL"]
    assert 0 < t_rouge <= 1 and 0 <= s_rouge <= 1, rows["rougeL"]
    # Higher is better: the drop is the relative fall, and with max_quality_drop 0 only a student at least as
    # good as its teacher passes.
    assert reg.delta == pytest.approx((t_rouge - s_rouge) / t_rouge)
    assert reg.promoted == (s_rouge >= t_rouge)
    client = project.client()
    version = client.get_model_version(reg.model_name, reg.version)
    assert float(version.tags["test_rougeL"]) == pytest.approx(s_rouge)
    assert version.tags["forgeline.teacher"] == TEACHER and "rougeL" in version.tags["forgeline.decision"]
    run = client.get_run(outcome.run_id)
    assert "student/rougeL" in run.data.metrics and run.data.metrics["student/tokens_per_sec"] > 0
    assert "ROUGE-L" in version.description
