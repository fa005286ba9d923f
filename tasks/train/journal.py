"""The per-step metrics of a training lineage, kept next to its checkpoints (``metrics.jsonl``).

The tracking store is not the only copy of a training curve: a store that is deleted, replaced or restored
from an older backup would otherwise lose the history of a checkpoint that outlives it. The journal is
written before every checkpoint, so it always covers the newest checkpoint's steps; on resume it is cut back
to the checkpoint's step, so steps trained again are never recorded twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

JOURNAL_FILE = "metrics.jsonl"

Entry = tuple[int, int, dict[str, float]]
"""``(step, timestamp in ms, {metric: value})``."""


class MetricJournal:
    """Append-only per-step metrics; lines are buffered and written by :meth:`flush`.

    Args:
        path: The journal file (``run_dir / JOURNAL_FILE``).
        resume_step: The step training starts from (0 when fresh); later lines, left by a run that died
            after its last checkpoint, are dropped.
    """

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self._pending: list[str] = []
        cut_journal(path, resume_step)

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Queue the metrics of ``step`` (written at the next :meth:`flush`)."""
        row = {"step": step, "ts": int(time.time() * 1000), "metrics": metrics}
        self._pending.append(json.dumps(row, separators=(",", ":")))

    def flush(self) -> None:
        """Append the queued lines to the file (call before writing a checkpoint)."""
        if not self._pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(self._pending) + "\n")
        self._pending = []


class DiscardJournal(MetricJournal):
    """The journal of a rank other than 0 in a torchrun job: rank 0 keeps the one journal."""

    def __init__(self) -> None:
        self.path = Path(os.devnull)
        self._pending = []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        """Dropped."""

    def flush(self) -> None:
        """Nothing to write."""


def read_journal(path: Path, up_to: int | None = None) -> list[Entry]:
    """The journal's entries in step order, up to step ``up_to`` (all when ``None``); ``[]`` without a file.

    A torn last line (the process died while appending) is skipped.
    """
    if not path.is_file():
        return []
    entries: list[Entry] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            entry = (int(row["step"]), int(row["ts"]), {str(k): float(v) for k, v in row["metrics"].items()})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        if up_to is None or entry[0] <= up_to:
            entries.append(entry)
    return sorted(entries, key=lambda e: e[0])


def cut_journal(path: Path, step: int) -> None:
    """Keep only the entries up to ``step`` (none when 0): what a resume from that step has trained."""
    if not path.exists():
        return
    kept = read_journal(path, up_to=step) if step > 0 else []
    if not kept:
        path.unlink()
        return
    tmp = path.with_suffix(".jsonl.tmp")
    lines = (json.dumps({"step": s, "ts": ts, "metrics": m}, separators=(",", ":")) for s, ts, m in kept)
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    logger.debug("metric journal %s cut back to step %d", path, step)


def history_entries(history: list[dict[str, float]]) -> list[Entry]:
    """Journal entries rebuilt from a ``TrainResult.history`` (loss at log and eval intervals only).

    For checkpoints finished before the journal existed: their curve is coarser, but it is the one they have.
    """
    now = int(time.time() * 1000)
    entries: list[Entry] = []
    for point in history:
        metrics = {k: float(v) for k, v in point.items() if k not in ("step", "time")}
        if metrics:
            entries.append((int(point["step"]), now, metrics))
    return entries
