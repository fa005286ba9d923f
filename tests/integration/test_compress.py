"""`forgeline compress` against a real registry: the smoke champion distilled into `<model>-small`.

The champion comes from one in-process smoke pipeline run. The good compression runs as a
``python -m forgeline`` subprocess, as a user runs it; the bad inputs (RELIABILITY.md H7) run through the
same Typer app in-process and must each end in one error line with nothing registered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

TEACHER = "forgeline-smoke-lm"
STUDENT = "forgeline-smoke-lm-small"
FAST = (
    "--set",
    "compress.max_steps=6",
    "--set",
    "compress.latency_requests=2",
    "--set",
    "compress.latency_new_tokens=4",
)


@pytest.fixture(scope="module")
def champion(module_project: Any) -> Iterator[Any]:
    result = module_project.run_in_process()
    assert (result.version, result.promoted) == ("1", True)
    yield module_project


def student_versions(project: Any) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return list(project.client().search_model_versions(f"name = '{STUDENT}'"))
    except MlflowException:
        return []


@pytest.fixture
def invoke(champion: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The ``forgeline`` app in-process; returns ``(exit_code, output)``."""
    from typer.testing import CliRunner

    from forgeline.flows.cli import console
    from forgeline.flows.cli.main import app

    monkeypatch.setattr(console, "configure_logging", lambda verbose: None)  # keep pytest's log handlers
    monkeypatch.setattr(console.err, "width", 300)
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["compress", "--config", "smoke.yaml", *FAST, *args])
        return result.exit_code, result.output  # stdout and stderr together

    return run


def tiny_model_with_other_vocabulary(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=7, n_positions=32, n_embd=8, n_layer=1, n_head=2)).save_pretrained(folder)
    return folder


def test_bad_inputs_end_in_one_line_and_register_nothing(invoke: Any, champion: Any, tmp_path: Path) -> None:
    other_vocab = tiny_model_with_other_vocabulary(tmp_path / "other-vocab")
    cases = [
        (["models:/no-such-model/1"], "does not exist"),
        (["--set", "compress.n_layer=5"], "larger than the teacher"),
        (["--set", "compress.layers_from_teacher=[0, 7]"], "layer 7 is out of range"),
        (["--set", f"compress.student_from={other_vocab}"], "vocabulary"),
    ]
    for args, message in cases:
        code, output = invoke(*args)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert code == 2, (args, output)
        assert len(errors) == 1 and message in errors[0], (args, output)
    assert student_versions(champion) == []


@pytest.mark.slow  # about 20-30 s; the default suite stays near 12 min on 2 cores
def test_compress_registers_the_student_with_its_tradeoff(champion: Any) -> None:
    result = champion.cli("compress", "--config", "smoke.yaml", *FAST, "--set", "compress.max_quality_drop=100")
    assert result.returncode == 0, result.describe()
    assert "| bits_per_byte |" in result.stdout and "champion" in result.stdout
    client = champion.client()
    versions = student_versions(champion)
    assert [str(v.version) for v in versions] == ["1"]
    student = versions[0]
    assert student.tags["forgeline.teacher"] == TEACHER and student.tags["forgeline.teacher_version"] == "1"
    assert student.tags["forgeline.promoted"] == "true"
    assert str(client.get_model_version_by_alias(STUDENT, "champion").version) == "1"
    assert "Teacher against student" in (student.description or "")
    run = client.get_run(student.tags["forgeline.model_card_run_id"])
    assert run.info.run_name == "compress" and run.info.status == "FINISHED"
    history = {key for key in run.data.metrics}
    assert {"kd_loss", "ce_loss", "val/loss", "student/bits_per_byte", "teacher/parameters"} <= history
    table_path = client.download_artifacts(run.info.run_id, "tradeoff.json")
    table = json.loads(Path(table_path).read_text())
    rows = {row[0]: row[1:] for row in table["data"]}
    assert rows["parameters"][1] < rows["parameters"][0]  # the student is smaller
    assert {"tokens_per_sec", "latency_p50_ms", "latency_p95_ms", "bytes_on_disk"} <= set(rows)

    # A random-init student after one step is far worse than the teacher: registered, no alias, reason tagged.
    worse = champion.cli(
        "compress", "--config", "smoke.yaml", *FAST, "--set", "compress.init=scratch", "--set", "compress.max_steps=1"
    )
    assert worse.returncode == 0, worse.describe()
    assert "registered without alias" in worse.stdout
    refused = client.get_model_version(STUDENT, "2")
    assert refused.tags["forgeline.promoted"] == "false"
    assert "exceeds compress.max_quality_drop" in refused.tags["forgeline.decision"]
    assert str(client.get_model_version_by_alias(STUDENT, "champion").version) == "1"


def test_pipeline_compresses_its_champion_when_enabled(project: Any) -> None:
    settings = ["compress.enabled=true", "compress.max_steps=4", "compress.latency_requests=2"]
    result = project.run_in_process(*settings, "compress.latency_new_tokens=4", "compress.max_quality_drop=100")
    assert (result.version, result.promoted) == ("1", True)
    assert result.student and result.student.startswith(f"{STUDENT} version 1, champion ("), result.student
    assert "bits_per_byte " in result.student and "parameters 0." in result.student
    client = project.client()
    assert client.get_run(result.run_id).data.tags["forgeline.student"] == result.student
    student = client.get_model_version_by_alias(STUDENT, "champion")
    assert student.tags["forgeline.teacher"] == TEACHER and student.tags["forgeline.teacher_version"] == "1"
    run = client.get_run(student.tags["forgeline.model_card_run_id"])
    assert run.data.tags.get("mlflow.parentRunId") == result.run_id  # the compress run nests in the pipeline's
    assert "time/compress" in client.get_run(result.run_id).data.metrics
