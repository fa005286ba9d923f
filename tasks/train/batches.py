"""Batches and the loss: random windows of the token stream, the device and precision they run in."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from forgeline.tasks.config import TrainConfig
from forgeline.tasks.train.shards import Shards

logger = logging.getLogger(__name__)


def sample_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the token stream: inputs ``(B, T)`` and next-token targets ``(B, T)``.

    Cut where ``data`` lives (``generator`` must be on that device): on a GPU the stream stays there and no
    batch crosses from the host.
    """
    starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator, device=data.device)
    index = starts[:, None] + torch.arange(block_size + 1, device=data.device)  # (B, T+1)
    window = data[index]
    return window[:, :-1], window[:, 1:]


def fixed_batches(
    data: torch.Tensor, cfg: TrainConfig, block_size: int, seed: int, device: torch.device | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``cfg.eval_batches`` batches drawn once from a seeded generator: every evaluation scores the same windows.

    Drawn in one go (the same windows as one draw per batch) and moved to ``device`` in one copy.
    """
    gen = torch.Generator().manual_seed(seed)
    n, b = cfg.eval_batches, cfg.batch_size
    x, y = sample_batch(data, n * b, block_size, gen)
    xy = torch.stack([x, y]).to(device or data.device)  # (2, n*B, T)
    return [(xy[0, i * b : (i + 1) * b], xy[1, i * b : (i + 1) * b]) for i in range(n)]


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on inputs ``x`` and targets ``y`` (both ``(B, T)``)."""
    # Loss from the logits outside the model: scores all T targets (as nanoGPT) and compiles better.
    # No KV cache to fill while training; a plain GPT-2 runs its own modules without the per-call plumbing.
    return F.cross_entropy(lm_logits(model, x).flatten(0, 1).float(), y.flatten())


def lm_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The next-token logits ``(B, T, V)`` of a causal LM for unpadded windows ``x`` ``(B, T)``, without a KV cache.

    A plain GPT-2 runs its own modules without the per-call plumbing (:func:`_gpt2_logits`); any other model
    is called as usual.
    """
    return _gpt2_logits(model, x) if _plain_gpt2(model) else model(input_ids=x, use_cache=False).logits


def _plain_gpt2(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return (
        type(model).__name__ == "GPT2LMHeadModel"
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not getattr(config, "add_cross_attention", False)
    )


def _gpt2_logits(model: Any, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's training forward through its own modules and weights, without its per-call plumbing.

    The same ops as ``model(input_ids=x, use_cache=False).logits`` for unpadded windows with SDPA attention
    (causal, no mask): it skips the padding warning's check and the packed-sequence probe, each a host sync per
    call, and the mask, cache and output objects (BENCHMARKS.md section 1: 2.4 ms of a 29 ms CPU step).
    """
    body = model.transformer
    h = body.drop(body.wte(x) + body.wpe(torch.arange(x.shape[1], device=x.device)))  # (B, T, C)
    for block in body.h:
        h = block(h)  # attention_mask None: SDPA's is_causal, as the model's own causal-mask shortcut gives
    return model.lm_head(body.ln_f(h))  # (B, T, V)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_loss_fn(model: torch.nn.Module, cfg: TrainConfig) -> LossFn:
    """``lm_loss`` of ``model`` as one function; with ``train.compile``, the forward and the loss compiled together."""

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, x, y)

    if not cfg.compile:
        return loss_of
    compiled = torch.compile(loss_of, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    if cfg.compile_mode != "reduce-overhead":
        return compiled

    def graphed(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Each call starts a step: CUDA graph outputs of the previous one (already read or copied) may be reused.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, y)

    return graphed


def estimate_loss(
    model: Any,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    cfg: TrainConfig,
    loss_fn: LossFn | None = None,
    shards: Shards | None = None,
) -> float:
    """Mean loss over fixed validation batches, summed on the device and read once.

    With ``shards``, the batches are shared out among the shards' threads, each summing its own.
    """
    was_training = model.training
    model.eval()
    loss_of = loss_fn or (lambda x, y: lm_loss(model, x, y))

    def total_of(group: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():  # per thread, as autocast
            for x, y in group:
                with autocast_context(device, cfg):
                    total += loss_of(x.to(device), y.to(device)).double()
        return total

    try:
        parts = [total_of(batches)] if shards is None else shards.map(total_of, shards.groups(batches))
        total = torch.stack(parts).sum()
    finally:
        model.train(was_training)
    return total.item() / len(batches)


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
