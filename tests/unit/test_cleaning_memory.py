"""What keeps cleaning's own memory flat in the input size: few large Arrow batches, no row index arrays."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forgeline.tasks.config import DataConfig, FilesSource
from forgeline.tasks.data import cleaning, loading, memory, store

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


def test_record_masks_hold_a_bit_per_record_and_agree_with_bool_arrays() -> None:
    """The keep and drop masks live for the whole run: a byte a record made memory grow with the input."""
    rng = np.random.default_rng(0)
    size = 3 * 1024 + 5  # not a multiple of 8: the last byte is partly padding
    keep_bools, dup_bools = rng.random(size) < 0.8, rng.random(size) < 0.3
    keep = memory.Bits(size)
    for start in range(0, size, 1024):  # written a chunk at a time, as the rule pass does
        keep.put(start, keep_bools[start : start + 1024])
    dup = memory.Bits(size)
    dup.set(np.flatnonzero(dup_bools)[::-1])  # any order, repeats allowed
    dup.set(np.flatnonzero(dup_bools)[:10])

    assert keep.packed.nbytes == (size + 7) // 8 and len(keep) == size
    assert keep.get().tolist() == keep_bools.tolist() and keep.count() == int(keep_bools.sum())
    assert keep.get(1024, 2048).tolist() == keep_bools[1024:2048].tolist()
    assert keep.get(3072).tolist() == keep_bools[3072:].tolist()
    assert memory.Bits.of(dup_bools).get().tolist() == dup.get().tolist()
    assert keep.drop(dup) == int(dup_bools.sum())
    assert keep.get().tolist() == (keep_bools & ~dup_bools).tolist()
    assert keep.count() == int((keep_bools & ~dup_bools).sum())


def _mapped_column(folder: Path, values: np.ndarray) -> Any:
    """A memory-mapped dataset of one ``hi`` column, in 32,768-row batches as the cleaning map writes them."""
    import datasets
    import pyarrow as pa

    table = pa.table({"hi": values})
    with pa.ipc.new_stream(str(folder / "mapped.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=2**15)
    return datasets.Dataset.from_file(str(folder / "mapped.arrow"))


def _rss_file_kib() -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def test_release_drops_the_read_pages_of_a_mapped_dataset_and_never_touches_owned_memory(tmp_path: Path) -> None:
    """A pass over a memory-mapped 1 GB dataset kept every page it read resident: 2 GB of RSS."""
    import datasets

    values = np.arange(8 * 2**20, dtype=np.uint64)  # 64 MiB
    mapped = _mapped_column(tmp_path, values)
    owned = datasets.Dataset.from_dict({"hi": values[:1000]})  # in the process's own memory
    assert int(store.column(mapped, "hi").sum()) == int(values.sum())  # every page read once
    before = _rss_file_kib()
    memory.release(mapped, ["hi"], 0, len(mapped))
    memory.release(owned, ["hi"], 0, len(owned))
    dropped_mib = (before - _rss_file_kib()) / 1024
    assert dropped_mib > 32, dropped_mib
    assert store.column(mapped, "hi").tolist() == values.tolist()  # read again from the page cache
    assert store.column(owned, "hi").tolist() == values[:1000].tolist()


def test_hash_splits_are_moved_into_the_store_not_read_and_copied_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_to_disk read every kept record once more through the memory map: the process's peak at 1 GB."""
    import datasets

    lines = [f"record number {i % 900} of the moved splits" for i in range(3000)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    saved_rows: list[int] = []
    real_save = datasets.Dataset.save_to_disk

    def counting_save(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved_rows.append(len(self))
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", counting_save)
    cfg = DataConfig(sources=[FilesSource(paths=["corpus.txt"])], cache_dir="cache", record="line")
    result = cleaning.clean_dataset(cfg, base_dir=tmp_path)

    assert saved_rows == [0, 0, 0]  # only the metadata of each split went through save_to_disk
    stored = datasets.load_from_disk(result.dataset_dir)
    assert {split: len(stored[split]) for split in stored} == result.rows_per_split
    texts = [text for split in stored for text in stored[split]["text"]]
    assert sorted(texts) == sorted(set(lines))
    for split in stored:
        assert [p.name for p in (Path(result.dataset_dir) / split).glob("*.arrow")] == ["data-00000-of-00001.arrow"]
    assert not list(Path(result.dataset_dir).glob(".work"))


def test_release_without_proc_releases_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox without /proc: no mapping is known to be a read-only file, so no page is handed back."""

    mapped = _mapped_column(tmp_path, np.arange(2**20, dtype=np.uint64))
    monkeypatch.setattr(memory, "_MAPS", str(tmp_path / "no-proc" / "maps"))
    assert memory._read_only_file_maps() == []
    memory.release(mapped, ["hi"], 0, len(mapped))
    assert store.column(mapped, "hi").tolist() == list(range(2**20))


def test_bits_read_from_any_record_and_refuse_a_write_that_would_split_a_byte() -> None:
    bools = np.array([i % 3 == 0 for i in range(29)])
    bits = memory.Bits.of(bools)
    for start, stop in [(4, 8), (3, 20), (13, 29), (28, 29), (5, 5)]:
        assert bits.get(start, stop).tolist() == bools[start:stop].tolist(), (start, stop)
    with pytest.raises(ValueError, match="whole bytes"):
        bits.put(4, np.ones(4, dtype=bool))  # would overwrite records 0-3
    with pytest.raises(ValueError, match="whole bytes"):
        bits.put(8, np.ones(5, dtype=bool))  # would zero records 13-15
    bits.put(24, np.ones(5, dtype=bool))  # the last, short chunk
    assert bits.get(24).tolist() == [True] * 5 and bits.count() == int(bools[:24].sum()) + 5
