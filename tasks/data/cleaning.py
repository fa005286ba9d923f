"""Data cleaning on Hugging Face ``datasets``: read sources, clean records, split them, store them as Arrow.

Pure functions (no Prefect, no MLflow): the flow, the CLI and the tests share one code path. Inputs (``paths``)
are scanned once for the cache key, then load through ``datasets`` builders (``loading``); one batched ``map``
over all cores marks each record's drop rule, digest and hash split (``rules.clean_batch``); exact and near
(MinHash) de-duplication and the ``hash`` or ``tail`` split follow (``store``), and the splits are saved under
``<cache_dir>/datasets/<fingerprint>/``. With ``data.label_column`` a text seen under two labels keeps no copy
(``conflicting_label``), the hash split is stratified and ``labels.json`` is written.

The fingerprint covers the config and the cleaned records, not file names: the same content under a new name
is the same dataset. An index keyed by the inputs' content hashes makes a re-run on unchanged inputs a cache
hit that reads no data.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from forgeline.tasks import progress
from forgeline.tasks.config import DataConfig
from forgeline.tasks.data import loading, pairs, store
from forgeline.tasks.data.builtin import DOCSTRINGS_LABEL, builtin_corpus
from forgeline.tasks.data.labels import build_label_set, check_label_kinds, labels_as_text, write_label_set
from forgeline.tasks.data.memory import release
from forgeline.tasks.data.paths import DataError, Input, join, resolve_data_override, resolve_inputs
from forgeline.tasks.data.rules import EXTRA_COLUMNS, KEEP, RULES, TEXT_PREFIX, clean_batch, clean_text, drop_reason
from forgeline.tasks.data.store import SPLITS
from forgeline.tasks.data.stratify import stratified_splits

__all__ = ["CleanResult", "DataError", "builtin_corpus", "clean_dataset", "clean_text", "drop_reason"]
__all__ += ["iter_split", "read_split_text", "report_rows", "resolve_data_override"]

logger = logging.getLogger(__name__)

CLEANING_VERSION = 2
"""Bumped whenever cleaning changes its output or its fingerprint: part of both the cache key and the fingerprint.
2: Arrow splits (``save_to_disk``) and a fingerprint over record digests (1: JSON Lines files)."""
SMALL_INPUT_BYTES = 32 * 2**20
"""Below this much input one process cleans: starting workers costs more than it saves."""


class CleanResult(BaseModel):
    """What one cleaning produced (``report.json`` holds all of it but ``cache_hit``)."""

    fingerprint: str
    dataset_dir: str
    cache_hit: bool
    rows_in: int
    dropped: dict[str, int]
    rows_per_split: dict[str, int]
    bytes_per_split: dict[str, int]
    sources: list[str]
    split: str
    columns: list[str] = ["text"]
    class_counts: dict[str, dict[str, int]] = {}
    """With ``data.label_column``: ``{split: {label: records}}`` (also in ``labels.json``)."""


def clean_dataset(
    cfg: DataConfig, *, data_override: list[str] | None = None, base_dir: Path | None = None
) -> CleanResult:
    """Read, clean and split the configured data, or return the cached result for unchanged inputs.

    Args:
        cfg: The data section of the pipeline config.
        data_override: CLI ``--data`` values (files, globs or directories) replacing ``cfg.sources``.
        base_dir: Folder that relative source paths and ``cfg.cache_dir`` resolve against (default: cwd).

    Returns:
        The cleaning report, with ``cache_hit`` telling whether the stored dataset was reused.

    Raises:
        DataError: A source is missing, unsafe or malformed, or too little data is left to split.
    """
    base = Path(base_dir if base_dir is not None else Path.cwd()).resolve()
    inputs = resolve_inputs(cfg.sources, base, cfg.roots, data_override)
    cache_dir = join(base, cfg.cache_dir)
    payload = _config_payload(cfg)
    key, stamps = _input_key(inputs, payload, cfg.record, cache_dir)
    cached = store.lookup(cache_dir, key)
    if cached is not None:
        logger.info("cleaning cache hit: %s (%s)", cached["fingerprint"][:12], cached["dataset_dir"])
        # this run's inputs: the stored report names whichever run stored the same content first
        return CleanResult(**cached | {"sources": [i.label for i in inputs]}, cache_hit=True)
    result = _clean_and_store(cfg, inputs, payload, cache_dir, stamps)
    store.write_index(cache_dir, key, result.fingerprint)
    return result


def load_split(dataset_dir: str | Path, split: str) -> Any:
    """One stored split as a ``datasets.Dataset`` (memory-mapped Arrow).

    Raises:
        DataError: Unknown split name or missing split folder.
    """
    import datasets

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of: {', '.join(SPLITS)})")
    path = Path(dataset_dir) / split
    if not (path / "dataset_info.json").is_file():
        raise DataError(f"{path}: split folder not found")
    return datasets.load_from_disk(str(path))


def iter_split(dataset_dir: str | Path, split: str) -> Iterator[str]:
    """Stream the text of one stored split, record by record, in stored order."""
    for chunk in load_split(dataset_dir, split).data.column("text").chunks:
        yield from chunk.to_pylist()


def read_split_text(dataset_dir: str | Path, split: str, sep: str = "\n") -> str:
    """A whole split as one string: its records joined by ``sep`` (a ``tail`` split is one record)."""
    return sep.join(iter_split(dataset_dir, split))


def report_rows(result: CleanResult) -> list[dict[str, Any]]:
    """Rows for a report table: input count, each drop rule, each split.

    Returns:
        Dicts with the keys ``kind`` (input/dropped/split), ``name``, ``count``, ``bytes`` (splits only).
    """
    rows: list[dict[str, Any]] = [{"kind": "input", "name": "rows_in", "count": result.rows_in, "bytes": None}]
    rows += [{"kind": "dropped", "name": r, "count": n, "bytes": None} for r, n in result.dropped.items()]
    rows += [
        {"kind": "split", "name": s, "count": result.rows_per_split[s], "bytes": result.bytes_per_split[s]}
        for s in SPLITS
    ]
    return rows


# ---------------------------------------------------------------------------------------- cache key
def _config_payload(cfg: DataConfig) -> dict[str, Any]:
    payload = cfg.model_dump(mode="json", exclude={"cache_dir", "roots", "sources", "num_proc"})
    payload["cleaning"]["near_dedup"] = cfg.cleaning.near_dedup and _near_dedup_available()
    payload["version"] = CLEANING_VERSION
    if cfg.label_column:  # labeled data is split by class and gets labels.json: older stores lack both
        payload["stratified"] = 1
    return payload


def _near_dedup_available() -> bool:
    try:
        import datasketch  # noqa: F401
    except ImportError:
        return False
    return True


def _input_key(
    inputs: list[Input], payload: dict[str, Any], record: str, cache_dir: Path
) -> tuple[str, dict[Path, tuple[int, int]]]:
    """Cache key over the config and each input's content; plus stat stamps of the files."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    stamps: dict[Path, tuple[int, int]] = {}
    for item in inputs:
        if item.fmt in ("builtin", "docstrings"):
            entry = pairs.builtin_entry(item.fmt, item.label, item.max_bytes, cache_dir)
        elif item.fmt == "hf-hub":
            entry = [item.label, loading.hub_fingerprint(item, cache_dir), item.hf and item.hf.model_dump()]
        elif item.fmt == "hf-disk":
            assert item.path is not None and item.hf is not None
            entry = [store.sha256_tree(item.path), item.hf.model_dump(exclude={"name"})]
        else:
            assert item.path is not None
            stat = item.path.stat()
            stamps[item.path] = (stat.st_size, stat.st_mtime_ns)
            entry = [item.label, loading.scan_file(item.path, item.fmt, record), item.text_column]
        digest.update(json.dumps(entry).encode())
    return digest.hexdigest(), stamps


def _check_unchanged(stamps: dict[Path, tuple[int, int]]) -> None:
    for path, (size, mtime) in stamps.items():
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            raise DataError(f"{path}: file changed while it was being read; retry once the writer has finished")


# -------------------------------------------------------------------------------------------- run
def _clean_and_store(
    cfg: DataConfig,
    inputs: list[Input],
    payload: dict[str, Any],
    cache_dir: Path,
    stamps: dict[Path, tuple[int, int]],
) -> CleanResult:
    """Clean into a temporary folder next to the store, then rename it to its fingerprint."""
    import datasets

    folder = cache_dir / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        rows_in, dropped, parts, digest, class_counts = _run_pipeline(cfg, inputs, tmp / ".work")
        _check_unchanged(stamps)
        fingerprint = hashlib.sha256(json.dumps([payload, digest], sort_keys=True).encode()).hexdigest()
        store.save_splits(parts, tmp)
        del parts  # unmaps the split files: their pages leave the resident set
        shutil.rmtree(tmp / ".work", ignore_errors=True)
        saved = {s: datasets.load_from_disk(str(tmp / s)) for s in SPLITS}
        result = CleanResult(
            fingerprint=fingerprint,
            dataset_dir=str(folder / fingerprint),
            cache_hit=False,
            rows_in=rows_in,
            dropped=dropped,
            rows_per_split={s: len(saved[s]) for s in SPLITS},
            bytes_per_split={s: _text_bytes(saved[s]) for s in SPLITS},
            sources=[i.label for i in inputs],
            split=cfg.split,
            columns=list(saved["train"].column_names),
            class_counts=class_counts,
        )
        if cfg.label_column:
            write_label_set(tmp, build_label_set(class_counts))
        (tmp / "report.json").write_text(result.model_dump_json(exclude={"cache_hit"}, indent=2), encoding="utf-8")
        store.publish(tmp, folder / fingerprint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bars:
            datasets.enable_progress_bars()
    logger.info("cleaned %d records -> %s (dropped %s)", rows_in, result.rows_per_split, _nonzero(dropped))
    return result


def _run_pipeline(
    cfg: DataConfig, inputs: list[Input], work: Path
) -> tuple[int, dict[str, int], dict[str, Any], str, dict[str, dict[str, int]]]:
    """Load, clean, de-duplicate and split; returns rows_in, dropped, the splits, their digest, class counts."""
    if cfg.label_column and cfg.split == "tail":
        raise DataError("data.split 'tail' cuts one stream of text and loses the labels: use split 'hash'")
    cleaned = _load_and_clean(cfg, inputs, work)
    keep, counts = store.Bits(len(cleaned)), np.zeros(len(RULES) + 1, dtype=np.int64)
    for start in range(0, len(cleaned), store.CHUNK):  # a bit a record, not the whole rule column at once
        rule = store.column(cleaned, "rule", start, start + store.CHUNK)
        counts += np.bincount(rule, minlength=len(RULES) + 1)
        keep.put(start, rule == KEEP)
        store.release(cleaned, ["rule"], start, start + store.CHUNK)
    dropped = {name: int(counts[1 + i]) for i, name in enumerate(RULES)}
    if cfg.label_column:  # one text under two labels: no copy is kept, since which label is right is unknown
        if conflicts := keep.drop(store.conflicting_labels(cleaned, keep, work)):
            logger.warning("dropped %d records whose text also appears with another label", conflicts)
        dropped["conflicting_label"] = conflicts
    if "completion" in cleaned.column_names:
        dropped["empty_completion"] = keep.drop(pairs.empty_completions(cleaned, keep, store.CHUNK))
    if cfg.cleaning.dedup:
        dropped["duplicate"] = keep.drop(store.later_duplicates(cleaned, keep, work))
    if cfg.cleaning.near_dedup and _near_dedup_available():
        dropped["near_duplicate"] = keep.drop(store.near_duplicates(cleaned, keep, cfg.cleaning.near_dedup_threshold))
    elif cfg.cleaning.near_dedup:
        logger.warning("near_dedup is on but datasketch is not installed; skipping near-duplicates")
    if not keep.count():
        labels = [i.label for i in inputs]
        shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
        drops = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "none"
        raise DataError(f"no records left after cleaning ({len(keep)} read from {shown}; dropped: {drops})")
    class_counts: dict[str, dict[str, int]] = {}
    if cfg.split == "hash":
        extras = [c for c in EXTRA_COLUMNS if c in cleaned.column_names]
        dest = None
        if cfg.label_column:
            dest, class_counts = stratified_splits(cleaned, keep, cfg.fractions, cfg.label_column)
        parts, digest = store.hash_splits(cleaned, keep, work, extras, dest)
    else:
        parts = store.tail_splits(cleaned, keep, cfg.fractions, work, check_leaks=not cfg.cleaning.dedup)
        digest = store.split_digest(parts)
    for split in ("train", "validation"):
        if len(parts[split]) == 0:
            raise DataError(
                f"split '{split}' is empty ({keep.count()} records kept, split by {cfg.split}); "
                f"add data or raise data.fractions.{split}"
            )
    if cfg.fractions.test > 0 and len(parts["test"]) == 0:
        logger.warning("split 'test' is empty although data.fractions.test is %g", cfg.fractions.test)
    return len(keep), dropped, parts, digest, class_counts


def _load_and_clean(cfg: DataConfig, inputs: list[Input], work: Path) -> Any:
    """Load every input and run the cleaning ``map``: once per run of inputs with the same record cutting."""
    import datasets

    work.mkdir(parents=True, exist_ok=True)
    size = sum(i.path.stat().st_size for i in inputs if i.path is not None and i.path.is_file())
    workers = 1 if size < SMALL_INPUT_BYTES else cfg.num_proc or os.cpu_count() or 1
    loaded: list[tuple[bool, Any]] = []  # (cut into paragraphs, dataset), in input order
    kinds: dict[str, str] = {}
    for n, item in enumerate(inputs):
        if item.fmt == "builtin":  # the built-in corpora are written out and load like any file
            path = work / f"builtin-{n}.txt"
            path.write_text(pairs.pretraining_corpus(item.max_bytes), encoding="utf-8")
            item = Input(item.label, "builtin", path=path)
        elif item.fmt == "docstrings":
            path = pairs.write_docstrings(work / f"docstrings-{n}.jsonl", item.max_bytes)
            item = Input(item.label, "jsonl", path=path)
        ds = loading.load_input(item, input_columns(cfg, item), cfg.record, work)
        if cfg.label_column:
            place = functools.partial(loading.record_place, item)
            ds, kinds[item.label] = labels_as_text(ds, item.label, cfg.label_column, place)
        loaded.append((item.fmt in ("text", "builtin") and cfg.record == "paragraph", ds))
    if cfg.label_column:
        check_label_kinds(kinds, cfg.label_column)
    fractions = (cfg.fractions.train, cfg.fractions.validation, cfg.fractions.test)
    mapped = []
    feed = _ProgressFeed(work / "progress.bin") if progress.reporter().enabled else None
    kwargs = {"cfg": cfg.cleaning.model_dump(), "fractions": fractions, "progress": feed and str(feed.path)}
    try:
        for k, (paragraph, group) in enumerate(itertools.groupby(loaded, key=lambda pair: pair[0])):
            parts = [ds for _, ds in group]
            ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            cleaned = ds.with_format("arrow").map(
                clean_batch,
                batched=True,
                batch_size=loading.BATCH,
                writer_batch_size=loading.BATCH,
                num_proc=workers if workers > 1 and len(ds) > loading.BATCH * workers else None,
                remove_columns=ds.column_names,
                fn_kwargs=kwargs | {"paragraph": paragraph},
                cache_file_name=str(work / f"clean-{k}.arrow"),
                load_from_cache_file=False,
                new_fingerprint=f"forgeline-clean-{k}",
            )
            mapped.append(cleaned.with_format(None))
    finally:
        if feed is not None:
            feed.close()
    cleaned = mapped[0] if len(mapped) == 1 else datasets.concatenate_datasets(mapped)
    release(cleaned, cleaned.column_names, 0, len(cleaned))  # pages `datasets` read while opening the shards
    return cleaned


class _ProgressFeed(threading.Thread):
    """Feeds the progress reporter from the file the ``map`` batches append their counts to (any process)."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="clean-progress", daemon=True)
        self.path, self._offset, self._done = path, 0, threading.Event()
        path.touch()
        self.start()

    def run(self) -> None:
        while not self._done.wait(0.25):
            self._drain()

    def close(self) -> None:
        self._done.set()
        self.join()
        self._drain()

    def _drain(self) -> None:
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        whole = len(data) - len(data) % 16  # a record being appended right now is read next time
        self._offset += whole
        for rows, nbytes in np.frombuffer(data[:whole], dtype="<i8").reshape(-1, 2).tolist():
            progress.reporter().clean_rows(rows, nbytes)


def input_columns(cfg: DataConfig, item: Input) -> dict[str, str]:
    """Canonical column name to the input's own: ``_t0``... for the text, then the carried columns."""
    if item.fmt in ("text", "builtin"):
        return {f"{TEXT_PREFIX}0": "text"}
    if item.label == DOCSTRINGS_LABEL:
        return {"prompt": "prompt", "completion": "completion"}
    columns = {}  # with both pair columns and no text columns: text = prompt + newline + completion
    if not (cfg.prompt_column and cfg.completion_column) or cfg.text_columns:
        texts = cfg.text_columns or [item.text_column]
        columns = {f"{TEXT_PREFIX}{i}": name for i, name in enumerate(texts)}
    wanted = zip(EXTRA_COLUMNS, (cfg.label_column, cfg.prompt_column, cfg.completion_column), strict=True)
    return columns | {canon: name for canon, name in wanted if name}


def _text_bytes(ds: Any) -> int:
    import pyarrow.compute as pc

    return sum(pc.sum(pc.binary_length(chunk)).as_py() or 0 for chunk in ds.data.column("text").chunks)


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}
