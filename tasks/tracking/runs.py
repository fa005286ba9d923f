"""The one module that talks to MLflow tracking. Stage logic never imports mlflow.

Runs are created and ended explicitly through ``MlflowClient`` (not the fluent active-run stack), so
a stage run's status is exactly what happened to the stage: FINISHED, FAILED on an exception, KILLED
on an interrupt, and never left RUNNING by a crash for longer than the next pipeline start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgeline.tasks.config import PipelineConfig, TrackingConfig, dump_config, flatten, is_secret_key, redact
from forgeline.tasks.errors import StageInterrupted
from forgeline.tasks.locks import acquire_within

logger = logging.getLogger(__name__)

PROJECT_TAG = "forgeline.project"
OWNER_TAG = "forgeline.owner"  # host:pid of the process that owns a RUNNING run
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


class TrackingError(RuntimeError):
    """Tracking is misconfigured or unreachable; the message is one line."""


# ------------------------------------------------------------------------------------------ setup
def resolve_tracking_uri(cfg: TrackingConfig, base_dir: Path | None = None) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then SQLite under ``mlruns/``.

    Raises:
        TrackingError: for the deprecated plain-folder store.
    """
    base = (base_dir or Path.cwd()).resolve()
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlruns' / 'mlflow.db'}"
    if uri.startswith("file:") or (
        not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks"))
    ):
        raise TrackingError(
            f"tracking URI {uri!r}: plain-folder stores are not supported; use sqlite:///PATH/mlflow.db or http://HOST:PORT"
        )
    return uri


def artifact_location(cfg: TrackingConfig, uri: str, base_dir: Path | None = None) -> str | None:
    """Artifact root for new experiments on a database store (a server chooses its own)."""
    if uri.startswith(("http:", "https:")):
        return None
    root = Path(cfg.artifact_root)
    if not root.is_absolute():
        root = (base_dir or Path.cwd()).resolve() / root
    return root.as_uri()


def setup_tracking(cfg: TrackingConfig, base_dir: Path | None = None) -> str:
    """Point MLflow at the configured store and check it answers. Returns the tracking URI."""
    import mlflow

    uri = resolve_tracking_uri(cfg, base_dir)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (trials, workers) follow the same store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith(("http:", "https:")):
        _check_server(uri)
    elif uri.startswith("sqlite:///"):
        _open_sqlite_store(uri)
    return uri


def _open_sqlite_store(uri: str, timeout: float = 300.0) -> None:
    # MLflow creates and migrates a new SQLite database without a lock, so two processes starting on a
    # fresh mlruns/ race through the migrations and one crashes ("duplicate column name", "Online
    # migration expected to match one row"; RELIABILITY.md B2). The first open of the store in each
    # process happens under a host-wide file lock; later opens hit MLflow's per-process store cache.
    import fcntl

    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    lock_path = db.parent / "locks" / "store-init.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as fh:
        if not acquire_within(fh, timeout):
            raise TrackingError(f"store {db}: another process held {lock_path} for over {timeout:.0f}s")
        try:
            c = MlflowClient(tracking_uri=uri, registry_uri=uri)
            c.search_experiments(max_results=1)
            c.search_registered_models(max_results=1)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_server(uri: str, timeout: float = 5) -> None:
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except OSError as exc:
        raise TrackingError(f"tracking server {uri} is not reachable ({exc})") from None


def client() -> Any:
    """An ``MlflowClient`` for the current tracking URI."""
    from mlflow import MlflowClient

    return MlflowClient()


def ensure_experiment(name: str, cfg: TrackingConfig, base_dir: Path | None = None) -> str:
    """Get or create the experiment called ``name``; safe when two processes race to create it."""
    from mlflow.exceptions import MlflowException

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location(cfg, c._tracking_client.tracking_uri, base_dir)
    try:
        return c.create_experiment(name, artifact_location=location, tags={PROJECT_TAG: "forgeline"})
    except MlflowException:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ------------------------------------------------------------------------------------------- tags
def git_tags(base_dir: Path | None = None) -> dict[str, str]:
    """Git commit and dirty flag of the code that runs (empty outside a repository)."""
    cwd = str(base_dir or Path.cwd())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        "mlflow.source.git.commit": commit,
        "forgeline.git_commit": commit,
        "forgeline.git_dirty": str(bool(dirty)).lower(),
    }


def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run's id and UI URL, when there is one."""
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
        if not run_id:
            return {}
        tags = {"prefect.flow_run_id": str(run_id)}
        url = flow_run.ui_url
        if url and str(url).startswith("http"):
            tags["prefect.flow_run_url"] = str(url)
        return tags
    except Exception:  # noqa: BLE001 - tags are best effort; outside Prefect there is simply none
        return {}


def owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------------------- runs
@contextlib.contextmanager
def stage_run(
    experiment_id: str,
    name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[str]:
    """Create a run, yield its id, and end it with the status of what happened inside.

    FINISHED on success, KILLED on ``StageInterrupted``/``KeyboardInterrupt``, FAILED otherwise (the
    error is recorded as the ``forgeline.error`` tag).
    """
    c = client()
    all_tags = {PROJECT_TAG: "forgeline", OWNER_TAG: owner_tag(), RUN_NAME_TAG: name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(experiment_id, run_name=name, tags=all_tags)
    run_id = run.info.run_id
    monitor = _start_system_metrics(run_id) if system_metrics else None
    status = "FAILED"
    answers = True
    try:
        yield run_id
        status = "FINISHED"
    except (StageInterrupted, KeyboardInterrupt):
        status = "KILLED"
        answers = _store_answers(run_id)
        raise
    except BaseException as exc:
        answers = _store_answers(run_id)
        if answers:
            with contextlib.suppress(Exception):
                c.set_tag(run_id, "forgeline.error", f"{type(exc).__name__}: {exc}"[:4000])
        raise
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        if answers:
            with contextlib.suppress(Exception):
                c.set_terminated(run_id, status)


def _store_answers(run_id: str) -> bool:
    # On the way out of a failed stage, a tracking server that is down would hold every cleanup call in
    # MLflow's own HTTP retries for minutes. Ask its health endpoint once instead; a run left RUNNING
    # is ended KILLED by reap_orphan_runs at the next start.
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http:", "https:")):
        return True
    try:
        _check_server(uri, timeout=3)
    except TrackingError:
        logger.warning("tracking server %s is not answering: run %s stays RUNNING until the next start", uri, run_id)
        return False
    return True


def _start_system_metrics(run_id: str) -> Any:
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - system metrics are optional (psutil missing, etc.)
        logger.warning("system metrics disabled: %s", exc)
        return None


def reap_orphan_runs(experiment_id: str) -> list[str]:
    """End KILLED every RUNNING run of this project whose owning process on this host is gone.

    Metrics that an earlier process could not deliver (:func:`deliver_spooled_metrics`) are sent first.

    Returns:
        The ids of the runs that were ended.
    """
    import psutil

    deliver_spooled_metrics()
    c = client()
    host = socket.gethostname()
    reaped: list[str] = []
    runs = c.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{PROJECT_TAG}` = 'forgeline'",
        max_results=1000,
    )
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG, "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or psutil.pid_exists(int(pid)):
            continue
        c.set_tag(run.info.run_id, "forgeline.reaped", "owner process gone")
        c.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
    if reaped:
        logger.warning("ended %d orphaned RUNNING MLflow run(s) as KILLED: %s", len(reaped), ", ".join(reaped))
    return reaped


# ----------------------------------------------------------------------------------------- logging
def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log flat params (values truncated to MLflow's limit; secrets redacted)."""
    from mlflow.entities import Param

    items = [Param(k, "***" if is_secret_key(k) else str(v)[:6000]) for k, v in params.items() if v is not None]
    c = client()
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_config(run_id: str, cfg: PipelineConfig) -> None:
    """Flattened resolved config as params, and ``resolved_config.yaml`` as an artifact."""
    log_params(run_id, flatten(redact(cfg.model_dump(mode="json"))))
    log_text(run_id, dump_config(cfg), "resolved_config.yaml")


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        c.set_tag(run_id, key, "***" if is_secret_key(key) else text)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log a few metrics at once (one request)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    client().log_batch(run_id, metrics=batch)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


def log_dict(run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    client().log_text(run_id, json.dumps(redact(data), indent=2, default=str), artifact_file)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_path)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    client().log_figure(run_id, figure, artifact_file)


def log_dataset_input(
    run_id: str, *, name: str, digest: str, source: str, context: str, profile: dict[str, Any]
) -> None:
    """Record a cleaned split as an MLflow dataset input of ``run_id`` with its fingerprint as digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name,
        digest=digest[:36],
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps(profile),
    )
    client().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


RETRY_SECONDS_ENV = "FORGELINE_METRIC_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
"""How long ``MetricBuffer.close`` keeps retrying undelivered metrics (a tracking server restart fits)."""


class MetricBuffer:
    """Per-step metrics, sent as one ``log_batch`` every ``flush_every`` steps on a background thread.

    The training loop only appends to a list; the network or SQLite write happens off the loop, so an
    unreachable store never stalls training (checkpoints keep being written). A failed send is retried
    on the next flush (the metrics stay queued). ``close`` keeps retrying for ``retry_seconds``; what is
    still undelivered then is written to a spool file (:func:`spool_dir`) and ``close`` raises
    ``TrackingError``, so nothing is dropped silently: the next pipeline start delivers the spool to the
    same run (:func:`deliver_spooled_metrics`).

    Args:
        run_id: The run the metrics belong to.
        flush_every: Steps between background sends.
        max_retries: Sends ``close`` attempts at most; ``None``: as many as fit in its time budget.
        retry_seconds: ``close``'s time budget; default ``$FORGELINE_METRIC_RETRY_SECONDS`` or
            ``DEFAULT_RETRY_SECONDS``.
    """

    def __init__(
        self,
        run_id: str,
        flush_every: int = 50,
        max_retries: int | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        self.run_id = run_id
        self.flush_every = flush_every
        self.max_retries = max_retries
        self.retry_seconds = retry_seconds if retry_seconds is not None else _default_retry_seconds()
        self._pending: list[Any] = []
        self._inflight: list[Any] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._steps = 0
        self.sent = 0
        self.failures = 0
        self._last_error: BaseException | None = None

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Queue metrics for ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._steps += 1
        if self._steps % self.flush_every == 0:
            self._flush_async()
        _pause_fault(step)

    def _flush_async(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # the previous batch is still on its way; this one rides the next flush
        self._thread = threading.Thread(target=self._send, name="forgeline-metrics", daemon=True)
        self._thread.start()

    def _send(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._inflight = batch
        done = 0
        try:
            c = client()
            for start in range(0, len(batch), 1000):
                chunk = batch[start : start + 1000]
                c.log_batch(self.run_id, metrics=chunk)
                done = start + len(chunk)
                self.sent += len(chunk)
        except Exception as exc:  # noqa: BLE001 - re-queued and retried; close() raises if it persists
            self.failures += 1
            self._last_error = exc
            with self._lock:
                self._pending[:0] = batch[done:]
                self._inflight = []
                queued = len(self._pending)
            logger.warning("metric upload failed (%s); %d metrics queued for retry", _first_line(exc), queued)
        else:
            with self._lock:
                self._inflight = []

    def close(self, timeout: float | None = None) -> None:
        """Send everything still queued, retrying for ``timeout`` seconds (default ``retry_seconds``).

        Raises:
            TrackingError: metrics are still undelivered at the end; they are kept in memory (a later
                ``close`` may deliver them) and in the spool file the message names.
        """
        deadline = time.monotonic() + (self.retry_seconds if timeout is None else timeout)
        attempt = 0
        while True:
            thread = self._thread
            if thread is not None and thread.is_alive():
                # A send may sit in the MLflow client's own HTTP retries; wait for it within the budget.
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    break
            with self._lock:
                remaining = len(self._pending)
            if remaining == 0:
                if self.failures:
                    logger.info("metrics of run %s delivered after %d failed upload(s)", self.run_id, self.failures)
                _remove_spool(self.run_id)
                return
            if (self.max_retries is not None and attempt >= self.max_retries) or time.monotonic() >= deadline:
                break
            if attempt:
                time.sleep(max(0.0, min(2**attempt, 10, deadline - time.monotonic())))
            self._thread = threading.Thread(target=self._send, name="forgeline-metrics", daemon=True)
            self._thread.start()
            attempt += 1
        with self._lock:
            undelivered = [*self._inflight, *self._pending]
        try:
            where = str(_spool_metrics(self.run_id, undelivered))
        except OSError as exc:  # a full or read-only disk must not hide the tracking error itself
            where = f"memory only (spool not written: {exc})"
        cause = _first_line(self._last_error) if self._last_error else "the last upload did not return in time"
        raise TrackingError(
            f"{len(undelivered)} metrics could not be logged to run {self.run_id} at {_tracking_uri_shown()}: "
            f"{cause}; kept in {where}, delivered at the next start"
        )


def _default_retry_seconds() -> float:
    raw = os.environ.get(RETRY_SECONDS_ENV)
    try:
        return float(raw) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        logger.warning("%s=%r is not a number; using %.0f s", RETRY_SECONDS_ENV, raw, DEFAULT_RETRY_SECONDS)
        return DEFAULT_RETRY_SECONDS


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _pause_fault(step: int) -> None:
    # Test-only fault injection (RELIABILITY.md B3): FORGELINE_FAULT_KIND=pause_metrics holds the training
    # loop after queueing step FORGELINE_FAULT_AT_STEP until the file FORGELINE_FAULT_FILE exists (it
    # writes FILE.reached first), so a test can stop the tracking server at a known step.
    if os.environ.get("FORGELINE_FAULT_KIND") != "pause_metrics" or os.environ.get("FORGELINE_FAULT_AT_STEP") != str(
        step
    ):
        return
    release = Path(os.environ["FORGELINE_FAULT_FILE"])
    Path(f"{release}.reached").write_text(str(step))
    deadline = time.monotonic() + 600
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


# ------------------------------------------------------------------------------------ metric spool
def spool_dir(tracking_uri: str | None = None) -> Path:
    """Where undelivered metrics wait for the next start: one ``RUN_ID.jsonl`` per run.

    Next to the database for SQLite (``mlruns/spool``); for a server, under ``$FORGELINE_HOME``
    (default ``.forgeline`` in the working directory), one folder per server URI.
    """
    import hashlib

    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "spool"
    home = Path(os.environ.get("FORGELINE_HOME", ".forgeline")).resolve()
    return home / "spool" / hashlib.sha256(uri.encode()).hexdigest()[:12]


def _spool_metrics(run_id: str, metrics: list[Any]) -> Path:
    path = spool_dir() / f"{run_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for m in metrics:
            fh.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
    tmp.replace(path)
    return path


def _remove_spool(run_id: str) -> None:
    with contextlib.suppress(Exception):
        (spool_dir() / f"{run_id}.jsonl").unlink(missing_ok=True)


def deliver_spooled_metrics() -> int:
    """Send the metrics earlier processes could not deliver to their runs, and drop each delivered spool.

    A spool that still cannot be delivered stays for the next start (a warning says why).

    Returns:
        How many metrics were delivered.
    """
    from mlflow.entities import Metric

    folder = spool_dir()
    if not folder.is_dir():
        return 0
    delivered = 0
    c = client()
    for path in sorted(folder.glob("*.jsonl")):
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            batch = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]
            for start in range(0, len(batch), 1000):
                c.log_batch(path.stem, metrics=batch[start : start + 1000])
        except Exception as exc:  # noqa: BLE001 - kept for the next start; the warning says why
            logger.warning("spooled metrics %s not delivered yet: %s", path, _first_line(exc))
            continue
        path.unlink(missing_ok=True)
        delivered += len(batch)
        logger.info("delivered %d spooled metrics to run %s", len(batch), path.stem)
    return delivered


LOCAL_UI = "http://127.0.0.1:5000"


def ui_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of a run: the server itself, or the local UI's default address for a database store."""
    return f"{ui_base_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_base_url(tracking_uri: str) -> str:
    """Where the MLflow UI for ``tracking_uri`` is (``forgeline ui`` serves a database store on LOCAL_UI)."""
    return (tracking_uri if tracking_uri.startswith("http") else LOCAL_UI).rstrip("/")


def _tracking_uri_shown() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


# ---------------------------------------------------------------------------------------- figures
def loss_curve_figure(history: list[dict[str, float]]) -> Any:
    """Train and validation loss against step and, when entries carry ``time``, against wall time.

    Args:
        history: ``TrainResult.history``: dicts with ``step``, ``train/loss`` or ``val/loss``, and
            ``time`` (seconds since the training loop started; older histories lack it).

    Returns:
        A matplotlib figure: one panel (step) or two (step, wall time).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any("time" in h for h in history)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4), dpi=110, squeeze=False)
    # Fixed margins instead of tight_layout, which measures every label (0.1 s on each run's chart).
    fig.subplots_adjust(left=0.07 if timed else 0.11, right=0.98, bottom=0.13, top=0.91, wspace=0.2)
    panels = [("step", "step")] + ([("time", "wall time (s since training started)")] if timed else [])
    for ax, (x_key, x_label) in zip(axes[0], panels, strict=True):
        for key, style in (
            ("train/loss", {"linewidth": 1, "alpha": 0.8}),
            ("val/loss", {"marker": "o", "linewidth": 1.5}),
        ):
            points = [(h[x_key], h[key]) for h in history if key in h and x_key in h]
            if points:
                ax.plot(*zip(*points, strict=True), label=key, **style)
        ax.set_xlabel(x_label)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"Loss against {x_key if x_key == 'step' else 'wall time'}")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def cleaning_report_figure(dropped: dict[str, int], rows_per_split: dict[str, int], rows_in: int | None = None) -> Any:
    """Bar charts of the cleaning report: records dropped per rule, and records per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    rules = list(dropped) or ["(none)"]
    counts = [dropped.get(r, 0) for r in rules]
    bars = left.barh(rules, counts, color="#c0504d")
    left.bar_label(bars, padding=2, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("records dropped")
    left.set_title("Dropped per rule" + (f" ({rows_in:,} read)" if rows_in is not None else ""))
    splits = list(rows_per_split)
    bars = right.bar(splits, [rows_per_split[s] for s in splits], color="#4f81bd")
    right.bar_label(bars, padding=2, fontsize=8)
    right.set_ylabel("records")
    right.set_title("Records per split")
    for ax in (left, right):
        ax.grid(axis="x" if ax is left else "y", alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- finished runs, lookups
def record_run(
    experiment_id: str,
    name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    metrics: list[tuple[str, float, int]] | None = None,
    status: str = "FINISHED",
    start_time_ms: int | None = None,
    end_time_ms: int | None = None,
) -> str:
    """Record a run that already happened elsewhere (e.g. an Optuna trial), in a few requests.

    Args:
        experiment_id: Experiment to record into.
        name: Run name.
        parent_run_id: Makes it a nested (child) run.
        tags: Tags (secret-named keys redacted).
        params: Flat params (secrets redacted, values truncated).
        metrics: ``(key, value, step)`` triples; non-finite values are skipped.
        status: Final status: ``FINISHED``, ``FAILED`` or ``KILLED``.
        start_time_ms: When it started (epoch ms); default now.
        end_time_ms: When it ended (epoch ms); default now.

    Returns:
        The new run's id.
    """
    import math

    from mlflow.entities import Metric

    c = client()
    all_tags = {PROJECT_TAG: "forgeline", RUN_NAME_TAG: name}
    all_tags |= {k: ("***" if is_secret_key(k) else str(v)) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(experiment_id, start_time=start_time_ms, tags=all_tags, run_name=name)
    run_id = run.info.run_id
    try:
        if params:
            log_params(run_id, params)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(s)) for k, v, s in metrics or [] if math.isfinite(float(v))]
        for start in range(0, len(batch), 1000):
            c.log_batch(run_id, metrics=batch[start : start + 1000])
    except BaseException:
        with contextlib.suppress(Exception):
            c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, status, end_time=end_time_ms)
    return run_id


def find_runs(experiment_id: str, tags: dict[str, str], max_results: int = 50_000) -> list[tuple[str, dict[str, str]]]:
    """Runs of an experiment whose tags equal ``tags`` (all pages), as ``(run_id, tags)`` pairs."""
    c = client()
    clauses = [f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in tags.items()]
    found: list[tuple[str, dict[str, str]]] = []
    token = None
    while len(found) < max_results:
        page = c.search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=1000, page_token=token)
        found.extend((r.info.run_id, dict(r.data.tags)) for r in page)
        token = page.token
        if not token:
            break
    return found
