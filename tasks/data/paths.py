"""Where data may come from: sources resolved to files (or datasets), with the path-safety rules.

URLs, percent-encoded separators and NUL bytes are refused before anything is opened; ``..`` may not lead
outside the allowed roots, nor may a symlink (``data.roots``, or else the working directory and each
source's own folder). Paths typed on the command line (``--data``) become roots of their own.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from forgeline.tasks.config import BuiltinSource, DirectorySource, FilesSource, HfSource, Source
from forgeline.tasks.data.builtin import BUILTIN_LABEL, DOCSTRINGS_LABEL

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst"})
TABLE_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet"})
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | TABLE_SUFFIXES

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
_SCHEME = re.compile(r"^(file|https?|ftp|sftp|s3|gs|gcs|az|abfs|hf|data):", re.IGNORECASE)
_ENCODED = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_GLOB_MAGIC = re.compile(r"[*?\[]")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class DataError(ValueError):
    """Bad input data: a one-line message naming the file (and line or byte offset where it applies)."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", message))


@dataclass(frozen=True)
class Input:
    """One resolved input: a file, a Hugging Face dataset (``fmt`` ``hf-disk``/``hf-hub``) or the builtin corpus."""

    label: str
    fmt: str
    path: Path | None = None
    text_column: str = "text"
    max_bytes: int = 0
    hf: HfSource | None = None


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
        elif join(base, value).is_dir():
            sources.append(DirectorySource(path=value, text_column=text_column))
        elif join(base, value).is_file():
            sources.append(FilesSource(paths=[value], text_column=text_column))
        else:
            raise DataError(f"{value}: no such file or directory")
    return sources


def join(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


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
        self.lexical = [join(base, r) for r in roots] or [base]
        self.real = [p.resolve() for p in self.lexical]
        self.explicit = bool(roots)

    def path(self, value: str) -> Path:
        """``value`` joined to the base folder; refused if it is a URL or its ``..`` or location leaves the roots."""
        _check_value(value)
        lexical = join(self.base, value)
        if ".." in Path(value).parts and not any(lexical.is_relative_to(r) for r in self.lexical):
            where = "data.roots" if self.explicit else f"the working directory {self.base}"
            raise DataError(f"{value}: '..' leads outside {where}; add the folder to data.roots")
        if self.explicit and not any(
            lexical.is_relative_to(r) or lexical.resolve().is_relative_to(r) for r in self.real
        ):
            raise DataError(f"{value}: outside the allowed data roots ({', '.join(map(str, self.real))})")
        return lexical

    def check_file(self, value: str, path: Path, anchor: Path) -> Path:
        """Return the real path of ``path`` if it (symlinks followed) lies inside an allowed root."""
        real = path.resolve()
        allowed = self.real if self.explicit else [*self.real, anchor.resolve()]
        if not any(real.is_relative_to(r) for r in allowed):
            shown = ", ".join(str(r) for r in allowed)
            raise DataError(f"{value}: {path} resolves to {real}, outside the allowed data roots ({shown})")
        return real


def _anchor(value: str, base: Path) -> Path:
    """The folder a value stands for: a glob's leading fixed part, a folder itself, or a file's parent."""
    if _GLOB_MAGIC.search(value):
        fixed = itertools.takewhile(lambda p: not _GLOB_MAGIC.search(p), Path(value).parts)
        return join(base, str(Path(*fixed)))
    lexical = join(base, value)
    return lexical if lexical.is_dir() else lexical.parent


def _expand_glob(value: str, base: Path) -> list[Path]:
    pattern = value if Path(value).is_absolute() else os.path.join(glob.escape(str(base)), value)
    found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not found:
        raise DataError(f"{value}: glob matched no files")
    return [Path(os.path.normpath(p)) for p in found]


def resolve_inputs(
    sources: Iterable[Source], base: Path, roots: list[str], data_override: list[str] | None = None
) -> list[Input]:
    """Expand sources into inputs in order, checking every path against the allowed roots.

    ``data_override`` (CLI ``--data`` values) replaces ``sources``; the folders it names become roots too.

    Raises:
        DataError: A path is unsafe, missing, empty or matches nothing.
    """
    if data_override:
        sources = resolve_data_override(data_override, base_dir=base)
        roots = [*(roots or [str(base)]), *(str(_anchor(value, base)) for value in data_override)]
    guard = _Roots(base, roots)
    inputs: list[Input] = []
    for source in sources:
        if isinstance(source, BuiltinSource) and source.name == "python-docstrings":
            inputs.append(Input(label=DOCSTRINGS_LABEL, fmt="docstrings", max_bytes=source.max_bytes))
        elif isinstance(source, BuiltinSource):
            inputs.append(Input(label=BUILTIN_LABEL, fmt="builtin", max_bytes=source.max_bytes))
        elif isinstance(source, HfSource):
            inputs.append(_hf_input(source, guard))
        elif isinstance(source, DirectorySource):
            inputs += _directory_inputs(source, guard)
        else:
            for value in source.paths:
                inputs += _files_inputs(value, source.text_column, guard)
    return inputs


def _hf_input(source: HfSource, guard: _Roots) -> Input:
    _check_value(source.name)  # before the name is looked up as a folder
    if join(guard.base, source.name).is_dir():
        folder = guard.path(source.name)
        real = guard.check_file(source.name, folder, folder)
        return Input(label=str(real), fmt="hf-disk", path=real, text_column=source.text_column, hf=source)
    if source.name.startswith((".", "/", "~")) or not _HUB_ID.match(source.name):
        raise DataError(f"{source.name}: no such directory (and not a hub dataset id)")
    return Input(label=f"hf:{source.name}", fmt="hf-hub", text_column=source.text_column, hf=source)


def _files_inputs(value: str, column: str, guard: _Roots) -> list[Input]:
    lexical = guard.path(value)
    if _GLOB_MAGIC.search(value):
        anchor, files = _anchor(value, guard.base), _expand_glob(value, guard.base)
    elif lexical.is_dir():
        raise DataError(f"{value}: is a directory; use a directory source (kind: directory)")
    elif not lexical.is_file():
        raise DataError(f"{value}: no such file or directory")
    else:
        anchor, files = lexical.parent, [lexical]
    return [_file_input(value, f, column, guard, anchor) for f in files]


def _directory_inputs(source: DirectorySource, guard: _Roots) -> list[Input]:
    folder = guard.path(source.path)
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


def _file_input(value: str, path: Path, column: str, guard: _Roots, anchor: Path) -> Input:
    real = guard.check_file(value, path, anchor)
    size = real.stat().st_size
    if size == 0 or (size == len(codecs.BOM_UTF8) and real.read_bytes() == codecs.BOM_UTF8):
        raise DataError(f"{real}: file is empty")
    suffix = real.suffix.lower()
    fmt = suffix.lstrip(".") if suffix in TABLE_SUFFIXES else "text"
    return Input(label=str(real), fmt=fmt, path=real, text_column=column)
