"""Classification through the train stage and the tune flow, on real SQLite MLflow and Optuna stores."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from transformers import pipeline

from forgeline.flows import stages
from forgeline.flows.stages import RunContext
from forgeline.flows.tune import tune_flow
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.tracking import store
from forgeline.tasks.tune.study import build_spec, open_study
from tests.classify_train_support import classification_config, write_labeled_dataset
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

FINGERPRINT = "cd" * 32


def _named(cfg: PipelineConfig, name: str, **sections: Any) -> PipelineConfig:
    tree = cfg.model_dump(mode="json")
    tree["name"] = name
    for section, values in sections.items():
        tree[section] = {**tree[section], **values}
    return PipelineConfig.model_validate(tree)


def test_the_train_stage_trains_a_classifier_and_logs_its_validation_metrics(project: Project) -> None:
    dataset = write_labeled_dataset(project.root / "dataset", n=60)
    cfg = _named(classification_config(epochs=2, max_steps=100), "cls-train")
    store.setup_tracking(cfg.tracking, project.root)
    experiment_id = store.ensure_experiment(cfg.name, cfg.tracking, project.root)
    ctx = RunContext(experiment_id=experiment_id, base_dir=str(project.root))

    outcome = stages.run_training(cfg, str(dataset), FINGERPRINT, ctx, fresh=False)

    assert outcome.result.steps == 9 and outcome.model_uri
    client = project.client()
    f1 = client.get_metric_history(outcome.train_run_id, "val/f1_macro")
    assert [m.step for m in f1] == [4, 8, 9] and all(0 <= m.value <= 1 for m in f1)
    assert client.get_metric_history(outcome.train_run_id, "val/accuracy")
    params = client.get_run(outcome.train_run_id).data.params
    assert params["summary.total_steps"] == "9" and params["world_size"] == "1"
    answers = pipeline("text-classification", model=outcome.result.model_dir)(["pipeline deployment registry"])
    assert answers[0]["label"] in {"mlops", "nlp", "vision"}

    again = stages.run_training(cfg, str(dataset), FINGERPRINT, ctx, fresh=False)
    assert again.result.already_done and again.model_uri == outcome.model_uri


def test_a_tiny_search_reports_val_f1_macro_and_maximizes_it(project: Project) -> None:
    dataset = write_labeled_dataset(project.root / "dataset", n=60)
    space = {
        "train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "train.class_weights": {"type": "categorical", "choices": ["none", "balanced"]},
        "train.epochs": {"type": "categorical", "choices": [1, 2]},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.2},
    }
    tune = {"n_trials": 2, "search_space": space, "pruner": "none", "sampler": "random"}
    cfg = _named(classification_config(max_steps=100), "cls-tune", tune=tune)

    result = tune_flow(cfg, str(dataset), FINGERPRINT)

    spec = build_spec(cfg, str(dataset), FINGERPRINT, trials_root=project.root / "ckpt", base_dir=project.root)
    study = open_study(spec)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    for trial in complete:
        reported = trial.intermediate_values  # val/f1_macro at each evaluation (every 4 steps and the last)
        assert reported and all(0 <= v <= 1 for v in reported.values())
        assert trial.value == max(reported.values())
        assert trial.params["train.epochs"] in (1, 2)
    assert result.best_value == max(t.value for t in complete)
    assert math.isfinite(result.best_value) and set(result.best_params) == set(space)
    # Each trial's MLflow run shows what it reported under the metric's own name, not as a loss.
    client = project.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    trials = client.search_runs(experiments, filter_string="attributes.run_name LIKE 'trial-%'")
    assert len(trials) == 2
    for run in trials:
        assert "val/f1_macro" in run.data.metrics and "best_val_f1_macro" in run.data.metrics
        assert "val/loss" not in run.data.metrics and "best_val_loss" not in run.data.metrics
