"""A completion search that chooses by validation ROUGE-L while pruning on the validation loss (issue 17, 5).

Two real trials on a tiny generated JSON Lines set: the study maximizes, each completed trial's value is the
ROUGE-L of its model's decodings of the validation split, the pruner saw the loss negated, and the search hands
back the best trial's parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.data.cleaning import clean_dataset, load_split
from forgeline.tasks.tune import study as studies
from forgeline.tasks.tune import workers

pytestmark = pytest.mark.integration

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def _config(tmp_path: Path) -> PipelineConfig:
    rows = [{"q": f"swap({WORDS[i % 6]} {WORDS[(i * 5 + 1) % 6]} {i})", "a": f"{i} {WORDS[i % 6]}"} for i in range(60)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return PipelineConfig.model_validate(
        {
            "name": "complete-tune",
            "seed": 5,
            "task": {"kind": "completion"},
            "data": {
                "sources": [{"kind": "files", "paths": ["pairs.jsonl"]}],
                "prompt_column": "q",
                "completion_column": "a",
                "cache_dir": str(tmp_path / "cache"),
                "fractions": {"train": 0.6, "validation": 0.2, "test": 0.2},
            },
            "tokenizer": {"kind": "char"},
            "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32, "dropout": 0.0},
            "train": {"max_steps": 6, "batch_size": 8, "eval_interval": 3, "checkpoint_interval": 3, "log_interval": 3},
            "eval": {"max_new_tokens": 8, "max_examples": 6},
            "tune": {
                "n_trials": 2,
                "metric": "val/rougeL",
                "sampler": "random",
                "pruner": "none",
                "max_steps": 6,
                "eval_interval": 3,
                "heartbeat_interval": 1,
                "search_space": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
            },
        }
    )


def test_two_trial_completion_search_chooses_by_validation_rouge_l(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = _config(tmp_path)
    cleaned = clean_dataset(cfg.data, base_dir=tmp_path)
    assert len(load_split(cleaned.dataset_dir, "validation")) > 0
    spec = studies.build_spec(
        cfg, cleaned.dataset_dir, cleaned.fingerprint, trials_root=tmp_path / "ckpt", base_dir=tmp_path
    )
    result = workers.run_study(spec)
    study = studies.open_study(spec)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 2
    for trial in complete:
        assert trial.value is not None and 0.0 <= trial.value <= 1.0
        scores = trial.user_attrs["val_metrics"]
        assert trial.value == pytest.approx(scores["val/rougeL"])  # scored on the validation split
        assert {"val/bleu", "val/exact_match", "val/chrf", "val/loss"} <= set(scores)
        # The pruner saw the validation loss, negated: every reported value is a negative finite number.
        assert sorted(trial.intermediate_values) == [3, 6]
        assert all(v < 0 and math.isfinite(v) for v in trial.intermediate_values.values())
        assert not (Path(trial.user_attrs["run_dir"]) / "model").exists()  # weights dropped after scoring
    best = max(complete, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
    assert result.best_value == best.value
    assert result.best_trial == best.number
    assert result.best_params == best.params
