"""Cells of the commands' tables and records: numbers, times, durations, who did it. A leaf."""

from __future__ import annotations

import math
import os
import socket
from datetime import UTC, datetime
from typing import Any


def to_float(value: Any) -> float | None:
    """``value`` as a finite float, else ``None`` (missing, not a number, NaN or infinite)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def is_finite(value: Any) -> bool:
    """Whether ``value`` reads as a finite number."""
    return to_float(value) is not None


def num(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals, ``-`` when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def when(ms: int | None) -> str:
    """A millisecond timestamp as local ``YYYY-MM-DD HH:MM``, ``-`` when missing."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def duration(start: int | None, end: int | None) -> str:
    """``1h02m``, ``3m04s`` or ``5s`` between two millisecond timestamps; ``running`` without an end."""
    if not start:
        return "-"
    if not end:
        return "running"
    seconds = max(0, round((end - start) / 1000))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def short(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def now() -> str:
    """The current UTC time, ISO 8601 to the second (what the records store)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def who() -> str:
    """``user@host`` of whoever runs the command (what the records store)."""
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
    return f"{user}@{socket.gethostname()}"
