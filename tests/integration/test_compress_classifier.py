"""A classification teacher compressed for real: trained and registered in a SQLite MLflow store, distilled
into a 1-layer student by the compress flow (and by ``forgeline.compress``), registered as its own
``text-classification`` model with a records-per-second and macro-F1 trade-off table.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import forgeline
from forgeline.flows import stages
from forgeline.flows.compress import compress_flow
from forgeline.flows.stages import RunContext
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.tracking import store
from tests.classifier_support import make_labeled_rows, write_labeled_csv
from tests.classify_train_support import classification_config
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

TEACHER = "cls-teacher"
LABELS = {"mlops", "nlp", "vision"}


def _config(csv: str) -> PipelineConfig:
    tree = classification_config(model={"n_layer": 2, "n_embd": 32}, max_steps=30).model_dump(mode="json")
    tree["name"] = "cls-compress"
    tree["registry"] = {**tree["registry"], "model_name": TEACHER}
    tree["data"] = {
        **tree["data"],
        "sources": [{"kind": "files", "paths": [csv]}],
        "record": "line",
        "text_columns": ["title", "description"],
        "fractions": {"train": 0.6, "validation": 0.2, "test": 0.2},
    }
    tree["compress"] = {"max_steps": 8, "layers_from_teacher": [1], "latency_requests": 3, "max_quality_drop": 1.0}
    return PipelineConfig.model_validate(tree)


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


def test_a_classifier_teacher_becomes_a_registered_text_classification_student(project: Project) -> None:
    from forgeline.tasks.tracking.classifiers import model_task, predict_labels

    torch.set_num_threads(1)
    write_labeled_csv(project.root / "tags.csv", make_labeled_rows(60))
    cfg = _config("tags.csv")
    teacher_version = _registered_teacher(project, cfg)

    outcome = compress_flow(cfg)  # the champion; the data cleaned again (a cache hit)

    reg = outcome.registered
    assert outcome.teacher_uri == f"models:/{TEACHER}/{teacher_version}"
    assert (reg.model_name, reg.version, reg.metric, reg.higher_is_better) == (
        "cls-teacher-small",
        "1",
        "test/f1_macro",
        True,
    )
    rows = dict(
        zip(
            outcome.table["quantity"], zip(outcome.table["teacher"], outcome.table["student"], strict=True), strict=True
        )
    )
    assert "records_per_sec" in rows and "f1_macro" in rows and "tokens_per_sec" not in rows
    assert rows["n_layer"] == (2, 1) and rows["parameters"][1] < rows["parameters"][0]
    assert rows["bytes_on_disk"][1] < rows["bytes_on_disk"][0] and rows["records_per_sec"][1] > 0
    t_f1, s_f1 = rows["f1_macro"]
    assert 0 < t_f1 <= 1 and 0 <= s_f1 <= 1
    assert reg.delta == pytest.approx((t_f1 - s_f1) / t_f1)  # a drop of F1 is a fall, not a rise
    assert reg.promoted  # max_quality_drop 1.0 lets any F1 >= 0 through

    # Served as its teacher is: a text-classification pipeline answering with the dataset's labels.
    assert model_task(reg.model_uri) == "text-classification"
    answers = predict_labels(reg.model_uri, ["pipeline deployment registry", "image pixels"])
    assert {a["label"] for a in answers} <= LABELS
    client = project.client()
    version = client.get_model_version(reg.model_name, reg.version)
    assert version.tags["forgeline.teacher"] == TEACHER and version.tags["forgeline.teacher_version"] == teacher_version
    assert float(version.tags["test_f1_macro"]) == pytest.approx(s_f1)
    assert str(client.get_model_version_by_alias(reg.model_name, "champion").version) == "1"
    run = client.get_run(outcome.run_id)
    assert run.data.metrics["student/records_per_sec"] > 0 and "student/f1_macro" in run.data.metrics
    assert "Requests: CPU, one record per request" in version.description

    # The Python API: the same compression again is recognised as done and keeps its version.
    again: Any = forgeline.compress(cfg, teacher=f"models:/{TEACHER}@champion")
    assert again.already_done and again.registered.version == "1" and again.table == outcome.table


@pytest.mark.slow
def test_the_teacher_cache_benchmark_runs_in_smoke_mode() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "teacher_cache.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["classifier"]["cached_s"] and out["classifier"]["on_the_fly_s"]
    assert 0 < out["lm"]["teacher_share"] < 1 and out["lm"]["cache_every_window_bytes"] > 10**10
