"""A tracking server that goes down mid-training (RELIABILITY.md B3, issue 7 must 4).

A real ``mlflow server`` on 127.0.0.1 is stopped while the training loop is held at step 20 (fault kind
``pause_metrics``), and either restarted within the retry budget (logging resumes, every metric lands in
the train run) or left down past it (checkpoints kept, one loud error line, undelivered metrics spooled;
the rerun delivers them and registers exactly one version). Metrics are counted in every case.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CLI_TIMEOUT, CliResult, Project
from tests.integration.test_tracking_store_faults import HOLDER

pytestmark = pytest.mark.integration

PAUSE_STEP = 20
MAX_STEPS = 40  # smoke.yaml
# Per-step metric keys and how many steps carry each (smoke.yaml: log every 5 steps, eval every 10).
EXPECTED_COUNTS = {"train/loss": 40, "lr": 40, "grad_norm": 40, "tokens_per_sec": 8, "val/loss": 4}
SERVER_START_TIMEOUT = 120


class MlflowServer:
    """``mlflow server`` on a fixed loopback port and SQLite file, so it can be stopped and started again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        log = (self.root / f"server-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share the group, so stop() ends them all
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        # Workers of the group may outlive the parent for a moment; the port must be free (and refusing).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        logs = sorted(self.root.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-3000:] if logs else ""

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path / "server")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _start_cli(project: Project, server: MlflowServer, extra_env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "forgeline", "run", "--config", "smoke.yaml", "--set", f"tracking.uri={server.url}"],
        cwd=project.root,
        env={**project.env, **extra_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], t0: float) -> CliResult:
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT + 300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return CliResult(proc.returncode, out, err, time.monotonic() - t0)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = CLI_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before step {PAUSE_STEP}: exit {proc.returncode}\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"training did not reach step {PAUSE_STEP} within {timeout}s")
        time.sleep(0.1)


def _train_runs(client: Any) -> list[Any]:
    exp = client.get_experiment_by_name("forgeline-smoke")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if r.info.run_name == "train"]


def _counts(client: Any, run_id: str) -> dict[str, int]:
    return {key: len(client.get_metric_history(run_id, key)) for key in EXPECTED_COUNTS}


def _stop_at_pause(project: Project, server: MlflowServer, extra_env: dict[str, str]) -> tuple[Any, int, float]:
    """Start a run, stop the server while training is held at PAUSE_STEP, release the loop.

    Returns:
        The CLI process, how many ``train/loss`` values the server held when it was stopped, and the start time.
    """
    release = project.root / "release-training"
    env = {
        "FORGELINE_FAULT_KIND": "pause_metrics",
        "FORGELINE_FAULT_AT_STEP": str(PAUSE_STEP),
        "FORGELINE_FAULT_FILE": str(release),
        **extra_env,
    }
    t0 = time.monotonic()
    proc = _start_cli(project, server, env)
    _wait_for(Path(f"{release}.reached"), proc)
    (train,) = _train_runs(server.client())
    before = len(server.client().get_metric_history(train.info.run_id, "train/loss"))
    server.stop()
    release.touch()
    return proc, before, t0


@pytest.mark.slow  # an mlflow server started twice and a pipeline run held at a step
def test_server_back_within_the_budget_resumes_logging_and_loses_nothing(
    project: Project, server: MlflowServer
) -> None:
    proc, before, t0 = _stop_at_pause(project, server, {})
    time.sleep(8)  # training runs to its end meanwhile; its metrics have nowhere to go
    server.start()
    result = _finish(proc, t0)
    assert result.returncode == 0, result.describe()
    assert before <= PAUSE_STEP  # steps after the pause could only arrive after the restart
    client = server.client()
    (train,) = _train_runs(client)
    assert train.info.status == "FINISHED"
    assert _counts(client, train.info.run_id) == EXPECTED_COUNTS
    steps = sorted(m.step for m in client.get_metric_history(train.info.run_id, "train/loss"))
    assert steps == list(range(1, MAX_STEPS + 1))
    assert [str(v.version) for v in client.search_model_versions("name = 'forgeline-smoke-lm'")] == ["1"]


@pytest.mark.slow  # the retry budget runs out, then a server restart and a second run
def test_server_down_past_the_budget_fails_loudly_keeps_checkpoints_and_rerun_fills_the_gap(
    project: Project, server: MlflowServer
) -> None:
    proc, _, t0 = _stop_at_pause(project, server, {"FORGELINE_METRIC_RETRY_SECONDS": "10"})
    result = _finish(proc, t0)  # the server stays down
    assert result.returncode == 1, result.describe()
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.describe()
    message = error_lines[0]
    assert "metrics could not be logged to run" in message
    assert server.url in message
    assert "kept in" in message and "delivered at the next start" in message
    # Training itself went on: its final checkpoint is on disk.
    (ckpt_dir,) = (project.root / "mlruns" / "checkpoints" / "forgeline-smoke").glob("*/checkpoints")
    assert (ckpt_dir / f"ckpt-{MAX_STEPS:08d}.ok").exists()
    spools = list((project.root / ".forgeline" / "spool").glob("*/*.jsonl"))
    assert len(spools) == 1
    spooled = len(spools[0].read_text().splitlines())
    assert spooled > 0

    server.start()
    client = server.client()
    (failed,) = _train_runs(client)
    assert failed.info.run_id == spools[0].stem
    delivered_before = sum(_counts(client, failed.info.run_id).values())
    assert delivered_before + spooled >= sum(EXPECTED_COUNTS.values())  # nothing was dropped, only spooled

    rerun = project.run_pipeline("--set", f"tracking.uri={server.url}")
    assert rerun.returncode == 0, rerun.describe()
    first, second = _train_runs(client)
    assert first.info.run_id == failed.info.run_id
    # The rerun delivered the spool into the run that produced the metrics: every step is there.
    assert _counts(client, first.info.run_id) == EXPECTED_COUNTS
    assert client.get_run(first.info.run_id).info.status == "KILLED"  # its owner is gone: reaped
    assert not spools[0].exists()
    assert second.data.tags.get("forgeline.already_done") == "true"  # resumed from the kept checkpoint
    assert [str(v.version) for v in client.search_model_versions("name = 'forgeline-smoke-lm'")] == ["1"]


# ------------------------------------------------------------- the spool, on a store held by a lock


def test_metrics_undelivered_past_the_budget_are_spooled_then_delivered_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeline.tasks.config import TrackingConfig
    from forgeline.tasks.tracking import metrics, store
    from forgeline.tasks.tracking import runs as tracking_runs
    from forgeline.tasks.tracking import spool as tracking_spool

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        store.setup_tracking(TrackingConfig(), tmp_path)
        exp = store.ensure_experiment("spool", TrackingConfig(), tmp_path)
        with tracking_runs.stage_run(exp, "probe") as run_id:
            pass
        buffer = metrics.MetricBuffer(run_id, flush_every=1000, retry_seconds=4)
        for step in range(1, 61):
            buffer.add(step, {"train/loss": 1.0 / step})
        db = tmp_path / "mlruns" / "mlflow.db"
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), "120"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        try:
            with pytest.raises(store.TrackingError) as info:
                buffer.close()
        finally:
            holder.kill()
            holder.wait()
        spool = tmp_path / "mlruns" / "spool" / f"{run_id}.jsonl"
        assert f"60 metrics could not be logged to run {run_id}" in str(info.value)
        assert f"kept in {spool}" in str(info.value)
        assert len(spool.read_text().splitlines()) == 60
        assert store.client().get_metric_history(run_id, "train/loss") == []

        # The next start (reap_orphan_runs runs first thing in every pipeline) delivers the spool.
        assert tracking_runs.reap_orphan_runs(exp) == []
        history = store.client().get_metric_history(run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(1, 61))
        assert not spool.exists()
        assert tracking_spool.deliver_spooled_metrics() == 0  # delivered once, not again
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
