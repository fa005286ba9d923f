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
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from forgeline.tasks.data.memory import release
from forgeline.tasks.data.paths import DataError, Input
from forgeline.tasks.data.rules import TEXT_PREFIX

logger = logging.getLogger(__name__)

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
_BUILDER = {"text": "text", "builtin": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


def scan_file(path: Path, fmt: str, record: str) -> str:
    """SHA-256 of a file; text-based files are also checked for UTF-8 and line (and record) length.

    Raises:
        DataError: Invalid UTF-8 (byte offset and line), or a line or record past the limits.
    """
    digest = hashlib.sha256()
    check = fmt != "parquet"
    offset = line = 0  # bytes and lines before ``carry``
    carry = bytearray()  # the start of a line that has no end yet
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            if not check:
                continue
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
    if check and carry:
        _check_lines(bytes(carry), path, offset, line)
    if check and fmt == "text" and record == "file" and offset + len(carry) > MAX_RECORD_CHARS:
        where, left = 1, MAX_RECORD_CHARS  # bytes >= characters: the line holding the limit is named
        with path.open("rb") as handle:
            while left > 0 and (block := handle.read(min(_BLOCK, left))):
                where, left = where + block.count(b"\n"), left - len(block)
        raise DataError(f"{path}:{where}: record longer than {MAX_RECORD_CHARS} characters; use data.record: line")
    return digest.hexdigest()


def _check_lines(data: bytes, path: Path, offset: int, line: int) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        number = line + data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: not valid UTF-8 at byte {offset + exc.start} (line {number})") from None
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1  # exclusive, "\n" included
    if not len(ends) or ends[-1] != len(data):
        ends = np.append(ends, len(data))
    starts = np.concatenate(([0], ends[:-1]))
    long = np.flatnonzero(ends - starts > MAX_LINE_BYTES)
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

    if item.fmt in ("text", "builtin"):
        ds = _build(item, "text", cache_dir, sample_by=_SAMPLE_BY[record], encoding="utf-8-sig")
        return ds.rename_column("text", f"{TEXT_PREFIX}0")
    if item.fmt == "hf-disk" or item.fmt == "hf-hub":
        ds = _hf_dataset(item, cache_dir)
    elif item.fmt == "parquet":
        _check_parquet(item.path, list(columns.values()))
        ds = _build(item, "parquet", cache_dir, columns=list(dict.fromkeys(columns.values())))
    elif item.fmt == "csv":
        header = _csv_header(item.path, columns)
        _check_csv_rows(item, header)
        features = datasets.Features({name: datasets.Value("string") for name in header})
        ds = _build(item, "csv", cache_dir, features=features, keep_default_na=False, na_filter=False)
    else:
        assert item.path is not None
        with item.path.open("rb") as handle:
            head = handle.read(4096)
        head = re.sub(rb"\s+", b"", head.removeprefix(b"\xef\xbb\xbf"))
        if not (head.startswith(b"{") or (item.fmt == "json" and head[:2] in (b"[{", b"[]"))):
            _diagnose(item, item.text_column)  # datasets reads a list of strings as a "text" column
        ds = _build(item, "json", cache_dir)
    _check_columns(item, ds, columns)
    if len(set(columns.values())) < len(columns):
        raise DataError(f"{item.label}: one column named twice in the data column options ({columns})")
    ds = ds.select_columns(list(columns.values())).rename_columns({v: k for k, v in columns.items()})
    release(ds, ds.column_names, 0, len(ds))  # pages the builder's checks read: the cleaning map reads them next
    return ds


def _build(item: Input, builder: str, cache_dir: Path, **options: Any) -> Any:
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
        _diagnose(item, item.text_column)
        raise DataError(f"{item.label}: cannot be read as {builder} ({str(exc).splitlines()[0][:200]})") from exc
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
        raise DataError(f"{item.label}: cannot load the dataset ({str(exc).splitlines()[0][:200]})") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise DataError(f"{item.label}: no split {source.split!r} (splits: {', '.join(loaded)})")
        loaded = loaded[source.split]
    return loaded


def hub_fingerprint(item: Input, cache_dir: Path) -> str:
    """The ``datasets`` fingerprint of a hub dataset (its cached files decide it): part of the cache key."""
    return str(_hf_dataset(item, cache_dir)._fingerprint)


def _check_columns(item: Input, ds: Any, columns: dict[str, str]) -> None:
    names = list(ds.column_names)
    text_sources = {src for canon, src in columns.items() if canon.startswith(TEXT_PREFIX)}
    problems = [src for src in dict.fromkeys(columns.values()) if src not in names]
    if not problems and len(ds) and not any(ds.data.column(src).null_count for src in text_sources):
        wrong = [s for s in text_sources if str(ds.features[s].dtype) not in ("string", "large_string")]
        if not wrong:
            return
    if item.fmt in ("jsonl", "json", "csv"):
        _diagnose(item, *text_sources, *problems)
    if problems:
        raise DataError(f"{item.label}: no column {problems[0]!r} (columns: {', '.join(names)})")
    if not len(ds):
        raise DataError(f"{item.label}: no records")
    for src in text_sources:
        if str(ds.features[src].dtype) not in ("string", "large_string"):
            raise DataError(f"{item.label}: column {src!r} has type {ds.features[src].dtype}, expected string")


# ------------------------------------------------------------------------------------------ checks
def _check_parquet(path: Path | None, columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    for column in columns:
        if column not in schema.names:
            raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: no rows")


def _check_csv_rows(item: Input, header: list[str]) -> None:
    """pyarrow's strict parser over the file: pandas (the csv builder) would fill a short row with blanks."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(newlines_in_values=True)
    convert = pcsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()))
    try:
        for _ in pcsv.open_csv(item.path, parse_options=parse, convert_options=convert):
            pass
    except pa.ArrowInvalid as exc:
        _diagnose(item, item.text_column)
        raise DataError(f"{item.label}: malformed CSV ({str(exc).splitlines()[0][:200]})") from None


def _csv_header(path: Path | None, columns: dict[str, str]) -> list[str]:
    assert path is not None
    with path.open(encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    missing = [c for c in columns.values() if c not in header]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(header)})")
    return header


def _diagnose(item: Input, *columns: str) -> None:
    """Re-read a JSON or CSV file with the standard library; raise the first problem as a ``DataError``."""
    if item.path is None or item.fmt not in ("jsonl", "json", "csv"):
        return
    text = item.path.read_text(encoding="utf-8-sig")  # UTF-8 was checked by scan_file
    column = columns[0] if columns else item.text_column
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
            _field(obj, column, f"{item.path}: item {i}")
    else:
        count = 0
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{item.path}:{number}: invalid JSON ({exc.msg})") from None
            count += 1
            _field(obj, column, f"{item.path}:{number}")
        if not count:
            raise DataError(f"{item.path}: no records (only blank lines)")


def _field(obj: Any, column: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if column not in obj:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(map(str, obj))})")
    if obj[column] is not None and not isinstance(obj[column], str):
        raise DataError(f"{where}: column {column!r} is {type(obj[column]).__name__}, expected a string")


def _diagnose_csv(path: Path, text: str, column: str) -> None:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_CHARS))
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)
    rows = 0
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: malformed CSV ({exc})") from None
        if start == 1:
            header = row
            if column not in header:
                raise DataError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
        elif row:
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}")
            rows += 1
    if not rows:
        raise DataError(f"{path}: no rows (header only)")


def record_place(item: Input, index: int) -> str:
    """Where record ``index`` (0-based, in loading order) of an input sits: ``path:line``, or ``path: row N``.

    Used on error paths only: a CSV or JSON Lines file is read again to count physical lines.
    """
    if item.path is not None and item.fmt == "csv":
        with item.path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            next(reader, None)  # the header
            number = 0
            while True:
                start = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if row:  # the builder skips blank lines
                    if number == index:
                        return f"{item.path}:{start}"
                    number += 1
    if item.path is not None and item.fmt == "jsonl":
        with item.path.open(encoding="utf-8-sig") as handle:
            records = (n for n, line in enumerate(handle, start=1) if line.strip())
            for number, line in enumerate(records):
                if number == index:
                    return f"{item.path}:{line}"
    return f"{item.label}: record {index + 1}"
