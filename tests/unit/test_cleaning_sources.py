"""The data stage's ``datasets`` side: column options, ``kind: hf`` sources, worker processes, Arrow splits."""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import pytest

from forgeline.tasks.config import DataConfig, FilesSource, HfSource
from forgeline.tasks.data import cleaning
from forgeline.tasks.data.cleaning import DataError, clean_dataset, iter_split, load_split

REVIEWS = [
    (f"Review {i} of the {w} was {m}.", f"Details: the {w} {m} again.", i % 3)
    for i, (w, m) in enumerate(
        [("kettle", "fine"), ("lamp", "bright"), ("chair", "sturdy"), ("desk", "wobbly"), ("clock", "late")] * 12
    )
]


def _labeled_csv(path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["title", "body", "stars"])
        writer.writerows(REVIEWS)
        writer.writerow(REVIEWS[0])  # an exact duplicate row


def _cfg(*sources: object, **kwargs: object) -> DataConfig:
    kwargs.setdefault("fractions", {"train": 0.6, "validation": 0.3, "test": 0.1})
    kwargs.setdefault("cache_dir", "cache")
    return DataConfig(sources=list(sources), record="line", **kwargs)


def test_text_columns_joined_and_label_carried_into_the_splits(tmp_path: Path) -> None:
    _labeled_csv(tmp_path / "reviews.csv")
    cfg = _cfg(FilesSource(paths=["reviews.csv"]), text_columns=["title", "body"], label_column="stars")
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert result.columns == ["text", "label"]
    assert result.rows_in == len(REVIEWS) + 1 and result.dropped["duplicate"] == 1
    rows = [row for split in ("train", "validation", "test") for row in load_split(result.dataset_dir, split)]
    expected = {f"{title}\n{body}": str(stars) for title, body, stars in REVIEWS}  # CSV fields stay strings
    assert {row["text"]: row["label"] for row in rows} == expected
    blob = (tmp_path / "reviews.csv").read_bytes()
    (tmp_path / "reviews.csv").write_bytes(blob.replace(b",2\r\n", b",9\r\n"))
    relabeled = clean_dataset(cfg, base_dir=tmp_path)
    assert relabeled.rows_per_split == result.rows_per_split
    assert relabeled.fingerprint != result.fingerprint  # labels are content too


def test_prompt_and_completion_columns_from_jsonl(tmp_path: Path) -> None:
    import json

    lines = [
        json.dumps({"q": f"Question {i} about {w}?", "a": f"Answer {i}: {w}."}) for i, w in enumerate("abcdefghij" * 3)
    ]
    (tmp_path / "qa.jsonl").write_text("\n".join(lines), encoding="utf-8")
    # With both pair columns the text is the pair itself (prompt, newline, completion), whatever text_column says.
    cfg = _cfg(FilesSource(paths=["qa.jsonl"], text_column="q"), prompt_column="q", completion_column="a")
    pairs = clean_dataset(cfg, base_dir=tmp_path)
    assert pairs.columns == ["text", "prompt", "completion"]
    rows = [r for split in ("train", "validation", "test") for r in load_split(pairs.dataset_dir, split)]
    assert len(rows) == 30 and all(r["text"] == f"{r['prompt']}\n{r['completion']}" for r in rows)
    cfg = _cfg(FilesSource(paths=["qa.jsonl"], text_column="a"), prompt_column="q")
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert result.columns == ["text", "prompt"]
    rows = [r for split in ("train", "validation", "test") for r in load_split(result.dataset_dir, split)]
    assert {r["text"]: r["prompt"] for r in rows} == {
        f"Answer {i}: {w}.": f"Question {i} about {w}?" for i, w in enumerate("abcdefghij" * 3)
    }


def test_missing_label_column_names_the_file(tmp_path: Path) -> None:
    _labeled_csv(tmp_path / "reviews.csv")
    cfg = _cfg(FilesSource(paths=["reviews.csv"], text_column="body"), label_column="score")
    with pytest.raises(DataError, match=r"reviews\.csv: no column 'score' \(columns: title, body, stars\)"):
        clean_dataset(cfg, base_dir=tmp_path)


def test_hf_source_from_a_saved_dataset(tmp_path: Path) -> None:
    texts = [f"Saved record {i} talks about {w}." for i, w in enumerate(["tea", "rain", "maps"] * 20)]
    saved = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": texts}),
            "extra": datasets.Dataset.from_dict({"content": ["x"]}),
        }
    )
    saved.save_to_disk(str(tmp_path / "saved"))
    source = HfSource(name="saved", text_column="content")
    result = clean_dataset(_cfg(source), base_dir=tmp_path)
    assert result.rows_in == 60 and result.sources == [str((tmp_path / "saved").resolve())]
    assert sorted(t for s in ("train", "validation", "test") for t in iter_split(result.dataset_dir, s)) == sorted(
        texts
    )
    assert clean_dataset(_cfg(source), base_dir=tmp_path).cache_hit
    with pytest.raises(DataError, match=r"saved: no split 'dev' \(splits: train, extra\)"):
        clean_dataset(_cfg(HfSource(name="saved", split="dev", text_column="content")), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: content\)"):
        clean_dataset(_cfg(HfSource(name="saved")), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"^\.\./nowhere: no such directory"):
        clean_dataset(_cfg(HfSource(name="../nowhere")), base_dir=tmp_path)


def test_hf_hub_id_offline_fails_with_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(DataError, match=r"^hf:someone/not-cached: cannot load the dataset"):
        clean_dataset(_cfg(HfSource(name="someone/not-cached")), base_dir=tmp_path)


def test_worker_processes_give_the_same_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [f"Line {i % 700} of a corpus about {('oak', 'elm', 'ash')[i % 3]} trees." for i in range(6000)]
    (tmp_path / "d.txt").write_text("\n".join([*lines, "", "42"]), encoding="utf-8")
    one = clean_dataset(_cfg(FilesSource(paths=["d.txt"]), num_proc=1), base_dir=tmp_path)
    monkeypatch.setattr(cleaning, "SMALL_INPUT_BYTES", 0)  # two workers even for a small file
    two = clean_dataset(_cfg(FilesSource(paths=["d.txt"]), num_proc=2, cache_dir="cache2"), base_dir=tmp_path)
    assert not two.cache_hit and two.fingerprint == one.fingerprint
    assert two.dropped == one.dropped and one.dropped["duplicate"] == 6000 - 2100
    assert list(iter_split(two.dataset_dir, "train")) == list(iter_split(one.dataset_dir, "train"))


def test_splits_open_with_datasets(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(f"Record {i} is plain prose." for i in range(50)), encoding="utf-8")
    result = clean_dataset(_cfg(FilesSource(paths=["d.txt"])), base_dir=tmp_path)
    stored = datasets.load_from_disk(result.dataset_dir)
    assert set(stored) == {"train", "validation", "test"}
    assert {s: len(stored[s]) for s in stored} == result.rows_per_split
    assert not list(Path(result.dataset_dir).glob(".work*"))


@pytest.mark.parametrize("shape", ["jsonl object", "parquet struct", "parquet list", "hf list"])
def test_a_nested_text_value_is_a_one_line_error(tmp_path: Path, shape: str) -> None:
    """A text column holding objects or lists once failed with ``AttributeError: ... no attribute 'dtype'``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shape == "jsonl object":
        (tmp_path / "n.jsonl").write_text('{"text": "a fine first record"}\n{"text": {"a": 1}}\n', encoding="utf-8")
        source, expected = FilesSource(paths=["n.jsonl"]), "n.jsonl:2: column 'text' is dict, expected a string"
    elif shape.startswith("parquet"):
        values = [{"a": 1}, {"a": 2}] if shape.endswith("struct") else [[1, 2], [3]]
        pq.write_table(pa.table({"text": values}), tmp_path / "n.parquet")
        kind = "dict" if shape.endswith("struct") else "List"
        source, expected = (
            FilesSource(paths=["n.parquet"]),
            f"n.parquet: column 'text' has type {kind}, expected string",
        )
    else:
        datasets.Dataset.from_dict({"text": [["x", "y"], ["z"]]}).save_to_disk(str(tmp_path / "hf"))
        source, expected = HfSource(name="hf"), "hf: column 'text' has type List, expected string"
    with pytest.raises(DataError, match=expected.replace("(", r"\(")):
        clean_dataset(_cfg(source), base_dir=tmp_path)


def test_a_library_error_without_a_message_still_names_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets.Dataset.from_dict({"text": ["one record", "another record"]}).save_to_disk(str(tmp_path / "hf"))

    def fail(*_: object, **__: object) -> None:
        raise RuntimeError()  # a library error with an empty message once raised IndexError here

    monkeypatch.setattr(datasets, "load_from_disk", fail)
    with pytest.raises(DataError, match=r"hf: cannot load the dataset \(RuntimeError\)"):
        clean_dataset(_cfg(HfSource(name="hf")), base_dir=tmp_path)


SENTENCES = [f"Sentence {i} of eight, about a quick brown fox." for i in range(8)]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return path.name


def _jsonl(path: Path, rows: list[dict[str, object]]) -> str:
    import json

    return _write(path, "\n".join(json.dumps(row) for row in rows) + "\n")


BAD_COLUMNS = {  # found by fuzzing: each once escaped as an Arrow or pandas error, or was read wrongly
    "number completion": (
        lambda d: _jsonl(d / "a.jsonl", [{"p": s, "c": i} for i, s in enumerate(SENTENCES)]),
        {"prompt_column": "p", "completion_column": "c"},
        r"a\.jsonl:1: column 'c' is int, expected a string",
    ),
    "list completion": (
        lambda d: _jsonl(d / "a.jsonl", [{"p": s, "c": [s]} for s in SENTENCES]),
        {"prompt_column": "p", "completion_column": "c"},
        r"a\.jsonl:1: column 'c' is list, expected a string",
    ),
    "one number among strings": (
        lambda d: _jsonl(d / "a.jsonl", [{"p": s, "c": s if i != 5 else 5} for i, s in enumerate(SENTENCES)]),
        {"prompt_column": "p", "completion_column": "c"},
        r"a\.jsonl:6: column 'c' is int, expected a string",
    ),
    "NaN label": (
        lambda d: _jsonl(
            d / "a.jsonl", [{"text": s, "y": float("nan") if i == 2 else 1.5} for i, s in enumerate(SENTENCES)]
        ),
        {"label_column": "y"},
        r"a\.jsonl:3: label nan is no class \(a missing or infinite number; column 'y'\)",
    ),
    "infinite label": (
        lambda d: _jsonl(
            d / "a.jsonl", [{"text": s, "y": float("inf") if i == 4 else 1.5} for i, s in enumerate(SENTENCES)]
        ),
        {"label_column": "y"},
        r"a\.jsonl:5: label inf is no class",
    ),
    "a row with a field too many, a CSV without a text column": (
        lambda d: _write(d / "a.csv", "p,c\n" + "".join(f"{s},answer\n" for s in SENTENCES)),
        {"prompt_column": "p", "completion_column": "c"},
        r"a\.csv:2: expected 2 fields, got 3",
    ),
    "a broken JSON line, text in other columns": (
        lambda d: _write(
            d / "a.jsonl", "".join(f'{{"p": "{s}", "c": "answer"}}\n' for s in SENTENCES) + '{"p": "x", "c": \n'
        ),
        {"prompt_column": "p", "completion_column": "c"},
        r"a\.jsonl:9: invalid JSON",
    ),
    "text column twice in a CSV header": (
        lambda d: _write(d / "a.csv", "text,text\n" + "".join(f"{s},other {s}\n" for s in SENTENCES)),
        {},
        r"a\.csv:1: column 'text' appears 2 times in the header",
    ),
}


@pytest.mark.parametrize("case", list(BAD_COLUMNS), ids=list(BAD_COLUMNS))
def test_bad_column_values_are_one_line_errors(tmp_path: Path, case: str) -> None:
    write, options, message = BAD_COLUMNS[case]
    with pytest.raises(DataError, match=message):
        clean_dataset(_cfg(FilesSource(paths=[write(tmp_path)]), **options), base_dir=tmp_path)


def test_large_string_text_joins_with_a_string_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = [f"More words about record {i}, its details." for i in range(len(SENTENCES))]
    table = pa.table({"title": SENTENCES, "body": pa.array(other, pa.large_string())})
    pq.write_table(table, tmp_path / "a.parquet")
    cfg = _cfg(
        FilesSource(paths=["a.parquet"]),
        text_columns=["title", "body"],
        fractions={"train": 0.5, "validation": 0.5, "test": 0},
    )
    result = clean_dataset(cfg, base_dir=tmp_path)
    texts = {row["text"] for split in ("train", "validation") for row in load_split(result.dataset_dir, split)}
    assert texts == {f"{a}\n{b}" for a, b in zip(SENTENCES, other, strict=True)}


def test_a_large_string_input_concatenates_with_a_string_input(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(SENTENCES[:4], pa.large_string())}), tmp_path / "a.parquet")
    _jsonl(tmp_path / "b.jsonl", [{"text": s} for s in SENTENCES[4:]])
    cfg = _cfg(FilesSource(paths=["a.parquet", "b.jsonl"]), fractions={"train": 0.5, "validation": 0.5, "test": 0})
    result = clean_dataset(cfg, base_dir=tmp_path)
    texts = {row["text"] for split in ("train", "validation") for row in load_split(result.dataset_dir, split)}
    assert texts == set(SENTENCES)


def test_a_csv_with_pandas_index_column_and_labels_with_pairs(tmp_path: Path) -> None:
    """``DataFrame.to_csv`` writes an unnamed index column first; it once failed the csv builder."""
    rows = "".join(f'{i},"{s}",answer {i},{"ab"[i % 2]}\n' for i, s in enumerate(SENTENCES))
    (tmp_path / "a.csv").write_text(",p,c,y\n" + rows, encoding="utf-8")
    cfg = _cfg(
        FilesSource(paths=["a.csv"]),
        prompt_column="p",
        completion_column="c",
        label_column="y",
        fractions={"train": 0.5, "validation": 0.5, "test": 0},
    )
    result = clean_dataset(cfg, base_dir=tmp_path)  # the label column was once dropped beside the pair columns
    assert result.columns == ["text", "label", "prompt", "completion"]
    rows_out = [row for split in ("train", "validation") for row in load_split(result.dataset_dir, split)]
    assert {(r["prompt"], r["completion"], r["label"]) for r in rows_out} == {
        (s, f"answer {i}", "ab"[i % 2]) for i, s in enumerate(SENTENCES)
    }
