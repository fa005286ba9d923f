"""What keeps cleaning's own memory flat in the input size: few large Arrow batches, no row index arrays."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from forgeline.tasks.config import DataConfig, FilesSource
from forgeline.tasks.data import cleaning, loading, store

ROWS = 60_000


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: dict[str, Any]) -> None:
    real = getattr(module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen[name] = (args, real(*args, **kwargs))
        return seen[name][1]

    monkeypatch.setattr(module, name, spy)


def test_tables_are_few_large_batches_and_splits_need_no_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record batch keeps kilobytes of metadata for the table's life: 1,000-row batches made the process
    grow ~10 bytes a record; a split selected through an indices mapping held 16 bytes a kept record and was
    saved row by row."""
    lines = [f"a record with a few words, number {i % 5000}" for i in range(ROWS)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(cleaning, "SMALL_INPUT_BYTES", 0)
    monkeypatch.setattr(loading, "BATCH", 8192)
    seen: dict[str, Any] = {}
    _spy(monkeypatch, loading, "load_input", seen)
    _spy(monkeypatch, store, "later_duplicates", seen)
    _spy(monkeypatch, store, "hash_splits", seen)
    cfg = DataConfig(sources=[FilesSource(paths=["corpus.txt"])], cache_dir="cache", record="line", num_proc=2)
    result = cleaning.clean_dataset(cfg, base_dir=tmp_path)

    assert result.rows_in == ROWS and result.dropped["duplicate"] == ROWS - 5000
    most = math.ceil(ROWS / 8192) + 2  # a short batch where a shard or a builder chunk ends
    loaded = seen["load_input"][1]
    assert loaded.data.table.column(0).num_chunks <= most
    cleaned = seen["later_duplicates"][0][0]  # the cleaning map's output
    assert cleaned.data.table.column("text").num_chunks <= most
    parts, _digest = seen["hash_splits"][1]
    assert all(part._indices is None for part in parts.values())  # contiguous tables, no row index
    assert {s: len(parts[s]) for s in parts} == result.rows_per_split
