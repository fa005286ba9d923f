"""Data cleaning: read sources, clean records, split them, and store the result content-addressed.

Pure functions (no Prefect, no MLflow) so that the flow, the CLI and the tests share one code path.

Reading streams every input (text files line by line in binary, tables in batches), so memory stays
bounded by the largest record. Exact de-duplication runs in bounded memory too (``_ExactDuplicates``:
past a few MB it spills to the dataset's temporary folder and decides by sorting); the near-duplicate
index and the ``tail`` split's leakage check without dedup still keep a few bytes to kilobytes per record.

Cleaning, in order, per record:

1. line endings: CRLF and CR become LF (always; a CRLF file gives the same records as an LF file);
   a leading UTF-8 BOM is stripped from every file (always) and record; lone surrogates are dropped;
2. ``strip_control``: control characters (Unicode ``Cc``) other than ``\\n`` and ``\\t`` are removed,
   as are the invisible ZERO WIDTH SPACE, WORD JOINER and ZERO WIDTH NO-BREAK SPACE;
3. ``unicode_form``: NFC, NFKC (``"ﬁ"`` becomes ``"fi"``) or none;
4. ``normalize_whitespace``: tabs expand to the next multiple of 4 columns, trailing whitespace of every
   line goes, runs of 3+ newlines collapse to one blank line, and the record is stripped;
5. drop rules, the first that applies is counted: ``empty`` (whitespace only), ``too_short``
   (``min_chars``), ``too_long`` (``max_chars``), ``non_text`` (share of characters that are neither
   letters, combining marks nor whitespace above ``max_nontext_fraction``), ``duplicate`` (exact, by
   content hash) and ``near_duplicate`` (MinHash, when ``near_dedup`` and datasketch is installed).

Splits: ``hash`` puts each record in the split its SHA-256 picks, so new data never moves an old record;
``tail`` joins all records with ``"\\n"`` and cuts the stream nanoGPT-style by character count. Each
non-empty tail split is stored as ONE record (written in ``TAIL_CHUNK_CHARS`` pieces), so
``read_split_text(d, split)`` returns exactly the contiguous slice whatever ``sep`` is.

Storage: ``<cache_dir>/datasets/<fingerprint>/{train,validation,test}.jsonl`` (``{"text": ...}`` per
line) plus ``report.json``, written into a temporary folder and renamed into place. An index file
``<cache_dir>/index/<input_key>.json`` maps the inputs (config plus each file's path, size and content
hash) to the fingerprint, so a re-run on unchanged inputs reads nothing but the index.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import csv
import functools
import glob
import hashlib
import importlib
import importlib.util
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import tokenize
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel

from forgeline.tasks import progress
from forgeline.tasks.config import (
    BuiltinSource,
    CleaningConfig,
    DataConfig,
    DirectorySource,
    FilesSource,
    Source,
    SplitFractions,
)

logger = logging.getLogger(__name__)

CLEANING_VERSION = 1
"""Bumped whenever cleaning code changes its output: part of both the cache key and the fingerprint."""
SPLITS = ("train", "validation", "test")
RULES = ("empty", "too_short", "too_long", "non_text", "duplicate", "near_duplicate")
BUILTIN_LABEL = "builtin:python-docs"
MAX_LINE_BYTES = 64 * 2**20
"""A physical line longer than this fails the read (bounded memory on a file with no newlines)."""
MAX_RECORD_CHARS = 256 * 2**20
"""A paragraph or file record longer than this fails the read; use ``record: line`` for such files."""
MAX_JSON_BYTES = 256 * 2**20
"""A ``.json`` file holding one list is parsed whole; past this size it must be JSON Lines instead."""
TAIL_CHUNK_CHARS = 2**20
NEAR_DEDUP_PERM = 128
TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst"})
TABLE_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES
BUILTIN_MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email.message",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "logging.handlers",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "poplib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
)
"""Stdlib modules whose docstrings (after ``pydoc_data`` topics) make up the builtin corpus, in order."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
_SCHEME = re.compile(r"^(file|https?|ftp|sftp|s3|gs|gcs|az|abfs|hf|data):", re.IGNORECASE)
_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_GLOB_MAGIC = re.compile(r"[*?\[]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_NONTEXT = re.compile(r"[^\w\s]|[\d_]")
_JSON_STR = json.JSONEncoder(ensure_ascii=False).encode
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class DataError(ValueError):
    """Bad input data: a one-line message naming the file (and line or byte offset where it applies)."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message))


class CleanResult(BaseModel):
    """What one cleaning produced (``report.json`` holds all of it but ``cache_hit``)."""

    fingerprint: str
    dataset_dir: str
    cache_hit: bool
    rows_in: int
    dropped: dict[str, int]
    rows_per_split: dict[str, int]
    bytes_per_split: dict[str, int]
    sources: list[str]
    split: str


@dataclass(frozen=True)
class _Input:
    """One resolved input: a file (``path``) or the builtin corpus (``path is None``)."""

    label: str
    fmt: str
    path: Path | None = None
    text_column: str = "text"
    max_bytes: int = 0


# ------------------------------------------------------------------------------------ public API
def clean_dataset(
    cfg: DataConfig, *, data_override: list[str] | None = None, base_dir: Path | None = None
) -> CleanResult:
    """Read, clean and split the configured data, or return the cached result for unchanged inputs.

    Args:
        cfg: The data section of the pipeline config.
        data_override: CLI ``--data`` values (files, globs or directories) replacing ``cfg.sources``.
        base_dir: Folder that relative source paths and ``cfg.cache_dir`` resolve against (default: cwd).

    Returns:
        The cleaning report, with ``cache_hit`` telling whether the stored dataset was reused.

    Raises:
        DataError: A source is missing, unsafe or malformed, or too little data is left to split.
    """
    base = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
    sources = resolve_data_override(data_override, base_dir=base) if data_override else list(cfg.sources)
    inputs = _resolve_inputs(sources, base, _roots_with_overrides(cfg.roots, data_override, base))
    cache_dir = _join(base, cfg.cache_dir)
    payload = _config_payload(cfg)
    key, stamps = _input_key(inputs, payload)
    cached = _lookup(cache_dir, key)
    if cached is not None:
        logger.info("cleaning cache hit: %s (%s)", cached.fingerprint[:12], cached.dataset_dir)
        return cached
    result = _clean_and_store(cfg, inputs, payload, cache_dir, stamps)
    _write_index(cache_dir, key, result.fingerprint)
    return result


def iter_split(dataset_dir: str | Path, split: str) -> Iterator[str]:
    """Stream the records of one stored split.

    Args:
        dataset_dir: A ``CleanResult.dataset_dir``.
        split: ``train``, ``validation`` or ``test``.

    Yields:
        Each record's text, in stored order.

    Raises:
        DataError: Unknown split name or missing split file.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
    path = Path(dataset_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    with path.open("rb") as handle:
        for raw in handle:
            yield json.loads(raw)["text"]


def read_split_text(dataset_dir: str | Path, split: str, sep: str = "\n") -> str:
    """Return a whole split as one string.

    Args:
        dataset_dir: A ``CleanResult.dataset_dir``.
        split: ``train``, ``validation`` or ``test``.
        sep: Joins records (a ``tail`` split is one record: its exact contiguous slice).

    Returns:
        The records joined by ``sep``.
    """
    return sep.join(iter_split(dataset_dir, split))


def resolve_data_override(paths: list[str], *, base_dir: Path | None = None, text_column: str = "text") -> list[Source]:
    """Turn CLI ``--data`` values into sources that replace ``cfg.sources``.

    A directory becomes a ``DirectorySource``; a file or a glob becomes a ``FilesSource``. Values are kept
    as given (relative ones resolve against ``base_dir`` when cleaning), in order.

    Args:
        paths: Files, glob patterns or directories.
        base_dir: Folder relative values resolve against (default: cwd).
        text_column: Column or JSON key holding the text in table files.

    Returns:
        One source per value.

    Raises:
        DataError: A value is a URL, does not exist, or is a glob that matches no file.
    """
    base = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
    if not paths:
        raise DataError("--data: no paths given")
    sources: list[Source] = []
    for value in paths:
        _check_value(value)
        if _GLOB_MAGIC.search(value):
            _expand_glob(value, base)
            sources.append(FilesSource(paths=[value], text_column=text_column))
        elif _join(base, value).is_dir():
            sources.append(DirectorySource(path=value, text_column=text_column))
        elif _join(base, value).is_file():
            sources.append(FilesSource(paths=[value], text_column=text_column))
        else:
            raise DataError(f"{value}: no such file or directory")
    return sources


def report_rows(result: CleanResult) -> list[dict[str, Any]]:
    """Rows for a Prefect table artifact: input count, each drop rule, each split.

    Args:
        result: A cleaning report.

    Returns:
        Dicts with the same keys: ``kind`` (input/dropped/split), ``name``, ``count``, ``bytes``
        (``None`` except for splits).
    """
    rows: list[dict[str, Any]] = [{"kind": "input", "name": "rows_in", "count": result.rows_in, "bytes": None}]
    rows += [{"kind": "dropped", "name": r, "count": n, "bytes": None} for r, n in result.dropped.items()]
    rows += [
        {"kind": "split", "name": s, "count": result.rows_per_split[s], "bytes": result.bytes_per_split[s]}
        for s in SPLITS
    ]
    return rows


def clean_text(text: str, cfg: CleaningConfig) -> str:
    """Apply the normalization steps (line endings, BOM, control, Unicode, whitespace) to one record.

    Args:
        text: A raw record.
        cfg: The cleaning rules.

    Returns:
        The normalized record (possibly empty).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.removeprefix("\ufeff")
    plain = text.isascii()  # ASCII has no surrogates and is invariant under every normalization form
    if not plain:
        text = _SURROGATE.sub("", text)
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    if cfg.unicode_form != "none" and not plain:
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.normalize_whitespace:
        text = _normalize_whitespace(text)
    return text


def _normalize_whitespace(text: str) -> str:
    if "\t" in text:
        text = text.expandtabs(4)
    if "\n" in text:
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        if "\n\n\n" in text:
            text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


def drop_reason(text: str, cfg: CleaningConfig) -> str | None:
    """The first content rule (not dedup) that drops a normalized record, or ``None`` to keep it.

    Args:
        text: A record after ``clean_text``.
        cfg: The cleaning rules.

    Returns:
        ``empty``, ``too_short``, ``too_long``, ``non_text`` or ``None``.
    """
    if not text.strip():
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if cfg.max_chars is not None and len(text) > cfg.max_chars:
        return "too_long"
    if nontext_fraction(text) > cfg.max_nontext_fraction:
        return "non_text"
    return None


def nontext_fraction(text: str) -> float:
    """Share of characters that are neither letters, combining marks nor whitespace (0 for "")."""
    if not text:
        return 0.0
    rest = "".join(_NONTEXT.findall(text))
    marks = 0 if rest.isascii() else sum(1 for ch in rest if unicodedata.category(ch).startswith("M"))
    return (len(rest) - marks) / len(text)


@functools.lru_cache(maxsize=4)
def builtin_corpus(max_bytes: int) -> str:
    """The offline ``python-docs`` corpus: pydoc topics, then stdlib docstrings, capped at ``max_bytes``.

    Deterministic for a given Python version: topics and modules are taken in a fixed sorted order.

    Args:
        max_bytes: Cap on the UTF-8 size of the corpus.

    Returns:
        Documents separated by blank lines.
    """
    parts: list[str] = []
    size = 0
    for doc in _builtin_docs():
        piece = doc if not parts else "\n\n" + doc
        room = max_bytes - size
        encoded = piece.encode("utf-8")
        if len(encoded) >= room:
            parts.append(encoded[:room].decode("utf-8", errors="ignore"))
            break
        parts.append(piece)
        size += len(encoded)
    return "".join(parts)


# ----------------------------------------------------------------------------- paths and safety
def _join(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_value(value: str) -> None:
    """Reject URLs, percent-encoded separators/dots and NUL bytes before anything is opened."""
    if _URL.match(value) or _SCHEME.match(value):
        raise DataError(f"{value}: URLs are not allowed as data paths; give a local file or folder")
    if _ENCODED.search(value) or "\x00" in value:
        raise DataError(f"{value}: percent-encoded or NUL characters are not allowed in data paths")


class _Roots:
    """Where data may be read from: ``cfg.roots``, or else the base folder and each source's own folder."""

    def __init__(self, base: Path, roots: list[str]) -> None:
        for root in roots:
            _check_value(root)
        self.base = base
        self.lexical = [_join(base, r) for r in roots] or [base]
        self.real = [p.resolve() for p in self.lexical]
        self.explicit = bool(roots)

    def check_value(self, value: str, lexical: Path) -> None:
        """A value whose ``..`` parts lead outside every root is rejected before any file access."""
        if ".." in Path(value).parts and not any(_inside(lexical, r) for r in self.lexical):
            where = "data.roots" if self.explicit else f"the working directory {self.base}"
            raise DataError(f"{value}: '..' leads outside {where}; add the folder to data.roots")
        if self.explicit and not any(_inside(lexical, r) or _inside(lexical.resolve(), r) for r in self.real):
            raise DataError(f"{value}: outside the allowed data roots ({', '.join(map(str, self.real))})")

    def check_file(self, value: str, path: Path, anchor: Path) -> Path:
        """Return the real path of ``path`` if it (symlinks followed) lies inside an allowed root."""
        real = path.resolve()
        allowed = self.real if self.explicit else [*self.real, anchor.resolve()]
        if not any(_inside(real, r) for r in allowed):
            shown = ", ".join(str(r) for r in allowed)
            raise DataError(f"{value}: {path} resolves to {real}, outside the allowed data roots ({shown})")
        return real


def _roots_with_overrides(roots: list[str], data_override: list[str] | None, base: Path) -> list[str]:
    # Paths typed on the command line are the user's explicit choice: their folders become allowed roots.
    if not data_override:
        return roots
    extra = []
    for value in data_override:
        lexical = _join(base, value)
        if _GLOB_MAGIC.search(value):
            extra.append(str(_glob_anchor(value, base)))
        else:
            extra.append(str(lexical if lexical.is_dir() else lexical.parent))
    return [*(roots or [str(base)]), *extra]


def _glob_anchor(value: str, base: Path) -> Path:
    parts = Path(value).parts
    fixed = list(itertools.takewhile(lambda p: not _GLOB_MAGIC.search(p), parts))
    return _join(base, str(Path(*fixed))) if fixed else base


def _expand_glob(value: str, base: Path) -> list[Path]:
    pattern = value if Path(value).is_absolute() else os.path.join(glob.escape(str(base)), value)
    found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not found:
        raise DataError(f"{value}: glob matched no files")
    return [Path(os.path.normpath(p)) for p in found]


def _resolve_inputs(sources: Iterable[Source], base: Path, roots: list[str]) -> list[_Input]:
    guard = _Roots(base, roots)
    inputs: list[_Input] = []
    for source in sources:
        if isinstance(source, BuiltinSource):
            inputs.append(_Input(label=BUILTIN_LABEL, fmt="builtin", max_bytes=source.max_bytes))
        elif isinstance(source, DirectorySource):
            inputs += _directory_inputs(source, base, guard)
        else:
            for value in source.paths:
                inputs += _files_inputs(value, source.text_column, base, guard)
    return inputs


def _files_inputs(value: str, column: str, base: Path, guard: _Roots) -> list[_Input]:
    _check_value(value)
    lexical = _join(base, value)
    guard.check_value(value, lexical)
    if _GLOB_MAGIC.search(value):
        anchor, files = _glob_anchor(value, base), _expand_glob(value, base)
    elif lexical.is_dir():
        raise DataError(f"{value}: is a directory; use a directory source (kind: directory)")
    elif not lexical.is_file():
        raise DataError(f"{value}: no such file or directory")
    else:
        anchor, files = lexical.parent, [lexical]
    return [_file_input(value, f, column, guard, anchor) for f in files]


def _directory_inputs(source: DirectorySource, base: Path, guard: _Roots) -> list[_Input]:
    _check_value(source.path)
    folder = _join(base, source.path)
    guard.check_value(source.path, folder)
    if not folder.is_dir():
        raise DataError(f"{source.path}: no such directory")
    files = sorted(
        (p for p in folder.glob(source.pattern) if _wanted(p, folder)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        shown = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise DataError(f"{source.path}: no supported files ({shown}) matching {source.pattern!r}")
    return [_file_input(source.path, f, source.text_column, guard, folder) for f in files]


def _wanted(path: Path, folder: Path) -> bool:
    """Regular files with a supported suffix and no hidden part (``.name``) under ``folder``."""
    rel = path.relative_to(folder).parts
    return path.suffix.lower() in SUPPORTED_SUFFIXES and not any(p.startswith(".") for p in rel) and path.is_file()


def _file_input(value: str, path: Path, column: str, guard: _Roots, anchor: Path) -> _Input:
    real = guard.check_file(value, path, anchor)
    size = real.stat().st_size
    if size == 0 or (size == len(codecs.BOM_UTF8) and real.read_bytes() == codecs.BOM_UTF8):
        raise DataError(f"{real}: file is empty")
    suffix = real.suffix.lower()
    fmt = suffix.lstrip(".") if suffix in TABLE_SUFFIXES else "text"
    return _Input(label=str(real), fmt=fmt, path=real, text_column=column)


# ---------------------------------------------------------------------------------------- cache
def _config_payload(cfg: DataConfig) -> dict[str, Any]:
    payload = cfg.model_dump(mode="json", exclude={"cache_dir", "roots", "sources"})
    payload["near_dedup"] = cfg.cleaning.near_dedup and _near_dedup_available()
    payload["version"] = CLEANING_VERSION
    return payload


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(functools.partial(handle.read, 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _input_key(inputs: list[_Input], payload: dict[str, Any]) -> tuple[str, dict[Path, tuple[int, int]]]:
    """Cache key over the config and each input's path, size and content; plus stat stamps of the files."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    stamps: dict[Path, tuple[int, int]] = {}
    for item in inputs:
        if item.path is None:
            text = builtin_corpus(item.max_bytes).encode("utf-8")
            entry = [item.label, len(text), hashlib.sha256(text).hexdigest(), item.fmt]
        else:
            stamps[item.path] = _stamp(item.path)
            entry = [item.label, stamps[item.path][0], _sha256_file(item.path), item.text_column]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest(), stamps


def _lookup(cache_dir: Path, key: str) -> CleanResult | None:
    index = cache_dir / "index" / f"{key}.json"
    if not index.is_file():
        return None
    try:
        fingerprint = json.loads(index.read_text(encoding="utf-8"))["fingerprint"]
        if not isinstance(fingerprint, str) or not _HEX64.match(fingerprint):
            raise ValueError("bad fingerprint")
        folder = cache_dir / "datasets" / fingerprint
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        if not all((folder / f"{s}.jsonl").is_file() for s in SPLITS):
            raise ValueError("split file missing")
        report["dataset_dir"] = str(folder)
        return CleanResult(**report, cache_hit=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring cache index %s (%s); cleaning again", index, exc)
        return None


def _write_index(cache_dir: Path, key: str, fingerprint: str) -> None:
    folder = cache_dir / "index"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    os.replace(tmp, folder / f"{key}.json")


def _check_unchanged(stamps: dict[Path, tuple[int, int]]) -> None:
    for path, stamp in stamps.items():
        if _stamp(path) != stamp:
            raise DataError(f"{path}: file changed while it was being read; retry once the writer has finished")


# ---------------------------------------------------------------------------------------- store
def _clean_and_store(
    cfg: DataConfig,
    inputs: list[_Input],
    payload: dict[str, Any],
    cache_dir: Path,
    stamps: dict[Path, tuple[int, int]],
) -> CleanResult:
    """Clean into a temporary folder next to the store, then rename it to its fingerprint."""
    datasets = cache_dir / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=datasets))
    try:
        rows_in, dropped, rows, sizes = _run_pipeline(cfg, inputs, tmp)
        _check_unchanged(stamps)
        fingerprint = _fingerprint(payload, tmp)
        final = datasets / fingerprint
        result = CleanResult(
            fingerprint=fingerprint,
            dataset_dir=str(final),
            cache_hit=False,
            rows_in=rows_in,
            dropped=dropped,
            rows_per_split=rows,
            bytes_per_split=sizes,
            sources=[i.label for i in inputs],
            split=cfg.split,
        )
        (tmp / "report.json").write_text(result.model_dump_json(exclude={"cache_hit"}, indent=2), encoding="utf-8")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("cleaned %d records -> %s (dropped %s)", rows_in, rows, {k: v for k, v in dropped.items() if v})
    return result


def _fingerprint(payload: dict[str, Any], folder: Path) -> str:
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for split in SPLITS:
        digest.update(f"{split}:{_sha256_file(folder / f'{split}.jsonl')}\n".encode())
    return digest.hexdigest()


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; identical content already stored (by anyone) wins."""
    if (final / "report.json").is_file():
        logger.info("dataset %s already stored; reusing it", final.name[:12])
        shutil.rmtree(tmp)
        return
    if final.exists():  # an incomplete folder nobody can be using: never written by this module
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "report.json").is_file():
            raise
        shutil.rmtree(tmp)  # a concurrent run stored the same content first


# ------------------------------------------------------------------------------------- pipeline
def _run_pipeline(
    cfg: DataConfig, inputs: list[_Input], out: Path
) -> tuple[int, dict[str, int], dict[str, int], dict[str, int]]:
    """Read, clean, split and write; returns rows_in, dropped, rows_per_split, bytes_per_split."""
    cleaner = _Cleaner(cfg.cleaning)
    records = cleaner.run(_all_records(inputs, cfg.record), out / ".dedup")
    with _SplitWriter(out) as writer:
        if cfg.split == "hash":
            for text in records:
                writer.write(_hash_split(text, cfg.fractions), text)
            cleaner.require_records(inputs)
        else:
            _tail_split(records, cfg, out, writer, cleaner, inputs)
    for split in ("train", "validation"):
        if writer.rows[split] == 0:
            raise DataError(
                f"split '{split}' is empty ({cleaner.kept} records kept, split by {cfg.split}); "
                f"add data or raise data.fractions.{split}"
            )
    if cfg.fractions.test > 0 and writer.rows["test"] == 0:
        logger.warning("split 'test' is empty although data.fractions.test is %g", cfg.fractions.test)
    cleaner.log_changes()
    return cleaner.rows_in, dict(cleaner.dropped), dict(writer.rows), dict(writer.bytes)


class _SplitWriter:
    """The three ``<split>.jsonl`` files of one dataset, with per-split row and byte counts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)
        self._files: dict[str, IO[str]] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _SplitWriter:
        for split in SPLITS:
            path = self.folder / f"{split}.jsonl"
            self._files[split] = self._stack.enter_context(path.open("w", encoding="utf-8", newline="\n"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def write(self, split: str, text: str) -> None:
        self._files[split].write('{"text": ' + _JSON_STR(text) + "}\n")
        self.rows[split] += 1
        self.bytes[split] += len(text.encode("utf-8"))

    def write_chunks(self, split: str, chunks: Iterable[str]) -> None:
        """Write one record whose text is the concatenation of ``chunks``, never holding it whole."""
        handle = self._files[split]
        handle.write('{"text": "')
        for chunk in chunks:
            handle.write(_JSON_STR(chunk)[1:-1])  # JSON escapes never span characters
            self.bytes[split] += len(chunk.encode("utf-8"))
        handle.write('"}\n')
        self.rows[split] += 1


def _hash_split(text: str, fractions: SplitFractions) -> str:
    """Split picked by the record's SHA-256 read as a number in [0, 1): stable as data is added."""
    point = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    if point < fractions.train:
        return "train"
    if fractions.test == 0 or point < fractions.train + fractions.validation:
        return "validation"
    return "test"


def _short_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _tail_split(
    records: Iterable[str],
    cfg: DataConfig,
    out: Path,
    writer: _SplitWriter,
    cleaner: _Cleaner,
    inputs: list[_Input],
) -> None:
    """nanoGPT split: join records with "\\n", cut by character count into contiguous slices."""
    stream = out / "stream.txt"
    track = not cfg.cleaning.dedup  # with exact dedup on, no record can be in two splits
    ends, hashes = array("Q"), array("Q")
    n = 0
    with stream.open("w", encoding="utf-8", newline="") as handle:
        for i, text in enumerate(records):
            handle.write(text if i == 0 else "\n" + text)
            n += len(text) if i == 0 else len(text) + 1
            if track:
                ends.append(n)
                hashes.append(_short_hash(text))
    cleaner.require_records(inputs)
    fr = cfg.fractions
    train_end = int(n * fr.train)
    val_end = n if fr.test == 0 else int(n * (fr.train + fr.validation))
    _cut_stream(stream, writer, [("train", train_end), ("validation", val_end - train_end), ("test", n - val_end)])
    stream.unlink()
    if track:
        _check_leakage(ends, hashes, train_end, val_end)


def _cut_stream(stream: Path, writer: _SplitWriter, lengths: list[tuple[str, int]]) -> None:
    """Copy consecutive slices of the stream into one record per non-empty split, chunk by chunk."""
    with stream.open("r", encoding="utf-8", newline="") as handle:
        for split, length in lengths:
            if length > 0:
                writer.write_chunks(split, _read_exactly(handle, length, stream))


def _read_exactly(handle: IO[str], length: int, stream: Path) -> Iterator[str]:
    left = length
    while left > 0:
        chunk = handle.read(min(TAIL_CHUNK_CHARS, left))
        if not chunk:
            raise RuntimeError(f"{stream}: stream ended {left} characters early")
        left -= len(chunk)
        yield chunk


def _check_leakage(ends: array[int], hashes: array[int], train_end: int, val_end: int) -> None:
    """Fail if a record lying wholly in validation/test also lies wholly in train (tail split, no dedup)."""
    starts = itertools.chain([0], (e + 1 for e in ends))
    train = {h for e, h in zip(ends, hashes, strict=True) if e <= train_end}
    leaks = dict.fromkeys(("validation", "test"), 0)
    for start, end, h in zip(starts, ends, hashes, strict=False):
        if start >= train_end and h in train:
            leaks["validation" if end <= val_end else "test"] += 1
    found = [f"{n} records appear in both train and {split}" for split, n in leaks.items() if n]
    if found:
        raise DataError(f"leakage: {'; '.join(found)}; enable data.cleaning.dedup or remove the duplicates")


# ------------------------------------------------------------------------------------- cleaning
def _near_dedup_available() -> bool:
    try:
        importlib.import_module("datasketch")
    except ImportError:
        return False
    return True


class _NearDuplicates:
    """MinHash LSH over character 5-gram shingles (lowercased, whitespace collapsed)."""

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NEAR_DEDUP_PERM)
        self._count = 0

    def seen(self, text: str) -> bool:
        flat = " ".join(text.lower().split())
        shingles = {flat[i : i + 5].encode("utf-8") for i in range(max(1, len(flat) - 4))}
        sketch = self._minhash(num_perm=NEAR_DEDUP_PERM)
        sketch.update_batch(sorted(shingles))
        if self._lsh.query(sketch):
            return True
        self._lsh.insert(str(self._count), sketch)
        self._count += 1
        return False


_ENTRY_DTYPE = [("hi", "<u8"), ("lo", "<u8"), ("seq", "<i8")]
"""A bucket file entry: a stored record's 16-byte digest (two integers) and its number in the spill."""
_ENTRY_BYTES = 24
_REPLAY_BLOCK = 8 * 2**20
"""Pass 2 reads the spill in blocks of about this many bytes (or one record, if longer)."""


class _ExactDuplicates:
    """Exact de-duplication in bounded memory: decide after reading, then replay in order.

    The one-pass way, a set of every distinct record's digest, grows with the data (about 80 bytes per
    distinct record). Here, while the kept records fit in ``memory_records`` and ``memory_bytes``, it
    is still that set, and nothing touches the disk. Past that, pass 1 appends each record (UTF-8) to a spill
    file and its 16-byte BLAKE2b digest to a buffer; every ``chunk`` records, copies inside the chunk
    are marked and the chunk's distinct digests are appended to one of ``2**bits`` bucket files chosen
    by the digest's leading bits. When the input ends each bucket (about one distinct digest in
    ``2**bits``) is sorted alone: a digest's lowest record number is its first occurrence, every other
    one a duplicate; a bucket over ``bucket_cap`` entries is first split again by the next bits.
    Duplicate numbers go to one file per ``window`` of numbers, and pass 2 replays the spill one window
    at a time, a block of bytes at a time. A record is dropped exactly when an earlier record that
    passed the content rules has the same digest: the one-pass set's decisions, in memory bounded by
    the chunk, one bucket and one window, with sequential disk traffic: the text of every record that
    passed the content rules plus about 40 bytes a record, all deleted when the filter ends.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        chunk: int = 2**17,
        bits: int = 8,
        bucket_cap: int = 2**20,
        window: int = 2**18,
        memory_records: int = 2**15,
        memory_bytes: int = 4 * 2**20,
    ) -> None:
        self.workdir = workdir
        self.chunk, self.bits, self.bucket_cap, self.window = chunk, bits, bucket_cap, window
        self.memory_records, self.memory_bytes = memory_records, memory_bytes
        self.dropped = 0
        self._pending: list[str] | None = []  # kept records while everything fits in memory
        self._digests = bytearray()  # digests of the spilled records numbered from self._base on
        self._lengths = array("Q")  # their UTF-8 lengths
        self._base = 0
        self._stored = 0  # records in the spill

    def filter(self, texts: Iterable[str]) -> Iterator[str]:
        """Yield ``texts`` without exact duplicates, in order.

        Small inputs stream as they are read; larger ones are read whole before the first yield.
        """
        try:
            records = iter(texts)
            if not self._read_in_memory(records):
                yield from self._pending or []
                return
            self._read_spilling(records)
            self._resolve_all()
            yield from self._replay()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # pass 1 ------------------------------------------------------------------------------------
    def _read_in_memory(self, records: Iterator[str]) -> bool:
        """The one-pass set until the kept records outgrow memory; True if the rest must be spilled."""
        seen: set[bytes] = set()
        pending: list[str] = []
        size = 0
        self._pending = pending
        for text in records:
            data = text.encode("utf-8")
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if digest in seen:
                self.dropped += 1
                continue
            seen.add(digest)
            pending.append(text)
            size += len(data)
            if size > self.memory_bytes or len(pending) >= self.memory_records:
                self._start_spill(pending)
                return True
        return False

    def _start_spill(self, pending: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "records.bin").open("wb") as spill:
            for text in pending:
                data = text.encode("utf-8")
                self._digests += hashlib.blake2b(data, digest_size=16).digest()
                self._lengths.append(len(data))
                spill.write(data)
        self._pending = None
        if len(self._lengths) >= self.chunk:
            self._flush_chunk()

    def _read_spilling(self, records: Iterator[str]) -> None:
        digests, lengths, chunk = self._digests, self._lengths, self.chunk
        with (self.workdir / "records.bin").open("ab") as spill:
            write = spill.write
            for text in records:
                data = text.encode("utf-8")
                digests += hashlib.blake2b(data, digest_size=16).digest()
                lengths.append(len(data))
                write(data)
                if len(lengths) == chunk:
                    self._flush_chunk()
                    digests, lengths = self._digests, self._lengths
        self._flush_chunk()

    def _flush_chunk(self) -> None:
        """Mark copies inside the chunk; send its distinct digests to the buckets; store the lengths."""
        import numpy as np

        count = len(self._lengths)
        if count == 0:
            return
        with (self.workdir / "lengths.bin").open("ab") as handle:
            handle.write(self._lengths.tobytes())
        pairs = np.frombuffer(self._digests, dtype=">u8").reshape(count, 2).astype(np.uint64)
        seq = np.arange(self._base, self._base + count, dtype=np.int64)
        later = _later_copies(pairs[:, 0], pairs[:, 1])
        self._save_dups(seq[later])
        entries = np.empty(int(count - later.sum()), dtype=_ENTRY_DTYPE)
        entries["hi"], entries["lo"], entries["seq"] = pairs[~later, 0], pairs[~later, 1], seq[~later]
        self._partition(entries, level=0, folder=self.workdir / "buckets")
        self._base += count
        self._digests, self._lengths = bytearray(), array("Q")

    def _partition(self, entries: Any, level: int, folder: Path) -> None:
        """Append entries to bucket files by the digest bits after the first ``level * bits``; order kept."""
        import numpy as np

        folder.mkdir(parents=True, exist_ok=True)
        shift = np.uint64(64 - self.bits * (level + 1))
        bucket = (entries["hi"] >> shift) & np.uint64(2**self.bits - 1)
        order = np.argsort(bucket, kind="stable")
        entries, bucket = entries[order], bucket[order]
        ids, starts = np.unique(bucket, return_index=True)
        for b, part in zip(ids, np.split(entries, starts[1:]), strict=True):
            with (folder / f"{int(b):05d}").open("ab") as handle:
                part.tofile(handle)

    def _save_dups(self, seqs: Any) -> None:
        """Append duplicate record numbers (ascending) to their window files."""
        import numpy as np

        if len(seqs) == 0:
            return
        folder = self.workdir / "dups"
        folder.mkdir(parents=True, exist_ok=True)
        ids, starts = np.unique(seqs // self.window, return_index=True)
        for w, part in zip(ids, np.split(seqs, starts[1:]), strict=True):
            with (folder / f"{int(w)}").open("ab") as handle:
                part.tofile(handle)
        self.dropped += len(seqs)

    # resolution ---------------------------------------------------------------------------------
    def _resolve_all(self) -> None:
        self._stored = self._base
        buckets = self.workdir / "buckets"
        if buckets.is_dir():
            self._resolve(buckets, level=0)
        logger.debug("exact dedup: %d duplicates; %d records went through the spill", self.dropped, self._stored)

    def _resolve(self, folder: Path, level: int) -> None:
        """Sort each bucket alone (order kept inside it, so the lowest number is the first copy)."""
        import numpy as np

        can_split = 64 - self.bits * (level + 2) >= 0  # bits of the digest's first half left to split on
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            if can_split and path.stat().st_size > self.bucket_cap * _ENTRY_BYTES:
                sub = folder / f"{path.name}.d"
                with path.open("rb") as handle:
                    while (part := np.fromfile(handle, dtype=_ENTRY_DTYPE, count=self.chunk)).size:
                        self._partition(part, level + 1, sub)
                path.unlink()
                self._resolve(sub, level + 1)
                continue
            entries = np.fromfile(path, dtype=_ENTRY_DTYPE)
            later = _later_copies(entries["hi"], entries["lo"])
            self._save_dups(entries["seq"][later])
            path.unlink()

    # pass 2 -------------------------------------------------------------------------------------
    def _replay(self) -> Iterator[str]:
        import numpy as np

        with (
            (self.workdir / "records.bin").open("rb") as data,
            (self.workdir / "lengths.bin").open("rb") as lengths,
        ):
            for w in range(-(-self._stored // self.window)):
                lens = np.fromfile(lengths, dtype=np.uint64, count=self.window).astype(np.int64)
                path = self.workdir / "dups" / f"{w}"
                keep = np.ones(len(lens), dtype=bool)
                if path.is_file():
                    keep[np.fromfile(path, dtype=np.int64) - w * self.window] = False
                yield from _replay_window(data, lens, keep)


def _replay_window(data: IO[bytes], lens: Any, keep: Any) -> Iterator[str]:
    """Decode the kept records of one window from ``data``, reading about ``_REPLAY_BLOCK`` bytes at a time."""
    import numpy as np

    ends = np.cumsum(lens)
    starts = ends - lens
    kept = np.flatnonzero(keep)
    i = 0
    while i < len(lens):
        # Records [i, j) fill one block; a record longer than a block is a block of its own.
        j = max(i + 1, int(np.searchsorted(ends, starts[i] + _REPLAY_BLOCK, side="right")))
        origin = int(starts[i])
        block = data.read(int(ends[j - 1]) - origin)
        chosen = kept[np.searchsorted(kept, i) : np.searchsorted(kept, j)]
        for s, e in zip((starts[chosen] - origin).tolist(), (ends[chosen] - origin).tolist(), strict=True):
            yield block[s:e].decode("utf-8")
        i = j


def _later_copies(hi: Any, lo: Any) -> Any:
    """Boolean mask: True where (hi, lo) equals an earlier entry's (stable sort: earlier stays first)."""
    import numpy as np

    order = np.lexsort((lo, hi))
    h, low = hi[order], lo[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (h[1:] == h[:-1]) & (low[1:] == low[:-1])
    later = np.zeros(len(order), dtype=bool)
    later[order] = same
    return later


class _Cleaner:
    """Normalizes each record and counts what every drop rule removed."""

    def __init__(self, cfg: CleaningConfig) -> None:
        self.cfg = cfg
        self.rows_in = 0
        self.kept = 0
        self.changed = 0
        self.dropped = dict.fromkeys(RULES, 0)
        self._near: _NearDuplicates | None = None
        if cfg.near_dedup:
            if _near_dedup_available():
                self._near = _NearDuplicates(cfg.near_dedup_threshold)
            else:
                logger.warning("near_dedup is on but datasketch is not installed; skipping near-duplicates")

    def run(self, texts: Iterable[str], workdir: Path) -> Iterator[str]:
        """Yield the kept records in input order; ``workdir`` holds exact dedup's spill files meanwhile."""
        records = self._content(texts)
        exact = _ExactDuplicates(workdir) if self.cfg.dedup else None
        if exact is not None:
            records = exact.filter(records)
        for text in records:
            if self._near is not None and self._near.seen(text):
                self.dropped["near_duplicate"] += 1
                continue
            self.kept += 1
            yield text
        if exact is not None:
            self.dropped["duplicate"] = exact.dropped

    def _content(self, texts: Iterable[str]) -> Iterator[str]:
        """Normalize each record and apply the content rules (every rule but the two dedups)."""
        for raw in texts:
            self.rows_in += 1
            progress.clean_record(raw)
            text = clean_text(raw, self.cfg)
            self.changed += text != raw
            rule = drop_reason(text, self.cfg)
            if rule is not None:
                self.dropped[rule] += 1
                continue
            yield text

    def require_records(self, inputs: list[_Input]) -> None:
        if self.kept:
            return
        labels = [i.label for i in inputs]
        shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        drops = ", ".join(f"{k}={v}" for k, v in self.dropped.items() if v) or "none"
        raise DataError(f"no records left after cleaning ({self.rows_in} read from {shown}; dropped: {drops})")

    def log_changes(self) -> None:
        logger.info("normalization changed %d of %d records (not a drop)", self.changed, self.rows_in)


# -------------------------------------------------------------------------------------- reading
def _all_records(inputs: list[_Input], mode: str) -> Iterator[str]:
    for item in inputs:
        logger.debug("reading %s (%s)", item.label, item.fmt)
        yield from _records(item, mode)


def _records(item: _Input, mode: str) -> Iterator[str]:
    if item.path is None:
        corpus = builtin_corpus(item.max_bytes)
        yield from _group(enumerate(io.StringIO(corpus, newline="\n"), start=1), mode, item.label)
        return
    readers: dict[str, Callable[[Path, str], Iterator[str]]] = {
        "jsonl": _jsonl_records,
        "json": _json_records,
        "csv": _csv_records,
        "parquet": _parquet_records,
    }
    if item.fmt in readers:
        yield from readers[item.fmt](item.path, item.text_column)
    else:
        yield from _group(_iter_lines(item.path), mode, item.label)


def _decode(raw: bytes, path: Path, offset: int, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 at byte {offset + exc.start} (line {number})") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its terminator), the BOM stripped, one line in memory at a time."""
    offset = 0
    with path.open("rb") as handle:
        for number in itertools.count(1):
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes (at byte {offset})")
            skip = len(codecs.BOM_UTF8) if number == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            yield number, _decode(raw[skip:], path, offset + skip, number)
            offset += len(raw)


def _group(lines: Iterable[tuple[int, str]], mode: str, label: str) -> Iterator[str]:
    """Cut plain-text lines into records: each line, each blank-line separated paragraph, or the file."""
    if mode == "line":
        for _, line in lines:
            yield line.removesuffix("\n").removesuffix("\r")
        return
    parts: list[str] = []
    size = 0
    for number, line in lines:
        if mode == "paragraph" and not line.strip():
            if parts:
                yield "".join(parts)
            parts, size = [], 0
            continue
        parts.append(line)
        size += len(line)
        if size > MAX_RECORD_CHARS:
            raise DataError(
                f"{label}:{number}: record longer than {MAX_RECORD_CHARS} characters; use data.record: line"
            )
    if parts:
        yield "".join(parts)


def _field(obj: Any, column: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if column not in obj:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(map(str, obj))})")
    value = obj[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} is {type(value).__name__}, expected a string")
    return value


def _jsonl_records(path: Path, column: str) -> Iterator[str]:
    count = 0
    for number, line in _iter_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        count += 1
        yield _field(obj, column, f"{path}:{number}")
    if not count:
        raise DataError(f"{path}: no records (only blank lines)")


def _json_records(path: Path, column: str) -> Iterator[str]:
    """A ``.json`` file: a list of objects (parsed whole, size-capped) or else JSON Lines."""
    with path.open("rb") as handle:
        head = handle.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_records(path, column)
        return
    if path.stat().st_size > MAX_JSON_BYTES:
        raise DataError(f"{path}: JSON list larger than {MAX_JSON_BYTES} bytes; convert it to JSON Lines")
    raw = path.read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = skip + exc.start
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"{path}: not valid UTF-8 at byte {at} (line {line})") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not items:
        raise DataError(f"{path}: no records (empty list)")
    for i, obj in enumerate(items):
        yield _field(obj, column, f"{path}: item {i}")


def _csv_records(path: Path, column: str) -> Iterator[str]:
    """Stream a CSV with a header row; wrong field counts and broken quoting fail with the line number."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_CHARS))
    reader = csv.reader((line for _, line in _iter_lines(path)), strict=True)
    header = _csv_row(reader, path)
    if header is None:
        raise DataError(f"{path}: file is empty")
    if column not in header:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(header)})")
    index, count = header.index(column), 0
    while (row := _csv_row(reader, path)) is not None:
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {len(row)}")
        count += 1
        yield row[index]
    if not count:
        raise DataError(f"{path}: no rows (header only)")


def _csv_row(reader: Any, path: Path) -> list[str] | None:
    start = reader.line_num + 1
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise DataError(f"{path}:{start}: malformed CSV ({exc})") from None


def _parquet_records(path: Path, column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = parquet.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {column!r} has type {kind}, expected string")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path}: no rows")
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield value or ""


# -------------------------------------------------------------------------------------- builtin
def _builtin_docs() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python installs
        logger.warning("pydoc_data is missing; the builtin corpus has docstrings only")
        topics = {}
    for key in sorted(topics):
        yield topics[key].strip()
    for name in BUILTIN_MODULES:
        tree = _module_ast(name)
        if tree is not None:
            yield from _ast_docs(name, tree)


def _module_ast(name: str) -> ast.Module | None:
    """Parse a stdlib module's source (read, not imported: runtime patching cannot change the corpus)."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # pragma: no cover - optional stdlib parts
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with tokenize.open(spec.origin) as handle:
            return ast.parse(handle.read())
    except (OSError, SyntaxError, UnicodeDecodeError):  # pragma: no cover - stripped installs
        return None


def _ast_docs(name: str, tree: ast.Module) -> Iterator[str]:
    """The module docstring, then each public class/function (and class method) docstring in source order."""
    doc = ast.get_docstring(tree)
    if doc:
        yield f"{name}\n\n{doc}"
    for node in tree.body:
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if doc:
            yield f"{name}.{node.name}\n\n{doc}"
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                is_def = isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
                doc = ast.get_docstring(member) if is_def and not member.name.startswith("_") else None
                if doc:
                    yield f"{name}.{node.name}.{member.name}\n\n{doc}"
