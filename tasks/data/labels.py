"""The label set of a classification dataset: which classes exist and how many records each split holds.

The data stage writes ``labels.json`` beside the splits (``<dataset_dir>/labels.json``); training, evaluation,
the model's ``id2label`` and the registry read it from there. Labels are strings (a numeric label column is
read as text), sorted, and come from the training split only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from forgeline.tasks.data.paths import DataError

LABELS_FILE = "labels.json"


class LabelSet(BaseModel):
    """The classes of a classification dataset and their record counts per split."""

    labels: list[str]
    """Sorted class names, as found in the training split; a class's id is its index here."""
    counts: dict[str, dict[str, int]] = {}
    """``{split: {label: records}}`` for train, validation and test."""

    @property
    def id2label(self) -> dict[int, str]:
        """Class id to name, as ``transformers`` configs store it."""
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        """Class name to id."""
        return {name: i for i, name in enumerate(self.labels)}


def write_label_set(dataset_dir: str | Path, label_set: LabelSet) -> Path:
    """Write ``labels.json`` into a dataset folder (before the folder is published)."""
    path = Path(dataset_dir) / LABELS_FILE
    path.write_text(json.dumps(label_set.model_dump(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_label_set(dataset_dir: str | Path) -> LabelSet:
    """The label set stored with a cleaned classification dataset.

    Raises:
        DataError: The dataset was not cleaned with ``data.label_column`` (no ``labels.json``).
    """
    path = Path(dataset_dir) / LABELS_FILE
    if not path.is_file():
        raise DataError(f"{dataset_dir}: no {LABELS_FILE}: the dataset was cleaned without data.label_column")
    return LabelSet.model_validate_json(path.read_text(encoding="utf-8"))


def build_label_set(counts: dict[str, dict[str, int]]) -> LabelSet:
    """The label set of a split dataset: the training split's classes, sorted.

    Args:
        counts: ``{split: {label: records}}`` for train, validation and test.

    Raises:
        DataError: A label appears in validation or test but not in train (one line naming it).
    """
    labels = sorted(name for name, n in counts.get("train", {}).items() if n)
    for split in ("validation", "test"):
        unseen = sorted(name for name, n in counts.get(split, {}).items() if n and name not in labels)
        if unseen:
            shown = ", ".join(f"{name!r} ({counts[split][name]} records)" for name in unseen[:5])
            raise DataError(f"label {shown} only in the {split} split, not in train: the model could never predict it")
    full = {split: {name: per.get(name, 0) for name in labels} for split, per in counts.items()}
    return LabelSet(labels=labels, counts=full)


def class_count_rows(counts: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """Rows of a per-class table: ``label``, the records of each split, and ``total``."""
    labels = sorted({name for per in counts.values() for name in per})
    rows = []
    for name in labels:
        row: dict[str, Any] = {"label": name} | {split: per.get(name, 0) for split, per in counts.items()}
        rows.append(row | {"total": sum(per.get(name, 0) for per in counts.values())})
    return rows


# ------------------------------------------------------------------------------------- on loading
_NUMBER = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


def labels_as_text(ds: Any, item_label: str, column: str, where: Callable[[int], str]) -> tuple[Any, str]:
    """An input's ``label`` column as text (``3`` becomes ``"3"``), refusing empty labels; and its kind.

    Args:
        ds: One loaded input with the canonical ``label`` column.
        item_label: The input's name (its path), for messages.
        column: The configured label column, for messages.
        where: Record index to the place in the file a message names (``path:line`` or ``path: row N``).

    Returns:
        ``(ds, kind)``: the dataset with a string ``label`` column, and ``numeric`` (every label is a
        number) or ``text``.

    Raises:
        DataError: A label is missing or blank, or the column holds neither text nor numbers.
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if "label" not in ds.column_names:
        raise DataError(f"{item_label}: plain text has no column {column!r}; labeled data is CSV, JSON or Parquet")
    kind = ds.features["label"]
    if isinstance(kind, datasets.ClassLabel):  # a saved Hugging Face dataset: its ids stand for these names
        ids = ds.data.column("label").to_pylist()
        names = [kind.names[i] if i is not None and i >= 0 else None for i in ids]
        ds = ds.remove_columns("label").add_column("label", names, feature=datasets.Value("string"))
        kind = ds.features["label"]
    if isinstance(kind, datasets.Json):  # the json builder's type for a key whose values differ in type
        _mixed_json(ds.data.column("label").to_pylist(), column, where)
    dtype = kind.pa_type if isinstance(kind, datasets.Value) else pa.binary()
    if pa.types.is_null(dtype):  # the key is null (or absent) in every record
        raise DataError(f"{where(0)}: empty label (column {column!r})")
    if not (pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or _is_number(dtype)):
        raise DataError(f"{item_label}: column {column!r} holds {kind}, expected text or numbers as labels")
    if pa.types.is_floating(dtype):  # pandas writes a missing value as NaN: neither it nor inf is a class
        bad = pc.index(pc.invert(pc.is_finite(ds.data.column("label"))), True).as_py()
        if bad >= 0:
            value = ds.data.column("label")[bad].as_py()
            raise DataError(
                f"{where(bad)}: label {value} is no class (a missing or infinite number; column {column!r})"
            )
    if dtype != pa.string():  # one type in every input, so that the inputs concatenate
        ds = ds.cast_column("label", datasets.Value("string"))
    values = ds.data.column("label")
    blank = pc.or_kleene(pc.is_null(values), pc.equal(pc.utf8_trim_whitespace(values), ""))
    first = pc.index(blank, True).as_py()
    if first >= 0:
        raise DataError(f"{where(first)}: empty label (column {column!r})")
    numeric = _is_number(dtype) or bool(pc.all(pc.match_substring_regex(values, _NUMBER)).as_py())
    return ds, "numeric" if numeric else "text"


def _mixed_json(raw: list[str | None], column: str, where: Callable[[int], str]) -> None:
    """Name the first record whose label is of another JSON type than the first record's (or empty)."""
    values = [None if v is None else json.loads(v) for v in raw]
    for i, value in enumerate(values):
        if value is None or value == "":
            raise DataError(f"{where(i)}: empty label (column {column!r})")
        if type(value) is not type(values[0]):
            raise DataError(
                f"{where(i)}: label {value!r} is {type(value).__name__} but the first record's "
                f"({values[0]!r}) is {type(values[0]).__name__}: column {column!r} must hold one kind of label"
            )


def _is_number(dtype: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype))


def check_label_kinds(kinds: dict[str, str], column: str) -> None:
    """Refuse labels that are numbers in one input and text in another (two encodings of one label set).

    Raises:
        DataError: One line naming a file of each kind.
    """
    numeric = [name for name, kind in kinds.items() if kind == "numeric"]
    text = [name for name, kind in kinds.items() if kind == "text"]
    if numeric and text:
        raise DataError(
            f"column {column!r} holds numbers in {numeric[0]} but text in {text[0]}: "
            "use one kind of label in every file"
        )
