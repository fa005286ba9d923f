"""Process-wide progress for long work: cleaning, training and the hyperparameter search.

Stage code and callbacks feed one reporter (:func:`reporter`); nothing is shown until a front end
turns it on with :func:`enable` (the ``forgeline run`` command does). Then a terminal gets rich
progress bars (cleaning: rows and bytes; training: step, loss, tokens/s, ETA; search: trials
complete/pruned/failed and the best value so far), and anything else (CI, a log file, tests) gets a
few plain log lines instead of bars: the stages' own logging stays as it is.

Free of Prefect, MLflow and Optuna; every method is cheap and safe to call when progress is off.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

PLAIN_INTERVAL = 10.0
"""Seconds between plain cleaning log lines when output is not a terminal."""


class ProgressReporter:
    """Progress bars (terminal) or sparse log lines (no terminal) for the stages of one process.

    Off by default: every feeding method returns at once until :meth:`enable` is called.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.terminal = False
        self._console: Any = None
        self._progress: Any = None  # rich.progress.Progress while any bar is live
        self._tasks: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._clean_rows = 0
        self._clean_bytes = 0
        self._clean_logged = 0.0
        self._train_total = 0
        self._search_seen: tuple[int, ...] = ()

    # ------------------------------------------------------------------------------ switching
    def enable(self, console: Any = None, *, terminal: bool | None = None) -> None:
        """Turn progress on.

        Args:
            console: The ``rich.console.Console`` the CLI logs through (bars then render below its log
                lines); ``None`` makes a stderr console.
            terminal: Force bars on or off; ``None`` asks whether the console (stderr) is a terminal.
        """
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        self._console = console
        if terminal is None:
            terminal = bool(getattr(console, "is_terminal", False)) and sys.stderr.isatty()
        self.terminal = terminal
        self.enabled = True

    def disable(self) -> None:
        """Stop every bar and turn progress off (safe to call twice)."""
        with self._lock:
            self._stop_all()
            self.enabled = False

    # ------------------------------------------------------------------------------ cleaning
    @contextmanager
    def cleaning(self) -> Iterator[None]:
        """Scope of one cleaning: the bar (created on the first record) ends when the block does."""
        self._clean_rows = self._clean_bytes = 0
        self._clean_logged = time.monotonic()
        try:
            yield
        finally:
            self.clean_done()

    def clean_record(self, text: str) -> None:
        """One record read (before cleaning decides on it)."""
        if self.enabled:
            self.clean_rows(1, len(text.encode("utf-8", "surrogatepass")), refresh=self._clean_rows % 256 == 255)

    def clean_rows(self, rows: int, nbytes: int, *, refresh: bool = True) -> None:
        """A batch of ``rows`` records (``nbytes`` of text) was cleaned."""
        if not self.enabled:
            return
        self._clean_rows += rows
        self._clean_bytes += nbytes
        if self.terminal:
            if "clean" not in self._tasks:
                self._add("clean", "cleaning", total=None, rows=0, mb=0.0)
            if refresh:
                self._update("clean", rows=self._clean_rows, mb=self._clean_bytes / 1e6)
        elif time.monotonic() - self._clean_logged >= PLAIN_INTERVAL:
            self._clean_logged = time.monotonic()
            logger.info("cleaning: %s records, %.1f MB read", f"{self._clean_rows:,}", self._clean_bytes / 1e6)

    def clean_done(self) -> None:
        """End the cleaning bar, if any."""
        if not self.enabled:
            return
        self._update("clean", rows=self._clean_rows, mb=self._clean_bytes / 1e6)
        self._finish("clean")

    # ------------------------------------------------------------------------------ training
    def train_start(self, total_steps: int, start_step: int = 0) -> None:
        """A training loop begins (``start_step`` > 0 when resumed)."""
        if not (self.enabled and self.terminal):
            return
        self._train_total = total_steps
        self._finish("train")
        self._add("train", "training", total=total_steps, completed=start_step, loss="-", rate="-")

    def train_update(self, step: int, metrics: Mapping[str, float]) -> None:
        """After an optimizer step: ``train/loss`` and, every few steps, ``tokens_per_sec``."""
        if not (self.enabled and self.terminal) or "train" not in self._tasks:
            return
        fields: dict[str, Any] = {"completed": step}
        if "train/loss" in metrics:
            fields["loss"] = f"{metrics['train/loss']:.4f}"
        if "tokens_per_sec" in metrics:
            fields["rate"] = f"{metrics['tokens_per_sec']:,.0f}"
        self._update("train", **fields)

    def train_done(self) -> None:
        """End the training bar, if any."""
        if self.enabled:
            self._finish("train")

    # -------------------------------------------------------------------------------- search
    def search_update(self, counts: Mapping[str, int], total: int, best: float | None) -> None:
        """The search's trial counts (``complete``, ``pruned``, ``failed``...) after a trial ends."""
        if not self.enabled:
            return
        done = counts.get("complete", 0) + counts.get("pruned", 0)
        failed = counts.get("failed", 0)
        best_text = f"{best:.4f}" if best is not None else "-"
        if self.terminal:
            if "search" not in self._tasks:
                self._add("search", "search", total=total, trials="", best="-")
            trials = f"{counts.get('complete', 0)} ok, {counts.get('pruned', 0)} pruned, {failed} failed"
            self._update("search", completed=min(done, total), total=total, trials=trials, best=best_text)
            return
        seen = (counts.get("complete", 0), counts.get("pruned", 0), failed)
        if seen != self._search_seen:
            self._search_seen = seen
            logger.info(
                "search: %d of %d trials done (%d complete, %d pruned, %d failed), best %s",
                done,
                total,
                *seen,
                best_text,
            )

    def search_done(self) -> None:
        """End the search bar, if any."""
        if self.enabled:
            self._finish("search")
            self._search_seen = ()

    # ------------------------------------------------------------------------------ internals
    def _add(self, name: str, label: str, *, total: float | None, completed: float = 0, **fields: Any) -> None:
        with self._lock:
            if name in self._tasks:
                return
            if self._progress is None:
                self._progress = self._make_progress()
                self._progress.start()
            self._tasks[name] = self._progress.add_task(label, total=total, completed=completed, kind=name, **fields)

    def _update(self, name: str, **fields: Any) -> None:
        task_id = self._tasks.get(name)
        progress = self._progress
        if task_id is None or progress is None:
            return
        known = {k: fields.pop(k) for k in ("completed", "total") if k in fields}
        progress.update(task_id, **known, **fields)

    def _finish(self, name: str) -> None:
        with self._lock:
            task_id = self._tasks.pop(name, None)
            if task_id is not None and self._progress is not None:
                task = next(t for t in self._progress.tasks if t.id == task_id)
                if task.total is None:
                    self._progress.update(task_id, total=max(task.completed, 1), completed=max(task.completed, 1))
                self._progress.stop_task(task_id)
            if not self._tasks:
                self._stop_all()

    def _stop_all(self) -> None:
        if self._progress is not None:
            try:
                self._progress.stop()
            finally:
                self._progress = None
                self._tasks.clear()

    def _make_progress(self) -> Any:
        from rich.progress import (
            BarColumn,
            Progress,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class DetailColumn(ProgressColumn):
            """Count and the kind's detail: records/MB, step/loss/tok/s, trials/best."""

            def render(self, task: Any) -> Text:
                return Text(_detail(task), style="progress.download")

        wide = getattr(self._console, "width", 80) >= 110
        return Progress(
            *([SpinnerColumn()] if wide else []),
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(bar_width=24 if wide else 10),
            DetailColumn(),
            *([TimeElapsedColumn(), TextColumn("eta")] if wide else []),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
            refresh_per_second=4,
        )


def _detail(task: Any) -> str:
    """The text beside a bar, from the task's fields."""
    fields = task.fields
    kind = fields.get("kind")
    if kind == "clean":
        return f"{fields.get('rows', 0):,} records  {fields.get('mb', 0.0):.1f} MB"
    total = f"{task.total:.0f}" if task.total is not None else "?"
    if kind == "train":
        return f"step {task.completed:.0f}/{total}  loss {fields.get('loss', '-')}  {fields.get('rate', '-')} tok/s"
    if kind == "search":
        return f"{task.completed:.0f}/{total} trials: {fields.get('trials', '')}, best {fields.get('best', '-')}"
    return ""


_REPORTER = ProgressReporter()


def reporter() -> ProgressReporter:
    """The process-wide reporter (off until :func:`enable`)."""
    return _REPORTER


def enable(console: Any = None, *, terminal: bool | None = None) -> ProgressReporter:
    """Turn the process-wide reporter on (bars on a terminal, plain log lines otherwise)."""
    _REPORTER.enable(console, terminal=terminal)
    return _REPORTER


def disable() -> None:
    """Turn the process-wide reporter off and stop any live bar."""
    _REPORTER.disable()


def clean_record(text: str) -> None:
    """Shorthand for ``reporter().clean_record(text)`` (the cleaning loop's one hook)."""
    if _REPORTER.enabled:
        _REPORTER.clean_record(text)
