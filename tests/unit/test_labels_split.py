"""Labeled data in the data stage (issue 16): the stratified hash split, label typing, conflicting duplicates.

RELIABILITY.md row H4 at the function level; ``tests/integration/test_classification_data.py`` runs the same
bad inputs through the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from forgeline.tasks.config import DataConfig, FilesSource, HfSource, PipelineConfig, SplitFractions
from forgeline.tasks.data.cleaning import DataError, clean_dataset, load_split
from forgeline.tasks.data.labels import LABELS_FILE, build_label_set, class_count_rows, read_label_set
from forgeline.tasks.data.store import SPLITS
from forgeline.tasks.data.stratify import stratify
from tests.classifier_support import make_labeled_rows, write_labeled_csv

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _cfg(*paths: str, **kwargs: object) -> DataConfig:
    kwargs.setdefault("fractions", FRACTIONS)
    kwargs.setdefault("text_columns", ["title", "description"])
    kwargs.setdefault("label_column", "tag")
    return DataConfig(sources=[FilesSource(paths=list(paths))], record="line", cache_dir="cache", **kwargs)


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _placed(dataset_dir: str) -> dict[str, tuple[str, str]]:
    """text -> (split, label) over the three stored splits."""
    return {row["text"]: (split, row["label"]) for split in SPLITS for row in load_split(dataset_dir, split).to_list()}


# ------------------------------------------------------------------------------ the split, as a function
def test_stratify_keeps_the_hash_split_when_every_class_reaches_every_split() -> None:
    point = np.array([0.1, 0.85, 0.95, 0.2, 0.86, 0.97])
    split = np.array([0, 1, 2, 0, 1, 2], dtype=np.int8)
    codes = np.array([0, 0, 0, 1, 1, 1])
    assert stratify(split, point, codes, SplitFractions(**FRACTIONS)).tolist() == split.tolist()


def test_stratify_moves_the_nearest_records_into_the_missing_splits_and_back_when_data_fills_them() -> None:
    fractions = SplitFractions(**FRACTIONS)
    point = np.array([0.10, 0.50, 0.70, 0.79, 0.30, 0.85, 0.95])
    split = np.array([0, 0, 0, 0, 0, 1, 2], dtype=np.int8)  # class 0 hashes into train only
    codes = np.array([0, 0, 0, 0, 1, 1, 1])
    dest = stratify(split, point, codes, fractions)
    # 0.79 lies nearest to validation's range [0.8, 0.9); then 0.70 is the nearest left for test [0.9, 1)
    assert dest.tolist() == [0, 0, 2, 1, 0, 1, 2]
    # a new class-0 record hashes into validation: only test needs a record now, and 0.79 is the nearest
    more = stratify(np.append(split, 1), np.append(point, 0.88), np.append(codes, 0), fractions)
    assert more.tolist() == [0, 0, 0, 2, 0, 1, 2, 1]
    # one that hashes into test too: every record of the class is back where its hash put it
    full = stratify(np.append(split, [1, 2]), np.append(point, [0.88, 0.99]), np.append(codes, [0, 0]), fractions)
    assert full.tolist() == [0, 0, 0, 0, 0, 1, 2, 1, 2]


def test_stratify_without_a_test_split_fills_train_and_validation_only() -> None:
    fractions = SplitFractions(train=0.9, validation=0.1, test=0)
    dest = stratify(np.zeros(3, dtype=np.int8), np.array([0.1, 0.2, 0.3]), np.zeros(3, dtype=int), fractions)
    assert sorted(dest.tolist()) == [0, 0, 1] and dest[2] == 1


# ------------------------------------------------------------------------------ the split, through cleaning
def test_every_class_in_every_split_and_the_label_set_from_train(tmp_path: Path) -> None:
    rows = make_labeled_rows(90) + [{"title": f"rare case {i}", "description": "odd", "tag": "rare"} for i in range(3)]
    write_labeled_csv(tmp_path / "d.csv", rows)
    result = clean_dataset(_cfg("d.csv"), base_dir=tmp_path)
    assert all(set(result.class_counts[s]) == {"mlops", "nlp", "rare", "vision"} for s in SPLITS)
    assert all(result.class_counts[s]["rare"] == 1 for s in SPLITS)  # three records, one per split
    assert all(n > 0 for per in result.class_counts.values() for n in per.values())
    label_set = read_label_set(result.dataset_dir)
    assert label_set.labels == ["mlops", "nlp", "rare", "vision"] and label_set.counts == result.class_counts
    assert label_set.id2label[2] == "rare" and label_set.label2id["vision"] == 3
    assert sum(result.class_counts["validation"].values()) == result.rows_per_split["validation"]
    assert result.columns == ["text", "label"] and (Path(result.dataset_dir) / LABELS_FILE).is_file()


def test_adding_records_moves_no_existing_record(tmp_path: Path) -> None:
    rows = make_labeled_rows(240)
    write_labeled_csv(tmp_path / "d.csv", rows[:120])
    before = _placed(clean_dataset(_cfg("d.csv"), base_dir=tmp_path).dataset_dir)
    write_labeled_csv(tmp_path / "d.csv", rows)
    after = _placed(clean_dataset(_cfg("d.csv"), base_dir=tmp_path).dataset_dir)
    assert len(before) == 120 and len(after) == 240
    assert {text: after[text] for text in before} == before


def test_a_class_too_rare_for_the_splits_is_named_with_its_count(tmp_path: Path) -> None:
    rows = make_labeled_rows(60) + [{"title": f"rare {i}", "description": "odd", "tag": "rare"} for i in range(2)]
    write_labeled_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match=r"^class 'rare' \(2 records\) in column 'tag': too few records .* 3 splits"):
        clean_dataset(_cfg("d.csv"), base_dir=tmp_path)
    # without a test split two records are enough
    result = clean_dataset(_cfg("d.csv", fractions={"train": 0.9, "validation": 0.1, "test": 0}), base_dir=tmp_path)
    assert result.class_counts["train"]["rare"] == 1 and result.class_counts["validation"]["rare"] == 1


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    rows = make_labeled_rows(30, labels={"nlp": ["text", "tokens", "parsing"]})
    write_labeled_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError, match=r"^column 'tag' holds one class only \('nlp', 30 records after cleaning\)"):
        clean_dataset(_cfg("d.csv"), base_dir=tmp_path)


def test_a_label_only_outside_train_is_named() -> None:
    counts = {"train": {"a": 5, "b": 4}, "validation": {"a": 1, "b": 1}, "test": {"a": 1, "c": 2}}
    with pytest.raises(DataError, match=r"^label 'c' \(2 records\) only in the test split, not in train"):
        build_label_set(counts)
    label_set = build_label_set(counts | {"test": {"a": 1}})
    assert label_set.labels == ["a", "b"] and label_set.counts["test"] == {"a": 1, "b": 0}
    assert class_count_rows(label_set.counts)[1] == {"label": "b", "train": 4, "validation": 1, "test": 0, "total": 5}


def test_split_tail_with_a_label_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"data\.split: 'tail' joins all records"):
        PipelineConfig.model_validate(
            {"task": {"kind": "classification"}, "data": {"label_column": "y", "split": "tail"}}
        )
    write_labeled_csv(tmp_path / "d.csv", make_labeled_rows(30))
    with pytest.raises(DataError, match="split 'tail'"):
        clean_dataset(_cfg("d.csv", split="tail"), base_dir=tmp_path)


# ------------------------------------------------------------------------------ label typing
def test_csv_jsonl_and_parquet_give_the_same_splits_and_labels(tmp_path: Path) -> None:
    rows = [row | {"tag": {"mlops": 0, "nlp": 1, "vision": 2}[row["tag"]]} for row in make_labeled_rows(90)]
    write_labeled_csv(tmp_path / "d.csv", rows)
    _jsonl(tmp_path / "d.jsonl", rows)  # numbers as JSON numbers
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")  # an int64 column
    results = [clean_dataset(_cfg(f"d.{ext}"), base_dir=tmp_path) for ext in ("csv", "jsonl", "parquet")]
    assert len({r.fingerprint for r in results}) == 1  # the same records in the same splits
    assert results[0].class_counts["train"].keys() == {"0", "1", "2"}  # 2 is read as "2"
    placed = [_placed(r.dataset_dir) for r in results]
    assert placed[0] == placed[1] == placed[2] and len(placed[0]) == 90


def test_labels_are_stripped_and_numeric_text_matches_numbers(tmp_path: Path) -> None:
    rows = make_labeled_rows(60)
    write_labeled_csv(tmp_path / "a.csv", [row | {"tag": f" {row['tag']}  "} for row in rows[:30]])
    write_labeled_csv(tmp_path / "b.csv", rows[30:])
    result = clean_dataset(_cfg("a.csv", "b.csv"), base_dir=tmp_path)
    assert set(result.class_counts["train"]) == {"mlops", "nlp", "vision"}


def test_numbers_in_one_file_and_text_in_another_name_both_files(tmp_path: Path) -> None:
    rows = make_labeled_rows(60)
    write_labeled_csv(tmp_path / "names.csv", rows[:30])
    _jsonl(tmp_path / "ids.jsonl", [row | {"tag": i % 3} for i, row in enumerate(rows[30:])])
    with pytest.raises(DataError, match=r"^column 'tag' holds numbers in .*ids\.jsonl but text in .*names\.csv"):
        clean_dataset(_cfg("names.csv", "ids.jsonl"), base_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "make", "where"),
    [
        ("d.csv", lambda p, rows: write_labeled_csv(p, rows), r"d\.csv:6: empty label \(column 'tag'\)"),
        ("d.jsonl", lambda p, rows: _jsonl(p, rows), r"d\.jsonl:5: empty label \(column 'tag'\)"),
        (
            "d.parquet",
            lambda p, rows: pq.write_table(pa.Table.from_pylist([r | {"tag": r["tag"] or None} for r in rows]), p),
            r"d\.parquet: record 5: empty label \(column 'tag'\)",
        ),
    ],
)
def test_an_empty_label_names_the_file_and_record(tmp_path: Path, name: str, make: object, where: str) -> None:
    rows = make_labeled_rows(30)
    rows[4]["tag"] = " " if name == "d.csv" else ""
    make(tmp_path / name, rows)  # type: ignore[operator]
    with pytest.raises(DataError, match=where):
        clean_dataset(_cfg(name), base_dir=tmp_path)


def test_a_jsonl_record_without_the_label_and_mixed_kinds_in_one_file(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [dict(r) for r in make_labeled_rows(30)]
    del rows[2]["tag"]
    _jsonl(tmp_path / "gap.jsonl", rows)
    with pytest.raises(DataError, match=r"gap\.jsonl:3: empty label"):
        clean_dataset(_cfg("gap.jsonl"), base_dir=tmp_path)
    rows = [dict(r) for r in make_labeled_rows(30)]
    rows[7]["tag"] = 7
    _jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl:8: label 7 is int but the first record's \('mlops'\) is str"):
        clean_dataset(_cfg("mixed.jsonl"), base_dir=tmp_path)


@pytest.mark.parametrize("ext", ["csv", "jsonl", "parquet"])
def test_a_missing_label_column_lists_the_columns_found(tmp_path: Path, ext: str) -> None:
    rows = make_labeled_rows(30)
    write_labeled_csv(tmp_path / "d.csv", rows)
    _jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=rf"d\.{ext}: no column 'topic' \(columns: title, description, tag\)"):
        clean_dataset(_cfg(f"d.{ext}", label_column="topic"), base_dir=tmp_path)


def test_a_plain_text_source_has_no_label_column(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("one line\nanother line\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.txt: plain text has no column 'tag'"):
        clean_dataset(_cfg("notes.txt", text_columns=[]), base_dir=tmp_path)


def test_a_saved_hf_dataset_with_class_names_gives_the_names(tmp_path: Path) -> None:
    rows = make_labeled_rows(60)
    names = ["mlops", "nlp", "vision"]
    features = datasets.Features({"text": datasets.Value("string"), "tag": datasets.ClassLabel(names=names)})
    data = {"text": [r["title"] + " " + r["description"] for r in rows], "tag": [names.index(r["tag"]) for r in rows]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(sources=[HfSource(name="saved")], cache_dir="cache", fractions=FRACTIONS, label_column="tag")
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert read_label_set(result.dataset_dir).labels == names


# ------------------------------------------------------------------------------ duplicates and the cache
def test_one_text_under_two_labels_keeps_no_copy(tmp_path: Path) -> None:
    rows = make_labeled_rows(60)
    twice = rows[:3] + [rows[0] | {"tag": "vision" if rows[0]["tag"] != "vision" else "nlp"}]  # a conflict
    write_labeled_csv(tmp_path / "d.csv", rows + twice)  # rows[1] and rows[2] repeat with their own label
    result = clean_dataset(_cfg("d.csv"), base_dir=tmp_path)
    assert result.dropped["conflicting_label"] == 3  # every copy of rows[0]
    assert result.dropped["duplicate"] == 2
    placed = _placed(result.dataset_dir)
    assert f"{rows[0]['title']}\n{rows[0]['description']}" not in placed and len(placed) == 59


def test_labeled_and_unlabeled_cleanings_of_the_same_files_are_kept_apart(tmp_path: Path) -> None:
    write_labeled_csv(tmp_path / "d.csv", make_labeled_rows(60))
    labeled = clean_dataset(_cfg("d.csv"), base_dir=tmp_path)
    plain = clean_dataset(_cfg("d.csv", label_column=None), base_dir=tmp_path)
    assert not plain.cache_hit and plain.fingerprint != labeled.fingerprint
    assert plain.columns == ["text"] and plain.class_counts == {} and "conflicting_label" not in plain.dropped
    assert not (Path(plain.dataset_dir) / LABELS_FILE).exists()
    again = clean_dataset(_cfg("d.csv"), base_dir=tmp_path)
    assert again.cache_hit and again.dataset_dir == labeled.dataset_dir
    assert again.class_counts == labeled.class_counts


@pytest.mark.parametrize("shape", [{}, {"CHUNK": 16, "BUCKET": 8}], ids=["in memory", "chunks and buckets"])
def test_conflicting_labels_in_memory_and_in_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: dict[str, int]
) -> None:
    import hashlib

    from forgeline.tasks.data import memory, store

    for name, value in shape.items():
        monkeypatch.setattr(store, name, value)
    rng = np.random.default_rng(0)
    texts = [f"text {i}" for i in rng.integers(0, 60, 400)]
    labels = [f"class {int(t.split()[1]) % 3 if i % 37 else 9}" for i, t in enumerate(texts)]  # some texts relabeled
    keep = np.array([i % 11 != 5 for i in range(len(texts))])

    def digest(value: str, start: int) -> int:
        return int.from_bytes(hashlib.sha256(value.encode()).digest()[start : start + 8], "big")

    table = pa.table(
        {
            "hi": pa.array([digest(t, 0) for t in texts], pa.uint64()),
            "lo": pa.array([digest(t, 8) for t in texts], pa.uint64()),
            "lab": pa.array([digest(label, 0) for label in labels], pa.uint64()),
        }
    )
    conflict = store.conflicting_labels(datasets.Dataset(table), memory.Bits.of(keep), tmp_path).get()
    seen: dict[str, set[str]] = {}
    for text, label, kept in zip(texts, labels, keep, strict=True):
        if kept:
            seen.setdefault(text, set()).add(label)
    expected = [bool(kept) and len(seen[text]) > 1 for text, kept in zip(texts, keep, strict=True)]
    assert conflict.tolist() == expected and 0 < sum(expected) < len(texts)


def test_record_place_counts_physical_lines_past_quoted_newlines_and_blank_lines(tmp_path: Path) -> None:
    from forgeline.tasks.data.loading import record_place
    from forgeline.tasks.data.paths import Input

    path = tmp_path / "ml.csv"
    path.write_text('title,description,tag\na,"multi\nline one",x\n\nb,second,\nc,third,y\n', encoding="utf-8")
    item = Input(label=str(path), fmt="csv", path=path)
    assert [record_place(item, k) for k in range(3)] == [f"{path}:2", f"{path}:5", f"{path}:6"]
    assert record_place(Input(label="hf:x", fmt="hf-hub"), 4) == "hf:x: record 5"
