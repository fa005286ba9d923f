"""Alias history: the moves of the champion alias, kept as a JSON tag on the registered model, and replayed.

Pure functions: the tracking package reads and writes the tag
(:func:`forgeline.tasks.tracking.registry_store.alias_history`, ``record_alias_move``).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

ALIAS_HISTORY_TAG = "forgeline.alias_history"
"""Registered-model tag: a JSON list of alias moves, oldest first (trimmed to fit the tag's 5000 chars)."""
HISTORY_LIMIT = 4800


def parse_history(raw: str | None, model_name: str = "") -> list[dict[str, Any]]:
    """The alias moves in a ``forgeline.alias_history`` tag value, oldest first (``[]`` when unset or unreadable).

    Each entry: ``alias``, ``version``, ``previous`` (the version that held the alias before, or ``None``),
    ``kind`` (``gate``, ``promote``, ``force`` or ``rollback``), ``reason`` and ``at`` (UTC, ISO 8601).
    """
    if not raw:
        return []
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("%s: unreadable %s tag; ignoring it", model_name, ALIAS_HISTORY_TAG)
        return []
    return [e for e in entries if isinstance(e, dict) and "alias" in e and "version" in e]


def alias_move(
    alias: str, version: str | int, reason: str, *, previous: str | int | None = None, kind: str = "gate"
) -> dict[str, Any]:
    """One alias-history entry, stamped now (UTC); ``reason`` is cut to 160 characters."""
    return {
        "alias": alias,
        "version": str(version),
        "previous": None if previous is None else str(previous),
        "kind": kind,
        "reason": reason[:160],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def history_blob(entries: list[dict[str, Any]], limit: int = HISTORY_LIMIT) -> str:
    """Entries as compact JSON, the oldest dropped until it fits ``limit`` characters (tag size limits)."""
    blob = json.dumps(entries, separators=(",", ":"))
    while len(blob) > limit and len(entries) > 1:
        entries = entries[1:]
        blob = json.dumps(entries, separators=(",", ":"))
    return blob


def champion_stack(entries: list[dict[str, Any]], alias: str, current: str | None) -> list[str]:
    """Replay alias moves into the stack of versions that held ``alias``, current one last.

    Promotions push, rollbacks pop. A history with gaps (moves made before recording started, or by code
    that does not record) is patched from each entry's ``previous`` and from ``current``.

    Args:
        entries: :func:`alias_history` output (any alias; others are ignored).
        alias: The alias to replay.
        current: The version the alias points to now, or ``None``.

    Returns:
        Versions, oldest first; the last one is ``current`` when there is one.
    """
    stack: list[str] = []
    for entry in entries:
        if entry.get("alias") != alias:
            continue
        version = str(entry["version"])
        previous = entry.get("previous")
        previous = None if previous is None else str(previous)
        if entry.get("kind") == "rollback":
            if stack and stack[-1] == previous:
                stack.pop()
            while stack and stack[-1] != version and version in stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
            continue
        if previous is not None and (not stack or stack[-1] != previous):
            stack.append(previous)
        if not stack or stack[-1] != version:
            stack.append(version)
    if current is not None and (not stack or stack[-1] != str(current)):
        stack.append(str(current))
    return stack


def previous_champion(stack: list[str], exists: Any = None) -> str | None:
    """The version a rollback returns to: the one below the top of :func:`champion_stack`.

    Args:
        stack: Versions that held the alias, current last.
        exists: Optional ``callable(version) -> bool``; versions that no longer exist are skipped.

    Returns:
        The previous version, or ``None`` when there is none.
    """
    current = stack[-1] if stack else None
    for version in reversed(stack[:-1]):
        if version != current and (exists is None or exists(version)):
            return version
    return None
