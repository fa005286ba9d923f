"""Prompt/completion data in the cleaning stage: the ``python-docstrings`` input, empty completions, held-out pairs.

A completion record carries ``prompt`` and ``completion`` (cleaned like any text) and ``text`` = prompt + newline
+ completion, the text that dedup, the hash split and a trained tokenizer see. A record whose completion is
empty is dropped and counted (``empty_completion``). The ``python-docstrings`` test pairs stay out of the
``python-docs`` pretraining text: every pair whose hash-split point lies in the last :data:`HELD_OUT_FROM` of
the unit interval (the test split of any ``data.fractions`` with ``train + validation >= 0.9``) is excluded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from forgeline.tasks.data.builtin import DOCSTRINGS_LABEL, builtin_corpus, docstring_pairs, docstrings_digest

PAIR_SEPARATOR = "\n"
"""Between prompt and completion in ``text`` (``tasks.train.completion.DEFAULT_SEPARATOR``'s value)."""
HELD_OUT_FROM = 0.9
"""Docstring pairs whose hash-split point is at least this never enter the ``python-docs`` corpus."""


def docstrings_entry(max_bytes: int) -> list[str]:
    """The cleaning cache key's entry for the ``python-docstrings`` input (its records' digest)."""
    return [DOCSTRINGS_LABEL, docstrings_digest(max_bytes)]


def write_docstrings(path: Path, max_bytes: int) -> Path:
    """Write ``python-docstrings`` (capped at ``max_bytes``) as JSON Lines with ``prompt`` and ``completion``."""
    with path.open("w", encoding="utf-8") as handle:
        for record in docstring_pairs(max_bytes):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def split_point(text: str) -> float:
    """Where a cleaned text falls in [0, 1) for the hash split (``rules.clean_batch``'s rule)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


@functools.lru_cache(maxsize=1)
def held_out_docstrings() -> frozenset[str]:
    """Completions of the ``python-docstrings`` pairs that may be test pairs (hash-split point >= 0.9)."""
    pairs = docstring_pairs()
    return frozenset(
        p["completion"]
        for p in pairs
        if split_point(p["prompt"] + PAIR_SEPARATOR + p["completion"]) >= HELD_OUT_FROM and p["completion"]
    )


def pretraining_corpus(max_bytes: int) -> str:
    """The ``python-docs`` corpus without any document holding a held-out docstring pair's completion."""
    return builtin_corpus(max_bytes, exclude=held_out_docstrings())


def empty_completions(ds: Any, keep: np.ndarray, chunk: int) -> np.ndarray:
    """Mask of kept records whose ``completion`` is empty or whitespace (after cleaning)."""
    import pyarrow.compute as pc

    out = np.zeros(len(keep), dtype=bool)
    column = ds.data.column("completion")
    for start in range(0, len(keep), chunk):
        part = column.slice(start, min(chunk, len(keep) - start))
        blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(part), ""), True)
        out[start : start + len(part)] = blank.to_numpy(zero_copy_only=False)
    return out & keep
