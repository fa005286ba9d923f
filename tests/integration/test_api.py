"""``forgeline.run``: the pipeline from Python, in this process, against the project's SQLite store."""

from __future__ import annotations

import pytest

import forgeline
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration


def test_run_returns_the_summary_and_registers(project: Project) -> None:
    summary = forgeline.run("smoke.yaml", overrides={"train.max_steps": 12, "name": "api-demo"})

    assert summary.experiment_name == "api-demo"
    assert summary.version == "1" and summary.promoted
    assert summary.metrics["test/bits_per_byte"] > 0
    client = project.client()
    version = client.get_model_version_by_alias(summary.model_name, "champion")
    assert str(version.version) == "1"  # MLflow gives the number as an int
    train = client.search_runs([summary.experiment_id], filter_string="tags.mlflow.runName = 'train'")
    assert train[0].data.params["train.max_steps"] == "12"

    again = forgeline.run(forgeline.load_config("smoke.yaml", {"train.max_steps": 12, "name": "api-demo"}))
    assert again.reused and again.version == "1"


def test_bad_data_raises_the_data_error(project: Project) -> None:
    bad = project.root / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe not utf-8\n")
    with pytest.raises(Exception, match=r"bad.txt: not valid UTF-8"):
        forgeline.run("smoke.yaml", data=[str(bad)])
    assert project.client().search_registered_models() == []
