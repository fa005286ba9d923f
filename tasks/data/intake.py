"""One new file checked the way the clean stage will read it, before it joins a dataset (``forgeline ingest``).

A labeled file (classification, completion) that lacks a column or holds an empty label would be taken into
the incoming folder and then fail every retrain after it, since the folder is part of each retrain's data.
Reading it here, with the clean stage's own loader, refuses it at the door with the same one-line error.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from forgeline.tasks.config import DataConfig
from forgeline.tasks.data import loading
from forgeline.tasks.data.cleaning import input_columns
from forgeline.tasks.data.labels import labels_as_text
from forgeline.tasks.data.paths import TABLE_SUFFIXES, DataError, Input


def carried_columns(cfg: DataConfig) -> list[str]:
    """The columns besides the text that every record of ``cfg``'s data must hold (label, prompt, completion)."""
    return [c for c in (cfg.label_column, cfg.prompt_column, cfg.completion_column) if c]


def check_file(cfg: DataConfig, path: Path, text_column: str = "text") -> None:
    """Load ``path`` as the clean stage loads an input of ``cfg``; raise what the clean stage would raise.

    Only the loading is checked (format, columns, labels), not the splits: whether a class has records
    enough depends on the whole dataset.

    Args:
        cfg: The data section (text columns, label or prompt/completion columns, record cutting).
        path: The file; its suffix picks the reader, as for any input.
        text_column: The text column of the source the file joins (``data.text_columns`` wins).

    Raises:
        DataError: one line naming the file (and record) and what is wrong with it.
    """
    suffix = path.suffix.lower()
    carried = carried_columns(cfg)
    if suffix not in TABLE_SUFFIXES and carried:
        raise DataError(f"{path}: plain text has no column {carried[0]!r}; labeled data is CSV, JSON or Parquet")
    fmt = suffix.lstrip(".") if suffix in TABLE_SUFFIXES else "text"
    item = Input(label=str(path), fmt=fmt, path=path, text_column=text_column)
    with tempfile.TemporaryDirectory(prefix="forgeline-intake-") as work:
        ds = loading.load_input(item, input_columns(cfg, item), cfg.record, Path(work))
        if cfg.label_column:
            labels_as_text(ds, item.label, cfg.label_column, functools.partial(loading.record_place, item))
