"""After the cleaning ``map``: exact and near de-duplication, the two split methods, the fingerprint, the cache.

The cleaned dataset lives in memory-mapped Arrow files, so the passes here read its small columns
(``rule``, ``split``, digests, lengths) a chunk at a time; per record they keep a bit or two of masks
(``Bits``), so the process's own memory stays flat in the input size.

Storage: ``<cache_dir>/datasets/<fingerprint>/`` is a ``DatasetDict.save_to_disk`` folder (``train``,
``validation``, ``test``: ``datasets.load_from_disk`` opens it) plus ``report.json``, written in a temporary
folder and renamed into place. ``<cache_dir>/index/<input_key>.json`` maps the inputs (config plus each
file's content hash) to the fingerprint, so a re-run on unchanged inputs reads nothing but the index.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from forgeline.tasks.config import SplitFractions
from forgeline.tasks.data.memory import Bits, release
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.data.rules import NearDuplicates

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
CHUNK = 2**20
"""Records per chunk when a pass reads a column of the cleaned dataset."""
BUCKET = 2**18
"""Exact dedup sorts digests in buckets of about this many entries (past one chunk of records)."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def column(ds: Any, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``[start, stop)`` of one column of a dataset without an indices mapping, as numpy."""
    return ds.data.column(name).slice(start, (stop or len(ds)) - start).to_numpy()


# ---------------------------------------------------------------------------------------- dedup
def later_duplicates(ds: Any, keep: Bits, workdir: Path) -> Bits:
    """Mask of kept records whose text digest (``hi``, ``lo``) equals an earlier kept record's.

    Up to ``CHUNK`` records sort in memory. Past that, each chunk's digests go to bucket files chosen by
    their leading bits (about ``BUCKET`` entries each, order kept), and each bucket is sorted alone: the
    one-pass set's decisions in memory bounded by a chunk and a bucket.
    """
    return _by_digest(ds, keep, workdir, ("hi", "lo"), _later)


def conflicting_labels(ds: Any, keep: Bits, workdir: Path) -> Bits:
    """Mask of kept records whose text another kept record carries with another label (``lab``: label digest).

    Every copy is marked, the first included: which label such a text should teach is unknown.
    """
    return _by_digest(ds, keep, workdir, ("hi", "lo", "lab"), _conflicts)


def _by_digest(
    ds: Any, keep: Bits, workdir: Path, fields: tuple[str, ...], decide: Callable[[np.ndarray], np.ndarray]
) -> Bits:
    """``decide`` over the kept records' digest columns, in memory or bucket by bucket (same text, same bucket)."""
    entry = np.dtype([(name, "<u8") for name in fields] + [("seq", "<i8")])
    mask = Bits(len(keep))
    if len(keep) <= CHUNK:
        entries = _entries(ds, keep, 0, len(keep), entry)
        mask.set(entries["seq"][decide(entries)])
        return mask
    bits = max(1, int(np.ceil(np.log2(len(keep) / BUCKET))))
    folder = workdir / "buckets"
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(keep), CHUNK):
        entries = _entries(ds, keep, start, min(start + CHUNK, len(keep)), entry)
        buckets = entries["hi"] >> np.uint64(64 - bits)
        order = np.argsort(buckets, kind="stable")
        ids, firsts = np.unique(buckets[order], return_index=True)
        for b, part in zip(ids, np.split(entries[order], firsts)[1:], strict=True):  # none for a chunk all dropped
            # a plain string path: pathlib interns every part it parses, megabytes over thousands of appends
            with open(os.path.join(folder, f"{int(b):06d}"), "ab") as handle:
                part.tofile(handle)
    for path in sorted(folder.iterdir()):
        entries = np.fromfile(path, dtype=entry)
        mask.set(entries["seq"][decide(entries)])
        path.unlink()
    return mask


def _entries(ds: Any, keep: Bits, start: int, stop: int, entry: np.dtype) -> np.ndarray:
    """The digest fields and record number of the kept records in ``[start, stop)``, in record order."""
    seq = start + np.flatnonzero(keep.get(start, stop))
    entries = np.empty(len(seq), dtype=entry)
    for name in entry.names[:-1]:
        entries[name] = column(ds, name, start, stop)[seq - start]
    entries["seq"] = seq
    release(ds, entry.names[:-1], start, stop)
    return entries


def _sorted_runs(entries: np.ndarray, *minor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A stable sort of the entries by (hi, lo, minor), and where in it each run of equal (hi, lo) starts."""
    order = np.lexsort((*minor, entries["lo"], entries["hi"]))
    h, low = entries["hi"][order], entries["lo"][order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (h[1:] != h[:-1]) | (low[1:] != low[:-1])
    return order, starts


def _later(entries: np.ndarray) -> np.ndarray:
    """True where (hi, lo) equals an earlier entry's (the stable sort keeps the earlier copy first)."""
    order, starts = _sorted_runs(entries)
    later = np.empty(len(order), dtype=bool)
    later[order] = ~starts
    return later


def _conflicts(entries: np.ndarray) -> np.ndarray:
    """True where another entry has the same (hi, lo) and a different ``lab``."""
    order, starts = _sorted_runs(entries, entries["lab"])
    labs = entries["lab"][order]
    mixed = labs[starts] != labs[np.roll(starts, -1)]  # each run's lowest label against its highest
    out = np.empty(len(order), dtype=bool)
    out[order] = mixed[np.cumsum(starts) - 1]
    return out


def near_duplicates(ds: Any, keep: Bits, threshold: float) -> Bits:
    """Mask of kept records that MinHash LSH finds near an earlier kept record (sequential, in order)."""
    index = NearDuplicates(threshold)
    near = Bits(len(keep))
    for start in range(0, len(keep), CHUNK):
        local = np.flatnonzero(keep.get(start, start + CHUNK))
        texts = ds.data.column("text").slice(start, CHUNK).take(local).to_pylist()
        near.set([start + i for i, text in zip(local, texts, strict=True) if index.seen(text)])
    return near


# --------------------------------------------------------------------------------------- splits
def hash_splits(
    ds: Any, keep: Bits, workdir: Path, extras: list[str], dest: np.ndarray | None = None
) -> tuple[dict[str, Any], str]:
    """Each kept record in the split its content hash picked (the ``split`` column); plus their digest.

    ``dest`` (a split code per record, -1 for dropped) replaces the hash's choice: the stratified split.

    One pass, a chunk at a time: Arrow filters the chunk into each split's Arrow file (memory-mapped
    afterwards), so no index of the chosen rows is ever held, and ``save_to_disk`` then copies contiguous
    tables instead of gathering rows one at a time through an indices mapping.
    """
    import datasets
    import pyarrow as pa

    names = ["text", *extras]
    table = ds.data.table.select(names)
    paths = [workdir / f"split-{split}.arrow" for split in SPLITS]
    streams = [[hashlib.sha256() for _ in range(2 + len(extras))] for _ in SPLITS]  # per split: hi, lo, each extra
    with contextlib.ExitStack() as stack:
        schema = table.schema.remove_metadata()
        writers = [stack.enter_context(pa.ipc.new_stream(str(path), schema)) for path in paths]
        for start in range(0, len(keep), CHUNK):
            stop = min(start + CHUNK, len(keep))
            if dest is None:
                chosen = np.where(keep.get(start, stop), column(ds, "split", start, stop), -1)
            else:
                chosen = dest[start:stop]
            hi, lo = column(ds, "hi", start, stop), column(ds, "lo", start, stop)
            chunk = table.slice(start, stop - start)
            for code, (writer, (hi_s, lo_s, *extra_s)) in enumerate(zip(writers, streams, strict=True)):
                mask = chosen == code
                part = chunk.filter(pa.array(mask))
                writer.write_table(part)
                hi_s.update(hi[mask].tobytes())  # record digests (and carried values) in stored order
                lo_s.update(lo[mask].tobytes())
                for stream, name in zip(extra_s, extras, strict=True):
                    for value in part.column(name).to_pylist():
                        stream.update(json.dumps(value).encode() + b"\n")
            release(ds, [*names, "hi", "lo", "split"], start, stop)
    info = datasets.DatasetInfo(features=datasets.Features({name: ds.features[name] for name in names}))
    parts = {split: datasets.Dataset.from_file(str(path), info=info) for split, path in zip(SPLITS, paths, strict=True)}
    digest = hashlib.sha256()
    for split, split_streams in zip(SPLITS, streams, strict=True):
        digest.update(f"{split}:{len(parts[split])}:{[s.hexdigest() for s in split_streams]}\n".encode())
    return parts, digest.hexdigest()


def tail_splits(ds: Any, keep: Bits, fractions: SplitFractions, workdir: Path, check_leaks: bool) -> Any:
    """nanoGPT split: kept records joined with "\\n", cut by character count into one record per split.

    ``check_leaks`` (without exact dedup): fail if a record lies wholly in train and in validation or test.
    ``workdir`` is unused: each split's text is cut from the records directly.
    """
    import datasets

    seq = np.flatnonzero(keep.get())
    chars = column(ds, "chars")[seq]
    starts = np.concatenate(([0], np.cumsum(chars[:-1] + 1)))
    n = int(starts[-1] + chars[-1])
    train_end = int(n * fractions.train)
    val_end = n if fractions.test == 0 else int(n * (fractions.train + fractions.validation))
    if check_leaks:
        _check_leakage(column(ds, "hi")[seq], starts, starts + chars, train_end, val_end)
    features = datasets.Features({"text": datasets.Value("large_string")})
    parts = {}
    for split, (a, b) in zip(SPLITS, [(0, train_end), (train_end, val_end), (val_end, n)], strict=True):
        text = _stream_text(ds, seq, starts, a, b)
        parts[split] = datasets.Dataset.from_dict({"text": [text] if text else []}, features=features)
    return parts


def _stream_text(ds: Any, seq: np.ndarray, starts: np.ndarray, a: int, b: int) -> str:
    """Characters ``[a, b)`` of the records ``seq`` (starting at ``starts``) joined with "\\n", a chunk at a time.

    Gathered as UTF-8 and decoded once: at most the text's bytes and the text itself are held together.
    """
    buf = io.BytesIO()
    first, stop = int(np.searchsorted(starts, a, "right")) - 1, int(np.searchsorted(starts, b))
    for lo in range(first, stop, CHUNK):  # the records from the one holding a to the last starting before b
        texts = ds.data.column("text").take(seq[lo : min(lo + CHUNK, stop)]).to_pylist()
        texts.append("")  # each record followed by its "\\n"
        buf.write("\n".join(texts)[max(a - starts[lo], 0) : b - starts[lo]].encode("utf-8"))
    return buf.getvalue().decode("utf-8")


def _check_leakage(hi: np.ndarray, starts: np.ndarray, ends: np.ndarray, train_end: int, val_end: int) -> None:
    """Fail if a record lying wholly in validation/test also lies wholly in train (tail split, no dedup)."""
    leaked = (starts >= train_end) & np.isin(hi, hi[ends <= train_end])
    leaks = {"validation": int((leaked & (ends <= val_end)).sum()), "test": int((leaked & (ends > val_end)).sum())}
    found = [f"{k} records appear in both train and {split}" for split, k in leaks.items() if k]
    if found:
        raise DataError(f"leakage: {'; '.join(found)}; enable data.cleaning.dedup or remove the duplicates")


def save_splits(parts: dict[str, Any], folder: Path) -> None:
    """``DatasetDict(parts).save_to_disk(folder)``, each hash split's Arrow file moved into place, not copied.

    ``save_to_disk`` reads every kept record once more through the memory map (resident until the end: the
    process's peak at 1 GB of input) and writes a second copy. A split the hash pass wrote is already one
    Arrow stream file of its schema: saving an empty dataset of the same features and fingerprint writes
    the folder's metadata, and the split's file takes the place of the empty data file.
    """
    import datasets

    moved = {s: p.cache_files[0]["filename"] for s, p in parts.items() if len(p.cache_files) == 1 and len(p)}
    templates = {
        s: datasets.Dataset(p.data.table.slice(0, 0), info=p.info, fingerprint=p._fingerprint) if s in moved else p
        for s, p in parts.items()
    }
    shards = {s: 1 for s, p in templates.items() if not len(p)}  # an empty split or template: one empty file
    datasets.DatasetDict(templates).save_to_disk(str(folder), num_shards=shards or None)
    for split, source in moved.items():
        os.replace(source, folder / split / "data-00000-of-00001.arrow")


def split_digest(parts: dict[str, Any]) -> str:
    """Digest of the tail splits' text (each split is one record)."""
    digest = hashlib.sha256()
    for split in SPLITS:
        texts = parts[split]["text"]
        digest.update(f"{split}:{hashlib.sha256((texts[0] if texts else '').encode()).hexdigest()}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- cache
def sha256_tree(folder: Path) -> str:
    """Content hash of every file under a folder (relative names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(2**20):
                digest.update(block)
    return digest.hexdigest()


def lookup(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The stored report for an input key, or ``None`` (a broken index or folder is ignored)."""
    index = cache_dir / "index" / f"{key}.json"
    if not index.is_file():
        return None
    try:
        fingerprint = json.loads(index.read_text(encoding="utf-8"))["fingerprint"]
        if not isinstance(fingerprint, str) or not _HEX64.match(fingerprint):
            raise ValueError("bad fingerprint")
        folder = cache_dir / "datasets" / fingerprint
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        if not all((folder / s / "dataset_info.json").is_file() for s in SPLITS):
            raise ValueError("split folder missing")
        return report | {"dataset_dir": str(folder)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring cache index %s (%s); cleaning again", index, exc)
        return None


def write_index(cache_dir: Path, key: str, fingerprint: str) -> None:
    """Point the input key at a stored dataset (atomic rename)."""
    folder = cache_dir / "index"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    os.replace(tmp, folder / f"{key}.json")


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place; identical content already stored (by anyone) wins."""
    if final.exists() and not (final / "report.json").is_file():  # incomplete: never written by this module
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}")
        os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)  # fails if a stored folder is there
    except OSError:
        if not (final / "report.json").is_file():
            raise
        logger.info("dataset %s already stored; reusing it", final.name[:12])
        shutil.rmtree(tmp)
