"""A completion search that chooses by a generation metric (issue 17, point 5): config, signs, records."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from forgeline.tasks.config import COMPLETION_TUNE_METRICS, PipelineConfig
from forgeline.tasks.tune import study as studies

BUILTIN = {"sources": [{"kind": "builtin", "name": "python-docstrings"}]}


def _cfg(metric: str | None) -> PipelineConfig:
    tune: dict[str, Any] = {} if metric is None else {"metric": metric}
    return PipelineConfig.model_validate({"task": {"kind": "completion"}, "data": BUILTIN, "tune": tune})


@pytest.mark.parametrize("metric", COMPLETION_TUNE_METRICS)
def test_completion_accepts_val_loss_and_the_validation_generation_metrics(metric: str) -> None:
    assert _cfg(metric).tune_metric()[0] == metric


@pytest.mark.parametrize("metric", ["test/rougeL", "val/perplexity", "val/f1_macro", "rougeL"])
def test_completion_refuses_other_tune_metrics_in_one_line_listing_the_allowed(metric: str) -> None:
    with pytest.raises(ValueError, match="tune.metric") as info:
        _cfg(metric)
    message = str(info.value)
    assert all(name in message for name in COMPLETION_TUNE_METRICS)
    assert f"'{metric}'" in message


def test_default_completion_search_prunes_and_chooses_on_val_loss_with_no_sign_change() -> None:
    cfg = _cfg(None)
    assert studies.study_metric(cfg) == ("val/loss", False)
    assert studies.pruning_metric(cfg) == ("val/loss", False)
    assert studies.report_sign(cfg) == 1.0
    assert studies.reported_value(cfg, 2.5) == 2.5


@pytest.mark.parametrize("metric", ["val/rougeL", "val/bleu", "val/exact_match", "val/chrf"])
def test_a_generation_metric_maximizes_while_the_pruner_sees_the_loss_negated(metric: str) -> None:
    cfg = _cfg(metric)
    assert studies.study_metric(cfg) == (metric, True)
    assert studies.pruning_metric(cfg) == ("val/loss", False)
    assert studies.report_sign(cfg) == -1.0
    assert studies.reported_value(cfg, -2.5) == 2.5  # the records show the loss itself


def test_negated_losses_keep_the_median_pruner_meaning_in_a_maximizing_study() -> None:
    # Two trials with a low loss, then one whose loss is far higher: in a maximizing study the pruner
    # must stop the high-loss trial, which it does only if it sees -loss.
    cfg = _cfg("val/rougeL")
    sign = studies.report_sign(cfg)
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    )
    for loss in (1.0, 1.1):
        trial = study.ask()
        trial.report(sign * loss, 1)
        study.tell(trial, 0.5)
    bad = study.ask()
    bad.report(sign * 5.0, 1)
    assert bad.should_prune()
    good = study.ask()
    good.report(sign * 0.9, 1)
    assert not good.should_prune()


def test_trial_records_show_the_loss_as_val_loss_and_the_value_under_its_own_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from forgeline.tasks.tracking import tune_tracking

    cfg = _cfg("val/rougeL")
    spec = studies.StudySpec(
        config=cfg, dataset_dir="d", fingerprint="f", study_name="s", storage_url="sqlite://", trials_dir="t"
    )
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.report(-2.0, 3)
    trial.report(-1.5, 6)
    trial.set_user_attr("steps", 6)
    trial.set_user_attr("val_metrics", {"val/rougeL": 0.4, "val/bleu": 12.0, "val/loss": 1.5})
    study.tell(trial, 0.4)
    captured: dict[str, Any] = {}
    monkeypatch.setattr(tune_tracking, "find_runs", lambda *_a, **_k: [])
    monkeypatch.setattr(tune_tracking, "record_run", lambda *_a, **kw: captured.update(kw) or "run")
    tune_tracking.StudyRecorder("0", "parent", spec).record_trial(study.trials[0])
    metrics = {(name, step): value for name, value, step in captured["metrics"]}
    assert metrics[("val/loss", 3)] == 2.0 and metrics[("val/loss", 6)] == 1.5
    assert metrics[("val/rougeL", 6)] == 0.4
    assert metrics[("val/bleu", 6)] == 12.0
    assert not any(name.startswith("best_") for name, _ in metrics)
