"""Crash and resume: the CLI killed or stopped mid-run (a real signal in a subprocess), then the same run again;
and bad input. The run after a crash is in-process (``forgeline.run``) where its output is not under test.
"""

from __future__ import annotations

import re
import signal

import pytest

from tests.integration.conftest import Project, runs_by_name

pytestmark = pytest.mark.integration

EXPERIMENT = "forgeline-smoke"
MODEL = "forgeline-smoke-lm"
MAX_STEPS = 40  # smoke.yaml; checkpoint_interval 10
KILL_AT = 20


def test_killed_run_resumes_from_its_last_checkpoint(project: Project) -> None:
    killed = project.run_pipeline(
        extra_env={"FORGELINE_FAULT_AT_STEP": str(KILL_AT), "FORGELINE_FAULT_KIND": "sigkill"}
    )
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.describe()

    client = project.client()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = runs_by_name(client, experiment_id)
    assert [r.info.status for r in runs["pipeline"]] == ["RUNNING"]
    assert [r.info.status for r in runs["train"]] == ["RUNNING"]
    assert [r.info.status for r in runs["clean"]] == ["FINISHED"]
    assert "evaluate" not in runs and "register" not in runs
    orphans = {runs["pipeline"][0].info.run_id, runs["train"][0].info.run_id}
    checkpoints = list((project.root / "mlruns" / "checkpoints").rglob("*"))
    assert checkpoints, "no checkpoint written before the kill"

    resumed = project.run_in_process()
    assert resumed.resumed_from == KILL_AT
    assert (resumed.model_name, resumed.version, resumed.promoted) == (MODEL, "1", True)

    runs = runs_by_name(client, experiment_id)
    for run_id in orphans:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", run_id
        assert run.data.tags.get("forgeline.reaped")
    assert [r.info.status for r in runs["pipeline"]] == ["KILLED", "FINISHED"]
    assert [r.info.status for r in runs["train"]] == ["KILLED", "FINISHED"]
    assert [r.info.status for r in runs.get("evaluate", [])] == ["FINISHED"]
    assert [r.info.status for r in runs.get("register", [])] == ["FINISHED"]

    new_train = runs["train"][1]
    assert new_train.data.tags["forgeline.resumed_from"] == str(KILL_AT)
    steps = sorted(m.step for m in client.get_metric_history(new_train.info.run_id, "train/loss"))
    assert steps == list(range(KILL_AT + 1, MAX_STEPS + 1))
    assert sorted(m.step for m in client.get_metric_history(new_train.info.run_id, "val/loss")) == [30, 40]

    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert versions[0].tags["train_run_id"] == new_train.info.run_id


def test_missing_data_fails_with_one_line(project: Project) -> None:
    result = project.run_pipeline("--data", "does-not-exist.txt")
    assert result.returncode != 0, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.describe()
    assert "does-not-exist.txt" in lines[0]
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.output
    if project.has_store():
        client = project.client()
        assert client.search_registered_models() == []


@pytest.mark.slow  # a stopped run and its resume; the SIGKILL case above is the default suite's resume test
def test_sigterm_ends_runs_killed_with_a_checkpoint_and_resumes(project: Project) -> None:
    stopped = project.run_pipeline(extra_env={"FORGELINE_FAULT_AT_STEP": "15", "FORGELINE_FAULT_KIND": "sigterm"})
    assert stopped.returncode == 143, stopped.describe()
    assert "re-run the same command to resume" in stopped.stderr
    assert "Traceback" not in stopped.output

    client = project.client()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = runs_by_name(client, experiment_id)
    assert [r.info.status for r in runs["train"]] == ["KILLED"]
    assert [r.info.status for r in runs["pipeline"]] == ["KILLED"]
    assert client.search_registered_models() == []

    resumed = project.run_in_process()
    assert resumed.resumed_from == 15 and resumed.version == "1"


@pytest.mark.slow  # 14 s; the SIGKILL resume above stays in the default suite
def test_ctrl_c_during_training_exits_130_with_a_checkpoint(project: Project) -> None:
    stopped = project.run_pipeline(extra_env={"FORGELINE_FAULT_AT_STEP": "12", "FORGELINE_FAULT_KIND": "sigint"})
    assert stopped.returncode == 130, stopped.describe()
    assert "stopped by a signal after step 12 (Ctrl-C); checkpoint saved" in re.sub(r"\s+", " ", stopped.stderr)
    client = project.client()
    runs = runs_by_name(client, client.get_experiment_by_name(EXPERIMENT).experiment_id)
    assert [r.info.status for r in runs["train"]] == ["KILLED"]
    assert client.search_registered_models() == []


def test_bad_data_found_while_cleaning_exits_2(project: Project) -> None:
    (project.root / "tiny.txt").write_text("one short line\n", encoding="utf-8")
    result = project.run_pipeline("--data", "tiny.txt")
    assert result.returncode == 2, result.describe()
    assert "error: split 'validation' is empty" in result.stderr  # a data problem, found while cleaning
    assert project.client().search_registered_models() == []


@pytest.mark.slow  # a run killed after registering, then a second run
def test_crash_between_version_and_alias_completes_on_rerun(project: Project) -> None:
    crashed = project.run_pipeline(extra_env={"FORGELINE_FAULT_KIND": "sigkill_after_register"})
    assert crashed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), crashed.describe()
    client = project.client()
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]
    assert not client.get_registered_model(MODEL).aliases

    rerun = project.run_in_process()
    assert (rerun.version, rerun.champion_version) == ("1", "1")
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert versions[0].tags["forgeline.promoted"] == "true"


def test_out_of_memory_fails_the_run_and_registers_nothing(project: Project) -> None:
    result = project.run_pipeline(extra_env={"FORGELINE_FAULT_AT_STEP": "12", "FORGELINE_FAULT_KIND": "oom"})
    assert result.returncode == 1, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: OutOfMemoryError: injected out of memory (FORGELINE_FAULT_KIND=oom)"]
    client = project.client()
    runs = runs_by_name(client, client.get_experiment_by_name(EXPERIMENT).experiment_id)
    assert [r.info.status for r in runs["train"]] == ["FAILED"]
    assert [r.info.status for r in runs["pipeline"]] == ["FAILED"]
    assert "OutOfMemoryError" in runs["train"][0].data.tags["forgeline.error"]
    assert client.search_registered_models() == []
