"""Faults in deployed mode, injected for real against one stack (reliability rows A4, C1, F7, C3, C2).

One ``forgeline up`` + ``deploy`` for the module; the rows run in order on it:

- A4: ``kill -9`` the gpu worker and its flow-run process mid-training. The heartbeat automation marks the
  train flow run Crashed; ``forgeline up`` restarts the missing worker; the next pipeline start ends the
  orphaned MLflow train run KILLED, and that pipeline completes on the restarted worker.
- C1: two ``forgeline ingest`` of the same file at once, each forcing its event: one retrain, one version.
- F7: the same content under a new name is not new (no event); new content under the old name is (in C3).
- C3: two ingests of different files within a second: retrain runs never overlap; the last sees all data.
- C2: an old event replayed: the retrain flow run skips; no pipeline run, no version.

Heartbeats come every 30 s (Prefect's minimum); ``deploy.missed_heartbeats=2`` makes the automation crash a
run after 60 s of silence, so A4 waits about a minute. About 5 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import Project, prefect_client

pytestmark = pytest.mark.e2e

MODEL = "forgeline-smoke-lm"
SMOKE = ["--config", "configs/smoke.yaml"]
SETS = ["--set", "deploy.allow_cpu_fallback=true", "--set", "deploy.missed_heartbeats=2"]
SILENCE = 60  # heartbeat_seconds (30) x missed_heartbeats (2)


def _text(tag: str, n: int = 60) -> str:
    return "\n\n".join(f"{tag} paragraph {i}: the {tag} records for the fault tests, item {i}." for i in range(n))


@pytest.fixture(scope="module")
def stack(project: Project) -> Iterator[Project]:
    # A retrain queued behind another (deployment concurrency 1) is retried every 5 s instead of 30 s.
    project.env["PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS"] = "5"
    project.forgeline("up", "--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port))
    project.forgeline("deploy", *SMOKE, *SETS)
    yield project
    project.forgeline("down", check=False)


# ----------------------------------------------------------------------------------------- helpers
def _api(project: Project) -> str:
    return f"http://127.0.0.1:{project.prefect_port}/api"


def _spawn(project: Project, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(  # noqa: S603 - our own command
        [sys.executable, "-m", "forgeline", *args],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def _mlflow(project: Project) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"http://127.0.0.1:{project.mlflow_port}")


def _runs(project: Project, name: str) -> list[Any]:
    client = _mlflow(project)
    experiment = client.get_experiment_by_name("forgeline-smoke")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.runName` = '{name}'")


def _versions(project: Project) -> list[str]:
    return sorted((v.version for v in _mlflow(project).search_model_versions(f"name = '{MODEL}'")), key=int)


def _flow_runs(project: Project, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(_api(project)) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            sort=FlowRunSort.START_TIME_ASC,
        )


def _wait(what: str, check: Any, timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _retrains_settled(project: Project, count: int, timeout: float = 300) -> list[Any]:
    def settled() -> list[Any] | None:
        runs = _flow_runs(project, "retrain")
        return runs if len(runs) >= count and all(r.state and r.state.is_final() for r in runs) else None

    return _wait(f"{count} finished retrain flow runs", settled, timeout)


def _logs(project: Project, flow_run_id: Any) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_client(_api(project)) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _logged(project: Project, runs: list[Any], text: str, timeout: float = 60) -> bool:
    """Whether one of ``runs`` logged ``text`` (logs reach the server in batches, after the state may)."""
    return _wait(f"{text!r} in the logs", lambda: any(text in _logs(project, r.id) for r in runs), timeout)


def _dataset_text(project: Project, fingerprint: str) -> str:
    from forgeline.tasks.data.cleaning import read_split_text

    folder = project.root / "mlruns" / "cache" / "datasets" / fingerprint
    return "\n".join(read_split_text(folder, split) for split in ("train", "validation", "test"))


def _ingest(project: Project, *args: str) -> subprocess.Popen[str]:
    return _spawn(project, "ingest", *SMOKE, *args)


def _fingerprint_of(output: str) -> str:
    return output.split("incoming fingerprint ")[1].split()[0]


# -------------------------------------------------------------------------------------------------- A4
def test_a4_worker_killed_mid_training_is_crashed_reaped_and_replaced(stack: Project) -> None:
    project = stack
    killed_run = _spawn(project, "run", *SMOKE, *SETS, "--deployed", "--set", "train.max_steps=1000000")

    def training() -> Any:  # the deployed train run is RUNNING and has logged losses
        runs = [r for r in _runs(project, "train") if r.info.status == "RUNNING"]
        return runs[0] if runs and "train/loss" in _mlflow(project).get_run(runs[0].info.run_id).data.metrics else None

    train_run = _wait("a deployed train run logging losses", training, timeout=240)
    (train_flow_run,) = [r for r in _flow_runs(project, "train") if r.state and r.state.is_running()]
    state = json.loads((project.home / "stack.json").read_text())
    worker_pid = next(p["pid"] for p in state["procs"] if p["role"] == "worker-gpu")
    worker = psutil.Process(worker_pid)
    family = [worker, *worker.children(recursive=True)]  # the worker and the flow-run process it started
    assert len(family) >= 2, "no flow-run process under the gpu worker"
    for proc in family:
        os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    psutil.wait_procs(family, timeout=10)
    assert project.forgeline("status", check=False).returncode == 1  # worker-gpu down

    up = project.forgeline("up", "--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port))
    assert "restarted worker-gpu" in up.stdout, up.stdout
    assert project.forgeline("status").returncode == 0
    # Nothing has ended the orphaned MLflow run yet: its process is gone, but nobody has looked.
    assert _mlflow(project).get_run(train_run.info.run_id).info.status == "RUNNING"

    # The next pipeline start (a normal run) reaps it at once; its train run waits for the gpu pool's one
    # slot, which the dead run holds until the heartbeat automation crashes it.
    recovery = _spawn(project, "run", *SMOKE, *SETS, "--deployed")

    def reaped() -> bool:
        run = _mlflow(project).get_run(train_run.info.run_id)
        return run.info.status == "KILLED" and run.data.tags.get("forgeline.reaped") == "owner process gone"

    _wait("the orphaned MLflow train run ended KILLED", reaped, timeout=120)

    def crashed() -> Any:
        with prefect_client(_api(project)) as client:
            run = client.read_flow_run(train_flow_run.id)
        return run if run.state and run.state.is_final() else None

    ended = _wait("the killed train flow run marked final", crashed, timeout=SILENCE + 90)
    waited = time.monotonic() - killed_at
    assert ended.state.name == "Crashed", ended.state
    assert "no heartbeat" in (ended.state.message or "")
    assert waited < SILENCE + 90

    code, out = _finish(killed_run, timeout=120)
    assert code == 1 and "Crashed" in out, out  # the pipeline that waited for it fails, naming the crash

    code, out = _finish(recovery, timeout=300)
    assert code == 0 and f"completed: {MODEL} version 1" in out, out  # trained on the restarted worker
    train_runs = [r for r in _flow_runs(project, "train") if r.state and r.state.is_completed()]
    assert len(train_runs) == 1 and train_runs[0].start_time > ended.state.timestamp  # after the slot freed


# -------------------------------------------------------------------------------------------------- C1
def test_c1_same_data_ingested_twice_at_once_retrains_once(stack: Project) -> None:
    project = stack
    notes = project.root / "drop" / "notes.txt"
    notes.parent.mkdir(exist_ok=True)
    notes.write_text(_text("alpha"))
    pipelines_before = len(_runs(project, "pipeline"))
    retrains_before = len(_flow_runs(project, "retrain"))

    # Both force their event: two identical events at once, whatever the ingest lock decides.
    procs = [_ingest(project, str(notes), "--copy", "--force") for _ in range(2)]
    results = [_finish(p, timeout=180) for p in procs]
    assert all(code == 0 for code, _ in results), results
    assert sorted("1 new file(s)" in out for _, out in results) == [False, True], results  # added once
    assert all("emitted forgeline.dataset.updated" in out for _, out in results), results
    fingerprint = _fingerprint_of(results[0][1])
    assert fingerprint == _fingerprint_of(results[1][1])

    runs = _retrains_settled(project, retrains_before + 2)
    assert len(runs) == retrains_before + 2 and all(r.state.is_completed() for r in runs)
    trained = _runs(project, "pipeline")
    assert len(trained) == pipelines_before + 1  # one retrain ran the pipeline; the other skipped
    (retrained,) = [r for r in trained if r.data.tags.get("forgeline.retrain_fingerprint") == fingerprint]
    assert retrained.data.tags["model_version"] == "2"
    assert _versions(project) == ["1", "2"]
    assert _logged(project, runs[retrains_before:], "already retrained")


# -------------------------------------------------------------------------------------------------- F7
def test_f7_same_content_under_a_new_name_is_not_new(stack: Project) -> None:
    project = stack
    retrains_before = len(_flow_runs(project, "retrain"))
    renamed = project.root / "drop" / "renamed.txt"
    os.replace(project.root / "drop" / "notes.txt", renamed)
    code, out = _finish(_ingest(project, str(renamed)), timeout=180)
    assert code == 0 and "0 new file(s)" in out and "nothing new: no event emitted" in out, out
    assert not renamed.exists()  # moved: its content is already in the incoming folder
    time.sleep(5)
    assert len(_flow_runs(project, "retrain")) == retrains_before


# -------------------------------------------------------------------------------------------------- C3
def test_c3_two_datasets_in_a_burst_queue_and_the_last_sees_all(stack: Project) -> None:
    project = stack
    drop = project.root / "drop"
    (drop / "notes.txt").write_text(_text("bravo"))  # F7: new content under an old name
    (drop / "more.txt").write_text(_text("charlie"))
    versions_before = _versions(project)
    retrains_before = len(_flow_runs(project, "retrain"))
    first = _ingest(project, str(drop / "notes.txt"))
    time.sleep(1.0)
    second = _ingest(project, str(drop / "more.txt"))
    outs = [_finish(first, timeout=180), _finish(second, timeout=180)]
    assert all(code == 0 and "1 new file(s)" in out and "emitted" in out for code, out in outs), outs
    final_fingerprint = _folder_fp(project)
    assert final_fingerprint in {_fingerprint_of(out) for _, out in outs}  # the ingest that came second saw both

    runs = _retrains_settled(project, retrains_before + 2)
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    spans = sorted((r.start_time, r.end_time) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"retrain runs overlapped: {spans}"

    new_versions = [v for v in _versions(project) if v not in versions_before]
    assert 1 <= len(new_versions) <= 2, new_versions
    last = next(r for r in _runs(project, "pipeline") if r.data.tags.get("model_version") == new_versions[-1])
    assert last.data.tags["forgeline.retrain_fingerprint"] == final_fingerprint
    text = _dataset_text(project, last.data.tags["data_fingerprint"])
    for tag in ("alpha", "bravo", "charlie"):  # C1's data, the overwritten file's new content, the other file
        assert f"{tag} paragraph" in text, tag


def _folder_fp(project: Project) -> str:
    from forgeline.flows.retrain import incoming_fingerprint

    return incoming_fingerprint(project.root / "data" / "incoming")


# -------------------------------------------------------------------------------------------------- C2
def test_c2_replayed_old_event_retrains_nothing(stack: Project) -> None:
    project = stack
    c1 = next(r for r in _runs(project, "pipeline") if r.data.tags.get("model_version") == "2")
    old = c1.data.tags["forgeline.retrain_fingerprint"]
    assert old != _folder_fp(project)  # newer data has been retrained since
    pipelines_before = len(_runs(project, "pipeline"))
    versions_before = _versions(project)
    retrains_before = len(_flow_runs(project, "retrain"))
    emit = (
        "from forgeline.flows.retrain import emit_dataset_updated; from forgeline.tasks.config import load_config; "
        f"assert emit_dataset_updated(load_config('configs/smoke.yaml'), {old!r}, 1)"
    )
    env = {**project.env, "PREFECT_API_URL": _api(project)}
    subprocess.run([sys.executable, "-c", emit], cwd=project.root, env=env, check=True, timeout=120)  # noqa: S603

    runs = _retrains_settled(project, retrains_before + 1, timeout=180)
    replay = runs[-1]
    assert replay.state.is_completed() and replay.parameters["fingerprint"] == old
    assert _logged(project, [replay], "already retrained")
    assert len(_runs(project, "pipeline")) == pipelines_before
    assert _versions(project) == versions_before


def test_zz_down_leaves_nothing(stack: Project) -> None:
    assert "worker-gpu" in stack.forgeline("down").stdout
    assert not (stack.home / "stack.json").exists()
    assert not Path(stack.root / "data" / ".incoming.partial").exists()
