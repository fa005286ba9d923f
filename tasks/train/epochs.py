"""The step loop the classification and completion loops share: epochs of batches, validation, patience.

Each task brings its batches (``fetch``: micro-batch ``k`` of the run, on the device, and its token count), its
loss and its validation (``evaluate``: every ``val/...`` metric). The loop owns the rest, as the language
model's loop does: the warm-up/cosine learning rate, gradient accumulation and clipping, the non-finite-loss
policy, history and metric journal, callbacks, the best evaluation (``keep_best``), early stopping after
``patience`` evaluations without improvement, checkpoints and a clean stop on a signal. Free of Prefect and MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks import faults
from forgeline.tasks.config import PipelineConfig, TrainConfig
from forgeline.tasks.train.batches import autocast_context
from forgeline.tasks.train.checkpoints import load_latest_checkpoint
from forgeline.tasks.train.driver import (
    TrainCallbacks,
    TrainResult,
    loop_result,
    restore_checkpoint,
    stopped_by_signal,
    write_done,
)
from forgeline.tasks.train.journal import JOURNAL_FILE, MetricJournal
from forgeline.tasks.train.schedule import get_lr, make_optimizer
from forgeline.tasks.train.signals import stop_on_signal
from forgeline.tasks.train.state import EvalState, skip_nonfinite, write_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class EpochTask:
    """What a task plugs into the shared loop."""

    metric: tuple[str, bool]
    """The validation metric that decides the best evaluation and early stopping; whether higher is better."""
    fetch: Callable[[int], tuple[Any, int]]
    """Micro-batch ``k`` of the run, moved to the device, and its token count."""
    loss: Callable[[Any], torch.Tensor]
    """The mean training loss of a fetched micro-batch (run under autocast)."""
    evaluate: Callable[[], dict[str, float]]
    """Every validation metric (``val/loss`` among them), over the whole validation split."""


@dataclass
class EpochRun:
    """One run of the shared loop: the model, its optimizer, where it checkpoints and whom it tells."""

    cfg: TrainConfig  # max_steps = the run's steps (epochs resolved), so the schedule decays over them
    model: Any
    optimizer: torch.optim.Optimizer
    device: torch.device
    run_dir: Path
    config_hash: str
    patience: int | None
    keep_best: bool
    cb: TrainCallbacks
    journal: MetricJournal


def open_run(
    cfg: PipelineConfig, train_cfg: TrainConfig, model: Any, device: torch.device, run_dir: Path, cb: TrainCallbacks
) -> tuple[EpochRun, EvalState, int | None]:
    """The run of ``cfg`` with its optimizer, resumed from this config's newest checkpoint when there is one.

    Returns:
        The run, the loop's state and the step resumed from (``None``: a fresh start).
    """
    optimizer = make_optimizer(model, train_cfg, device)
    config_hash = cfg.config_hash()
    state, resumed_from = resume(run_dir, config_hash, model, optimizer, device)
    run = EpochRun(
        cfg=train_cfg,
        model=model,
        optimizer=optimizer,
        device=device,
        run_dir=run_dir,
        config_hash=config_hash,
        patience=cfg.patience(),
        keep_best=cfg.keep_best(),
        cb=cb,
        journal=MetricJournal(run_dir / JOURNAL_FILE, state.step),
    )
    return run, state, resumed_from


def resume(
    run_dir: Path, config_hash: str, model: Any, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[EvalState, int | None]:
    """The loop's state from this config's newest checkpoint (weights and optimizer loaded), or a fresh one.

    Returns:
        The state and the step resumed from (``None``: a fresh start).
    """
    ckpt = load_latest_checkpoint(run_dir / "checkpoints", config_hash)
    if ckpt is None:
        return EvalState(), None
    restore_checkpoint(ckpt, model, optimizer, device)
    state = EvalState.from_checkpoint(ckpt)
    logger.info("resumed from step %d (%s)", state.step, run_dir / "checkpoints")
    return state, state.step


def finish(
    run: EpochRun,
    state: EvalState,
    tokenizer: Any,
    loop: dict[str, Any],
    *,
    resumed_from: int | None,
    t_start: float,
    parameters: int,
) -> TrainResult:
    """Keep the best evaluation's weights (``keep_best``), save model and tokenizer, write ``done.json``."""
    if run.keep_best and state.best_model is not None:
        run.model.load_state_dict(state.best_model)
        logger.info("keeping the best evaluation's weights: %s", fmt_metrics(state.best_metrics))
    model_dir = run.run_dir / "model"
    run.model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = loop_result(
        run.run_dir,
        loop,
        state,
        resumed_from=resumed_from,
        t_start=t_start,
        parameters=parameters,
        device=run.device,
        best_val_loss=state.best_metrics.get("val/loss"),
    )
    write_done(run.run_dir, out)
    return out


def run_steps(run: EpochRun, state: EvalState, task: EpochTask) -> dict[str, Any]:
    """Train from ``state.step`` to ``cfg.max_steps`` or an early stop; the loop's numbers for the result.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite losses in a row.
        StageInterrupted: SIGTERM or Ctrl-C (after the step's checkpoint).
    """
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    final_train = final_val = None
    # A run killed after its early-stop checkpoint, before done.json, stops again without another step.
    stopped_early = run.patience is not None and state.bad_evals >= run.patience
    loop_t0, loop_tokens = time.perf_counter(), 0
    t_offset = max((h.get("time", 0.0) for h in state.history), default=0.0) - loop_t0
    metric, higher = task.metric
    model.train()
    with stop_on_signal() as stop:
        while state.step < cfg.max_steps and not stopped_early:
            step = state.step
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            poison = faults.nan_loss(step + 1)
            for micro in range(cfg.grad_accum_steps):
                batch, tokens = task.fetch(step * cfg.grad_accum_steps + micro)
                loop_tokens += tokens
                with autocast_context(run.device, cfg):
                    loss = task.loss(batch)
                if poison:
                    loss = loss * float("nan")
                (loss / cfg.grad_accum_steps).backward()
                loss_sum += float(loss.detach())
            train_loss = loss_sum / cfg.grad_accum_steps
            state.step = step + 1
            if not math.isfinite(train_loss):
                optimizer.zero_grad(set_to_none=True)  # drop this step's gradients; no checkpoint
                skip_nonfinite(state, cfg, run.run_dir, state.step)
                continue
            state.nonfinite_run = 0
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            final_train = train_loss
            metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm}
            last = state.step == cfg.max_steps
            if state.step % cfg.log_interval == 0 or last:
                state.history.append(
                    {"step": state.step, "train/loss": train_loss, "time": t_offset + time.perf_counter()}
                )
                logger.info("step %d/%d  loss %.4f  lr %.2e", state.step, cfg.max_steps, train_loss, lr)
            if state.step % cfg.eval_interval == 0 or last:
                scores = task.evaluate()
                metrics.update(scores)
                final_val = scores["val/loss"]
                state.history.append({"step": state.step, **scores, "time": t_offset + time.perf_counter()})
                logger.info("step %d: %s", state.step, fmt_metrics(scores))
                state.record(scores, metric, higher, model, run.keep_best)
            run.journal.add(state.step, metrics)
            if run.cb.on_metrics:
                run.cb.on_metrics(state.step, metrics)
            if metric in metrics and run.cb.on_eval:
                run.cb.on_eval(state.step, metrics[metric])
            stopped_early = run.patience is not None and state.bad_evals >= run.patience
            saved = state.step % cfg.checkpoint_interval == 0 or last or stopped_early or stop.is_set()
            if saved:
                _checkpoint(run, state)
            faults.hit("train.step", step=state.step)
            if stop.is_set():
                if not saved:
                    _checkpoint(run, state)
                raise stopped_by_signal(stop, state.step)
            if stopped_early:
                logger.info(
                    "early stopping at step %d: no %s improvement in %d evaluations", state.step, metric, run.patience
                )
                break
    elapsed = time.perf_counter() - loop_t0
    return {
        "final_train": final_train,
        "final_val": final_val,
        "stopped_early": stopped_early,
        "tokens_per_sec": loop_tokens / elapsed if elapsed > 0 else 0.0,
        "loop_seconds": elapsed,
    }


def fmt_metrics(metrics: dict[str, float]) -> str:
    """``name value, ...`` with four decimals, for the log."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _checkpoint(run: EpochRun, state: EvalState) -> None:
    run.journal.flush()  # first: the journal must cover every step of the newest checkpoint
    # Batches are a function of (seed, step): no batch generator to save.
    fields = state.checkpoint_fields()
    write_checkpoint(
        run.model, run.optimizer, state.step, {}, fields, run.run_dir, run.config_hash, run.cfg, run.device
    )
