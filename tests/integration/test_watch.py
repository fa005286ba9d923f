"""The ``watch`` flow on a real Prefect test server: complete files in, half-written ones left, bad ones set aside.

And the watcher's lifecycle (issue 14.5): ``forgeline deploy`` leaves exactly one watch flow run, however many
intervals pass, replaces it on the next deploy, and the deployment's trigger brings back a crashed one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from forgeline.tasks.config import load_config
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

TEXT = "\n\n".join(f"Paragraph {i}: the watch takes files that are complete and leaves the rest." for i in range(20))


def _events(fingerprint: str, timeout: float = 30.0) -> list:
    """``forgeline.dataset.updated`` events with this fingerprint, once the server has stored them."""
    from prefect import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    from forgeline.flows.contract import EVENT

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), limit=50)
        found = [e for e in page.events if e.payload.get("fingerprint") == fingerprint]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_watch_ingests_complete_files_only(
    project: Project, prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeline.flows.watch import REJECTED, watch_flow

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)  # emit_dataset_updated emits only to a server
    config = load_config("smoke.yaml", ["deploy.watch_settle=1.0"])
    drop = project.root / "data" / "drop"
    (drop / "nested").mkdir(parents=True)
    (drop / "a.txt").write_text(TEXT)
    (drop / "nested" / "same.txt").write_text(TEXT)  # same content and type: added once
    (drop / "empty.txt").write_text("  \n")
    (drop / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (drop / "copying.txt.part").write_text(TEXT + " more")  # an in-progress name: never taken
    (drop / ".hidden.txt").write_text(TEXT + " hidden")
    growing = drop / "growing.txt"
    growing.write_text("start\n")
    stop = threading.Event()

    def write_slowly() -> None:
        with open(growing, "a", encoding="utf-8") as fh:
            while not stop.is_set():
                fh.write("another line of a file that is still being copied\n")
                fh.flush()
                os.fsync(fh.fileno())
                time.sleep(0.1)

    writer = threading.Thread(target=write_slowly, daemon=True)
    writer.start()
    try:
        first = watch_flow(config, looks=1)
    finally:
        stop.set()
        writer.join()

    incoming = project.root / "data" / "incoming"
    assert len(first.added) == 1 and len(first.duplicates) == 1, first
    assert [p.read_text() for p in incoming.iterdir() if p.is_file()] == [TEXT]
    assert set(first.rejected) == {"empty.txt", "latin1.txt"}
    assert "empty file" in first.rejected["empty.txt"] and "UTF-8" in first.rejected["latin1.txt"]
    assert (drop / REJECTED / "latin1.txt").exists()
    assert "UTF-8" in (drop / REJECTED / "latin1.txt.reason.txt").read_text()
    assert first.waiting == ["growing.txt"]
    assert sorted(p.name for p in drop.rglob("*") if p.is_file() and REJECTED not in p.parts) == [
        ".hidden.txt",
        "copying.txt.part",
        "growing.txt",
    ]
    assert first.emitted
    (event,) = _events(first.fingerprint)
    assert event.resource.id == "forgeline.dataset.forgeline-smoke"
    assert event.payload["files"] == 1

    written = growing.read_text()
    second = watch_flow(config, looks=1)  # the writer is done: the file is complete now
    assert len(second.added) == 1 and second.emitted and second.fingerprint != first.fingerprint
    assert not growing.exists()
    assert sorted(p.read_text() for p in incoming.iterdir() if p.is_file()) == sorted([TEXT, written])
    assert len(_events(second.fingerprint)) == 1

    third = watch_flow(config, looks=1)  # nothing new: no event
    assert (third.added, third.rejected, third.emitted) == ([], {}, False)
    assert third.fingerprint == second.fingerprint


def test_watch_without_drop_folder_does_nothing(project: Project) -> None:
    from forgeline.flows.watch import scan_drop_folder

    result = scan_drop_folder(load_config("smoke.yaml"), base_dir=project.root)
    assert (result.added, result.waiting, result.fingerprint) == ([], [], "")
    assert not (project.root / "data").exists()


def test_watcher_keeps_looking_in_one_run(
    project: Project, prefect_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One flow run looks again and again: a file dropped between looks is taken by the same run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from forgeline.flows.watch import watch_flow

    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    config = load_config("smoke.yaml", ["deploy.watch_settle=0.2", "deploy.watch_interval=1", "name=watch-loop"])
    drop = project.root / "data" / "drop"
    drop.mkdir(parents=True)

    def drop_later() -> None:
        time.sleep(1.5)
        (drop / "late.txt").write_text(TEXT)

    dropper = threading.Thread(target=drop_later)
    dropper.start()
    t0 = time.monotonic()
    result = watch_flow(config, looks=4)
    dropper.join()
    assert time.monotonic() - t0 >= 3.0  # three intervals between four looks
    assert len(result.added) == 1 and result.emitted and not (drop / "late.txt").exists()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["watch"])))
    assert len([r for r in runs if r.name == "watch watch-loop"]) == 1  # the looks are no runs of their own


def _watch_runs(earlier: frozenset = frozenset()) -> list:
    """The ``watch/watch`` deployment's flow runs, leaving out ``earlier`` ones (other tests share the server)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name("watch/watch")
        except ObjectNotFound:
            return []
        flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]))
        runs = client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    return [r for r in runs if r.id not in earlier]


def _active(runs: list) -> list:
    return [r for r in runs if r.state and not r.state.is_final()]


def test_deploy_leaves_one_watch_run_and_a_crashed_one_comes_back(project: Project, prefect_server: str) -> None:
    """Issue 14.5: a 2 s watch interval used to schedule a run every 2 s; now one run, however long we wait."""
    from prefect import get_client
    from prefect.states import Crashed

    from forgeline.flows.deploy import deploy_all

    repo = Path(__file__).resolve().parents[2]
    config = load_config("smoke.yaml", ["deploy.watch_interval=2"])
    earlier = frozenset(r.id for r in _watch_runs())  # runs other tests' deploys left on the session's server
    lines = deploy_all(config, source=repo)
    assert any(line.startswith("watcher flow run ") for line in lines), lines
    time.sleep(4)  # two intervals (the flood itself needs the scheduler of a real server: tests/e2e/test_watch.py)
    runs = _watch_runs(earlier)
    assert len(runs) == 1, [(r.name, r.state_name, r.created) for r in runs]  # no worker here: it waits Scheduled
    (first,) = runs
    assert first.parameters["config"]["deploy"]["watch_interval"] == 2

    lines = deploy_all(config, source=repo)  # a redeploy replaces the watcher (new config, new code)
    assert "1 earlier watcher run(s) cancelled" in lines[-1], lines
    runs = _watch_runs(earlier)
    assert len(runs) == 2 and len(_active(runs)) == 1
    assert next(r for r in runs if r.id == first.id).state.is_cancelled()

    (current,) = _active(runs)
    with get_client(sync_client=True) as client:  # what the heartbeat automation does to a dead watcher
        client.set_flow_run_state(current.id, Crashed(message="test: the machine died"), force=True)
    deadline = time.monotonic() + 60
    while len(runs := _watch_runs(earlier)) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(runs) == 3, [(r.name, r.state_name) for r in runs]
    (restarted,) = _active(runs)
    assert restarted.id not in (first.id, current.id) and restarted.state.is_scheduled()
    time.sleep(3)
    assert len(_watch_runs(earlier)) == 3  # restarted once, not again and again

    lines = deploy_all(
        config.model_copy(update={"deploy": config.deploy.model_copy(update={"watch_interval": None})}), source=repo
    )
    assert lines[-1].startswith("watch: off") and not _active(_watch_runs(earlier))
