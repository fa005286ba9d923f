"""The training step's numbers, read back from the device every few steps in one transfer instead of every step.

Each step leaves its loss and gradient norm on the device (a non-finite step is skipped there too: the fused
optimizer's ``found_inf``). At a log, evaluation or checkpoint step, or a stop, :meth:`StepReadout.drain`
reads every pending step at once (one host sync), and the per-step metrics reach the journal and the callbacks
in step order, as if they had been read one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from forgeline.tasks.train.journal import MetricJournal

Metrics = dict[str, float]


@dataclass
class StepReadout:
    """Steps trained but not read yet: ``(step, lr, loss, grad norm)``, the last two as device scalars."""

    journal: MetricJournal
    on_metrics: Callable[[int, Metrics], None] | None
    on_nonfinite: Callable[[int], None]
    """Called with each non-finite step, in order (it counts them and may raise)."""
    on_finite: Callable[[], None]
    """Called for each finite step, in order (it ends a run of non-finite ones)."""
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    last_train: float | None = None
    """The newest finite training loss read."""

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Keep one step's numbers on the device (no sync)."""
        self.pending.append((step, lr, loss, grad_norm))

    def drain(self) -> Metrics | None:
        """Read the pending steps; emit all but the newest, whose metrics are returned (``None``: non-finite).

        The caller adds what it measured at that step (rate, validation loss) and emits it with :meth:`emit`.
        """
        if not self.pending:
            return None
        device = self.pending[-1][3].device
        values = torch.stack([t.to(device, torch.float32) for *_, loss, norm in self.pending for t in (loss, norm)])
        flat = values.tolist()  # the one host sync of these steps
        steps, self.pending = self.pending, []
        newest: Metrics | None = None
        for i, (step, lr, _, _) in enumerate(steps):
            loss, norm = flat[2 * i], flat[2 * i + 1]
            if not math.isfinite(loss):
                self.on_nonfinite(step)
                newest = None
                continue
            self.on_finite()
            self.last_train = loss
            newest = {"train/loss": loss, "lr": lr, "grad_norm": norm}
            if i < len(steps) - 1:
                self.emit(step, newest)
        return newest

    def emit(self, step: int, metrics: Metrics) -> None:
        """One step's metrics to the journal and the ``on_metrics`` callback."""
        self.journal.add(step, metrics)
        if self.on_metrics:
            self.on_metrics(step, metrics)
