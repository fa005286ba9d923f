"""The listing commands and the run's log lines as a script, a pipe or a CI log sees them, from the real CLI.

Two smoke runs fill a store: one through ``forgeline run`` with standard error piped at 80 columns (its log
lines are checked), one in-process with another learning rate. Then ``compare`` and ``models`` run as
subprocesses with standard output piped: at 80 columns every value shows; csv and json parse and agree.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.integration

MODEL = "forgeline-smoke-lm"
NARROW = {"COLUMNS": "80"}
# One log event: a timestamp, the level, and the whole message on the same line.
STEP_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO +step \d+/40  loss \d+\.\d{4}  lr \S+  \d+ tok/s$")


@pytest.fixture(scope="module")
def store(module_project: Any) -> Iterator[tuple[Any, Any]]:
    """(project, the CLI run's result): versions 1 (CLI, lr 0.003) and 2 (in-process, lr 0.001)."""
    first = module_project.run_pipeline(extra_env=NARROW)
    assert first.returncode == 0, first.describe()
    module_project.run_in_process("train.learning_rate=0.001")
    yield module_project, first


def test_run_log_lines_are_one_event_per_line(store: tuple[Any, Any]) -> None:
    _, run = store
    steps = [line for line in run.stderr.splitlines() if "tok/s" in line]
    assert len(steps) == 8, run.describe()  # log_interval 5 over 40 steps
    assert all(STEP_LINE.match(line) for line in steps), steps
    assert not [line for line in run.stderr.splitlines() if line.startswith(" ")], run.describe()  # no wrapped tails


def _runs(project: Any) -> list[Any]:
    client = project.client()
    experiment = client.get_experiment_by_name("forgeline-smoke")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'pipeline'")
    return sorted(runs, key=lambda r: r.data.metrics["test/bits_per_byte"])


def test_compare_at_80_columns_shows_every_value(store: tuple[Any, Any]) -> None:
    project, _ = store
    result = project.cli("compare", "--config", "smoke.yaml", extra_env=NARROW)
    assert result.returncode == 0, result.describe()
    lines = result.stdout.splitlines()
    assert lines[0] == "forgeline-smoke: best 2 of 2 pipeline runs by test/bits_per_byte"
    assert all(len(line) <= 80 for line in lines[1:-1]), result.stdout
    assert "│ │" not in result.stdout  # columns squeezed to nothing
    for run in _runs(project):
        assert f"run: {run.info.run_id[:12]}" in result.stdout, result.stdout
        assert f"lr: {run.data.params['train.learning_rate']}" in result.stdout
        for key, head in (("test/bits_per_byte", "test bpb"), ("test/loss", "test loss"), ("val/loss", "val loss")):
            assert f"{head}: {run.data.metrics[key]:.4f}" in result.stdout, (key, result.stdout)
    assert "--output csv|json" in lines[-1]


def test_compare_csv_and_json_hold_the_same_rows(store: tuple[Any, Any]) -> None:
    project, _ = store
    as_csv = project.cli("compare", "--config", "smoke.yaml", "--output", "csv")
    as_json = project.cli("compare", "--config", "smoke.yaml", "-o", "json")
    assert as_csv.returncode == 0 and as_json.returncode == 0, as_csv.describe() + as_json.describe()
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    records = json.loads(as_json.stdout)  # nothing but the JSON on standard output
    runs = _runs(project)
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in records] == [r.info.run_id for r in runs]
    for row, record, run in zip(rows, records, runs, strict=True):
        assert row == {k: "" if v is None else str(v) for k, v in record.items()}
        assert {k: record[k] for k in run.data.metrics} == run.data.metrics  # every metric, in full
        assert record["train.learning_rate"] == run.data.params["train.learning_rate"]
        assert record["version"] == run.data.tags["model_version"]


def test_models_csv_and_json(store: tuple[Any, Any]) -> None:
    project, _ = store
    listed = project.cli("models", "-o", "json")
    assert listed.returncode == 0, listed.describe()
    assert [(m["name"], m["latest_version"]) for m in json.loads(listed.stdout)] == [(MODEL, 2)]
    as_json = project.cli("models", MODEL, "--output", "json")
    as_csv = project.cli("models", MODEL, "--output", "csv")
    assert as_json.returncode == 0 and as_csv.returncode == 0, as_json.describe() + as_csv.describe()
    found = json.loads(as_json.stdout)
    assert [v["version"] for v in found["versions"]] == ["2", "1"]
    assert found["alias_history"][-1]["alias"] == "champion"
    versions = project.client().search_model_versions(f"name='{MODEL}'")
    runs = {str(v.version): v.tags["train_run_id"] for v in versions}
    assert {v["version"]: v["train_run_id"] for v in found["versions"]} == runs  # full ids, not cut
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["version"] for r in rows] == ["2", "1"]
    assert sum("champion" in r["aliases"].split(";") for r in rows) == 1
    table = project.cli("models", MODEL, extra_env=NARROW)
    assert "version: 1" in table.stdout and "alias history" in table.stdout, table.describe()


def test_an_unknown_output_format_is_bad_input(store: tuple[Any, Any]) -> None:
    project, _ = store
    result = project.cli("compare", "--config", "smoke.yaml", "--output", "xml")
    assert result.returncode == 2 and "xml" in result.stderr, result.describe()
