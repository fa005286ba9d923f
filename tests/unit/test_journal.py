"""The per-step metric journal kept beside the checkpoints (tasks/train/journal.py)."""

from __future__ import annotations

from pathlib import Path

from forgeline.tasks.train.journal import MetricJournal, cut_journal, history_entries, read_journal


def _steps(path: Path) -> list[int]:
    return [step for step, _, _ in read_journal(path)]


def test_lines_reach_the_file_only_when_flushed(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    journal = MetricJournal(path, resume_step=0)
    journal.add(1, {"train/loss": 2.5, "lr": 1e-3})
    journal.add(2, {"train/loss": 2.25})
    assert not path.exists()
    journal.flush()
    entries = read_journal(path)
    assert [(s, m) for s, _, m in entries] == [(1, {"train/loss": 2.5, "lr": 1e-3}), (2, {"train/loss": 2.25})]
    assert all(ts > 1_600_000_000_000 for _, ts, _ in entries)  # milliseconds, as MLflow wants them


def test_a_resume_cuts_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    first = MetricJournal(path, resume_step=0)
    for step in range(1, 26):  # a run that died at step 25, after its checkpoint at 20
        first.add(step, {"train/loss": float(step)})
    first.flush()
    resumed = MetricJournal(path, resume_step=20)
    assert _steps(path) == list(range(1, 21))
    for step in range(21, 31):
        resumed.add(step, {"train/loss": float(step)})
    resumed.flush()
    assert _steps(path) == list(range(1, 31))  # each step once
    assert read_journal(path, up_to=10)[-1][0] == 10


def test_a_fresh_start_drops_a_stale_journal(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    stale = MetricJournal(path, resume_step=0)
    stale.add(1, {"train/loss": 9.0})
    stale.flush()
    MetricJournal(path, resume_step=0)  # no checkpoint: nothing of the earlier attempt counts
    assert not path.exists()
    cut_journal(path, 5)  # and cutting a missing journal is a no-op


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    journal = MetricJournal(path, resume_step=0)
    journal.add(1, {"train/loss": 1.0})
    journal.flush()
    with path.open("a") as fh:
        fh.write('{"step":2,"ts":17000')  # the process died while appending
    assert _steps(path) == [1]
    MetricJournal(path, resume_step=1)
    assert path.read_text().count("\n") == 1 and _steps(path) == [1]


def test_a_history_without_journal_becomes_loss_entries() -> None:
    history = [
        {"step": 5, "train/loss": 3.0, "time": 0.5},
        {"step": 10, "train/loss": 2.5, "time": 1.0},
        {"step": 10, "val/loss": 2.7, "time": 1.1},
    ]
    entries = history_entries(history)
    assert [(s, m) for s, _, m in entries] == [
        (5, {"train/loss": 3.0}),
        (10, {"train/loss": 2.5}),
        (10, {"val/loss": 2.7}),
    ]
