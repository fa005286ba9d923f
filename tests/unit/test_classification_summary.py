"""The run summary of a classification run shows the model's figures beside the baseline's; an lm run's is unchanged."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from forgeline.flows.pipeline import PipelineResult, headline_rows, run_metrics, summary_markdown
from forgeline.tasks.evaluate.baseline import model_vs_baseline
from forgeline.tasks.train.loop import TrainResult

CLS_METRICS = {
    "test/accuracy": 0.85,
    "test/f1_macro": 0.80,
    "test/f1_weighted": 0.84,
    "test/loss": 0.45,
    "baseline/accuracy": 0.92,
    "baseline/f1_weighted": 0.91,
    "baseline/f1_macro": 0.79,
    "val/loss": 0.5,
}
LM_METRICS = {"test/loss": 1.5, "test/perplexity": 4.4817, "test/bits_per_byte": 2.1, "val/loss": 1.6}


def _summary(metrics: dict[str, float]) -> PipelineResult:
    return PipelineResult(
        experiment_name="demo",
        experiment_id="3",
        run_id="abc123",
        tracking_uri="sqlite:////tmp/mlflow.db",
        fingerprint="f" * 64,
        model_name="demo",
        version="4",
        promoted=True,
        decision="first version",
        metrics=metrics,
    )


def test_model_vs_baseline_pairs_each_baseline_figure_with_the_models() -> None:
    assert model_vs_baseline(CLS_METRICS) == [
        ("test/accuracy", 0.85, 0.92),
        ("test/f1_weighted", 0.84, 0.91),
        ("test/f1_macro", 0.80, 0.79),
    ]
    assert model_vs_baseline(LM_METRICS) == []


def test_summary_markdown_has_a_model_vs_baseline_section() -> None:
    text = summary_markdown(_summary(CLS_METRICS))
    assert "## Model vs baseline (TF-IDF (char 2-5-grams) + logistic regression, same test split)" in text
    assert "| `test/f1_weighted` | 0.8400 | 0.9100 | -0.0700 |" in text
    assert "| `test/f1_macro` | 0.8000 | 0.7900 | +0.0100 |" in text
    assert "| `test/accuracy` | 0.8500 |" in text  # the model's own table
    assert "| `baseline/" not in text  # baseline figures only in their section


def test_lm_summary_markdown_and_headline_rows_unchanged() -> None:
    text = summary_markdown(_summary(LM_METRICS))
    assert "baseline" not in text.lower()
    assert "| `test/bits_per_byte` | 2.1000 |\n| `val/loss` | 1.6000 |" in text
    assert headline_rows(LM_METRICS) == [{"metric": k, "value": round(v, 5)} for k, v in LM_METRICS.items()]


def test_headline_rows_put_the_baseline_beside_the_model() -> None:
    rows = {row["metric"]: row for row in headline_rows(CLS_METRICS)}
    assert rows["test/f1_weighted"] == {"metric": "test/f1_weighted", "value": 0.84, "baseline": 0.91}
    assert rows["test/loss"]["baseline"] is None
    assert not any(name.startswith("baseline/") for name in rows)


def _printed(monkeypatch: pytest.MonkeyPatch, metrics: dict[str, float]) -> str:
    from forgeline.flows.cli import runs

    buffer = io.StringIO()
    monkeypatch.setattr(runs, "out", Console(file=buffer, width=200, color_system=None))
    runs.print_summary(_summary(metrics))
    return buffer.getvalue()


def test_printed_summary_shows_the_baseline_beside_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _printed(monkeypatch, CLS_METRICS)
    assert "0.8400   baseline 0.9100 (-0.0700)" in text
    assert "0.8000   baseline 0.7900 (+0.0100)" in text
    assert "TF-IDF baseline" in text and "ahead of the model on f1_weighted by 0.0700" in text
    assert "baseline/" not in text


def test_printed_lm_summary_has_no_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _printed(monkeypatch, LM_METRICS)
    assert "baseline" not in text.lower()
    lines = [line for line in text.splitlines() if "test/bits_per_byte" in line]
    assert len(lines) == 1 and lines[0].split()[-2:] == ["2.1000", "│"]


def test_headline_metrics_are_each_results_metrics() -> None:
    from forgeline.flows.stages import headline_metrics
    from forgeline.tasks.evaluate.classification import ClassificationEvalResult
    from forgeline.tasks.evaluate.evaluation import EvalResult

    lm = EvalResult(loss=1.0, perplexity=2.718, bits_per_byte=1.5, tokens=10, bytes=10, samples=[])
    assert headline_metrics(lm) == {"test/loss": 1.0, "test/perplexity": 2.718, "test/bits_per_byte": 1.5}
    cls = ClassificationEvalResult(
        metrics={"test/f1_macro": 0.5, "baseline/f1_macro": 0.6},
        per_class=[],
        mistakes=[],
        confusion=[],
        confusion_png="cm.png",
        labels=[],
        examples=0,
    )
    assert headline_metrics(cls) == {"test/f1_macro": 0.5, "baseline/f1_macro": 0.6}


def test_run_metrics_show_the_val_loss_of_the_weights_evaluated() -> None:
    trained = TrainResult(run_dir="r", model_dir="r/model", steps=40, best_val_loss=0.37, final_val_loss=0.15)
    lm = {"test/loss": 1.5, "test/perplexity": 4.48, "test/bits_per_byte": 2.1}
    assert run_metrics(lm, trained, kept_best=False) == lm | {"val/loss": 0.15}  # lm: the last evaluation, as before
    kept = run_metrics(CLS_METRICS, trained, kept_best=True)  # a classifier evaluates the best evaluation's weights
    assert kept["val/loss"] == 0.37 and kept["baseline/f1_weighted"] == 0.91
    never = TrainResult(run_dir="r", model_dir="r/model", steps=0)
    assert "val/loss" not in run_metrics(lm, never, kept_best=True)


def _deployed_summary(monkeypatch: pytest.MonkeyPatch, metrics: dict[str, float]) -> str:
    from types import SimpleNamespace

    from forgeline.flows.cli import stack
    from forgeline.tasks.config import PipelineConfig
    from forgeline.tasks.tracking import queries, store

    run = SimpleNamespace(
        data=SimpleNamespace(tags={"model_version": "2", "promoted": "true"}, metrics=metrics),
        info=SimpleNamespace(experiment_id="3", run_id="abc123"),
    )
    monkeypatch.setattr(store, "setup_tracking", lambda cfg: "sqlite:////tmp/mlflow.db")
    monkeypatch.setattr(queries, "pipeline_run_of_flow_run", lambda name, flow_run_id: run)
    buffer = io.StringIO()
    monkeypatch.setattr(stack, "out", Console(file=buffer, width=200, color_system=None))
    stack.print_deployed_summary(PipelineConfig(), "flow-run-id")
    return buffer.getvalue()


def test_deployed_summary_shows_the_baseline_beside_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _deployed_summary(monkeypatch, CLS_METRICS).splitlines()
    assert "test/f1_macro: 0.8000 (baseline 0.7900)" in lines
    assert "test/f1_weighted: 0.8400 (baseline 0.9100)" in lines
    assert "test/accuracy: 0.8500 (baseline 0.9200)" in lines
    assert "test/loss: 0.4500" in lines


def test_deployed_lm_summary_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _deployed_summary(monkeypatch, LM_METRICS).splitlines()
    shown = [line for line in lines if line.startswith(("test/", "val/"))]
    assert shown == ["test/bits_per_byte: 2.1000", "test/loss: 1.5000", "val/loss: 1.6000"]
