"""A training lineage outliving its tracking store, and two runs of one lineage at once (RELIABILITY.md H1, H2).

H1: the checkpoint folder stays while ``mlruns/mlflow.db`` is deleted, or restored from a backup older than
the checkpoint; the rerun must log the model and the curve that made it into the store now in use.
H2: two ``forgeline run`` processes of the same config in one folder: one writer per checkpoint folder.
The store is only ever opened by this process after the CLI runs that replace it (a cached SQLite
connection would otherwise keep reading the deleted file).
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from forgeline.tasks.train.journal import JOURNAL_FILE, read_journal
from tests.integration.conftest import Project, runs_by_name
from tests.integration.test_training_faults import _train, dataset_dir, reference  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

EXPERIMENT = "forgeline-smoke"
MODEL = "forgeline-smoke-lm"
MAX_STEPS = 40  # smoke.yaml: log every 5 steps, evaluate and checkpoint every 10
KILL = {"FORGELINE_FAULT_AT_STEP": "20", "FORGELINE_FAULT_KIND": "sigkill"}


def _run_dir(project: Project) -> Path:
    (run_dir,) = [p for p in (project.root / "mlruns" / "checkpoints" / EXPERIMENT).iterdir() if p.is_dir()]
    return run_dir


def _one_version(client: Any) -> tuple[Any, Any]:
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    return versions[0], client.get_run(versions[0].tags["train_run_id"])


def _steps(client: Any, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _assert_whole_curve(client: Any, run: Any) -> None:
    run_id = run.info.run_id
    assert _steps(client, run_id, "train/loss") == list(range(1, MAX_STEPS + 1))
    assert _steps(client, run_id, "val/loss") == [10, 20, 30, 40]
    assert "loss_curve.png" in {a.path for a in client.list_artifacts(run_id)}


def _flat(text: str) -> str:
    return " ".join(text.split())  # the terminal log wraps long lines


@pytest.mark.slow  # 34 s on 2 cores; the other-store case below keeps H1 in the default suite
def test_deleted_store_gets_the_finished_model_and_its_curve_again(project: Project) -> None:
    first = project.run_pipeline()
    assert first.returncode == 0, first.describe()
    old = json.loads((_run_dir(project) / "logged_model.json").read_text())
    (project.root / "mlruns" / "mlflow.db").unlink()

    second = project.run_pipeline()
    assert second.returncode == 0, second.describe()
    assert "logging it and its training curve there again" in _flat(second.stderr)

    client = project.client()
    version, run = _one_version(client)
    assert run.data.tags["forgeline.already_done"] == "true"
    assert version.run_id == run.info.run_id  # the model was logged into this store, by this run
    _assert_whole_curve(client, run)
    new = json.loads((_run_dir(project) / "logged_model.json").read_text())
    assert new["model_uri"] != old["model_uri"]
    assert str(client.get_logged_model(new["model_uri"].removeprefix("models:/")).status) == "READY"

    again = project.run_in_process()  # the stale state is mended for good: the next run re-uses the version
    assert (again.version, again.reused) == ("1", True)
    _one_version(client)


def test_a_finished_checkpoint_tracked_by_another_store_brings_its_curve(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = project.run_in_process()
    assert first.version == "1"
    other = f"sqlite:///{project.root / 'elsewhere' / 'mlflow.db'}"  # e.g. the server of `forgeline up`
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    moved = project.run_in_process()
    assert (moved.tracking_uri, moved.version, moved.reused) == (other, "1", False)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=other, registry_uri=other)
    version, run = _one_version(client)
    assert run.data.tags["forgeline.already_done"] == "true"
    assert version.run_id == run.info.run_id
    _assert_whole_curve(client, run)

    def curve(c: Any, run_id: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in c.get_metric_history(run_id, "train/loss"))

    first_run = project.client().get_model_version(MODEL, "1").tags["train_run_id"]
    assert curve(client, run.info.run_id) == curve(project.client(), first_run)  # the same curve, replayed


def _back_up(db: Path, backup: Path) -> None:
    """Back the store up the way an operator's tool does: through SQLite's backup API.

    A plain file copy after a SIGKILL can catch the database mid-transaction, its pages in the hot
    ``-journal`` beside it: the copy alone is a malformed image (CI saw it once). Opening the store rolls
    that journal back first, as any SQLite reader would.
    """
    with closing(sqlite3.connect(db)) as source, closing(sqlite3.connect(backup)) as target:
        source.backup(target)


def _restore(backup: Path, db: Path) -> None:
    """Put the backup in the store's place, with no journal of the newer store left beside it."""
    for leftover in (db.with_name(db.name + suffix) for suffix in ("-journal", "-wal", "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copy2(backup, db)


@pytest.mark.slow  # a kill, a resume and a restore (31 s); the other-store test above keeps H1 in the default suite
def test_store_restored_from_a_backup_older_than_the_checkpoint(project: Project, tmp_path: Path) -> None:
    killed = project.run_pipeline(extra_env=KILL)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.describe()
    db = project.root / "mlruns" / "mlflow.db"
    backup = tmp_path / "mlflow-backup.db"
    _back_up(db, backup)  # knows the killed run's 20 steps: no model, no version
    resumed = project.run_pipeline()
    assert resumed.returncode == 0, resumed.describe()
    _restore(backup, db)

    restored = project.run_in_process()
    assert (restored.version, restored.reused) == ("1", False)
    client = project.client()
    version, run = _one_version(client)
    assert run.data.tags["forgeline.already_done"] == "true"
    assert version.run_id == run.info.run_id
    _assert_whole_curve(client, run)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = runs_by_name(client, experiment_id)
    assert [r.info.status for r in runs["train"]] == ["KILLED", "FINISHED"]  # the backup's orphan reaped


@pytest.mark.slow  # a kill and a resume; the other-store case above is the default suite's H1 test
def test_resume_into_a_new_store_replays_the_steps_it_did_not_see(project: Project) -> None:
    killed = project.run_pipeline(extra_env=KILL)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.describe()
    (project.root / "mlruns" / "mlflow.db").unlink()

    resumed = project.run_in_process()
    assert (resumed.version, resumed.resumed_from) == ("1", 20)
    client = project.client()
    _, run = _one_version(client)
    assert run.data.tags["forgeline.replayed_steps"] == "20"
    _assert_whole_curve(client, run)
    journal = [step for step, _, _ in read_journal(_run_dir(project) / JOURNAL_FILE)]
    assert journal == list(range(1, MAX_STEPS + 1))


def test_journal_after_a_kill_mid_checkpoint_matches_an_uninterrupted_run(
    dataset_dir: str,  # noqa: F811 - the imported fixture
    reference: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    fault = {"FORGELINE_FAULT_AT_STEP": "20", "FORGELINE_FAULT_KIND": "sigkill_in_checkpoint"}
    killed = _train(dataset_dir, tmp_path, fault)
    assert killed.returncode == -signal.SIGKILL
    # Written before the checkpoint that never completed: ahead of the newest checkpoint (step 10).
    assert read_journal(tmp_path / JOURNAL_FILE)[-1][0] == 20
    resumed = _train(dataset_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 10" in resumed.stderr

    def steady(path: Path) -> list[tuple[int, dict[str, float]]]:
        return [(s, {k: v for k, v in m.items() if k != "tokens_per_sec"}) for s, _, m in read_journal(path)]

    got = steady(tmp_path / JOURNAL_FILE)
    assert [step for step, _ in got] == list(range(1, 31))  # steps 11-20 cut, trained again, logged once
    assert got == steady(reference / JOURNAL_FILE)


# ----------------------------------------------------------------------------------------------- H2
def _spawn(project: Project, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "forgeline", "run", "--config", "smoke.yaml", "--set", "train.max_steps=300"]
    return subprocess.Popen(
        args,
        cwd=project.root,
        env={**project.env, **(extra_env or {})},
        stdout=log.with_suffix(".out").open("wb"),
        stderr=log.with_suffix(".err").open("wb"),
    )


def _wait_for(check: Any, procs: list[subprocess.Popen[bytes]], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            assert proc.poll() is None, f"process {proc.pid} exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow  # about 20-30 s; the default suite stays near 12 min on 2 cores
def test_two_runs_of_one_lineage_at_once_have_one_writer_and_one_version(project: Project, tmp_path: Path) -> None:
    release = tmp_path / "release"
    reached = Path(f"{release}.reached")
    pause = {
        "FORGELINE_FAULT_AT_STEP": "100",
        "FORGELINE_FAULT_KIND": "pause_metrics",
        "FORGELINE_FAULT_FILE": str(release),
    }
    first = _spawn(project, tmp_path / "first", pause)
    second: subprocess.Popen[bytes] | None = None
    try:
        _wait_for(reached.exists, [first], "first run at step 100")  # training, holding the lineage
        second = _spawn(project, tmp_path / "second")
        second_err = (tmp_path / "second").with_suffix(".err")
        told = f"waiting for pid {first.pid} on "
        _wait_for(lambda: told in _flat(second_err.read_text()), [first, second], "wait message naming the first")
        release.touch()
        assert first.wait(timeout=240) == 0, (tmp_path / "first").with_suffix(".err").read_text()[-4000:]
        run_dir = _run_dir(project)
        when_first_ended = _snapshot(run_dir)
        assert second.wait(timeout=240) == 0, second_err.read_text()[-4000:]
    finally:
        release.touch()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    assert "resumed from step" not in _flat(second_err.read_text())
    assert _snapshot(run_dir) == when_first_ended  # the second wrote nothing into the checkpoint folder
    client = project.client()
    version, _ = _one_version(client)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = runs_by_name(client, experiment_id)["train"]
    assert [r.data.tags["forgeline.already_done"] for r in runs] == ["false", "true"]
    assert [r.data.tags["forgeline.resumed_from"] for r in runs] == ["none", "none"]
    assert version.run_id == runs[0].info.run_id  # the model comes from the run that trained it
    assert _steps(client, runs[0].info.run_id, "train/loss") == list(range(1, 301))


def test_a_finished_checkpoint_moved_or_without_its_model(reference: Path, tmp_path: Path) -> None:  # noqa: F811
    from forgeline.tasks.config import load_config
    from forgeline.tasks.train.checkpoints import CheckpointError
    from forgeline.tasks.train.loop import train_model

    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)  # a project folder copied elsewhere: done.json names the old paths
    cfg = load_config(None, [])

    def finish() -> Any:
        return train_model(
            cfg.train, cfg.model, cfg.tokenizer, dataset_dir=tmp_path, run_dir=moved, seed=0, config_hash="-"
        )

    result = finish()
    assert result.already_done and result.model_dir == str(moved / "model") and result.run_dir == str(moved)
    shutil.rmtree(moved / "model")
    with pytest.raises(CheckpointError, match=r"model folder .*moved/model is missing; run with --fresh"):
        finish()
