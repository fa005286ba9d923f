"""Runs: a stage's run with an honest end status, runs recorded after the fact, and finding runs by tags.

A stage run's status is exactly what happened to the stage: FINISHED, FAILED on an exception, KILLED on an
interrupt, and never left RUNNING by a crash for longer than the next pipeline start (:func:`reap_orphan_runs`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

from forgeline.tasks.config import is_secret_key
from forgeline.tasks.errors import StageInterrupted
from forgeline.tasks.tracking.records import log_params
from forgeline.tasks.tracking.spool import deliver_spooled_metrics
from forgeline.tasks.tracking.store import TrackingError, check_server, client, tracking_uri
from forgeline.tasks.tracking.tags import OWNER_TAG, PARENT_TAG, PROJECT_TAG, RUN_NAME_TAG, owner_tag

logger = logging.getLogger(__name__)


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
    uri = tracking_uri()
    if not uri.startswith(("http:", "https:")):
        return True
    try:
        check_server(uri, timeout=3)
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
