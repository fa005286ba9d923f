"""The label set of a classification dataset: which classes exist and how many records each split holds.

The data stage writes ``labels.json`` beside the splits (``<dataset_dir>/labels.json``); training, evaluation,
the model's ``id2label`` and the registry read it from there. Labels are strings (a numeric label column is
read as text), sorted, and come from the training split only.
"""

from __future__ import annotations

import json
from pathlib import Path

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
