"""Knowledge distillation: the loss, and the resumable loop the lm, classifier and completion students share.

The loss is DistilGPT2's: ``alpha_kd * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha_ce * CE(s, y)``, the
forward KL on temperature-softened distributions (``T^2`` keeps its gradients on the scale of the CE's).
Teacher logits are computed on the fly under ``no_grad``: batches are random windows, so a cache would hold
every window the loop might draw (16.7 GB for Tiny Shakespeare; BENCHMARKS.md section 8). Classifiers cache
theirs (:mod:`.classify`). Batches, schedule, optimizer, checkpoints, signals and the NaN policy are
``forgeline.tasks.train``'s.

The three loops (:func:`distill`, :func:`.classify.distill_classifier`, :func:`.complete.distill_pairs`) differ
only in how one micro-batch is drawn and run through both models (a :data:`Forward`) and how the student is
validated (a :data:`Validate`); :func:`start_distillation` and :func:`run_distillation` are the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
Forward = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(student_logits, teacher_logits, targets)`` of one micro-batch, given its number in the whole run
(``step * grad_accum_steps + micro``); called under autocast, the teacher's logits without gradient."""
Validate = Callable[[], dict[str, float]]
"""The student's validation metrics, ``val/loss`` among them."""


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
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer, state = start_distillation(
        student, teacher, settings, checkpoint_dir, device=device, what="distillation", gen=gen
    )
    val_batches = fixed_batches(val_data, cfg, settings.block_size, settings.seed + 1)

    def forward(_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = sample_batch(train_data, cfg.batch_size, settings.block_size, gen)
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits  # (B, T, V)
        return student(input_ids=x, use_cache=False).logits, t_logits, y

    def validate() -> dict[str, float]:
        return {"val/loss": estimate_loss(student, val_batches, device, cfg)}

    return run_distillation(
        student, optimizer, state, settings, checkpoint_dir, forward, validate, on_metrics, device=device, gen=gen
    )


def start_distillation(
    student: Any,
    teacher: Any,
    settings: DistillSettings,
    checkpoint_dir: Path,
    *,
    device: torch.device,
    what: str,
    gen: torch.Generator | None = None,
) -> tuple[torch.optim.Optimizer, DistillState]:
    """The optimizer and state of a distillation, resumed from the latest checkpoint of ``settings.run_hash``.

    Args:
        student: The model being trained (its weights are restored from the checkpoint).
        teacher: Put in eval mode; never trained.
        settings: Loop settings.
        checkpoint_dir: Where the checkpoints of this distillation live.
        device: Where the optimizer's state goes.
        what: The loop's name in the ``resumed from step`` log line.
        gen: The batch generator whose state the checkpoint restores; None where batches are a function of the
            step (the checkpoint's slot is then left alone).

    Returns:
        ``(optimizer, state)``; ``state.resumed_from`` is the checkpoint's step, None on a fresh start.
    """
    teacher.eval()
    optimizer = make_optimizer(student, settings.train, device)
    ckpt = load_latest_checkpoint(checkpoint_dir, settings.run_hash)
    if ckpt is None:
        return optimizer, DistillState()
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if gen is not None:
        gen.set_state(ckpt["rng"]["batches"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    state = DistillState(
        step=ckpt["step"], best_val=ckpt["best_val"], nonfinite=ckpt["nonfinite"], history=list(ckpt["history"])
    )
    state.resumed_from = state.step
    logger.info("%s resumed from step %d (%s)", what, state.step, checkpoint_dir)
    return optimizer, state


def distil_step(
    student: Any,
    optimizer: torch.optim.Optimizer,
    state: DistillState,
    settings: DistillSettings,
    forward: Forward,
    *,
    device: torch.device,
) -> dict[str, float] | None:
    """One optimizer step over ``grad_accum_steps`` micro-batches of :func:`distillation_loss`; advances ``state.step``.

    Returns:
        The step's ``train/loss``, ``kd_loss``, ``ce_loss``, ``lr`` and ``grad_norm``; None when the loss was
        non-finite (the gradients are left for :func:`skip_nonfinite`, the optimizer has not stepped).
    """
    cfg = settings.train
    lr = get_lr(state.step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = torch.zeros(3, device=device)  # loss, kd, ce
    poison = faults.nan_loss(state.step + 1)
    for micro in range(cfg.grad_accum_steps):
        with autocast_context(device, cfg):
            s_logits, t_logits, targets = forward(state.step * cfg.grad_accum_steps + micro)
            loss, kd, ce = distillation_loss(
                s_logits,
                t_logits,
                targets,
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


def skip_nonfinite(optimizer: torch.optim.Optimizer, state: DistillState, cfg: TrainConfig) -> None:
    """Drop a non-finite step's gradients and count it (the training loop's policy).

    Raises:
        NonFiniteLossError: the ``cfg.max_nonfinite_steps``-th non-finite step in a row.
    """
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite += 1
    state.nonfinite_run += 1
    logger.warning("non-finite distillation loss at step %d (skipped; %d in a row)", state.step, state.nonfinite_run)
    if state.nonfinite_run >= cfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"distillation loss was non-finite for {state.nonfinite_run} steps in a row (last at step {state.step})"
        )


def run_distillation(
    student: Any,
    optimizer: torch.optim.Optimizer,
    state: DistillState,
    settings: DistillSettings,
    checkpoint_dir: Path,
    forward: Forward,
    validate: Validate | None,
    on_metrics: OnMetrics | None = None,
    *,
    device: torch.device,
    gen: torch.Generator | None = None,
    log_parts: bool = True,
    fault_point: bool = True,
) -> DistillState:
    """Step ``student`` from ``state.step`` to ``settings.train.max_steps``: validate, log, checkpoint, stop.

    Args:
        student: The model being trained (put in train mode).
        optimizer: From :func:`start_distillation`.
        state: From :func:`start_distillation`; updated in place and returned.
        settings: Loop settings (``train``'s intervals decide when to validate, log and checkpoint).
        checkpoint_dir: Where checkpoints go.
        forward: One micro-batch through both models.
        validate: The validation metrics, every ``eval_interval`` steps and at the last; None: never.
        on_metrics: Called with every finite step's metrics.
        device: Where the student is.
        gen: The batch generator whose state checkpoints keep; None: an unused one fills the slot.
        log_parts: Whether the progress line shows ``kd`` and ``ce`` beside the loss.
        fault_point: Whether each step passes the ``train.step`` fault injection point.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite losses in a row.
        StageInterrupted: SIGTERM or Ctrl-C (a checkpoint is written first).
    """
    cfg = settings.train
    gen = gen if gen is not None else torch.Generator()  # the checkpoint keeps its slot either way
    student.train()
    with stop_on_signal() as stop:
        while state.step < cfg.max_steps:
            metrics = distil_step(student, optimizer, state, settings, forward, device=device)
            if metrics is None:
                skip_nonfinite(optimizer, state, cfg)
                continue
            last = state.step == cfg.max_steps
            if validate is not None and (state.step % cfg.eval_interval == 0 or last):
                scores = validate()
                state.final_val = scores["val/loss"]
                state.best_val = min(state.best_val, state.final_val)
                metrics |= scores
            if state.step % cfg.log_interval == 0 or last:
                state.history.append({"step": state.step, **metrics})
                _log_step(state.step, cfg.max_steps, metrics, log_parts)
            if on_metrics:
                on_metrics(state.step, metrics)
            if state.step % cfg.checkpoint_interval == 0 or last or stop.is_set():
                save_distill_checkpoint(student, optimizer, gen, state, settings, checkpoint_dir)
            if fault_point:
                faults.hit("train.step", step=state.step)
            if stop.is_set():
                signum = int(getattr(stop, "signum", 15))  # SIGTERM
                raise StageInterrupted(f"distillation stopped by a signal after step {state.step}", signum)
    return state


def save_distill_checkpoint(
    student: Any,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    state: DistillState,
    settings: DistillSettings,
    checkpoint_dir: Path,
) -> None:
    """Write a checkpoint of the distillation at ``state.step`` (keeping ``train.keep_checkpoints``)."""
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


def _log_step(step: int, max_steps: int, metrics: dict[str, float], parts: bool) -> None:
    if parts:
        logger.info(
            "distil step %d/%d  loss %.4f  kd %.4f  ce %.4f",
            step,
            max_steps,
            metrics["train/loss"],
            metrics["kd_loss"],
            metrics["ce_loss"],
        )
    else:
        logger.info("distil step %d/%d  loss %.4f", step, max_steps, metrics["train/loss"])
