"""Training progress as a Prefect progress artifact, updated a bounded number of times per run."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)


class PrefectTrainProgress:
    """A ``training-progress`` artifact on the current flow run, updated every ``every`` percent.

    At most about ``100 / every`` API calls per training run (20 at the default 5 %), and none closer
    than ``min_seconds`` apart but the last, so the training loop is never slowed by the Prefect API
    (a 40-step smoke run would otherwise spend a fifth of a second on 20 calls). Outside a flow run, or
    when the API fails, it goes quiet for the rest of the run and training carries on.
    """

    def __init__(
        self, total_steps: int, every: float = 5.0, key: str = "training-progress", min_seconds: float = 2.0
    ) -> None:
        self.total = max(1, total_steps)
        self.every = every
        self.min_seconds = min_seconds
        self._last_call = 0.0
        self.key = key
        self._artifact_id: Any = None
        self._next = 0.0
        self._dead = False
        self.calls = 0

    def start(self, start_step: int = 0) -> None:
        """Create the artifact at the start (or resumed) percentage."""
        pct = self._pct(start_step)
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() is None and TaskRunContext.get() is None:
                self._dead = True  # outside a run Prefect would start a temporary server just for this
                return

            self._artifact_id = create_progress_artifact(
                pct, key=self.key, description=f"Training: step {start_step} of {self.total}"
            )
            self.calls += 1
            self._last_call = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - no flow run context, or no API: progress is a courtesy
            logger.debug("progress artifact not created: %s", exc)
            self._dead = True
            return
        self._next = (pct // self.every + 1) * self.every

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        """Feed every step; the API is called only when another ``every`` percent is reached."""
        if self._dead or self._artifact_id is None:
            return
        pct = self._pct(step)
        if step < self.total and (pct < self._next or time.monotonic() - self._last_call < self.min_seconds):
            return
        self._next = (pct // self.every + 1) * self.every
        loss = (metrics or {}).get("train/loss")
        description = f"Training: step {step} of {self.total}" + (f", loss {loss:.4f}" if loss is not None else "")
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, pct, description=description)
            self.calls += 1
            self._last_call = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - never fail training for a progress bar
            logger.debug("progress artifact not updated: %s", exc)
            self._dead = True

    def _pct(self, step: int) -> float:
        return min(100.0, (1000 * step // self.total) / 10)  # floored: 100 only at the last step


class TrainProgressFeed:
    """Both progress views of one training run: the terminal reporter and the Prefect artifact.

    Wire :meth:`start` to ``TrainCallbacks.on_start`` and :meth:`update` to ``on_metrics``; call
    :meth:`close` when training ends (also on failure).
    """

    def __init__(self, total_steps: int) -> None:
        from forgeline.tasks.progress import reporter

        self.reporter = reporter()
        self.artifact = PrefectTrainProgress(total_steps)
        self.total = total_steps

    def start(self, summary: Mapping[str, Any]) -> None:
        """From the loop's start summary (``total_steps``, ``start_step``)."""
        start_step = int(summary.get("start_step", 0))
        total = int(summary.get("total_steps", self.total))
        self.artifact.total = max(1, total)  # epochs may end training before train.max_steps
        self.reporter.train_start(total, start_step)
        self.artifact.start(start_step)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """After each optimizer step."""
        self.reporter.train_update(step, metrics)
        self.artifact.update(step, metrics)

    def close(self) -> None:
        """End the terminal bar."""
        self.reporter.train_done()
