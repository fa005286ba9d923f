"""Bad command-line values: a usage error (exit 2, one line, no traceback) before anything is created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from forgeline.flows.cli import lookup, serving
from forgeline.flows.cli.main import app
from forgeline.tasks import config


def _forgeline(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forgeline", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("port", ["99999", "-1", "0"])
def test_ui_refuses_a_port_out_of_range_before_creating_a_store(tmp_path: Path, port: str) -> None:
    """It printed a uvicorn traceback, exited 0 and left an empty mlruns/mlflow.db behind."""
    result = _forgeline(tmp_path, "ui", "--port", port)
    assert result.returncode == 2
    assert "--port" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "mlruns").exists()


def test_generate_refuses_a_seed_torch_cannot_take(tmp_path: Path) -> None:
    """2**64 reached torch.Generator.manual_seed: 'Overflow when unpacking long long'."""
    result = _forgeline(tmp_path, "generate", "--prompt", "x", "--seed", str(2**64))
    assert result.returncode == 2
    assert "--seed" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "mlruns").exists()


def test_the_cli_seed_bound_is_the_configs() -> None:
    assert serving.MAX_SEED == config.MAX_SEED


def _run(run_id: str, metrics: dict[str, float]) -> Any:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=1, end_time=2, status="FINISHED"),
        data=SimpleNamespace(params={}, metrics=metrics, tags={}),
    )


@pytest.fixture
def two_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.tasks.tracking import queries

    runs = [_run("a" * 32, {"test/bits_per_byte": 4.5, "val/loss": 3.0}), _run("b" * 32, {"test/loss": 3.1})]
    monkeypatch.setattr(lookup, "open_store", lambda cfg=None, **_: "sqlite:///x.db")
    monkeypatch.setattr(queries, "experiment_id", lambda name: "1")
    monkeypatch.setattr(queries, "pipeline_runs", lambda experiment_id, **_: runs)


def test_compare_by_a_metric_no_run_logged_fails_listing_the_metrics(two_runs: None) -> None:
    """It exited 0, 'ranking' every run by a metric none of them had."""
    result = CliRunner().invoke(app, ["compare", "--experiment", "demo", "--metric", "nope"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        "error: no pipeline run of 'demo' logged metric 'nope' (metrics: test/bits_per_byte, test/loss, val/loss)"
    ]


def test_compare_by_a_metric_some_run_logged_still_ranks(two_runs: None) -> None:
    result = CliRunner().invoke(app, ["compare", "--experiment", "demo", "--metric", "test/loss", "--output", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1].startswith("b" * 32)


def test_an_error_line_keeps_its_brackets(tmp_path: Path) -> None:
    """Rich read ``[ten]`` as markup and printed ``choices: }``."""
    space = "tune.search_space.train.max_steps={type: categorical, choices: [ten]}"
    result = CliRunner().invoke(app, ["validate", "--set", space])
    assert result.exit_code == 2
    assert f"error: --set {space}: train.max_steps: choice 'ten' does not fit" in result.output
