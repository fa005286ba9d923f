"""Training examples for prompt -> completion: ``prompt + separator + completion + eos``, loss on the completion.

Each part is tokenized on its own and the ids are joined, so the boundary between prompt and completion is
exact for any tokenizer, and decoding (which feeds :func:`encode_prompt`'s ids) sees the very ids training saw.
Labels are ``-100`` (ignored by the loss) on the prompt and separator when the loss is on the completion, and
on padding always; HF causal LMs shift labels inside the model, so the first completion token is predicted
from the last separator token. A completion is never cut: one that cannot fit the block with at least one
prompt token is dropped and counted, as is an empty one; a prompt too long for the block is dropped or cut
from the left.

Training batches are padded per batch (on the right), examples of similar length batched together
(:func:`pair_batches`): on 5k docstring pairs with a tiny GPT-2 on CPU this moved about 7% more completion tokens
per second than packing whole examples into rows (:func:`pack_batches`, kept for comparison) and twice as many
as padding random batches (BENCHMARKS.md, section 9).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position the loss skips (PyTorch's cross-entropy default)."""
GROUP_BATCHES = 50
"""Batches per window sorted by length in :func:`pair_batches` (enough to find neighbours, few enough to mix)."""
DEFAULT_SEPARATOR = "\n"
"""Text between prompt and completion: a newline, so that a one-line completion follows its prompt on a new line."""


@dataclass
class EncodedPairs:
    """Token ids and labels of the pairs that fit, and counts of those that did not."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    """Index in the input of each encoded example."""
    prompt_too_long: int = 0
    """Dropped: the prompt left no room for the completion (``overflow="drop"``)."""
    truncated_prompts: int = 0
    """Kept with the prompt cut from the left (``overflow="truncate_left"``)."""
    completion_too_long: int = 0
    """Dropped: completion + separator + eos alone leave no room for a single prompt token (never cut)."""
    empty_completions: int = 0
    """Dropped: the completion is empty or whitespace (nothing to learn but eos)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def dropped(self) -> int:
        """All pairs left out."""
        return self.prompt_too_long + self.completion_too_long + self.empty_completions

    def example(self, i: int) -> dict[str, list[int]]:
        """Example ``i`` as :func:`collate_pairs` takes it."""
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, separator: str = DEFAULT_SEPARATOR) -> list[int]:
    """The ids a completion follows: the prompt's, then the separator's (tokenized apart, as in training).

    Args:
        tokenizer: The model's tokenizer.
        prompt: Prompt text.
        separator: Text between prompt and completion.

    Returns:
        Token ids, without special tokens.
    """
    return _ids(tokenizer, [prompt])[0] + _ids(tokenizer, [separator])[0]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    block_size: int,
    separator: str = DEFAULT_SEPARATOR,
    loss_on: Literal["completion", "all"] = "completion",
    overflow: Literal["drop", "truncate_left"] = "drop",
) -> EncodedPairs:
    """Encode prompt/completion pairs as training examples of at most ``block_size`` tokens.

    Args:
        tokenizer: The model's tokenizer; it must have an eos token.
        prompts: Prompt texts.
        completions: Completion texts, aligned with ``prompts``.
        block_size: Longest example in tokens (the model's context).
        separator: Text between prompt and completion.
        loss_on: ``completion``: labels only on completion tokens and eos; ``all``: on every real token.
        overflow: A prompt too long for the block is dropped (``drop``) or cut from the left (``truncate_left``).

    Returns:
        The examples that fit, their indices in the input, and the counts of those dropped or cut.

    Raises:
        ValueError: If the lists differ in length, the tokenizer has no eos token, or an option is unknown.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: a completion could never end")
    if loss_on not in ("completion", "all") or overflow not in ("drop", "truncate_left"):
        raise ValueError(f"unknown loss_on {loss_on!r} or overflow {overflow!r}")
    eos = int(tokenizer.eos_token_id)
    sep = _ids(tokenizer, [separator])[0]
    out = EncodedPairs()
    for i, (prompt, completion) in enumerate(zip(_ids(tokenizer, prompts), _ids(tokenizer, completions), strict=True)):
        if not completions[i].strip():
            out.empty_completions += 1
            continue
        target = completion + [eos]
        room = block_size - len(sep) - len(target)  # tokens left for the prompt
        if room < 1:
            out.completion_too_long += 1
            continue
        if len(prompt) > room:
            if overflow == "drop":
                out.prompt_too_long += 1
                continue
            prompt = prompt[len(prompt) - room :]
            out.truncated_prompts += 1
        context = prompt + sep
        out.input_ids.append(context + target)
        out.labels.append((context if loss_on == "all" else [IGNORE_INDEX] * len(context)) + target)
        out.kept.append(i)
    if out.dropped or out.truncated_prompts:
        log.info(
            "encoded %d of %d pairs: %d prompts too long (dropped), %d cut from the left, %d completions too long, "
            "%d empty",
            len(out),
            len(prompts),
            out.prompt_too_long,
            out.truncated_prompts,
            out.completion_too_long,
            out.empty_completions,
        )
    return out


def collate_pairs(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest example.

    Args:
        examples: ``{"input_ids", "labels"}`` per example (:meth:`EncodedPairs.example`).
        pad_id: Id written into padding (its label is ``-100`` and its attention mask 0).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each ``(B, T)`` with ``T`` the longest example.
    """
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair_batches(
    encoded: EncodedPairs,
    batch_size: int,
    pad_id: int,
    *,
    seed: int | None = None,
    group_by_length: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """All examples in padded batches, one epoch's worth.

    With ``seed``, examples are shuffled; with ``group_by_length`` too, each window of ``GROUP_BATCHES`` batches
    is sorted by length before it is cut into batches, and the batches are shuffled again: batches hold examples
    of similar length (little padding) yet come in random order.

    Args:
        encoded: What :func:`encode_pairs` returned.
        batch_size: Examples per batch (the last may hold fewer).
        pad_id: Padding id.
        seed: Shuffle seed; None keeps the input order (evaluation).
        group_by_length: Group examples of similar length (only when shuffling).

    Returns:
        Collated batches.
    """
    order = list(range(len(encoded)))
    if seed is None:
        groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    else:
        gen = torch.Generator().manual_seed(seed)
        order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
        if group_by_length:
            window = batch_size * GROUP_BATCHES
            order = [
                i
                for start in range(0, len(order), window)
                for i in sorted(order[start : start + window], key=lambda i: len(encoded.input_ids[i]))
            ]
        groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        if group_by_length:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
    return [collate_pairs([encoded.example(i) for i in group], pad_id) for group in groups]


def pack_batches(
    encoded: EncodedPairs, block_size: int, rows: int, pad_id: int, *, seed: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """All examples laid end to end in rows of ``block_size`` tokens, each example whole and kept apart.

    Examples fill a row in (shuffled) order until the next does not fit; the row's tail is padding. Position ids
    restart at 0 for every example and no attention mask is given, from which transformers builds a
    block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``): no example sees another, and
    each sees the positions it would see alone. The first label of every example is ignored: it would otherwise
    be predicted from the end of the example before.

    Args:
        encoded: What :func:`encode_pairs` returned (every example is at most ``block_size`` tokens).
        block_size: Row length.
        rows: Rows per batch.
        pad_id: Padding id.
        seed: Shuffle seed; None keeps the input order.

    Returns:
        Batches of ``input_ids``, ``position_ids`` and ``labels``, each ``(rows, block_size)`` (the last may hold
        fewer rows).
    """
    order = list(range(len(encoded)))
    if seed is not None:
        order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    packed: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for i in order:
        example = encoded.input_ids[i]
        if len(ids) + len(example) > block_size:
            packed.append((ids, pos, labels))
            ids, pos, labels = [], [], []
        ids += example
        pos += range(len(example))
        labels += [IGNORE_INDEX] + encoded.labels[i][1:]
    if ids:
        packed.append((ids, pos, labels))
    batches = []
    for start in range(0, len(packed), rows):
        chunk = packed[start : start + rows]
        batch = {
            "input_ids": torch.full((len(chunk), block_size), pad_id, dtype=torch.long),
            "position_ids": torch.zeros((len(chunk), block_size), dtype=torch.long),
            "labels": torch.full((len(chunk), block_size), IGNORE_INDEX, dtype=torch.long),
        }
        for r, (row_ids, row_pos, row_labels) in enumerate(chunk):
            n = len(row_ids)
            batch["input_ids"][r, :n] = torch.tensor(row_ids)
            batch["position_ids"][r, :n] = torch.tensor(row_pos)
            batch["position_ids"][r, n:] = torch.arange(block_size - n)  # the padding tail: a sequence of its own
            batch["labels"][r, :n] = torch.tensor(row_labels)
        batches.append(batch)
    return batches


def completion_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the labelled tokens of a batch, and how many tokens it averaged over.

    Args:
        model: A causal LM (shifts ``labels`` inside, ignoring ``-100``).
        batch: A :func:`collate_pairs` or :func:`pack_batches` batch on the model's device.

    Returns:
        ``(loss, target tokens)``; weight by the count to average over several batches exactly.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, labels=batch["labels"], use_cache=False)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return out.loss, targets


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
