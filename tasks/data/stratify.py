"""The stratified hash split of labeled data: each record where its content hash puts it, every class in every split.

A record's split is picked by its text's hash exactly as ``split: hash`` picks it, so within each class the
expected share of every split is ``data.fractions`` and adding records never moves the ones already there.
Only where a class would miss a split that needs it (train, validation, and test when its fraction is above
0) does one of that class's records move: the one whose hash lies nearest to the missing split's range,
taken from a split that keeps at least one record of the class. When later data fills that split by hash,
the moved record goes back to its own place.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from forgeline.tasks.config import SplitFractions
from forgeline.tasks.data.memory import Bits
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.data.store import SPLITS, column

logger = logging.getLogger(__name__)


def needed_splits(fractions: SplitFractions) -> tuple[int, ...]:
    """Codes of the splits every class must reach: train, validation, and test when its fraction is above 0."""
    return (0, 1, 2) if fractions.test > 0 else (0, 1)


def split_ranges(fractions: SplitFractions) -> list[tuple[float, float]]:
    """The hash range ``[low, high)`` in ``[0, 1)`` of each split (the rule ``rules.clean_batch`` applies)."""
    train, validation = fractions.train, fractions.validation
    if fractions.test == 0:
        return [(0.0, train), (train, 1.0), (1.0, 1.0)]
    return [(0.0, train), (train, train + validation), (train + validation, 1.0)]


def stratify(split: np.ndarray, point: np.ndarray, codes: np.ndarray, fractions: SplitFractions) -> np.ndarray:
    """Each record's split: its hash split, except where a class would miss a needed split.

    Args:
        split: The hash split code of each record (0 train, 1 validation, 2 test).
        point: Each record's hash as a number in ``[0, 1)`` (what picked ``split``).
        codes: Each record's class, as a small integer.
        fractions: The split fractions (which splits are needed, and their hash ranges).

    Returns:
        The split code of each record (a new array).
    """
    dest = split.astype(np.int8, copy=True)
    needed, ranges = needed_splits(fractions), split_ranges(fractions)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for members in np.split(order, bounds):
        if len(members) and not all((dest[members] == s).any() for s in needed):
            _fill(dest, members, point, needed, ranges)
    return dest


def _fill(
    dest: np.ndarray, members: np.ndarray, point: np.ndarray, needed: tuple[int, ...], ranges: list[tuple[float, float]]
) -> None:
    """Move one record of a class into each needed split it misses: the nearest by hash, from a split with two."""
    for target in needed:
        mine = dest[members]
        if (mine == target).any():
            continue
        counts = np.bincount(mine, minlength=len(SPLITS))
        donors = members[counts[mine] > 1]
        low, high = ranges[target]
        where = point[donors]
        distance = np.maximum(low - where, 0) + np.maximum(where - high, 0)
        pick = donors[np.lexsort((where, distance))[0]]  # nearest first; a tie goes to the lower hash
        dest[pick] = target


def check_classes(names: list[str], totals: np.ndarray, fractions: SplitFractions, label_column: str) -> None:
    """Refuse a single class, and any class with fewer records than there are splits to fill.

    Raises:
        DataError: One line naming the class(es) and their counts.
    """
    if len(names) == 1:
        raise DataError(
            f"column {label_column!r} holds one class only ({names[0]!r}, {int(totals[0])} records after cleaning); "
            "classification needs at least two"
        )
    need = len(needed_splits(fractions))
    rare = [(name, int(n)) for name, n in zip(names, totals, strict=True) if n < need]
    if rare:
        shown = ", ".join(f"{name!r} ({n} record{'s' if n != 1 else ''})" for name, n in rare[:5])
        more = f" and {len(rare) - 5} more" if len(rare) > 5 else ""
        splits = ", ".join(SPLITS[s] for s in needed_splits(fractions))
        raise DataError(
            f"class {shown}{more} in column {label_column!r}: too few records after cleaning for the {need} splits "
            f"({splits}) that each need one; add records of it or remove it"
        )


def stratified_splits(
    ds: Any, keep: Bits, fractions: SplitFractions, label_column: str
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """The split of every record of the cleaned dataset (-1: dropped), and the class counts per split.

    Args:
        ds: The cleaned dataset (``label``, ``split`` and ``hi`` columns).
        keep: Which records are kept.
        fractions: The split fractions.
        label_column: The configured label column, for messages.

    Returns:
        ``(dest, counts)``: a split code per record, and ``{split: {label: records}}`` (sorted labels).

    Raises:
        DataError: One class only, or a class with fewer records than the splits need.
    """
    import pyarrow.compute as pc

    seq = np.flatnonzero(keep.get())
    labels = ds.data.column("label").combine_chunks().take(seq)
    encoded = pc.dictionary_encode(labels)
    names = encoded.dictionary.to_pylist()
    order = np.argsort(np.array(names, dtype=object), kind="stable") if names else np.zeros(0, dtype=np.int64)
    rank = np.empty(len(names), dtype=np.int64)
    rank[order] = np.arange(len(names))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    names = [names[i] for i in order]
    check_classes(names, np.bincount(codes, minlength=len(names)), fractions, label_column)
    point = column(ds, "hi")[seq].astype(np.float64) / 2.0**64
    hashed = column(ds, "split")[seq]
    chosen = stratify(hashed, point, codes, fractions)
    if moved := int((chosen != hashed).sum()):
        logger.info("stratified split: %d record(s) moved so that every class reaches every split", moved)
    dest = np.full(len(keep), -1, dtype=np.int8)
    dest[seq] = chosen
    counts = {}
    for code, split in enumerate(SPLITS):
        per_class = np.bincount(codes[chosen == code], minlength=len(names))
        counts[split] = {name: int(n) for name, n in zip(names, per_class, strict=True)}
    return dest, counts
