"""Per-step training metrics, batched and sent off the training loop, never dropped silently."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from forgeline.tasks import faults
from forgeline.tasks.tracking.spool import first_line, remove_spool, spool_metrics
from forgeline.tasks.tracking.store import TrackingError, client, tracking_uri

logger = logging.getLogger(__name__)

RETRY_SECONDS_ENV = "FORGELINE_METRIC_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
"""How long ``MetricBuffer.close`` keeps retrying undelivered metrics (a tracking server restart fits)."""


class MetricBuffer:
    """Per-step metrics, sent as one ``log_batch`` every ``flush_every`` steps on a background thread.

    The training loop only appends to a list; the network or SQLite write happens off the loop, so an
    unreachable store never stalls training (checkpoints keep being written). A failed send is retried
    on the next flush (the metrics stay queued). ``close`` keeps retrying for ``retry_seconds``; what is
    still undelivered then is written to a spool file (``spool.spool_dir``) and ``close`` raises
    ``TrackingError``, so nothing is dropped silently: the next pipeline start delivers the spool to the
    same run (``spool.deliver_spooled_metrics``).

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
        faults.hit("metrics.queue", step=step)  # a test may hold the loop here to stop the server

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
            logger.warning("metric upload failed (%s); %d metrics queued for retry", first_line(exc), queued)
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
                remove_spool(self.run_id)
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
            where = str(spool_metrics(self.run_id, undelivered))
        except OSError as exc:  # a full or read-only disk must not hide the tracking error itself
            where = f"memory only (spool not written: {exc})"
        cause = first_line(self._last_error) if self._last_error else "the last upload did not return in time"
        raise TrackingError(
            f"{len(undelivered)} metrics could not be logged to run {self.run_id} at {tracking_uri()}: "
            f"{cause}; kept in {where}, delivered at the next start"
        )


def _default_retry_seconds() -> float:
    raw = os.environ.get(RETRY_SECONDS_ENV)
    try:
        return float(raw) if raw else DEFAULT_RETRY_SECONDS
    except ValueError:
        logger.warning("%s=%r is not a number; using %.0f s", RETRY_SECONDS_ENV, raw, DEFAULT_RETRY_SECONDS)
        return DEFAULT_RETRY_SECONDS


def log_metric_history(run_id: str, entries: list[tuple[int, int, dict[str, float]]], chunk: int = 1000) -> int:
    """Log recorded per-step metrics (``(step, timestamp ms, {key: value})``) to ``run_id`` in batches.

    Used to replay a checkpoint's training curve into a store that never saw it (a new or restored store).

    Returns:
        How many metric values were logged.
    """
    from mlflow.entities import Metric

    batch = [Metric(key, float(value), ts, step) for step, ts, metrics in entries for key, value in metrics.items()]
    c = client()
    for start in range(0, len(batch), chunk):
        c.log_batch(run_id, metrics=batch[start : start + chunk])
    return len(batch)
