"""The watcher on a real stack (issue 14.5, reliability rows F7 and F8 through the watch).

``forgeline up`` + ``deploy`` with a 2 s ``deploy.watch_interval``: the ``watch`` deployment used to schedule a
flow run per interval (the server's scheduler fills the run list ahead of time); now there is one long-lived
watch flow run, Running on the cpu worker, however many intervals pass. A file dropped into the folder (written
slowly, so the watcher sees it half-way first) triggers exactly one retrain, trained on the whole file; the same
content under a new name triggers none; the watcher logs only what happened. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.e2e.conftest import Project, prefect_client

pytestmark = pytest.mark.e2e

SMOKE = ["--config", "configs/smoke.yaml"]
SETS = [
    *("--set", "deploy.allow_cpu_fallback=true", "--set", "deploy.watch_interval=2"),
    *("--set", "deploy.watch_settle=1"),
]
TEXT = "\n\n".join(f"Watched paragraph {i}: the watcher takes this file once it is whole." for i in range(60))


def _api(project: Project) -> str:
    return f"http://127.0.0.1:{project.prefect_port}/api"


def _runs(project: Project, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(_api(project)) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(1.0)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _logs(project: Project, flow_run_id: Any) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_client(_api(project)) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_one_watch_run_one_retrain_per_new_content(project: Project) -> None:
    project.forgeline("up", "--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port))
    deployed = project.forgeline("deploy", *SMOKE, *SETS).stdout
    assert "watcher flow run watch forgeline-smoke" in deployed and "every 2 s" in deployed, deployed

    (watcher,) = _wait("the watcher Running", lambda: [r for r in _runs(project, "watch") if r.state.is_running()], 120)
    time.sleep(20)  # ten intervals, four passes of the server's scheduler over a recently changed deployment
    runs = _runs(project, "watch")
    assert [(r.id, r.state_name) for r in runs] == [(watcher.id, "Running")]  # one run, not one per interval

    drop = project.root / "data" / "drop"
    drop.mkdir(parents=True, exist_ok=True)
    target = drop / "notes.txt"
    paragraphs = TEXT.split("\n\n")

    def write_slowly() -> None:  # F8: still being written across several looks
        with open(target, "w", encoding="utf-8") as fh:
            for i, paragraph in enumerate(paragraphs):
                fh.write(("\n\n" if i else "") + paragraph)
                fh.flush()
                time.sleep(0.15)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    writer.join()
    (retrain,) = _wait("a retrain flow run", lambda: _runs(project, "retrain"), 120)
    done = _wait("the retrain finished", lambda: [r for r in _runs(project, "retrain") if r.state.is_final()], 400)
    assert [r.state_name for r in done] == ["Completed"], [(r.state_name, r.state.message) for r in done]
    incoming = project.root / "data" / "incoming"
    assert [p.read_text() for p in incoming.iterdir() if p.is_file()] == [TEXT]  # taken whole, once
    assert not target.exists()

    (drop / "renamed.txt").write_text(TEXT)  # F7: the same content under a new name is not new
    _wait("the duplicate taken away", lambda: not (drop / "renamed.txt").exists(), 60)
    time.sleep(6)  # three more intervals
    assert [r.id for r in _runs(project, "retrain")] == [retrain.id]
    assert [(r.id, r.state_name) for r in _runs(project, "watch")] == [(watcher.id, "Running")]

    said = _logs(project, watcher.id)  # some 60 looks so far: a line per event, not per look
    assert any("1 new file(s); emitted forgeline.dataset.updated" in m for m in said), "\n".join(said)
    assert any("still being written, left for a later look: notes.txt" in m for m in said), "\n".join(said)
    assert len(said) < 15, "\n".join(said)

    project.forgeline("down")
