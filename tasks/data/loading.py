"""Reading inputs through the Hugging Face ``datasets`` builders (text, json, csv, parquet) and ``kind: hf``.

Every file is scanned once before loading, while its content hash is taken for the cache key: that pass
checks UTF-8 and line lengths so a bad byte or a line of gigabytes fails with file, line and offset
before a builder sees it. Where a builder still fails, or gives nulls and types it would accept but we
do not (a CSV row with too few fields, a JSON line without the text key), the file is read again with
the standard library only to name the first bad line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import re
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from forgeline.tasks.data.memory import release
from forgeline.tasks.data.paths import DataError, Input
from forgeline.tasks.data.rules import TEXT_PREFIX
from forgeline.tasks.errors import first_line

MAX_LINE_BYTES = 64 * 2**20
"""A physical line longer than this fails the read (bounded memory on a file with no newlines)."""
MAX_RECORD_CHARS = 256 * 2**20
"""A whole-file record (``record: file``) longer than this fails the read; use ``record: line``."""
BATCH = 2**15
"""Rows per Arrow record batch the builders and the cleaning ``map`` write (and per ``map`` batch). A table
keeps every batch's metadata in memory (kilobytes each), so the ``datasets`` default of 1,000 rows made
the process grow by about 10 bytes a record."""
_BLOCK = 2**20
_SAMPLE_BY = {"line": "line", "paragraph": "paragraph", "file": "document"}


def scan_file(path: Path, fmt: str, record: str) -> str:
    """SHA-256 of a file; text-based files are also checked for UTF-8 and line (and record) length.

    Raises:
        DataError: Invalid UTF-8 (byte offset and line), or a line or record past the limits.
    """
    if fmt == "parquet":  # binary: only hashed
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    digest = hashlib.sha256()
    offset = line = 0  # bytes and lines before ``carry``
    carry = bytearray()  # the start of a line that has no end yet
    where = 0  # the line holding the record limit (bytes >= characters)
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            start = offset + len(carry)
            if start < MAX_RECORD_CHARS <= start + len(block):
                where = line + block.count(b"\n", 0, MAX_RECORD_CHARS - start) + 1
            cut = block.rfind(b"\n") + 1  # b"\n" never sits inside a multi-byte character
            if not cut:
                carry += block
                if len(carry) > MAX_LINE_BYTES:
                    raise DataError(f"{path}:{line + 1}: line longer than {MAX_LINE_BYTES} bytes (at byte {offset})")
                continue
            whole = bytes(carry) + block[:cut]
            _check_lines(whole, path, offset, line)
            offset, line = offset + len(whole), line + whole.count(b"\n")
            carry = bytearray(block[cut:])
    if carry:
        _check_lines(bytes(carry), path, offset, line)
    if fmt == "text" and record == "file" and offset + len(carry) > MAX_RECORD_CHARS:
        raise DataError(f"{path}:{where}: record longer than {MAX_RECORD_CHARS} characters; use data.record: line")
    return digest.hexdigest()


def _check_lines(data: bytes, path: Path, offset: int, line: int) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = line + data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: not valid UTF-8 at byte {offset + exc.start} (line {number})") from None
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
    starts = np.concatenate(([0], newlines + 1, [len(data)]))  # and the end: line i is starts[i]:starts[i + 1]
    long = np.flatnonzero(np.diff(starts) > MAX_LINE_BYTES)
    if len(long):
        i = int(long[0])
        raise DataError(
            f"{path}:{line + i + 1}: line longer than {MAX_LINE_BYTES} bytes (at byte {offset + int(starts[i])})"
        )


def load_input(item: Input, columns: dict[str, str], record: str, cache_dir: Path) -> Any:
    """One input as a ``datasets.Dataset`` with the canonical columns (``_t0``..., ``label``...).

    Args:
        item: A resolved input (for ``builtin`` the corpus was written to ``item.path``).
        columns: Canonical name to source column, e.g. ``{"_t0": "body", "label": "stars"}``.
        record: ``line``, ``paragraph`` or ``file`` (plain text only).
        cache_dir: Where the builders write their Arrow files.

    Raises:
        DataError: The input cannot be read or lacks a column; the message names file and line.
    """
    import datasets

    strings = _string_columns(columns)  # what a failed read is diagnosed for
    if item.fmt in ("text", "builtin"):
        ds = _build(item, "text", cache_dir, strings, sample_by=_SAMPLE_BY[record], encoding="utf-8-sig")
        return ds.rename_column("text", f"{TEXT_PREFIX}0")
    if item.fmt in ("hf-disk", "hf-hub"):
        ds = _hf_dataset(item, cache_dir)
    elif item.fmt == "parquet":
        _check_parquet(item, columns.values())
        ds = _build(item, "parquet", cache_dir, strings, columns=list(dict.fromkeys(columns.values())))
    elif item.fmt == "csv":
        used = list(dict.fromkeys(columns.values()))  # only these: another column may lack a name (pandas' index)
        _check_csv(item, used)
        features = datasets.Features({name: datasets.Value("string") for name in used})
        ds = _build(
            item, "csv", cache_dir, strings, features=features, usecols=used, keep_default_na=False, na_filter=False
        )
    else:
        assert item.path is not None
        with item.path.open("rb") as handle:
            head = handle.read(4096)
        head = re.sub(rb"\s+", b"", head.removeprefix(b"\xef\xbb\xbf"))
        if not (head.startswith(b"{") or (item.fmt == "json" and head[:2] in (b"[{", b"[]"))):
            _diagnose(item, *strings)  # datasets reads a list of strings as a "text" column
        ds = _build(item, "json", cache_dir, strings)
    _check_columns(item, ds, columns)
    if len(set(columns.values())) < len(columns):
        raise DataError(f"{item.label}: one column named twice in the data column options ({columns})")
    ds = ds.select_columns(list(columns.values())).rename_columns({v: k for k, v in columns.items()})
    wide = [name for name in ds.column_names if _dtype(ds.features[name]) == "large_string"]
    if wide:  # inputs concatenate, and Arrow joins columns, of one string type only
        ds = ds.cast(datasets.Features({**ds.features, **dict.fromkeys(wide, datasets.Value("string"))}))
    release(ds, ds.column_names, 0, len(ds))  # pages the builder's checks read: the cleaning map reads them next
    return ds


def _build(item: Input, builder: str, cache_dir: Path, strings: list[str], **options: Any) -> Any:
    import datasets

    quiet = logging.getLogger("datasets")  # a builder logs its failure at ERROR: ours names the line instead
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(
            builder,
            data_files=[str(item.path)],
            split="train",
            cache_dir=str(cache_dir / "hf"),
            writer_batch_size=BATCH,
            **options,
        )
    except Exception as exc:  # noqa: BLE001 - every builder error becomes a message naming the line
        _diagnose(item, *strings)
        raise DataError(f"{item.label}: cannot be read as {builder} ({first_line(exc)})") from exc
    finally:
        quiet.setLevel(level)


def _hf_dataset(item: Input, cache_dir: Path) -> Any:
    import datasets

    source = item.hf
    assert source is not None
    try:
        if item.fmt == "hf-disk":
            loaded = datasets.load_from_disk(str(item.path))
        else:
            loaded = datasets.load_dataset(source.name, source.config, split=source.split, revision=source.revision)
    except Exception as exc:  # noqa: BLE001 - missing folder files, offline hub, unknown id
        raise DataError(f"{item.label}: cannot load the dataset ({first_line(exc)})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise DataError(f"{item.label}: no split {source.split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[source.split]
    return loaded


def hub_fingerprint(item: Input, cache_dir: Path) -> str:
    """The ``datasets`` fingerprint of a hub dataset (its cached files decide it): part of the cache key."""
    return str(_hf_dataset(item, cache_dir)._fingerprint)


# ------------------------------------------------------------------------------------------ checks
def _check_columns(item: Input, ds: Any, columns: dict[str, str]) -> None:
    names = ds.column_names
    texts = [src for canon, src in columns.items() if canon.startswith(TEXT_PREFIX)]
    strings = _string_columns(columns)
    missing = [src for src in columns.values() if src not in names]
    readable = not missing and len(ds) and not any(ds.data.column(src).null_count for src in texts)
    if readable and all(_dtype(ds.features[src]) in ("string", "large_string") for src in strings):
        return
    _diagnose(item, *strings, *missing)
    _require(item.label, columns.values(), names)
    if not len(ds):
        raise DataError(f"{item.label}: no records")
    for src in strings:
        if _dtype(ds.features[src]) not in ("string", "large_string"):
            raise DataError(f"{item.label}: column {src!r} has type {_dtype(ds.features[src])}, expected string")


def _string_columns(columns: dict[str, str]) -> list[str]:
    """The source columns that must hold text: the text parts first, then prompt and completion."""
    return [src for canon, src in columns.items() if canon.startswith(TEXT_PREFIX) or canon in ("prompt", "completion")]


def _dtype(feature: Any) -> str:
    """A column's value type: ``string``, ``int64``... or ``dict``/``list`` for nested values (no ``dtype``)."""
    return str(getattr(feature, "dtype", type(feature).__name__))


def _require(where: str, wanted: Iterable[str], names: Collection[str]) -> None:
    """Raise for the first of ``wanted`` not among ``names`` (a header, a schema, a JSON object's keys)."""
    missing = [name for name in wanted if name not in names]
    if missing:
        raise DataError(f"{where}: no column {missing[0]!r} (columns: {', '.join(names)})")


def _check_parquet(item: Input, wanted: Iterable[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(item.path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{item.label}: not a readable Parquet file ({exc})") from None
    _require(item.label, wanted, parquet.schema_arrow.names)
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{item.label}: no rows")


def _check_csv(item: Input, wanted: list[str]) -> None:
    """The header has each wanted column once; every row passes pyarrow's strict parser (pandas fills short rows)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    assert item.path is not None
    with item.path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    _require(item.label, wanted, header)
    twice = [name for name in dict.fromkeys(wanted) if header.count(name) > 1]
    if twice:  # pandas would read the first and quietly rename the others
        raise DataError(f"{item.path}:1: column {twice[0]!r} appears {header.count(twice[0])} times in the header")
    parse = pcsv.ParseOptions(newlines_in_values=True)
    convert = pcsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()))
    try:
        for _ in pcsv.open_csv(item.path, parse_options=parse, convert_options=convert):
            pass
    except pa.ArrowInvalid as exc:
        _diagnose(item, *wanted)
        raise DataError(f"{item.label}: malformed CSV ({first_line(exc)})") from None


def _diagnose(item: Input, *columns: str) -> None:
    """Re-read a JSON or CSV file with the standard library; raise the first problem.

    ``columns[0]`` must be present; every one of ``columns`` a record has must hold a string (or null).
    """
    if item.path is None or item.fmt not in ("jsonl", "json", "csv"):
        return
    text = item.path.read_text(encoding="utf-8-sig")  # UTF-8 was checked by scan_file
    column = columns[0] if columns else item.text_column
    others = columns[1:]
    if item.fmt == "csv":
        _diagnose_csv(item.path, text, column)
    elif item.fmt == "json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{item.path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not items:
            raise DataError(f"{item.path}: no records (empty list)")
        for i, obj in enumerate(items):
            _field(obj, column, f"{item.path}: item {i}", others)
    else:
        number = 0
        for number, line in _nonblank(text.split("\n")):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{item.path}:{number}: invalid JSON ({exc.msg})") from None
            _field(obj, column, f"{item.path}:{number}", others)
        if not number:
            raise DataError(f"{item.path}: no records (only blank lines)")


def _field(obj: Any, column: str, where: str, others: tuple[str, ...] = ()) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    _require(where, [column], obj)
    for name in (column, *others):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise DataError(f"{where}: column {name!r} is {type(obj[name]).__name__}, expected a string")


def _diagnose_csv(path: Path, text: str, column: str) -> None:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_CHARS))
    rows = end = 0
    try:
        for start, end, row in _csv_records(io.StringIO(text, newline="\n"), strict=True):
            if start == 1:
                header = row
                _require(str(path), [column], header)
            elif row:
                if len(row) != len(header):
                    raise DataError(f"{path}:{end}: expected {len(header)} fields, got {len(row)}")
                rows += 1
    except csv.Error as exc:
        raise DataError(f"{path}:{end + 1}: malformed CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows (header only)")


def _csv_records(lines: Iterable[str], strict: bool = False) -> Iterator[tuple[int, int, list[str]]]:
    """First line, last line and fields of each CSV record (one record may span lines)."""
    reader = csv.reader(lines, strict=strict)
    start = 1
    for row in reader:
        yield start, reader.line_num, row
        start = reader.line_num + 1


def _nonblank(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """Number (from 1) and text of each line that holds more than whitespace: blank lines hold no record."""
    return ((number, line) for number, line in enumerate(lines, start=1) if line.strip())


def record_place(item: Input, index: int) -> str:
    """Where record ``index`` (0-based, in loading order) of an input sits: ``path:line``, or ``path: row N``.

    Used on error paths only: a CSV or JSON Lines file is read again to count physical lines.
    """
    if item.path is not None and item.fmt in ("csv", "jsonl"):
        with item.path.open(encoding="utf-8-sig", newline="" if item.fmt == "csv" else None) as handle:
            if item.fmt == "csv":  # the header is not a record; the builder skips blank lines
                places = (start for start, _, row in _csv_records(handle) if row and start > 1)
            else:
                places = (number for number, _ in _nonblank(handle))
            line = next(itertools.islice(places, index, None), None)
        if line is not None:
            return f"{item.path}:{line}"
    return f"{item.label}: record {index + 1}"
