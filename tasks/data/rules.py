"""Cleaning rules for one record, and the batched ``map`` function that applies them to a whole dataset.

Per record, in order:

1. line endings: CRLF and CR become LF; a leading UTF-8 BOM is stripped; lone surrogates are dropped;
2. ``strip_control``: control characters (Unicode ``Cc``) other than ``\\n`` and ``\\t`` are removed,
   as are the invisible ZERO WIDTH SPACE, WORD JOINER and ZERO WIDTH NO-BREAK SPACE;
3. ``unicode_form``: NFC, NFKC (``"ﬁ"`` becomes ``"fi"``) or none;
4. ``normalize_whitespace``: tabs expand to the next multiple of 4 columns, trailing whitespace of every
   line goes, runs of 3+ newlines collapse to one blank line, and the record is stripped;
5. drop rules, the first that applies is counted: ``empty``, ``too_short`` (``min_chars``), ``too_long``
   (``max_chars``), ``non_text`` (share of characters that are neither letters, combining marks nor
   whitespace above ``max_nontext_fraction``); the two de-duplications run later, over the whole dataset.
"""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from typing import Any

import numpy as np

from forgeline.tasks.config import CleaningConfig
from forgeline.tasks.data.memory import release_arrays

RULES = ("empty", "too_short", "too_long", "non_text", "duplicate", "near_duplicate")
KEEP = 0
"""``rule`` column value of a kept record; a dropped one holds 1 + its index in ``RULES``."""
TEXT_PREFIX = "_t"
"""Input columns ``_t0``, ``_t1``... hold the text (several are joined with a newline)."""
EXTRA_COLUMNS = ("label", "prompt", "completion")

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u2060\ufeff]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_NONTEXT = re.compile(r"[^\w\s]|[\d_]")
_ASCII_SPACE = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"
"""What Python's ``str.strip()`` and ``\\s`` call whitespace, for ASCII."""
_NONTEXT_ASCII = f"[^A-Za-z{_ASCII_SPACE}]"
"""``_NONTEXT`` on ASCII text in RE2 syntax: not a letter and not whitespace."""


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
    if not cfg.normalize_whitespace:
        return text
    if "\t" in text:
        text = text.expandtabs(4)
    if "\n" in text:  # each line's trailing whitespace goes (the last line's: by the strip below)
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


def paragraphs(text: str) -> list[str]:
    """Cut a text into blank-line separated paragraphs (a line of spaces is blank too)."""
    out: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            out.append("\n".join(lines))
            lines = []
    if lines:
        out.append("\n".join(lines))
    return out


def clean_array(arr: Any, cfg: CleaningConfig) -> Any:
    """``clean_text`` over an Arrow string array: Arrow normalizes ASCII records without tabs, Python the rest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    slow = pc.invert(pc.string_is_ascii(arr))
    if cfg.normalize_whitespace:  # tabs expand by column: Python's expandtabs
        slow = pc.or_(slow, pc.match_substring(arr, "\t"))

    def sub(array: Any, pattern: str, replacement: str) -> Any:  # a copy only where a record matches
        hit = pc.any(pc.match_substring_regex(array, pattern)).as_py()
        return pc.replace_substring_regex(array, pattern, replacement) if hit else array

    out = sub(arr, r"\r\n?", "\n")
    if cfg.strip_control:
        out = sub(out, r"[\x00-\x08\x0b-\x1f\x7f]", "")
    if cfg.normalize_whitespace:  # what Python's str.strip() calls whitespace, for ASCII
        out = sub(out, r"[ \t\x0b\x0c\r\x1c-\x1f]+\n", "\n")
        out = sub(out, r"\n{3,}", "\n\n")
        if pc.any(pc.match_substring_regex(out, rf"^[{_ASCII_SPACE}]|[{_ASCII_SPACE}]$")).as_py():
            out = pc.ascii_trim(out, characters=_ASCII_SPACE)
    if not pc.any(slow).as_py():
        return out
    redo = [clean_text(t, cfg) for t in pc.filter(arr, slow).to_pylist()]
    return pc.replace_with_mask(out, slow, pa.array(redo, pa.string()))


def clean_batch(
    batch: Any, cfg: dict[str, Any], paragraph: bool, fractions: tuple[float, float, float], progress: str | None = None
) -> Any:
    """The cleaning ``map`` over an Arrow batch: normalized text plus the columns later passes decide on.

    Args:
        batch: A ``pyarrow.Table`` with ``_t0``... (text parts) and any of ``label``/``prompt``/``completion``.
        cfg: ``CleaningConfig`` as a dict (cheap to pickle into worker processes).
        paragraph: Re-cut each text into paragraphs (the text builder splits on ``"\\n\\n"`` only).
        fractions: Train, validation and test fractions, for the hash split.
        progress: A file that gets the batch's record and byte counts appended (the main process tails it).

    Returns:
        A table: ``text`` (empty for dropped records), ``rule`` (``KEEP`` or 1 + the index of the drop rule
        in ``RULES``), ``hi``/``lo`` (the first 16 bytes of the text's SHA-256, for exact dedup), ``split``
        (0, 1, 2: ``hi`` read as a number in [0, 1) picks it, so new data never moves an old record),
        ``chars`` (length, for the tail split), the carried columns (a label stripped of surrounding
        whitespace) and, with a label, ``lab`` (the first 8 bytes of the label's SHA-256).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    rules = CleaningConfig(**cfg)

    parts = [pc.fill_null(batch.column(n), "") for n in sorted(batch.column_names) if n.startswith(TEXT_PREFIX)]
    pair = {}  # prompt and completion are cleaned like text; without text columns, text = prompt \n completion
    for key in ("prompt", "completion"):
        if key in batch.column_names:
            pair[key] = clean_array(pc.fill_null(batch.column(key), "").combine_chunks(), rules)
    if not parts:
        parts = [pair["prompt"], pair["completion"]]
    arr = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\n")
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    extras = {k: pair.get(k, batch.column(k)) for k in EXTRA_COLUMNS if k in batch.column_names}
    if "label" in extras:  # " mlops" and "mlops" are one class; ``lab`` lets dedup see a text's two labels
        extras["label"] = pc.utf8_trim_whitespace(pc.fill_null(extras["label"], ""))
        labs = b"".join(hashlib.sha256(v.encode("utf-8")).digest()[:8] for v in extras["label"].to_pylist())
        extras["lab"] = np.frombuffer(labs, dtype=">u8").astype(np.uint64)
    if paragraph:
        arr = pa.array([p for raw in arr.to_pylist() for p in paragraphs(raw)], pa.string())
    read = struct.pack("<qq", len(arr), pc.sum(pc.binary_length(arr)).as_py() or 0)
    arr = clean_array(arr, rules)
    chars = pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    share = pc.count_substring_regex(arr, _NONTEXT_ASCII).to_numpy(zero_copy_only=False) / np.maximum(chars, 1)
    empty = pc.invert(pc.match_substring_regex(arr, f"[^{_ASCII_SPACE}]")).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~pc.string_is_ascii(arr).to_numpy(zero_copy_only=False)):
        text = arr[int(i)].as_py()
        share[i], empty[i] = nontext_fraction(text), not text.strip()
    too_long = chars > rules.max_chars if rules.max_chars is not None else np.zeros(len(chars), dtype=bool)
    checks = [empty, chars < rules.min_chars, too_long, share > rules.max_nontext_fraction]
    rule = np.select(checks, [1, 2, 3, 4], KEEP).astype(np.int8)
    kept = pc.if_else(pa.array(rule == KEEP), arr, "")
    digests = b"".join(hashlib.sha256(t.encode("utf-8")).digest()[:16] for t in kept.to_pylist())
    pairs = np.frombuffer(digests, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    point = pairs[:, 0].astype(np.float64) / 2.0**64
    train, validation, test = fractions
    split = np.where(point < train, 0, np.where((test == 0) | (point < train + validation), 1, 2)).astype(np.int8)
    columns = {"text": kept, "rule": rule, "hi": pairs[:, 0], "lo": pairs[:, 1], "split": split}
    if progress:  # one 16-byte append per batch is atomic (O_APPEND), whichever process runs it
        with open(progress, "ab") as handle:
            handle.write(read)
    release_arrays(chunk for column in batch.columns for chunk in column.chunks)  # read once: off the RSS
    return pa.table(columns | {"chars": np.where(rule == KEEP, chars, 0)} | extras)


class NearDuplicates:
    """MinHash LSH over character 5-gram shingles (lowercased, whitespace collapsed); sequential."""

    PERMUTATIONS = 128

    def __init__(self, threshold: float) -> None:
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=self.PERMUTATIONS)
        self._count = 0

    def seen(self, text: str) -> bool:
        """True if a similar text was offered before; otherwise remember this one."""
        flat = " ".join(text.lower().split())
        shingles = {flat[i : i + 5].encode("utf-8") for i in range(max(1, len(flat) - 4))}
        sketch = self._minhash(num_perm=self.PERMUTATIONS)
        sketch.update_batch(sorted(shingles))
        if self._lsh.query(sketch):
            return True
        self._lsh.insert(str(self._count), sketch)
        self._count += 1
        return False
