"""Unit tests for the data-cleaning stage (tasks/data/): rules, readers, splits, cache, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from forgeline.tasks.config import BuiltinSource, CleaningConfig, DataConfig, DirectorySource, FilesSource
from forgeline.tasks.data import cleaning, loading, memory, store
from forgeline.tasks.data.cleaning import (
    CleanResult,
    DataError,
    clean_dataset,
    clean_text,
    drop_reason,
    iter_split,
    load_split,
    read_split_text,
    report_rows,
    resolve_data_override,
)

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "amber",
    "basil",
    "cedar",
    "delta",
    "ember",
    "fjord",
    "grove",
    "harbor",
    "island",
    "jasper",
    "kettle",
)
PROSE = [
    f"Record number {i} talks about {w} and nothing else of note here."
    for i, w in enumerate(["apples", "rivers", "clocks", "engines", "gardens", "stars"] * 20)
]


def data_cfg(*paths: str, **kwargs: Any) -> DataConfig:
    """A DataConfig reading ``paths`` with a cache under the test's base folder."""
    column = kwargs.pop("text_column", "text")
    cleaning_kw = kwargs.pop("cleaning", {})
    kwargs.setdefault("record", "line")
    kwargs.setdefault("fractions", {"train": 0.6, "validation": 0.3, "test": 0.1})
    return DataConfig(
        sources=[FilesSource(paths=list(paths), text_column=column)],
        cleaning=CleaningConfig(**cleaning_kw),
        cache_dir="cache",
        **kwargs,
    )


def splits_of(result: CleanResult) -> dict[str, list[str]]:
    return {s: list(iter_split(result.dataset_dir, s)) for s in ("train", "validation", "test")}


def all_records(result: CleanResult) -> list[str]:
    return [r for recs in splits_of(result).values() for r in recs]


# ------------------------------------------------------------------------------- normalization
CLEAN_CASES = [
    ("ligature NFKC", "ﬁne ﬂour", {"unicode_form": "NFKC"}, "fine flour"),
    ("ligature NFC keeps", "ﬁne", {"unicode_form": "NFC"}, "ﬁne"),
    ("fullwidth NFKC", "ＡＢＣ１", {"unicode_form": "NFKC"}, "ABC1"),
    ("combining accent NFC", "cafe\u0301", {}, "café"),
    ("combining accent none", "cafe\u0301", {"unicode_form": "none"}, "cafe\u0301"),
    ("zero-width space", "zero\u200bwidth", {}, "zerowidth"),
    ("word joiner and bom inside", "a\u2060b\ufeffc", {}, "abc"),
    ("control chars", "\x00a\x07b\x1bc\x7f", {}, "abc"),
    ("c1 control", "a\x85b", {}, "ab"),
    ("controls kept when off", "a\x07b", {"strip_control": False}, "a\x07b"),
    ("leading bom", "\ufeffhello", {}, "hello"),
    ("bom even without strip_control", "\ufeffhello", {"strip_control": False}, "hello"),
    ("crlf", "a\r\nb\r\n", {}, "a\nb"),
    ("lone cr", "a\rb", {}, "a\nb"),
    ("crlf without whitespace rule", "a\r\nb", {"normalize_whitespace": False}, "a\nb"),
    ("trailing spaces per line", "a  \nb\t\n c ", {}, "a\nb\n c"),
    ("tab expands to 4 columns", "a\tb", {}, "a   b"),
    ("tab kept when off", "a\tb", {"normalize_whitespace": False}, "a\tb"),
    ("blank runs collapse", "a\n\n\n\n\nb", {}, "a\n\nb"),
    ("two newlines stay", "a\n\nb", {}, "a\n\nb"),
    ("record stripped", "  \n hi there \n\n", {}, "hi there"),
    ("no strip when off", "  hi  ", {"normalize_whitespace": False}, "  hi  "),
    ("nbsp NFKC becomes space then stripped", "hi\u00a0", {"unicode_form": "NFKC"}, "hi"),
    ("lone surrogate dropped", "a\ud800b", {}, "ab"),
    ("emoji untouched", "ok 👍🏽", {}, "ok 👍🏽"),
]


@pytest.mark.parametrize(
    ("raw", "overrides", "expected"), [c[1:] for c in CLEAN_CASES], ids=[c[0] for c in CLEAN_CASES]
)
def test_clean_text(raw: str, overrides: dict[str, Any], expected: str) -> None:
    assert clean_text(raw, CleaningConfig(**overrides)) == expected


DROP_CASES = [
    ("empty", "", {}, "empty"),
    ("whitespace only", " \t ", {}, "empty"),
    ("too short", "ab", {"min_chars": 3}, "too_short"),
    ("min boundary keeps", "abc", {"min_chars": 3}, None),
    ("too long", "abcdef", {"max_chars": 5}, "too_long"),
    ("max boundary keeps", "abcde", {"max_chars": 5}, None),
    ("digits", "1234 5678 90", {}, "non_text"),
    ("symbols", "#### ---- ++++", {}, "non_text"),
    ("arabic-indic digits", "١٢٣٤٥", {}, "non_text"),
    ("prose keeps", "Hello, world! 42", {}, None),
    ("cjk letters keep", "日本語のテキスト", {}, None),
    ("combining marks count as letters", "e\u0301" * 5, {"max_nontext_fraction": 0.0}, None),
    ("threshold is a strict bound", "ab12", {"max_nontext_fraction": 0.5}, None),
    ("just over threshold", "a12", {"max_nontext_fraction": 0.5}, "non_text"),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), [c[1:] for c in DROP_CASES], ids=[c[0] for c in DROP_CASES])
def test_drop_reason(text: str, overrides: dict[str, Any], expected: str | None) -> None:
    assert drop_reason(text, CleaningConfig(**overrides)) == expected


def test_every_rule_is_counted(tmp_path: Path) -> None:
    lines = [
        "A perfectly fine line of prose.",
        "A perfectly fine line of prose.",  # duplicate
        "",  # empty
        "tiny",  # too_short
        "x" * 200,  # too_long
        "0123456789 0123456789",  # non_text
        *PROSE[:40],
    ]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = data_cfg("d.txt", cleaning={"min_chars": 5, "max_chars": 100})
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert result.rows_in == len(lines)
    assert result.dropped == {
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "non_text": 1,
        "duplicate": 1,
        "near_duplicate": 0,
    }
    assert sum(result.rows_per_split.values()) == 41
    assert sorted(all_records(result)) == sorted({lines[0], *PROSE[:40]})


def test_dedup_off_keeps_duplicates(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE[:30] * 2), encoding="utf-8")
    result = clean_dataset(data_cfg("d.txt", cleaning={"dedup": False}), base_dir=tmp_path)
    assert result.dropped["duplicate"] == 0
    assert sum(result.rows_per_split.values()) == 60


def _near_duplicate_corpus(path: Path) -> tuple[str, str]:
    """Two near-identical paragraphs among 30 distinct ones; returns the pair."""
    base = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. "
    rng = random.Random(0)
    distinct = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(30)]
    pair = ((base * 3).strip(), base * 3 + "Indeed.")
    path.write_text("\n\n".join([*pair, *distinct]), encoding="utf-8")
    return pair


def test_near_dedup(tmp_path: Path) -> None:
    pair = _near_duplicate_corpus(tmp_path / "d.txt")
    cfg = data_cfg("d.txt", record="paragraph", cleaning={"near_dedup": True, "near_dedup_threshold": 0.8})
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert result.dropped["near_duplicate"] == 1
    assert result.rows_in == 32
    kept = all_records(result)
    assert (pair[0] in kept) != (pair[1] in kept)  # one of the pair is kept


def test_near_dedup_without_datasketch_keeps_both_warns_and_redoes_the_cache_once_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pair = _near_duplicate_corpus(tmp_path / "d.txt")
    cfg = data_cfg("d.txt", record="paragraph", cleaning={"near_dedup": True, "near_dedup_threshold": 0.8})
    with monkeypatch.context() as uninstalled:
        uninstalled.setitem(sys.modules, "datasketch", None)  # `import datasketch` raises ImportError
        with pytest.raises(ImportError):
            import datasketch  # noqa: F401
        result = clean_dataset(cfg, base_dir=tmp_path)
    assert "near_dedup is on but datasketch is not installed" in caplog.text
    assert result.dropped["near_duplicate"] == 0
    assert {pair[0], pair[1]} <= set(all_records(result))  # both kept, nothing silently lost

    # Installed again: the same command does not reuse the dataset cleaned without near-dedup.
    again = clean_dataset(cfg, base_dir=tmp_path)
    assert not again.cache_hit and again.fingerprint != result.fingerprint
    assert again.dropped["near_duplicate"] == 1


# ---------------------------------------------------------------------------- BOM / CRLF files
SAMPLE = "First paragraph line one.\nLine two of it.\n\nSecond paragraph here.\n\n\n\nThird one, café.\n"


@pytest.mark.parametrize(
    ("record", "split"),
    [("line", "hash"), ("paragraph", "hash"), ("line", "tail"), ("paragraph", "tail"), ("file", "tail")],
)
def test_bom_and_crlf_files_equal_plain(tmp_path: Path, record: str, split: str) -> None:
    variants = {
        "plain": SAMPLE.encode(),
        "bom": b"\xef\xbb\xbf" + SAMPLE.encode(),
        "crlf": SAMPLE.replace("\n", "\r\n").encode(),
        "bomcrlf": b"\xef\xbb\xbf" + SAMPLE.replace("\n", "\r\n").encode(),
    }
    results = {}
    for name, blob in variants.items():
        (tmp_path / f"{name}.txt").write_bytes(blob)
        fractions = {"train": 0.5, "validation": 0.5, "test": 0.0}
        cfg = data_cfg(f"{name}.txt", record=record, split=split, fractions=fractions)
        results[name] = clean_dataset(cfg, base_dir=tmp_path)
    texts = {name: splits_of(r) for name, r in results.items()} if split == "hash" else None
    fingerprints = {r.fingerprint for r in results.values()}
    assert len(fingerprints) == 1, "BOM/CRLF variants must clean to identical splits"
    if texts is not None:
        assert texts["bom"] == texts["plain"] == texts["crlf"] == texts["bomcrlf"]


# ---------------------------------------------------------------------------------- formats
def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_table_formats(tmp_path: Path) -> None:
    texts = PROSE[:20]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[:5])))
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in texts[5:10]]), encoding="utf-8")
    rows = ['"' + t.replace('"', '""') + '",x' for t in texts[10:15]]
    (tmp_path / "c.csv").write_bytes(b"\xef\xbb\xbftext,other\r\n" + "\r\n".join(rows).encode() + b"\r\n")
    write_parquet(tmp_path / "d.parquet", {"text": texts[15:19] + [None], "n": list(range(5))})
    (tmp_path / "e.json").write_text(json.dumps({"text": texts[19]}) + "\n", encoding="utf-8")  # JSON Lines
    cfg = data_cfg("a.jsonl", "b.json", "c.csv", "d.parquet", "e.json")
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert sorted(all_records(result)) == sorted(texts)
    assert result.rows_in == 21
    assert result.dropped["empty"] == 1  # the parquet null
    assert [Path(s).name for s in result.sources] == ["a.jsonl", "b.json", "c.csv", "d.parquet", "e.json"]


def test_csv_multiline_quoted_field_and_custom_column(tmp_path: Path) -> None:
    rows = "".join(f'{i},"{t}"\n' for i, t in enumerate(PROSE[:20]))
    (tmp_path / "c.csv").write_text('id,body\n1,"line one\nline two"\n2,"plain, with comma"\n' + rows)
    result = clean_dataset(data_cfg("c.csv", text_column="body"), base_dir=tmp_path)
    assert sorted(all_records(result)) == sorted(["line one\nline two", "plain, with comma", *PROSE[:20]])


def test_directory_source_sorted_and_filtered(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    (folder / "b.txt").write_text(PROSE[1])
    (folder / "a.md").write_text(PROSE[0])
    (folder / "sub" / "c.jsonl").write_text(json.dumps({"text": PROSE[2]}))
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    (folder / ".hidden" / "x.txt").write_text("secret")
    cfg = DataConfig(sources=[DirectorySource(path="corpus")], cache_dir="cache", record="file", split="tail")
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert [Path(s).name for s in result.sources] == ["a.md", "b.txt", "c.jsonl"]
    stream = "\n".join(PROSE[:3])
    assert read_split_text(result.dataset_dir, "train", sep="") == stream[: int(len(stream) * 0.9)]


# -------------------------------------------------------------------------------- bad input
def _write(name: str, data: bytes | str) -> Callable[[Path], str]:
    def make(base: Path) -> str:
        path = base / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data, encoding="utf-8")
        else:
            path.write_bytes(data)
        return name

    return make


def _parquet(name: str, columns: dict[str, list[Any]], string_type: bool = False) -> Callable[[Path], str]:
    def make(base: Path) -> str:
        import pyarrow as pa

        typed = {k: pa.array(v, pa.string()) for k, v in columns.items()} if string_type else columns
        write_parquet(base / name, typed)
        return name

    return make


BAD_INPUTS = [
    ("empty file", _write("empty.txt", b""), r"empty\.txt: file is empty$"),
    ("bom only", _write("bom.txt", b"\xef\xbb\xbf"), r"bom\.txt: file is empty$"),
    (
        "invalid utf8",
        _write("bad.txt", b"hello\nwor\xffld\n"),
        r"bad\.txt: not valid UTF-8 at byte 9 \(line 2\)",
    ),
    (
        "latin-1",
        _write("latin.txt", "ok\ncafé\n".encode("latin-1")),
        r"latin\.txt: not valid UTF-8 at byte 6 \(line 2\)",
    ),
    (
        "bad utf8 after bom",
        _write("b.txt", b"\xef\xbb\xbfab\xc3"),
        r"b\.txt: not valid UTF-8 at byte 5 \(line 1\)",
    ),
    (
        "bad utf8 in csv",
        _write("x.csv", b"text\nfine\nbr\xe9k\n"),
        r"x\.csv: not valid UTF-8 at byte 12 \(line 3\)",
    ),
    (
        "bad utf8 in json list",
        _write("l.json", b'[\n{"text": "a\xff"}]'),
        r"l\.json: not valid UTF-8 at byte 13 \(line 2\)",
    ),
    (
        "jsonl missing column",
        _write("m.jsonl", '{"body": "x", "id": 1}\n'),
        r"m\.jsonl:1: no column 'text' \(columns: body, id\)",
    ),
    ("csv missing column", _write("m.csv", "a,b\n1,2\n"), r"m\.csv: no column 'text' \(columns: a, b\)"),
    (
        "parquet missing column",
        _parquet("m.parquet", {"a": ["x"], "b": ["y"]}),
        r"m\.parquet: no column 'text' \(columns: a, b\)",
    ),
    (
        "parquet wrong type",
        _parquet("t.parquet", {"text": [1, 2]}),
        r"t\.parquet: column 'text' has type int64",
    ),
    (
        "parquet zero rows",
        _parquet("z.parquet", {"text": []}, string_type=True),
        r"z\.parquet: no rows",
    ),
    ("not parquet", _write("f.parquet", b"not parquet at all"), r"f\.parquet: not a readable Parquet file"),
    ("invalid json line", _write("j.jsonl", '{"text": "ok"}\n{"text": oops}\n'), r"j\.jsonl:2: invalid JSON"),
    (
        "json wrong type",
        _write("w.jsonl", '{"text": "ok"}\n\n{"text": 5}\n'),
        r"w\.jsonl:3: column 'text' is int",
    ),
    ("json not object", _write("o.jsonl", '["a"]\n'), r"o\.jsonl:1: expected a JSON object"),
    ("jsonl blank only", _write("b.jsonl", "\n \n"), r"b\.jsonl: no records"),
    ("json list invalid", _write("l.json", '[\n{"text": "a"},\n{"text": }\n]'), r"l\.json:3: invalid JSON"),
    (
        "csv wrong field count",
        _write("f.csv", "text,id\nhello,1\nworld,2,3\n"),
        r"f\.csv:3: expected 2 fields, got 3",
    ),
    ("csv too few fields", _write("f.csv", "text,id\nhello\n"), r"f\.csv:2: expected 2 fields, got 1"),
    ("csv unterminated quote", _write("q.csv", 'text\nok\n"abc\nmore\n'), r"q\.csv:3: malformed CSV"),
    ("csv header only", _write("h.csv", "text,id\n"), r"h\.csv: no rows \(header only\)"),
    ("missing file", lambda base: "nope.txt", r"^nope\.txt: no such file or directory$"),
    ("glob without match", lambda base: "none/*.txt", r"^none/\*\.txt: glob matched no files$"),
    ("directory given as file", lambda base: (base / "d").mkdir() or "d", r"^d: is a directory"),
]


@pytest.mark.parametrize(("make", "pattern"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(tmp_path: Path, make: Callable[[Path], str], pattern: str) -> None:
    value = make(tmp_path)
    with pytest.raises(DataError, match=pattern) as info:
        clean_dataset(data_cfg(value), base_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache" / "datasets").glob(".tmp-*")), "no half-written dataset left"


def test_huge_line_fails_with_line_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "MAX_LINE_BYTES", 100)
    (tmp_path / "big.txt").write_text("short line\n" + "x" * 500 + "\n")
    with pytest.raises(DataError, match=r"big\.txt:2: line longer than 100 bytes \(at byte 11\)"):
        clean_dataset(data_cfg("big.txt"), base_dir=tmp_path)


def test_huge_record_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "MAX_RECORD_CHARS", 50)
    (tmp_path / "big.txt").write_text("line of text\n" * 10)
    with pytest.raises(DataError, match=r"big\.txt:\d+: record longer than 50 characters"):
        clean_dataset(data_cfg("big.txt", record="file"), base_dir=tmp_path)


def test_nothing_left_after_cleaning(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("   \n\n1234\n")
    with pytest.raises(
        DataError,
        match=r"no records left after cleaning \(3 read from .*blank\.txt; "
        r"dropped: empty=2, non_text=1\)",
    ):
        clean_dataset(data_cfg("blank.txt"), base_dir=tmp_path)


@pytest.mark.parametrize("split", ["hash", "tail"])
def test_empty_split_named(tmp_path: Path, split: str) -> None:
    (tmp_path / "one.txt").write_text("Only a single record lives in this file.\n" if split == "hash" else "a")
    with pytest.raises(DataError, match=r"split '(train|validation)' is empty"):
        clean_dataset(data_cfg("one.txt", split=split), base_dir=tmp_path)


def test_file_changed_while_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.txt"
    path.write_text("\n".join(PROSE))
    original = cleaning._run_pipeline

    def run_then_append(*args: Any) -> Any:
        out = original(*args)
        with path.open("a") as handle:
            handle.write("\nmore text arrives")
        return out

    monkeypatch.setattr(cleaning, "_run_pipeline", run_then_append)
    with pytest.raises(DataError, match=r"d\.txt: file changed while it was being read"):
        clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    assert not (tmp_path / "cache" / "index").exists()


# ------------------------------------------------------------------------------- path safety
def test_rejects_urls_and_encoded_traversal(tmp_path: Path) -> None:
    for value in [
        "http://example.com/x.txt",
        "file:///etc/passwd",
        "HTTPS://x/y",
        "s3://bucket/k",
        "%2e%2e/x.txt",
    ]:
        with pytest.raises(DataError, match=rf"^{re.escape(value)}: (URLs|percent-encoded)"):
            clean_dataset(data_cfg(value), base_dir=tmp_path)
        with pytest.raises(DataError, match=rf"^{re.escape(value)}: "):
            resolve_data_override([value], base_dir=tmp_path)


def test_rejects_dotdot_escape(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "secret.txt").write_text("top secret words\n")
    with pytest.raises(DataError, match=r"^\.\./secret\.txt: '\.\.' leads outside"):
        clean_dataset(data_cfg("../secret.txt"), base_dir=project)
    with pytest.raises(DataError, match=r"^data/\.\./\.\./secret\.txt: '\.\.' leads outside"):
        clean_dataset(data_cfg("data/../../secret.txt", roots=["data"]), base_dir=project)


def test_roots_reject_outside_and_symlink_escape(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "secret.txt").write_text("top secret words\n")
    (data / "ok.txt").write_text("\n".join(PROSE))
    (data / "link.txt").symlink_to(tmp_path / "secret.txt")
    outside = str(tmp_path / "secret.txt")
    with pytest.raises(DataError, match=rf"^{outside}: outside the allowed data roots"):
        clean_dataset(data_cfg(outside, roots=["data"]), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"^data/link\.txt: .*resolves to .*secret\.txt, outside"):
        clean_dataset(data_cfg("data/link.txt", roots=["data"]), base_dir=tmp_path)
    with pytest.raises(DataError, match=r"^data/\*\.txt: .*link\.txt resolves to .*secret\.txt"):
        clean_dataset(data_cfg("data/*.txt", roots=["data"]), base_dir=tmp_path)
    # Without roots, a symlink escaping the source's own folder and the working dir is refused too.
    sub = tmp_path / "work"
    (sub / "in").mkdir(parents=True)
    (sub / "in" / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DataError, match=r"^in: .*link\.txt resolves to"):
        clean_dataset(DataConfig(sources=[DirectorySource(path="in")], cache_dir="c"), base_dir=sub)
    assert clean_dataset(data_cfg("data/ok.txt", roots=["data"]), base_dir=tmp_path).rows_in == len(PROSE)


# ------------------------------------------------------------------------------------ splits
def test_hash_split_is_stable_when_data_grows(tmp_path: Path) -> None:
    old = [f"Old record {i} describes a quiet village by the sea." for i in range(300)]
    new = [f"New record {i} describes a noisy city in the hills." for i in range(200)]
    (tmp_path / "old.txt").write_text("\n".join(old))
    (tmp_path / "new.txt").write_text("\n".join(new))
    fractions = {"train": 0.9, "validation": 0.05, "test": 0.05}
    first = splits_of(clean_dataset(data_cfg("old.txt", fractions=fractions), base_dir=tmp_path))
    second = splits_of(clean_dataset(data_cfg("new.txt", "old.txt", fractions=fractions), base_dir=tmp_path))
    for split in first:
        assert set(first[split]) <= set(second[split]), split
    assert all(first.values()), "300 records fill every split at 0.9/0.05/0.05"
    assert 0.8 < len(second["train"]) / 500 < 0.97


def test_hash_split_has_no_overlap_and_empty_test_file(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE * 3))
    fractions = {"train": 0.8, "validation": 0.2, "test": 0.0}
    result = clean_dataset(data_cfg("d.txt", fractions=fractions, cleaning={"dedup": False}), base_dir=tmp_path)
    parts = splits_of(result)
    assert parts["test"] == [] and len(load_split(result.dataset_dir, "test")) == 0
    assert not set(parts["train"]) & set(parts["validation"])
    assert sum(result.rows_per_split.values()) == len(PROSE) * 3


def test_tail_split_exact_nanogpt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    line = 'But soft, "what" light \\ yonder window breaks? ü👍'
    text = "".join(f"ROMEO {i}:\n{line}\n\n" for i in range(40))
    (tmp_path / "input.txt").write_text(text)
    fractions = {"train": 0.9, "validation": 0.1, "test": 0.0}
    result = clean_dataset(data_cfg("input.txt", record="file", split="tail", fractions=fractions), base_dir=tmp_path)
    data = text.strip()
    n = len(data)
    assert read_split_text(result.dataset_dir, "train", sep="") == data[: int(n * 0.9)]
    assert read_split_text(result.dataset_dir, "validation", sep="") == data[int(n * 0.9) :]
    assert read_split_text(result.dataset_dir, "test", sep="") == ""
    assert result.rows_per_split == {"train": 1, "validation": 1, "test": 0}
    assert read_split_text(result.dataset_dir, "train") == data[: int(n * 0.9)]  # default sep too
    assert result.bytes_per_split["train"] == len(data[: int(n * 0.9)].encode())
    assert result.split == "tail"


def test_tail_split_three_way_over_records(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE[:50]) + "\n\n\n")
    fractions = {"train": 0.7, "validation": 0.2, "test": 0.1}
    result = clean_dataset(data_cfg("d.txt", split="tail", fractions=fractions), base_dir=tmp_path)
    stream = "\n".join(PROSE[:50])
    n = len(stream)
    cut1, cut2 = int(n * 0.7), int(n * (0.7 + 0.2))
    got = [read_split_text(result.dataset_dir, s, sep="") for s in ("train", "validation", "test")]
    assert got == [stream[:cut1], stream[cut1:cut2], stream[cut2:]]
    assert result.dropped["empty"] == 2


def test_tail_leakage_fails(tmp_path: Path) -> None:
    lines = [*PROSE[:10], PROSE[0], PROSE[1]]  # the last two repeat train records
    (tmp_path / "d.txt").write_text("\n".join(lines))
    cfg = data_cfg(
        "d.txt",
        split="tail",
        cleaning={"dedup": False},
        fractions={"train": 0.8, "validation": 0.2, "test": 0},
    )
    with pytest.raises(DataError, match=r"leakage: 2 records appear in both train and validation"):
        clean_dataset(cfg, base_dir=tmp_path)
    cfg_dedup = data_cfg("d.txt", split="tail", fractions={"train": 0.8, "validation": 0.2, "test": 0})
    assert clean_dataset(cfg_dedup, base_dir=tmp_path).dropped["duplicate"] == 2


# ------------------------------------------------------------------------------------- cache
def test_cache_hit_skips_cleaning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE))
    calls = []
    original = cleaning._clean_and_store
    monkeypatch.setattr(cleaning, "_clean_and_store", lambda *a: calls.append(1) or original(*a))
    first = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    train = next((Path(first.dataset_dir) / "train").glob("*.arrow"))
    mtime = train.stat().st_mtime_ns
    second = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    assert (first.cache_hit, second.cache_hit, len(calls)) == (False, True, 1)
    assert second.model_dump(exclude={"cache_hit"}) == first.model_dump(exclude={"cache_hit"})
    assert train.stat().st_mtime_ns == mtime
    report = json.loads((Path(first.dataset_dir) / "report.json").read_text())
    assert "cache_hit" not in report and report["fingerprint"] == first.fingerprint
    assert Path(first.dataset_dir) == (tmp_path / "cache" / "datasets" / first.fingerprint).resolve()
    assert not list((tmp_path / "cache" / "datasets").glob(".tmp-*"))


def test_cache_follows_content_not_name(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE))
    first = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    (tmp_path / "d.txt").rename(tmp_path / "renamed.txt")
    renamed = clean_dataset(data_cfg("renamed.txt"), base_dir=tmp_path)
    assert not renamed.cache_hit and renamed.fingerprint == first.fingerprint  # same content: same dataset
    (tmp_path / "renamed.txt").write_text("\n".join(PROSE[:-1]) + "\nA brand new closing line of prose.")
    changed = clean_dataset(data_cfg("renamed.txt"), base_dir=tmp_path)
    assert not changed.cache_hit and changed.fingerprint != first.fingerprint
    other_cfg = clean_dataset(data_cfg("renamed.txt", cleaning={"unicode_form": "NFKC"}), base_dir=tmp_path)
    assert not other_cfg.cache_hit and other_cfg.fingerprint != changed.fingerprint
    moved_cache = data_cfg("renamed.txt").model_copy(update={"roots": [str(tmp_path)]})
    assert clean_dataset(moved_cache, base_dir=tmp_path).cache_hit  # roots are not part of the key


def test_a_cache_hit_reports_this_runs_sources(tmp_path: Path) -> None:
    """Two checkouts sharing one cache: the hit names its own file, not the one that stored the content first."""
    cache = tmp_path / "shared-cache"
    for checkout in ("a", "b"):
        (tmp_path / checkout).mkdir()
        (tmp_path / checkout / "d.txt").write_text("\n".join(PROSE))
    cfg = data_cfg("d.txt").model_copy(update={"cache_dir": str(cache)})
    first = clean_dataset(cfg, base_dir=tmp_path / "a")
    clean_dataset(cfg, base_dir=tmp_path / "b")
    hit = clean_dataset(cfg, base_dir=tmp_path / "b")
    assert hit.cache_hit and hit.fingerprint == first.fingerprint
    assert hit.sources == [str((tmp_path / "b" / "d.txt").resolve())]


def test_corrupt_index_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE))
    first = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    for index in (tmp_path / "cache" / "index").glob("*.json"):
        index.write_text(json.dumps({"fingerprint": "../../etc"}))
    again = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    assert not again.cache_hit and again.fingerprint == first.fingerprint
    assert clean_dataset(data_cfg("d.txt"), base_dir=tmp_path).cache_hit


# ----------------------------------------------------------------------------------- builtin
def test_builtin_corpus_deterministic_and_substantial(tmp_path: Path) -> None:
    corpus = cleaning.builtin_corpus(2_000_000)
    assert len(corpus.encode()) > 300_000
    assert "The" in corpus and "def " in corpus
    assert len(cleaning.builtin_corpus(100_000).encode()) <= 100_000
    script = (
        "import hashlib; from forgeline.tasks.data import cleaning; "
        "print(hashlib.sha256(cleaning.builtin_corpus(2_000_000).encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(corpus.encode()).hexdigest()
    cfg = DataConfig(sources=[BuiltinSource(max_bytes=200_000)], cache_dir="cache")
    result = clean_dataset(cfg, base_dir=tmp_path)
    assert result.sources == ["builtin:python-docs"]
    assert sum(result.bytes_per_split.values()) > 50_000
    assert result.rows_per_split["train"] > 100 and result.rows_per_split["validation"] > 0
    assert clean_dataset(cfg, base_dir=tmp_path).cache_hit


# -------------------------------------------------------------------------- override / report
def test_resolve_data_override(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("\n".join(PROSE[:60]))
    (tmp_path / "docs" / "b.txt").write_text("\n".join(PROSE[60:]))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "A record from the JSON Lines file."}))
    sources = resolve_data_override(["one.jsonl", "docs/*.txt", "docs"], base_dir=tmp_path)
    assert [type(s).__name__ for s in sources] == ["FilesSource", "FilesSource", "DirectorySource"]
    assert sources[0].paths == ["one.jsonl"] and sources[1].paths == ["docs/*.txt"] and sources[2].path == "docs"
    with pytest.raises(DataError, match=r"^missing: no such file or directory$"):
        resolve_data_override(["missing"], base_dir=tmp_path)
    with pytest.raises(DataError, match=r"^docs/\*\.csv: glob matched no files$"):
        resolve_data_override(["docs/*.csv"], base_dir=tmp_path)
    cfg = DataConfig(cache_dir="cache", record="line")  # default source is builtin: the override replaces it
    result = clean_dataset(cfg, data_override=["one.jsonl", "docs/*.txt"], base_dir=tmp_path)
    assert [Path(s).name for s in result.sources] == ["one.jsonl", "a.txt", "b.txt"]


def test_resolve_data_override_relative_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x.txt").write_text("hello")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_override(["x.txt"])[0].paths == ["x.txt"]


def test_report_rows_and_iter_split(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE + ["", PROSE[0]]))
    result = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    rows = report_rows(result)
    assert rows[0] == {"kind": "input", "name": "rows_in", "count": len(PROSE) + 2, "bytes": None}
    assert {r["name"]: r["count"] for r in rows if r["kind"] == "dropped"}["duplicate"] == 1
    split_rows = [r for r in rows if r["kind"] == "split"]
    assert [r["name"] for r in split_rows] == ["train", "validation", "test"]
    assert all(set(r) == {"kind", "name", "count", "bytes"} for r in rows)
    assert read_split_text(result.dataset_dir, "train") == "\n".join(iter_split(result.dataset_dir, "train"))
    with pytest.raises(DataError, match="unknown split 'dev'"):
        list(iter_split(result.dataset_dir, "dev"))


def test_relative_cache_dir_uses_base_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.txt").write_text("\n".join(PROSE))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = clean_dataset(data_cfg("d.txt"), base_dir=tmp_path)
    assert result.dataset_dir.startswith(str((tmp_path / "cache").resolve()))
    assert not os.listdir(elsewhere)


# ------------------------------------------------------------------- exact dedup, bounded memory
def _first_seen(texts: list[str]) -> list[str]:
    """The one-pass reference: keep a record unless an earlier one had the same text."""
    seen: set[str] = set()
    kept = []
    for text in texts:
        if text not in seen:
            seen.add(text)
            kept.append(text)
    return kept


def _skewed_texts(n: int, seed: int) -> list[str]:
    """Records with many repeats (a few very common), some long, some non-ASCII."""
    rng = random.Random(seed)
    pool = [f"{rng.choice(WORDS)} {i} é{'x' * rng.randrange(0, 300)}" for i in range(n // 3)]
    return [pool[0] if rng.random() < 0.2 else rng.choice(pool) for _ in range(n)]


def _digests(texts: list[str]) -> Any:
    """A dataset of the texts' digest columns, as the cleaning map writes them."""
    import datasets
    import pyarrow as pa

    blob = b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts)
    pairs = np.frombuffer(blob, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    return datasets.Dataset(pa.table({"hi": pairs[:, 0], "lo": pairs[:, 1]}))


EXACT_SHAPES = {
    "in memory": {},
    "chunks and buckets": {"CHUNK": 16, "BUCKET": 8},
    "one bucket": {"CHUNK": 16, "BUCKET": 10_000},
}


@pytest.mark.parametrize("shape", list(EXACT_SHAPES), ids=list(EXACT_SHAPES))
def test_exact_duplicates_match_one_pass_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    for name, value in EXACT_SHAPES[shape].items():
        monkeypatch.setattr(store, name, value)
    texts = _skewed_texts(600, seed=len(shape))
    keep = np.array([i % 7 != 3 for i in range(len(texts))])  # records a content rule dropped take no part
    dup = store.later_duplicates(_digests(texts), memory.Bits.of(keep), tmp_path).get()
    kept = [t for t, k, d in zip(texts, keep, dup, strict=True) if k and not d]
    assert kept == _first_seen([t for t, k in zip(texts, keep, strict=True) if k])
    assert not (dup & ~keep).any() and int(dup.sum()) > 100
    assert not list((tmp_path / "buckets").glob("*")) if (tmp_path / "buckets").exists() else True


def test_exact_duplicates_all_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "CHUNK", 8)  # a chunk is whole bytes of the bit masks
    monkeypatch.setattr(store, "BUCKET", 2)
    dup = store.later_duplicates(_digests(["one and the same"] * 50), memory.Bits.of(np.ones(50, dtype=bool)), tmp_path)
    assert dup.get().tolist() == [False] + [True] * 49


def test_exact_duplicates_in_chunks_hold_a_small_part_of_the_digests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past one chunk, memory is a chunk and a bucket (plus a byte per record), not every digest at once."""
    texts = [f"{i % 300_000:07d}" for i in range(400_000)]
    ds, keep = _digests(texts), memory.Bits.of(np.ones(len(texts), dtype=bool))

    def peak(chunk: int, bucket: int) -> tuple[int, int]:
        monkeypatch.setattr(store, "CHUNK", chunk)
        monkeypatch.setattr(store, "BUCKET", bucket)
        tracemalloc.start()
        try:
            dup = store.later_duplicates(ds, keep, tmp_path / f"w{chunk}")
            return tracemalloc.get_traced_memory()[1], dup.count()
        finally:
            tracemalloc.stop()

    whole, whole_dups = peak(2**20, 2**18)
    chunked, chunked_dups = peak(2**12, 2**10)
    assert whole_dups == chunked_dups == 100_000
    assert chunked < whole / 3, (chunked, whole)


def test_exact_duplicates_past_a_chunk_whose_records_were_all_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole chunk of dropped records spills no entry: it once failed the bucket split (zip of unequal lengths)."""
    monkeypatch.setattr(store, "CHUNK", 8)
    monkeypatch.setattr(store, "BUCKET", 4)
    texts = [f"line {i}" for i in range(16)] + [f"line {i % 5}" for i in range(16)]
    keep = np.array([i >= 8 for i in range(len(texts))])  # the first chunk is all dropped
    dup = store.later_duplicates(_digests(texts), memory.Bits.of(keep), tmp_path).get()
    assert np.flatnonzero(dup).tolist() == [21, 22, 23, *range(24, 32)]


@pytest.mark.parametrize("split", ["hash", "tail"])
def test_disk_dedup_gives_the_same_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, split: str) -> None:
    lines = [*_skewed_texts(400, seed=5), "", "tiny", *PROSE]
    (tmp_path / "d.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    in_memory = clean_dataset(data_cfg("d.txt", split=split), base_dir=tmp_path)

    monkeypatch.setattr(store, "CHUNK", 16)  # digests through bucket files on disk
    monkeypatch.setattr(store, "BUCKET", 8)
    cfg = data_cfg("d.txt", split=split)
    on_disk = clean_dataset(cfg.model_copy(update={"cache_dir": "cache2"}), base_dir=tmp_path)
    assert on_disk.fingerprint == in_memory.fingerprint
    assert on_disk.dropped == in_memory.dropped and on_disk.dropped["duplicate"] > 200
    assert splits_of(on_disk) == splits_of(in_memory)
    assert sorted(p.name for p in Path(on_disk.dataset_dir).iterdir()) == sorted(
        p.name for p in Path(in_memory.dataset_dir).iterdir()
    )  # no spill files left behind


def test_batched_rules_agree_with_drop_reason() -> None:
    """The cleaning map counts the non-text share with Arrow for ASCII records: the same decisions."""
    import pyarrow as pa

    from forgeline.tasks.data.rules import RULES, clean_batch

    rng = random.Random(3)
    alphabet = "ab Z9_#.\t\x0b\x0c\x1c\x1f\x07\x00\x7fé\u0301١ \r\n\n  "
    cases = [c[1] for c in CLEAN_CASES + DROP_CASES if c[0] != "lone surrogate dropped"]  # Arrow holds UTF-8
    texts = cases + ["".join(rng.choices(alphabet, k=12)) for _ in range(400)]
    overrides_list = [{}, {"strip_control": False}, {"normalize_whitespace": False, "min_chars": 3, "max_chars": 10}]
    for overrides in overrides_list:
        cfg = CleaningConfig(**overrides)
        table = pa.table({"_t0": texts})
        out = clean_batch(table, cfg.model_dump(), paragraph=False, fractions=(0.8, 0.1, 0.1)).to_pydict()
        expected = [drop_reason(clean_text(t, cfg), cfg) for t in texts]
        assert [None if r == 0 else RULES[r - 1] for r in out["rule"]] == expected
        assert [t for t, e in zip(out["text"], expected, strict=True) if e is None] == [
            clean_text(t, cfg) for t, e in zip(texts, expected, strict=True) if e is None
        ]


def test_builder_failure_logs_nothing_but_our_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The json builder logs its own failure at ERROR; the CLI must print one line (RELIABILITY F3)."""
    (tmp_path / "rows.jsonl").write_text('{"text": "one good record here"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: invalid JSON"):
        clean_dataset(data_cfg("rows.jsonl"), base_dir=tmp_path)
    assert not [r for r in caplog.records if r.name.startswith("datasets") and r.levelno >= 40]
