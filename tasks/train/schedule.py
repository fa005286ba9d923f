"""Learning-rate schedule and optimizer: warm-up then cosine decay, AdamW with nanoGPT's weight-decay groups."""

from __future__ import annotations

import math

import torch

from forgeline.tasks.config import TrainConfig


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_lr`` (nanoGPT's ``get_lr``)."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_steps + 1)
    if step > decay_steps:
        return cfg.min_lr
    span = max(1, decay_steps - cfg.warmup_steps)
    ratio = (step - cfg.warmup_steps) / span
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (nanoGPT's grouping), fused (one kernel for all tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu")
    )
