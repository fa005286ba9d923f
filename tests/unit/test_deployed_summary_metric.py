"""`run --deployed` ends with the config's gate metric first, whatever the task (issue 16.10)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from forgeline.tasks.config import PipelineConfig


def _summary(monkeypatch: pytest.MonkeyPatch, cfg: PipelineConfig, metrics: dict[str, float]) -> list[str]:
    from forgeline.flows.cli import stack
    from forgeline.tasks.tracking import queries, store

    run = SimpleNamespace(
        data=SimpleNamespace(tags={"model_version": "1", "promoted": "true"}, metrics=metrics),
        info=SimpleNamespace(experiment_id="1", run_id="r1"),
    )
    monkeypatch.setattr(store, "setup_tracking", lambda _cfg: "sqlite:////tmp/mlflow.db")
    monkeypatch.setattr(queries, "pipeline_run_of_flow_run", lambda _name, _id: run)
    buffer = io.StringIO()
    monkeypatch.setattr(stack, "out", Console(file=buffer, width=200, color_system=None))
    stack.print_deployed_summary(cfg, "flow-run-id")
    return [line for line in buffer.getvalue().splitlines() if line.startswith(("test/", "val/"))]


def test_the_gate_metric_leads_the_deployed_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    completion = PipelineConfig.model_validate(
        {"task": {"kind": "completion"}, "data": {"prompt_column": "q", "completion_column": "a"}}
    )
    shown = _summary(monkeypatch, completion, {"test/rougeL": 0.41, "test/loss": 2.0, "test/bleu": 12.5})
    assert shown == ["test/rougeL: 0.4100", "test/loss: 2.0000"]
    f1_gate = PipelineConfig.model_validate(
        {"task": {"kind": "classification"}, "data": {"label_column": "tag"}, "registry": {"metric": "test/accuracy"}}
    )
    shown = _summary(monkeypatch, f1_gate, {"test/f1_macro": 0.8, "test/accuracy": 0.85})
    assert shown == ["test/accuracy: 0.8500", "test/f1_macro: 0.8000"]
