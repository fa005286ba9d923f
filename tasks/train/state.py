"""What the training loop carries from step to step, and how it reaches a checkpoint and comes back from one."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks.config import TrainConfig
from forgeline.tasks.errors import NonFiniteLossError
from forgeline.tasks.train.checkpoints import save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The loop's counters and history; all of it is in every checkpoint."""

    step: int = 0
    best_val: float = math.inf
    bad_evals: int = 0
    nonfinite: int = 0
    nonfinite_run: int = 0
    history: list[dict[str, float]] | None = None
    best_step: int | None = None
    best_weights: dict[str, torch.Tensor] | None = None  # train.keep_best: the best evaluation's weights (CPU)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved."""
        return cls(
            step=ckpt["step"],
            best_val=ckpt["best_val"],
            bad_evals=ckpt["bad_evals"],
            nonfinite=ckpt["nonfinite"],
            history=list(ckpt["history"]),
            best_step=ckpt.get("best_step"),
            best_weights=ckpt.get("best_model"),
        )


@dataclass
class EvalState:
    """The classification and completion loops' counters: like :class:`TrainState`, with every validation metric."""

    step: int = 0
    best_score: float = math.inf  # the improvement metric, negated when higher is better: lower is better
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    nonfinite: int = 0
    nonfinite_run: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> EvalState:
        """The state a checkpoint saved."""
        return cls(
            step=ckpt["step"],
            best_score=ckpt["best_val"],
            best_metrics=dict(ckpt["best_metrics"]),
            bad_evals=ckpt["bad_evals"],
            nonfinite=ckpt["nonfinite"],
            history=list(ckpt["history"]),
            best_model=ckpt.get("best_model"),
        )

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint holds of this state (read back by :meth:`from_checkpoint`)."""
        fields: dict[str, Any] = {
            "best_val": self.best_score,
            "best_metrics": self.best_metrics,
            "bad_evals": self.bad_evals,
            "nonfinite": self.nonfinite,
            "history": self.history,
        }
        if self.best_model is not None:
            fields["best_model"] = self.best_model
        return fields

    def record(self, scores: dict[str, float], metric: str, higher: bool, model: Any, keep_best: bool) -> None:
        """Count an evaluation towards patience; with ``keep_best``, copy the weights of a new best."""
        score = -scores[metric] if higher else scores[metric]
        if score < self.best_score:
            self.best_score, self.best_metrics, self.bad_evals = score, scores, 0
            if keep_best:
                self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1


def record_eval(state: TrainState, model: torch.nn.Module, cfg: TrainConfig, val_loss: float) -> None:
    """Count an evaluation towards patience; with ``train.keep_best``, copy the weights of a new best."""
    if val_loss < state.best_val:
        state.best_val, state.bad_evals, state.best_step = val_loss, 0, state.step
        if cfg.keep_best:
            state.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    else:
        state.bad_evals += 1


def skip_nonfinite(state: TrainState | EvalState, cfg: TrainConfig, run_dir: Path, step: int) -> None:
    """Count a non-finite step (its update was skipped); ``train.max_nonfinite_steps`` in a row fail the run.

    Raises:
        NonFiniteLossError: too many in a row (no checkpoint is written: the last good one stays).
    """
    state.nonfinite += 1
    state.nonfinite_run += 1
    logger.warning(
        "non-finite loss at step %d (skipped; %d in a row, limit %d)",
        step,
        state.nonfinite_run,
        cfg.max_nonfinite_steps,
    )
    if state.nonfinite_run >= cfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"loss was non-finite for {state.nonfinite_run} steps in a row (last at step {step}); "
            f"last good checkpoint kept in {run_dir / 'checkpoints'}"
        )


def save_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    state: TrainState,
    run_dir: Path,
    config_hash: str,
    cfg: TrainConfig,
    device: torch.device,
) -> None:
    """Write the checkpoint of ``state.step``: weights, optimizer, generators and the loop's state."""
    fields: dict[str, Any] = {
        "best_val": state.best_val,
        "bad_evals": state.bad_evals,
        "nonfinite": state.nonfinite,
        "history": state.history,
    }
    if state.best_weights is not None:
        fields["best_model"], fields["best_step"] = state.best_weights, state.best_step
    write_checkpoint(
        model, optimizer, state.step, {"batches": gen.get_state()}, fields, run_dir, config_hash, cfg, device
    )


def write_checkpoint(
    model: Any,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: dict[str, torch.Tensor],
    fields: dict[str, Any],
    run_dir: Path,
    config_hash: str,
    cfg: TrainConfig,
    device: torch.device,
) -> None:
    """Write the checkpoint of ``step``: weights, optimizer, generators (``rng`` and torch's), a loop's ``fields``."""
    rng["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    payload = {
        "step": step,
        "config_hash": config_hash,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "warmup_cosine", "step": step},
        "rng": rng,
        **fields,
    }
    save_checkpoint(run_dir / "checkpoints", step, payload, keep=cfg.keep_checkpoints)
