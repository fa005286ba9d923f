"""Ingest under faults, no servers: a slow writer (F8), the same file ingested twice at once (C1, the ingest
half), and same content under a new name / new content under the same name (F7).

Writers are real processes (or a thread) appending to a real file while ``ingest_files`` or the
``forgeline ingest`` command runs; nothing is patched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from forgeline.flows.retrain import IngestError, incoming_dir, incoming_fingerprint, ingest_files, retrain_config
from forgeline.tasks.config import PipelineConfig, load_config
from forgeline.tasks.data.cleaning import clean_dataset, read_split_text

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK = "".join(f"line {i}: a paragraph the slow writer appends, one piece at a time.\n" for i in range(40))

# Appends CHUNKS pieces to a file it keeps open, pausing PAUSE seconds between them (longer than the
# quiet period ingest waits for: only seeing the open handle tells it the file is not done).
WRITER = textwrap.dedent(
    """
    import sys, time
    path, chunks, pause, text, marker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
    with open(path, "a", encoding="utf-8") as fh:
        for i in range(chunks):
            fh.write(text)
            fh.flush()
            if i == 0:
                open(marker, "w").close()
            time.sleep(pause)
    """
)


def _config(tmp_path: Path) -> PipelineConfig:
    return load_config(None, [f"deploy.incoming_dir={tmp_path / 'incoming'}", "deploy.retrain_from=scratch"])


def _start_writer(path: Path, chunks: int, pause: float) -> subprocess.Popen[bytes]:
    marker = path.parent.parent / f"{path.name}.started"  # outside the folder being ingested or watched
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", WRITER, str(path), str(chunks), str(pause), CHUNK, str(marker)]
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "writer did not start"
        time.sleep(0.05)
    return proc


# ---------------------------------------------------------------------------------------------- F8
def test_file_held_open_by_a_slow_writer_is_waited_for_never_truncated(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    src = tmp_path / "drop" / "growing.txt"
    src.parent.mkdir()
    writer = _start_writer(src, chunks=4, pause=1.0)  # ~4 s; each pause is twice the quiet period below
    t0 = time.monotonic()
    added, fingerprint = ingest_files([str(src)], cfg, settle=0.5, wait=60)
    waited = time.monotonic() - t0
    assert writer.wait(timeout=30) == 0
    assert waited > 2.0, f"ingest took the file after {waited:.1f} s while the writer still had it open"
    (placed,) = added
    assert placed.read_text(encoding="utf-8") == CHUNK * 4  # the whole file, not a prefix
    assert not src.exists()  # moved only once complete
    assert fingerprint == incoming_fingerprint(incoming_dir(cfg))


def test_file_still_written_after_the_wait_is_refused_and_nothing_moves(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    src = tmp_path / "drop" / "endless.txt"
    src.parent.mkdir()
    other = tmp_path / "drop" / "done.txt"
    other.write_text(CHUNK, encoding="utf-8")
    writer = _start_writer(src, chunks=40, pause=0.25)  # ~10 s, longer than the wait
    try:
        with pytest.raises(IngestError, match=r"endless\.txt: still being written after 2 s"):
            ingest_files([str(other), str(src)], cfg, settle=0.5, wait=2)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert other.exists() and src.exists()  # one file refused: nothing moved
    assert incoming_fingerprint(incoming_dir(cfg)) == ""


def test_writer_that_reopens_between_pieces_is_waited_for(tmp_path: Path) -> None:
    """No handle stays open between pieces; the file's changing size and mtime are what ingest sees."""
    cfg = _config(tmp_path)
    src = tmp_path / "drop" / "pieces.txt"
    src.parent.mkdir()
    src.write_text(CHUNK, encoding="utf-8")

    def append() -> None:
        for _ in range(9):
            time.sleep(0.3)  # shorter than the quiet period: the file is not done yet
            with open(src, "a", encoding="utf-8") as fh:
                fh.write(CHUNK)

    thread = threading.Thread(target=append)
    thread.start()
    try:
        added, _ = ingest_files([str(src)], cfg, keep=True, settle=1.0, wait=60)
    finally:
        thread.join()
    (placed,) = added
    assert placed.read_text(encoding="utf-8") == CHUNK * 10


# ---------------------------------------------------------------------------------------------- C1
def _cli(root: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FORGELINE_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["FORGELINE_HOME"] = str(root / ".forgeline")  # no stack there: ingest emits nothing
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "forgeline", "ingest", "--config", str(REPO_ROOT / "configs" / "smoke.yaml"), *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "move"])
def test_two_concurrent_ingests_of_the_same_file_add_it_once(tmp_path: Path, copy: bool) -> None:
    src = tmp_path / "same.txt"
    src.write_text(CHUNK, encoding="utf-8")  # fresh: both ingests wait out the quiet period together
    flags = ["--copy"] if copy else []
    procs = [_cli(tmp_path, str(src), *flags) for _ in range(2)]
    outputs = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    added = [out for rc, out, _ in outputs if rc == 0 and "1 new file(s)" in out]
    assert len(added) == 1, outputs  # one new file, hence at most one event
    for rc, out, err in outputs:
        if copy or rc == 0:  # a move may find the file already moved by the other: a clean one-line error
            assert rc == 0 and ("1 new file(s)" in out or "0 new file(s)" in out), (rc, out, err)
        else:
            assert rc == 2 and "same.txt: no such file or directory" in err + out, (rc, out, err)
    files = list((tmp_path / "data" / "incoming").iterdir())
    assert len(files) == 1 and files[0].read_text(encoding="utf-8") == CHUNK
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix != ".lock") == [
        "incoming"
    ]  # no partial leftovers
    assert src.exists() == copy


# ---------------------------------------------------------------------------------------------- F7
def _paragraphs(tag: str, n: int = 120) -> str:
    return "\n\n".join(f"{tag} paragraph {i}: records about {tag} for the retrain test, number {i}." for i in range(n))


def test_content_hash_decides_not_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            f"deploy.incoming_dir={tmp_path / 'incoming'}",
            "deploy.retrain_from=scratch",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.sources=[{{kind: files, paths: [{tmp_path / 'base.txt'}]}}]",
            "data.record=paragraph",
        ],
    )
    (tmp_path / "base.txt").write_text(_paragraphs("base"), encoding="utf-8")
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "notes.txt").write_text(_paragraphs("first"), encoding="utf-8")
    added, fp1 = ingest_files([str(drop / "notes.txt")], cfg, keep=True, settle=0)
    assert len(added) == 1
    before = clean_dataset(retrain_config(cfg, tmp_path).data, base_dir=tmp_path)

    # Same content under a new name: nothing new, same fingerprint, the cleaned data is a cache hit.
    os.rename(drop / "notes.txt", drop / "renamed.txt")
    again, fp_same = ingest_files([str(drop / "renamed.txt")], cfg, settle=0)
    assert again == [] and fp_same == fp1
    assert clean_dataset(retrain_config(cfg, tmp_path).data, base_dir=tmp_path).cache_hit

    # New content under the old name, same size: a new file, a new fingerprint, freshly cleaned data.
    old_text = _paragraphs("first")
    new_text = _paragraphs("fresh")
    assert len(new_text) == len(old_text)
    (drop / "notes.txt").write_text(new_text, encoding="utf-8")
    added2, fp2 = ingest_files([str(drop / "notes.txt")], cfg, settle=0)
    assert len(added2) == 1 and fp2 != fp1
    after = clean_dataset(retrain_config(cfg, tmp_path).data, base_dir=tmp_path)
    assert not after.cache_hit and after.fingerprint != before.fingerprint
    text = "".join(read_split_text(after.dataset_dir, s) for s in ("train", "validation", "test"))
    assert "fresh paragraph" in text and "first paragraph" in text and "base paragraph" in text

    # The cleaning cache keys on content too: an in-place overwrite with the same size and mtime is seen.
    base = tmp_path / "base.txt"
    stat = base.stat()
    base.write_text(_paragraphs("bxse"), encoding="utf-8")
    os.utime(base, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert base.stat().st_size == stat.st_size and base.stat().st_mtime_ns == stat.st_mtime_ns
    rewritten = clean_dataset(retrain_config(cfg, tmp_path).data, base_dir=tmp_path)
    assert not rewritten.cache_hit and rewritten.fingerprint != after.fingerprint
    text = "".join(read_split_text(rewritten.dataset_dir, s) for s in ("train", "validation", "test"))
    assert "bxse paragraph" in text and "base paragraph" not in text


def test_watch_leaves_a_file_held_open_by_a_paused_writer(tmp_path: Path) -> None:
    """The drop-folder watch looks twice; a writer pausing longer than that is still seen as writing."""
    from forgeline.flows.watch import REJECTED, scan_drop_folder

    cfg = load_config(
        None,
        [
            f"deploy.incoming_dir={tmp_path / 'incoming'}",
            f"deploy.drop_dir={tmp_path / 'drop'}",
            "deploy.watch_settle=0.5",
        ],
    )
    src = tmp_path / "drop" / "paused.txt"
    src.parent.mkdir()
    writer = _start_writer(src, chunks=2, pause=3.0)  # unchanged for 3 s between pieces, open all along
    try:
        time.sleep(1.0)  # already quiet for longer than the watch's settle time
        result = scan_drop_folder(cfg, base_dir=tmp_path)
    finally:
        assert writer.wait(timeout=30) == 0
    assert result.waiting == ["paused.txt"] and not result.rejected and not result.added, result
    assert src.exists() and not (tmp_path / "drop" / REJECTED).exists()
    assert scan_drop_folder(cfg, base_dir=tmp_path).added  # complete now: taken on the next look
    assert (tmp_path / "incoming").is_dir() and len(list((tmp_path / "incoming").iterdir())) == 1
    assert next((tmp_path / "incoming").iterdir()).read_text(encoding="utf-8") == CHUNK * 2
