"""Batches and the loss: random windows of the token stream, the device and precision they run in."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
import torch.nn.functional as F

from forgeline.tasks.config import TrainConfig

logger = logging.getLogger(__name__)


def sample_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream: inputs ``(B, T)`` and next-token targets ``(B, T)``."""
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
    window = data[index]
    return window[:, :-1], window[:, 1:]


def fixed_batches(
    data: torch.Tensor, cfg: TrainConfig, block_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.eval_batches`` batches drawn once from a seeded generator: every evaluation scores the same windows."""
    gen = torch.Generator().manual_seed(seed)
    return [sample_batch(data, cfg.batch_size, block_size, gen) for _ in range(cfg.eval_batches)]


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y`` (both ``(B, T)``)."""
    # Loss from the logits outside the model: scores all T targets (as nanoGPT) and compiles better.
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V); no KV cache to fill while training
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def estimate_loss(
    model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, cfg: TrainConfig
) -> float:
    """Mean loss over fixed validation batches."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        with autocast_context(device, cfg):
            total += lm_loss(model, x.to(device), y.to(device)).item()
    model.train(was_training)
    return total / len(batches)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """``auto`` picks CUDA when present.

    Raises:
        RuntimeError: ``train.device`` is ``cuda`` and there is none.
    """
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def scoring_device(cfg: TrainConfig) -> torch.device:
    """Where a saved model is scored in this process: CUDA when the config allows it and there is one, else the CPU.

    Scoring runs where the pipeline flow runs (the ``cpu`` pool), not where training ran: a ``cuda`` config
    scores on the CPU there (with one log line) instead of failing as training would (RELIABILITY.md A8).
    """
    if cfg.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if cfg.device == "cuda":
        logger.info("train.device is 'cuda' but this process has no CUDA device: scoring on the CPU")
    return torch.device("cpu")


def autocast_context(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when ``train.dtype`` asks for it (``auto``: on CUDA); otherwise a no-op context."""
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
