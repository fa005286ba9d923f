"""The cleaning progress bar advances as the cleaning ``map``'s batches complete, in workers too."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.tasks import progress
from forgeline.tasks.config import CleaningConfig, DataConfig, FilesSource
from forgeline.tasks.data import cleaning, loading
from forgeline.tasks.progress import ProgressReporter

ROWS = 20_000
BATCH = 2_000


def _corpus(path: Path, paragraphs: bool = False) -> int:
    """``ROWS`` distinct lines (blank-line separated when ``paragraphs``); returns their UTF-8 bytes."""
    lines = [f"line {i} of the progress corpus, with été {i % 7}" for i in range(ROWS)]
    path.write_text(("\n\n" if paragraphs else "\n").join(lines) + "\n", encoding="utf-8")
    return sum(len(line.encode()) for line in lines)


@pytest.mark.parametrize(("workers", "record"), [(2, "line"), (1, "line"), (2, "paragraph")])
def test_progress_counts_every_record_batch_by_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, record: str
) -> None:
    text_bytes = _corpus(tmp_path / "corpus.txt", paragraphs=record == "paragraph")
    monkeypatch.setattr(cleaning, "SMALL_INPUT_BYTES", 0)  # workers even for this small file
    monkeypatch.setattr(loading, "BATCH", BATCH)
    reporter = ProgressReporter()
    reporter.enable(terminal=False)
    monkeypatch.setattr(progress, "_REPORTER", reporter)
    calls: list[tuple[int, int]] = []
    feed = reporter.clean_rows
    monkeypatch.setattr(reporter, "clean_rows", lambda rows, nbytes: (calls.append((rows, nbytes)), feed(rows, nbytes)))
    cfg = DataConfig(
        sources=[FilesSource(paths=["corpus.txt"])],
        cleaning=CleaningConfig(),
        cache_dir="cache",
        record=record,
        num_proc=workers,
    )
    with reporter.cleaning():
        result = cleaning.clean_dataset(cfg, base_dir=tmp_path)
        assert result.rows_in == ROWS
        assert reporter._clean_rows == ROWS  # every record counted once, in whichever process it was cleaned
        assert reporter._clean_bytes == text_bytes
        assert sum(rows for rows, _ in calls) == ROWS
        assert max(rows for rows, _ in calls) <= BATCH  # batch by batch, not once at the end
        assert len(calls) >= ROWS // BATCH


def test_no_progress_file_when_progress_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _corpus(tmp_path / "corpus.txt")
    monkeypatch.setattr(progress, "_REPORTER", ProgressReporter())  # never enabled
    seen: list[object] = []
    clean_batch = cleaning.clean_batch
    monkeypatch.setattr(cleaning, "clean_batch", lambda *a, **k: (seen.append(k["progress"]), clean_batch(*a, **k))[1])
    cfg = DataConfig(sources=[FilesSource(paths=["corpus.txt"])], cache_dir="cache", record="line", num_proc=1)
    assert cleaning.clean_dataset(cfg, base_dir=tmp_path).rows_in == ROWS
    assert seen and set(seen) == {None}
