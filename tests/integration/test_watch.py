"""The ``watch`` flow on a real Prefect test server: complete files in, half-written ones left, bad ones set aside."""

from __future__ import annotations

import os
import threading
import time

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
        first = watch_flow(config)
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
    second = watch_flow(config)  # the writer is done: the file is complete now
    assert len(second.added) == 1 and second.emitted and second.fingerprint != first.fingerprint
    assert not growing.exists()
    assert sorted(p.read_text() for p in incoming.iterdir() if p.is_file()) == sorted([TEXT, written])
    assert len(_events(second.fingerprint)) == 1

    third = watch_flow(config)  # nothing new: no event
    assert (third.added, third.rejected, third.emitted) == ([], {}, False)
    assert third.fingerprint == second.fingerprint


def test_watch_without_drop_folder_does_nothing(project: Project) -> None:
    from forgeline.flows.watch import scan_drop_folder

    result = scan_drop_folder(load_config("smoke.yaml"), base_dir=project.root)
    assert (result.added, result.waiting, result.fingerprint) == ([], [], "")
    assert not (project.root / "data").exists()
