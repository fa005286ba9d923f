"""Cells and listings of the commands: numbers, times, who did it; a listing as a table, blocks, CSV or JSON.

A listing (:class:`Listing`) is rows of plain values (what ``--output csv|json`` prints, nothing cut) and the
columns a person sees (short headers, cut ids). :func:`emit` prints listings in the ``--output`` format: a table
where it fits the terminal, one block per row where it does not (a table squeezed to 80 columns shows
nothing).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from forgeline.flows.cli.console import Output, out, show

Row = Mapping[str, Any]


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


def iso(ms: int | None) -> str | None:
    """A millisecond timestamp as ISO 8601 UTC to the second (what CSV and JSON carry), ``None`` when missing."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else None


def local(stamp: str | None) -> str:
    """An ISO 8601 time as local ``YYYY-MM-DD HH:MM``; ``-`` when missing; as it is when it does not parse."""
    if not stamp:
        return "-"
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return stamp


def seconds_between(start: int | None, end: int | None) -> float | None:
    """Seconds between two millisecond timestamps; ``None`` without both."""
    return max(0.0, (end - start) / 1000) if start and end else None


def duration(start: int | None, end: int | None) -> str:
    """``1h02m``, ``3m04s`` or ``5s`` between two millisecond timestamps; ``running`` without an end."""
    if not start:
        return "-"
    return span(seconds_between(start, end)) if end else "running"


def span(seconds: float | None) -> str:
    """``1h02m``, ``3m04s`` or ``5s``; ``-`` when missing."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
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


SHORT_HEADS = {
    "test/f1_macro": "test f1",
    "test/accuracy": "test acc",
    "test/f1_weighted": "test f1 w",
    "baseline/accuracy": "base acc",
    "baseline/f1_weighted": "base f1 w",
    "baseline/f1_macro": "base f1",
}


def metric_head(key: str) -> str:
    """A short header for a metric: ``test/bits_per_byte`` reads ``test bpb``, ``baseline/accuracy`` ``base acc``."""
    return SHORT_HEADS.get(key) or key.replace("bits_per_byte", "bpb").replace("/", " ")


# ------------------------------------------------------------------------------------------------ listings
def plain(value: Any) -> str:
    """A value as one line of a cell: ``-`` when missing, lists joined with commas, no line breaks."""
    if value is None or value == "":
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}→{v}" for k, v in value.items()) or "-"
    return " ".join(str(value).split())


@dataclass(frozen=True)
class Column:
    """One field of a listing.

    Attributes:
        key: Its name in CSV and JSON (the row's key).
        head: Its header in a table; empty: the field is in CSV and JSON only.
        cell: The table's text from the whole row (default: :func:`plain` of the value).
        right: Align right (numbers).
    """

    key: str
    head: str = ""
    cell: Callable[[Row], str] | None = None
    right: bool = False

    def text(self, row: Row) -> str:
        """The cell a person sees (one line)."""
        return " ".join(self.cell(row).split()) if self.cell else plain(row.get(self.key))


@dataclass
class Listing:
    """Rows of plain values and the columns to show them by.

    Attributes:
        name: Its key when a command prints several listings as one JSON object.
        title: The line above the table.
        columns: Every field, in order; those with a head make the table.
        rows: JSON-ready values (str, int, float, bool, None, lists, dicts).
        caption: A line under the table, if any.
    """

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    caption: str = ""

    def records(self) -> list[dict[str, Any]]:
        """Each row with every column, in column order (what CSV and JSON print)."""
        return [{c.key: row.get(c.key) for c in self.columns} for row in self.rows]


def csv_text(listing: Listing) -> str:
    """Every column and row as CSV with a header; empty when missing, lists joined with ``;``."""

    def value(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, list | tuple):
            return ";".join(map(str, v))
        if isinstance(v, Mapping):
            return ";".join(f"{k}={x}" for k, x in v.items())
        return v

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([c.key for c in listing.columns])
    writer.writerows([value(r[c.key]) for c in listing.columns] for r in listing.records())
    return buffer.getvalue()


def json_text(*listings: Listing) -> str:
    """One listing as a JSON array of objects; several as one object keyed by their names."""
    if len(listings) == 1:
        return json.dumps(listings[0].records(), indent=2, ensure_ascii=False) + "\n"
    return json.dumps({x.name: x.records() for x in listings}, indent=2, ensure_ascii=False) + "\n"


def table(listing: Listing) -> Any:
    """The listing as a rich table at its natural width (cells never wrap: see :func:`fit`)."""
    from rich.table import Table
    from rich.text import Text

    shown = [c for c in listing.columns if c.head]
    grid = Table(caption=listing.caption or None, caption_justify="left")
    for column in shown:
        grid.add_column(column.head, justify="right" if column.right else "left", no_wrap=True)
    for row in listing.rows:
        grid.add_row(*(Text(c.text(row)) for c in shown))  # Text: a value is never read as markup
    return grid


def natural_width(renderable: Any) -> int:
    """How many columns ``renderable`` takes when nothing limits it."""
    from rich.console import Console
    from rich.measure import Measurement

    wide = Console(width=10_000, file=io.StringIO())
    return Measurement.get(wide, wide.options, renderable).maximum


def blocks(listing: Listing, width: int) -> list[str]:
    """One block per row: ``head: value`` pairs packed into lines of at most ``width`` (a pair never splits)."""
    from rich.cells import cell_len

    shown = [c for c in listing.columns if c.head]
    lines: list[str] = []
    for row in listing.rows:
        if lines:
            lines.append("")
        current = ""
        for pair in (f"{c.head}: {c.text(row)}" for c in shown):
            if current and cell_len(current) + 3 + cell_len(pair) > width:
                lines.append(current)
                current = "  " + pair  # the row's later lines are indented under its first
            else:
                current = f"{current}   {pair}" if current else pair
        lines.append(current)
    return lines


def fit(listing: Listing, width: int) -> list[Any]:
    """What to print for a person: title, then the table if it fits ``width``, else one block per row and a note."""
    from rich.text import Text

    head = [Text(listing.title)] if listing.title else []
    if not listing.rows:
        return [*head, Text(listing.caption or "(none)")]
    grid = table(listing)
    needed = natural_width(grid)
    if needed <= width:
        return [*head, grid]
    note = f"(a table needs {needed} columns, {width} here; --output csv|json gives every column)"
    tail = [Text(listing.caption)] if listing.caption else []
    return [*head, *(Text(line) for line in blocks(listing, width)), *tail, Text(note, style="dim")]


def emit(output: Output, *listings: Listing) -> None:
    """Print listings on standard output as ``--output`` asks.

    ``table``: each fitted to the terminal (:func:`fit`). ``json``: see :func:`json_text`. ``csv``: the first
    listing only (a CSV file holds one table; JSON holds them all).
    """
    if output == Output.JSON:
        sys.stdout.write(json_text(*listings))
    elif output == Output.CSV:
        sys.stdout.write(csv_text(listings[0]))
    else:
        for listing in listings:
            for part in fit(listing, out.width):
                show(part)
    sys.stdout.flush()
