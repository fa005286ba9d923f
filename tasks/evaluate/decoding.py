"""Completions decoded from prompts (batched, left-padded, KV cache) and the perplexity of reference completions.

The prompt ids are :func:`~forgeline.tasks.train.completion.encode_prompt`'s, exactly what training put before each
completion. Prompts are decoded in batches of similar length, padded on the left so that every row's next token
sits in the last column; ``generate`` derives position ids from the attention mask, so a batched row decodes as it
would alone. Decoding stops at eos and, with ``stop_at="newline"``, at the first token holding a newline (those
tokens are extra eos ids, so finished rows stop costing work); the text is cut at the newline as well. Within
the model's positions a prompt keeps its last ``max(positions - max_new_tokens, positions // 2)`` tokens, and a
batch generates at most the positions its longest prompt leaves.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel
from transformers import GenerationConfig, PreTrainedTokenizerBase

from forgeline.tasks.train.completion import (
    DEFAULT_SEPARATOR,
    completion_loss,
    encode_pairs,
    encode_prompt,
    pair_batches,
)

log = logging.getLogger(__name__)

_NEWLINE_IDS_ATTR = "_forgeline_newline_ids"


class ReferenceLoss(BaseModel):
    """How well a model predicts reference completions (and their eos) given the prompts."""

    loss: float
    """Mean nats per completion token."""
    perplexity: float
    tokens: int
    """Completion tokens scored."""
    pairs: int
    """Pairs scored (those whose completion fits the context)."""


def generate_completions(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_at: Literal["eos", "newline"] = "newline",
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    separator: str = DEFAULT_SEPARATOR,
) -> tuple[list[str], float]:
    """Decode a completion for every prompt.

    Args:
        model: A causal LM (``generate`` with a KV cache).
        tokenizer: Its tokenizer (needs an eos token).
        prompts: Prompt texts.
        max_new_tokens: Most tokens generated per prompt.
        stop_at: ``eos``, or ``newline``: also stop at (and cut before) the first newline.
        do_sample: Sample with ``temperature`` and ``top_k`` instead of greedy decoding.
        temperature: Sampling temperature.
        top_k: Sample among the ``top_k`` likeliest tokens (None: all).
        seed: Seed of the sampling (the caller's global RNG state is left as it was).
        batch_size: Prompts decoded together.
        separator: Text between prompt and completion, as in training.

    Returns:
        ``(completions, prompts per second)``: only the new text of each prompt, in input order.

    Raises:
        ValueError: If the tokenizer has no eos token or ``stop_at`` is unknown.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    if stop_at not in ("eos", "newline"):
        raise ValueError(f"unknown stop_at {stop_at!r}")
    if not prompts:
        return [], 0.0
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos
    stops = [eos] + (newline_ids(tokenizer) if stop_at == "newline" else [])
    settings: dict[str, Any] = {"do_sample": do_sample}
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k or 0)
    limit = _positions(model)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True, **settings
    )
    room = None if limit is None else max(limit - max_new_tokens, limit // 2)  # prompt tokens kept at most
    contexts = [encode_prompt(tokenizer, p, separator) for p in prompts]
    contexts = [ids if room is None else ids[max(0, len(ids) - room) :] for ids in contexts]
    order = sorted(range(len(prompts)), key=lambda i: len(contexts[i]))  # similar lengths: little padding
    texts: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode():
        torch.manual_seed(seed)
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            ids, mask = _left_pad([contexts[i] for i in rows], pad)
            new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - ids.shape[1])
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_config,
                max_new_tokens=new_tokens,
            )
            for row, new in zip(rows, out[:, ids.shape[1] :].tolist(), strict=True):
                texts[row] = _finish(tokenizer, new, set(stops), stop_at)
    seconds = time.perf_counter() - start
    model.train(was_training)
    rate = len(prompts) / seconds if seconds > 0 else float("inf")
    log.info("decoded %d prompts in %.1f s (%.1f prompts/s, batch %d)", len(prompts), seconds, rate, batch_size)
    return texts, rate


def reference_loss(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    references: Sequence[str],
    *,
    block_size: int,
    batch_size: int = 32,
    separator: str = DEFAULT_SEPARATOR,
) -> ReferenceLoss:
    """Mean loss and perplexity of the reference completions (and eos) given their prompts.

    Prompts too long for the block are cut from the left; pairs whose completion cannot fit are left out.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompts: Prompt texts.
        references: Reference completions.
        block_size: Longest example in tokens.
        batch_size: Examples per forward pass.
        separator: Text between prompt and completion, as in training.

    Returns:
        The scores.

    Raises:
        ValueError: If no pair fits the block.
    """
    encoded = encode_pairs(
        tokenizer, prompts, references, block_size=block_size, separator=separator, overflow="truncate_left"
    )
    if not len(encoded):
        raise ValueError(f"no reference completion fits a block of {block_size} tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for batch in pair_batches(encoded, batch_size, int(pad)):
            loss, n = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
            total += float(loss) * n
            tokens += n
    model.train(was_training)
    mean = total / tokens
    return ReferenceLoss(loss=mean, perplexity=math.exp(mean), tokens=tokens, pairs=len(encoded))


def newline_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every token whose text holds a newline (cached on the tokenizer).

    Args:
        tokenizer: Any tokenizer.

    Returns:
        Sorted ids.
    """
    cached = tokenizer.__dict__.get(_NEWLINE_IDS_ATTR)
    if cached is None:
        special = set(tokenizer.all_special_ids)
        cached = [i for i in range(len(tokenizer)) if i not in special and "\n" in tokenizer.decode([i])]
        tokenizer.__dict__[_NEWLINE_IDS_ATTR] = cached
    return cached


def _positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _finish(tokenizer: PreTrainedTokenizerBase, new: list[int], stops: set[int], stop_at: str) -> str:
    """The text of the new tokens up to the first stop token (a newline token's text before its newline)."""
    end = next((k for k, t in enumerate(new) if t in stops), len(new))
    keep = new[: end + 1] if end < len(new) and new[end] != tokenizer.eos_token_id else new[:end]
    text = tokenizer.decode(keep, skip_special_tokens=True)
    return text.split("\n", 1)[0] if stop_at == "newline" else text
