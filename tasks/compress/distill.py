"""Knowledge distillation: the loss and a resumable loop built from the training loop's pieces.

The loss is DistilGPT2's: ``alpha_kd * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha_ce * CE(s, y)``, the
forward KL on temperature-softened distributions (``T^2`` keeps its gradients on the scale of the CE's).
Teacher logits are computed on the fly under ``no_grad``: batches are random windows, so a cache would hold
every window the loop might draw (16.7 GB for Tiny Shakespeare; BENCHMARKS.md section 8). Classifiers cache
theirs (:mod:`.classify`). Batches, schedule, optimizer, checkpoints, signals and the NaN policy are
``forgeline.tasks.train``'s.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from forgeline.tasks import faults
from forgeline.tasks.config import TrainConfig
from forgeline.tasks.errors import NonFiniteLossError, StageInterrupted
from forgeline.tasks.train.batches import autocast_context, estimate_loss, fixed_batches, sample_batch
from forgeline.tasks.train.checkpoints import load_latest_checkpoint, save_checkpoint
from forgeline.tasks.train.schedule import get_lr, make_optimizer
from forgeline.tasks.train.signals import stop_on_signal

logger = logging.getLogger(__name__)

OnMetrics = Callable[[int, dict[str, float]], None]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha_kd: float,
    alpha_ce: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distillation loss of one batch and its two parts.

    Args:
        student_logits: ``(B, T, V)`` next-token logits, or ``(B, C)`` class logits of a classifier.
        teacher_logits: The same shape, without gradient.
        targets: ``(B, T)`` next-token ids, or ``(B,)`` class ids.
        temperature: Softens both distributions.
        alpha_kd: Weight of ``T^2 * KL(teacher || student)`` (mean over tokens, in nats).
        alpha_ce: Weight of the cross-entropy against ``targets``.

    Returns:
        ``(loss, kd, ce)``; ``kd`` is the KL before ``T^2`` and the weight.
    """
    s = student_logits.reshape(-1, student_logits.shape[-1]).float()  # (B*T, V) or (B, C)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    kd = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        reduction="batchmean",  # sum over the vocabulary (classes), mean over tokens (records)
        log_target=True,
    )
    ce = F.cross_entropy(s, targets.reshape(-1))
    return alpha_kd * temperature**2 * kd + alpha_ce * ce, kd, ce


@dataclass
class DistillSettings:
    """What the loop needs besides the models and data."""

    train: TrainConfig
    """Batch, schedule, intervals and device (``max_steps`` already the compress section's)."""
    block_size: int
    temperature: float
    alpha_kd: float
    alpha_ce: float
    seed: int
    run_hash: str
    """Stored in checkpoints; a checkpoint of another teacher or student is refused."""


@dataclass
class DistillState:
    """Counters and history of a (possibly resumed) distillation."""

    step: int = 0
    best_val: float = math.inf
    nonfinite: int = 0
    nonfinite_run: int = 0
    resumed_from: int | None = None
    final_val: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def distill(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    train_data: torch.Tensor,
    val_data: torch.Tensor,
    settings: DistillSettings,
    checkpoint_dir: Path,
    *,
    device: torch.device,
    on_metrics: OnMetrics | None = None,
) -> DistillState:
    """Train ``student`` against ``teacher`` for ``settings.train.max_steps`` steps, resuming a checkpoint.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite losses in a row.
        StageInterrupted: SIGTERM or Ctrl-C (a checkpoint is written first).
    """
    cfg = settings.train
    teacher.eval()
    optimizer = make_optimizer(student, cfg, device)
    gen = torch.Generator().manual_seed(settings.seed)
    state = DistillState()
    ckpt = load_latest_checkpoint(checkpoint_dir, settings.run_hash)
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        state = DistillState(
            step=ckpt["step"], best_val=ckpt["best_val"], nonfinite=ckpt["nonfinite"], history=list(ckpt["history"])
        )
        state.resumed_from = state.step
        logger.info("distillation resumed from step %d (%s)", state.step, checkpoint_dir)
    val_batches = fixed_batches(val_data, cfg, settings.block_size, settings.seed + 1)
    student.train()
    with stop_on_signal() as stop:
        while state.step < cfg.max_steps:
            metrics = _step(student, teacher, optimizer, train_data, gen, state, settings, device)
            if metrics is None:
                _skip_nonfinite(optimizer, state, cfg)
                continue
            last = state.step == cfg.max_steps
            if state.step % cfg.eval_interval == 0 or last:
                state.final_val = estimate_loss(student, val_batches, device, cfg)
                state.best_val = min(state.best_val, state.final_val)
                metrics["val/loss"] = state.final_val
            if state.step % cfg.log_interval == 0 or last:
                state.history.append({"step": state.step, **metrics})
                logger.info(
                    "distil step %d/%d  loss %.4f  kd %.4f  ce %.4f",
                    state.step,
                    cfg.max_steps,
                    metrics["train/loss"],
                    metrics["kd_loss"],
                    metrics["ce_loss"],
                )
            if on_metrics:
                on_metrics(state.step, metrics)
            if state.step % cfg.checkpoint_interval == 0 or last or stop.is_set():
                _checkpoint(student, optimizer, gen, state, settings, checkpoint_dir)
            faults.hit("train.step", step=state.step)
            if stop.is_set():
                signum = getattr(stop, "signum", signal.SIGTERM)
                raise StageInterrupted(f"distillation stopped by a signal after step {state.step}", int(signum))
    return state


def _step(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    train_data: torch.Tensor,
    gen: torch.Generator,
    state: DistillState,
    settings: DistillSettings,
    device: torch.device,
) -> dict[str, float] | None:
    cfg = settings.train
    lr = get_lr(state.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(3, device=device)  # loss, kd, ce
    poison = faults.nan_loss(state.step + 1)
    for _ in range(cfg.grad_accum_steps):
        x, y = sample_batch(train_data, cfg.batch_size, settings.block_size, gen)
        x, y = x.to(device), y.to(device)
        with autocast_context(device, cfg):
            with torch.no_grad():
                t_logits = teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
            s_logits = student(input_ids=x, use_cache=False).logits
            loss, kd, ce = distillation_loss(
                s_logits,
                t_logits,
                y,
                temperature=settings.temperature,
                alpha_kd=settings.alpha_kd,
                alpha_ce=settings.alpha_ce,
            )
        if poison:
            loss = loss * float("nan")
        (loss / cfg.grad_accum_steps).backward()
        sums += torch.stack([loss.detach(), kd.detach(), ce.detach()])
    loss_v, kd_v, ce_v = (sums / cfg.grad_accum_steps).tolist()
    state.step += 1
    if not math.isfinite(loss_v):
        return None
    state.nonfinite_run = 0
    limit = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), limit))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"train/loss": loss_v, "kd_loss": kd_v, "ce_loss": ce_v, "lr": lr, "grad_norm": grad_norm}


def _skip_nonfinite(optimizer: torch.optim.Optimizer, state: DistillState, cfg: TrainConfig) -> None:
    # The training loop's policy: drop the step's gradients and count it; K in a row fails.
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite += 1
    state.nonfinite_run += 1
    logger.warning("non-finite distillation loss at step %d (skipped; %d in a row)", state.step, state.nonfinite_run)
    if state.nonfinite_run >= cfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"distillation loss was non-finite for {state.nonfinite_run} steps in a row (last at step {state.step})"
        )


def _checkpoint(
    student: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    state: DistillState,
    settings: DistillSettings,
    checkpoint_dir: Path,
) -> None:
    payload = {
        "step": state.step,
        "config_hash": settings.run_hash,
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"batches": gen.get_state(), "torch": torch.get_rng_state()},
        "best_val": state.best_val,
        "nonfinite": state.nonfinite,
        "history": state.history,
    }
    save_checkpoint(checkpoint_dir, state.step, payload, keep=settings.train.keep_checkpoints)
