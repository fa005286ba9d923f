"""Metrics an earlier process could not deliver: one ``RUN_ID.jsonl`` per run, sent at the next start."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from forgeline.tasks.tracking.store import client, tracking_uri

logger = logging.getLogger(__name__)


def spool_dir(uri: str | None = None) -> Path:
    """Where undelivered metrics wait for the next start: one ``RUN_ID.jsonl`` per run.

    Next to the database for SQLite (``mlruns/spool``); for a server, under ``$FORGELINE_HOME``
    (default ``.forgeline`` in the working directory), one folder per server URI.
    """
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "spool"
    home = Path(os.environ.get("FORGELINE_HOME", ".forgeline")).resolve()
    return home / "spool" / hashlib.sha256(uri.encode()).hexdigest()[:12]


def spool_metrics(run_id: str, metrics: list[Any]) -> Path:
    """Write ``metrics`` (MLflow ``Metric`` objects) to the run's spool file, replacing it atomically."""
    path = spool_dir() / f"{run_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for m in metrics:
            fh.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
    tmp.replace(path)
    return path


def remove_spool(run_id: str) -> None:
    """Drop the run's spool file, if any (its metrics were delivered)."""
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
            logger.warning("spooled metrics %s not delivered yet: %s", path, first_line(exc))
            continue
        path.unlink(missing_ok=True)
        delivered += len(batch)
        logger.info("delivered %d spooled metrics to run %s", len(batch), path.stem)
    return delivered


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), for one-line warnings."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
