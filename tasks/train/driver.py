"""What every training loop does around its steps: resume, stop on a signal, report, and mark the run finished.

The language-model loop (``tasks/train/loop.py``), the classification loop (``classify.py``) and the completion
loop (``complete.py``) share these; the last two also share their whole step loop (``epochs.py``). Nothing
here runs inside the language model's step, which must not sync with the host. ``TrainResult``,
``TrainCallbacks``, ``DONE_FILE`` and ``finished_result`` are imported from ``loop.py`` too, where they began.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from forgeline.tasks.errors import StageInterrupted
from forgeline.tasks.train.checkpoints import CheckpointError

logger = logging.getLogger(__name__)

DONE_FILE = "done.json"


class TrainResult(BaseModel):
    """What a finished training run leaves behind (small: paths and numbers)."""

    run_dir: str
    model_dir: str
    steps: int
    resumed_from: int | None = None
    already_done: bool = False
    best_val_loss: float | None = None
    best_step: int | None = None
    kept_best: bool = False
    final_val_loss: float | None = None
    final_train_loss: float | None = None
    nonfinite_steps: int = 0
    stopped_early: bool = False
    tokens_per_sec: float = 0.0
    seconds: float = 0.0
    loop_seconds: float = 0.0
    parameters: int = 0
    device: str = "cpu"
    history: list[dict[str, float]] = []


@dataclass
class TrainCallbacks:
    """Hooks the wiring attaches; each may be ``None``."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    on_eval: Callable[[int, float], None] | None = None  # may raise (e.g. optuna.TrialPruned)


def finished_result(run_dir: Path, done: Path) -> TrainResult:
    """The result a finished run left in ``done``, with today's paths (every task's loop reuses it)."""
    result = TrainResult.model_validate_json(done.read_text())
    # Paths as of today: the project folder may have moved since the result was written.
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{done} says training finished, but its model folder {model_dir} is missing; "
            "run with --fresh to train again"
        )
    logger.info("training already complete for this config and data (%d steps): %s", result.steps, run_dir)
    return result.model_copy(update={"already_done": True, "run_dir": str(run_dir), "model_dir": str(model_dir)})


def finished_run(run_dir: Path) -> TrainResult | None:
    """The result of a run already finished in ``run_dir`` (it has ``done.json``), else ``None``."""
    done = run_dir / DONE_FILE
    return finished_result(run_dir, done) if done.exists() else None


def run_summary(
    sizes: dict[str, Any], tokenizer: Any, device: torch.device, start_step: int, world_size: int, global_batch: int
) -> dict[str, Any]:
    """What ``on_start`` gets: the loop's ``sizes`` (parameters, steps, data), then what every loop reports."""
    return {
        **sizes,
        "vocab_size": len(tokenizer),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "start_step": start_step,
        "world_size": world_size,
        "global_batch": global_batch,
    }


def restore_checkpoint(
    ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> None:
    """Load a checkpoint's weights, optimizer state and torch (and CUDA) generator states."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])


def stopped_by_signal(stop: threading.Event, step: int) -> StageInterrupted:
    """The error that ends a run stopped by SIGTERM or Ctrl-C after ``step`` (its checkpoint written)."""
    signum = getattr(stop, "signum", signal.SIGTERM)
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    return StageInterrupted(f"stopped by a signal after step {step} ({name}); checkpoint saved", int(signum))


def loop_result(
    run_dir: Path,
    loop: dict[str, Any],
    state: Any,
    *,
    resumed_from: int | None,
    t_start: float,
    parameters: int,
    device: torch.device,
    **best: Any,
) -> TrainResult:
    """A run's result from its loop's numbers (``final_train``, ``final_val``, ``stopped_early``, rates).

    ``state`` is the loop's state (``step``, ``nonfinite``, ``history``); ``best`` carries the loop's own
    best-evaluation fields (``best_val_loss``, ``best_step``, ``kept_best``).
    """
    return TrainResult(
        run_dir=str(run_dir),
        model_dir=str(run_dir / "model"),
        steps=state.step,
        resumed_from=resumed_from,
        final_val_loss=loop["final_val"],
        final_train_loss=loop["final_train"],
        nonfinite_steps=state.nonfinite,
        stopped_early=loop["stopped_early"],
        tokens_per_sec=loop["tokens_per_sec"],
        loop_seconds=loop["loop_seconds"],
        seconds=time.perf_counter() - t_start,
        parameters=parameters,
        device=str(device),
        history=state.history or [],
        **best,
    )


def write_done(run_dir: Path, result: TrainResult) -> None:
    """Mark the run finished: ``done.json`` holds its result, written whole or not at all."""
    done = run_dir / DONE_FILE
    tmp = done.with_suffix(".tmp")
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, done)
