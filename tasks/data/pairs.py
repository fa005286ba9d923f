"""Prompt/completion data in the cleaning stage: the ``python-docstrings`` input, empty completions, held-out pairs.

A completion record carries ``prompt`` and ``completion`` (cleaned like any text) and ``text`` = prompt + newline
+ completion, the text that dedup, the hash split and a trained tokenizer see. A record whose completion is
empty is dropped and counted (``empty_completion``). The ``python-docstrings`` test pairs stay out of the
``python-docs`` pretraining text: every pair whose hash-split point lies in the last :data:`HELD_OUT_FROM` of
the unit interval (the test split of any ``data.fractions`` with ``train + validation >= 0.9``) is excluded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from forgeline.tasks.data.builtin import DOCSTRINGS_LABEL, builtin_corpus, docstring_pairs, docstrings_digest
from forgeline.tasks.data.memory import Bits

PAIR_SEPARATOR = "\n"
"""Between prompt and completion in ``text`` (``tasks.train.completion.DEFAULT_SEPARATOR``'s value)."""
HELD_OUT_FROM = 0.9
"""Docstring pairs whose hash-split point is at least this never enter the ``python-docs`` corpus."""


def builtin_entry(fmt: str, label: str, max_bytes: int, cache_dir: Path | None = None) -> list[str]:
    """The cleaning cache key's entry for a built-in input: its records' digest (``builtin`` or ``docstrings``)."""
    if fmt == "docstrings":
        return [DOCSTRINGS_LABEL, docstrings_digest(max_bytes)]
    return [label, hashlib.sha256(pretraining_corpus(max_bytes, cache_dir).encode()).hexdigest()]


def write_docstrings(path: Path, max_bytes: int) -> Path:
    """Write ``python-docstrings`` (capped at ``max_bytes``) as JSON Lines with ``prompt`` and ``completion``."""
    with path.open("w", encoding="utf-8") as handle:
        for record in docstring_pairs(max_bytes):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def split_point(text: str) -> float:
    """Where a cleaned text falls in [0, 1) for the hash split (``rules.clean_batch``'s rule)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def held_out_docstrings(cache_dir: Path | None = None) -> frozenset[str]:
    """Completions of the ``python-docstrings`` pairs that may be test pairs (hash-split point >= 0.9).

    Kept in ``cache_dir`` per Python version: extracting the corpus starts an interpreter (about a second), which
    every language-model run would otherwise pay again.
    """
    if _HELD:
        return _HELD[0]
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stored = cache_dir / f"held-out-docstrings-{version}.json" if cache_dir else None
    if stored is not None and stored.is_file():
        try:
            _HELD.append(frozenset(json.loads(stored.read_text(encoding="utf-8"))))
            return _HELD[0]
        except (OSError, ValueError):
            pass  # unreadable: computed again and rewritten below
    held = frozenset(
        p["completion"]
        for p in docstring_pairs()
        if split_point(p["prompt"] + PAIR_SEPARATOR + p["completion"]) >= HELD_OUT_FROM and p["completion"]
    )
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(sorted(held)), encoding="utf-8")
        os.replace(tmp, stored)
    _HELD.append(held)
    return held


_HELD: list[frozenset[str]] = []  # this process's copy: the set depends on the Python version alone


def pretraining_corpus(max_bytes: int, cache_dir: Path | None = None) -> str:
    """The ``python-docs`` corpus without any document holding a held-out docstring pair's completion."""
    return builtin_corpus(max_bytes, exclude=held_out_docstrings(cache_dir))


def empty_completions(ds: Any, keep: Bits, chunk: int) -> Bits:
    """Mask of kept records whose ``completion`` is empty or whitespace (after cleaning)."""
    import pyarrow.compute as pc

    out = Bits(len(keep))
    column = ds.data.column("completion")
    for start in range(0, len(keep), chunk):
        part = column.slice(start, min(chunk, len(keep) - start))
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(part), ""), True)
        out.put(start, blank.to_numpy(zero_copy_only=False) & keep.get(start, start + len(part)))
    return out
