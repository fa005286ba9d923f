"""Fault injection for the reliability tests: named points that production code passes through.

Every point is a no-op unless a test sets one of these variables (RELIABILITY.md names the rows):

* ``FORGELINE_FAULT_AT_STEP`` and ``FORGELINE_FAULT_KIND``: a fault at one training step.

  - ``sigkill``, ``sigterm``, ``sigint``, ``raise``, ``oom`` at point ``train.step`` (after the step's
    checkpoint, if one was due);
  - ``nan`` (that step's loss) and ``nan_from`` (every step's loss from then on), read by :func:`nan_loss`;
  - ``sigkill_in_checkpoint``, ``enospc_in_checkpoint`` at ``checkpoint.write`` (temp file written, not renamed);
  - ``pause_metrics`` at ``metrics.queue``: the loop waits after queueing that step's metrics until the file
    ``FORGELINE_FAULT_FILE`` exists, writing ``FILE.reached`` first.

* ``FORGELINE_FAULT_KIND=sigkill_after_register``: die at ``registry.register``, between creating a model
  version and setting its aliases (no step).
* ``FORGELINE_TUNE_FAULTS=N:KIND[,N:KIND]`` by trial number: ``sigkill`` or ``raise`` at ``tune.eval`` (the
  trial's evaluations), ``diverge`` and ``nan`` read by :func:`trial_fault`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

AT_STEP_ENV = "FORGELINE_FAULT_AT_STEP"
KIND_ENV = "FORGELINE_FAULT_KIND"
FILE_ENV = "FORGELINE_FAULT_FILE"
TUNE_ENV = "FORGELINE_TUNE_FAULTS"

POINTS = ("train.step", "checkpoint.write", "metrics.queue", "registry.register", "tune.eval")

_PAUSE_LIMIT_S = 600.0


def _step_kind(step: int) -> str | None:
    at = os.environ.get(AT_STEP_ENV)
    kind = os.environ.get(KIND_ENV)
    if not at or not kind or int(at) != step:
        return None
    return kind


def nan_loss(step: int) -> bool:
    """Whether training step ``step`` (counted from 1) must produce a NaN loss."""
    at = os.environ.get(AT_STEP_ENV)
    kind = os.environ.get(KIND_ENV)
    if not at or kind not in ("nan", "nan_from"):
        return False
    return step >= int(at) if kind == "nan_from" else step == int(at)


def trial_fault(trial: int) -> str | None:
    """The fault ``FORGELINE_TUNE_FAULTS`` sets for Optuna trial number ``trial`` (``sigkill`` by default)."""
    for item in filter(None, os.environ.get(TUNE_ENV, "").split(",")):
        at, _, kind = item.partition(":")
        if int(at) == trial:
            return kind.strip() or "sigkill"
    return None


def hit(point: str, *, step: int | None = None, trial: int | None = None) -> None:
    """Pass injection point ``point``: kill, raise or pause here when a test armed it, else return at once.

    Args:
        point: One of :data:`POINTS`.
        step: The training step (``train.step``, ``checkpoint.write``, ``metrics.queue``).
        trial: The Optuna trial number (``tune.eval``).

    Raises:
        ValueError: an unknown point (a typo would silently disarm a test).
        RuntimeError, OSError, torch.OutOfMemoryError: the injected fault.
    """
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(POINTS)}")
    if point == "tune.eval":
        kind = trial_fault(trial) if trial is not None else None
        if kind == "sigkill":
            _kill(signal.SIGKILL)
        if kind == "raise":
            raise RuntimeError(f"injected fault ({TUNE_ENV}: {kind})")
        return
    if point == "registry.register":
        if os.environ.get(KIND_ENV) == "sigkill_after_register":
            _kill(signal.SIGKILL)
        return
    kind = _step_kind(step) if step is not None else None
    if kind is None:
        return
    if point == "train.step":
        _train_step(kind)
    elif point == "checkpoint.write":
        if kind == "sigkill_in_checkpoint":
            _kill(signal.SIGKILL)
        elif kind == "enospc_in_checkpoint":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
    elif point == "metrics.queue" and kind == "pause_metrics":
        _pause(step)  # type: ignore[arg-type] - _step_kind returned a kind, so step is set


def _train_step(kind: str) -> None:
    if kind == "sigkill":
        _kill(signal.SIGKILL)
    elif kind == "sigterm":
        _kill(signal.SIGTERM)
    elif kind == "sigint":  # what Ctrl-C sends
        _kill(signal.SIGINT)
    elif kind == "raise":
        raise RuntimeError(f"injected fault ({KIND_ENV}=raise)")
    elif kind == "oom":
        import torch

        raise torch.OutOfMemoryError(f"injected out of memory ({KIND_ENV}=oom)")


def _pause(step: int) -> None:
    release = Path(os.environ[FILE_ENV])
    Path(f"{release}.reached").write_text(str(step))
    deadline = time.monotonic() + _PAUSE_LIMIT_S
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _kill(signum: int) -> None:
    os.kill(os.getpid(), signum)
