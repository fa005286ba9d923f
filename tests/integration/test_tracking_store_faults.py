"""The tracking store under faults (RELIABILITY.md B1): a locked SQLite database, shorter and longer than the timeout.

Metrics are counted: a short lock delays them, a long one ends in a clear error naming the database, and
in neither case is a metric dropped silently.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forgeline.tasks.config import TrackingConfig
from forgeline.tasks.tracking import metrics
from forgeline.tasks.tracking import runs as tracking_runs
from forgeline.tasks.tracking import store as tracking_store

pytestmark = pytest.mark.integration

HOLDER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
con.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("ROLLBACK")
"""


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking_store.setup_tracking(TrackingConfig(), tmp_path)
    exp = tracking_store.ensure_experiment("locks", TrackingConfig(), tmp_path)
    with tracking_runs.stage_run(exp, "probe") as run_id:
        pass
    yield tmp_path / "mlruns" / "mlflow.db", run_id
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _history_count(run_id: str, key: str) -> int:
    return len(tracking_store.client().get_metric_history(run_id, key))


def test_short_lock_waits_and_every_metric_lands(store: tuple[Path, str]) -> None:
    db, run_id = store
    buffer = metrics.MetricBuffer(run_id, flush_every=1000)
    for step in range(1, 101):
        buffer.add(step, {"train/loss": 1.0 / step})
    holder = _hold_lock(db, 1.5)
    t0 = time.monotonic()
    buffer.close(timeout=60)
    holder.wait(timeout=30)
    assert time.monotonic() - t0 >= 1.0  # it waited for the lock rather than failing or dropping
    assert _history_count(run_id, "train/loss") == 100


@pytest.mark.slow  # waits out the 30 s close timeout behind a held lock
def test_long_lock_fails_loudly_naming_the_database(store: tuple[Path, str]) -> None:
    db, run_id = store
    buffer = metrics.MetricBuffer(run_id, flush_every=1000, max_retries=2)
    for step in range(1, 51):
        buffer.add(step, {"train/loss": 1.0 / step})
    holder = _hold_lock(db, 120)
    try:
        with pytest.raises(tracking_store.TrackingError) as info:
            buffer.close(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    message = str(info.value)
    assert "50 metrics could not be logged" in message
    assert str(db) in message
    assert "\n" not in message
    # Nothing was silently dropped: the same buffer delivers everything once the lock is gone.
    buffer.close(timeout=30)
    assert _history_count(run_id, "train/loss") == 50
    conn = sqlite3.connect(db)
    conn.close()


class _StubServer:
    """A tracking 'server' on 127.0.0.1 that answers 500, or never answers."""

    def __init__(self, mode: str) -> None:
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if mode == "hang":
                    time.sleep(30)
                    return
                self.send_response(500)
                self.end_headers()
                self.wfile.write(b"internal error")

            do_POST = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["500", "hang"])
def test_broken_tracking_server_fails_fast_with_a_clear_error(mode: str, tmp_path: Path) -> None:
    stub = _StubServer(mode)
    try:
        t0 = time.monotonic()
        with pytest.raises(tracking_store.TrackingError) as info:
            tracking_store.setup_tracking(TrackingConfig(uri=stub.url), tmp_path)
        elapsed = time.monotonic() - t0
    finally:
        stub.stop()
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert f"tracking server {stub.url} is not reachable" in str(info.value)
    assert "\n" not in str(info.value)
    assert elapsed < 15  # bounded: no hang
