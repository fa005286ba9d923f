"""Compressing a completion model: distillation on prompt/completion pairs, and its side of the trade-off table.

The student learns from the teacher on the training pairs encoded as the completion task trains them
(:func:`forgeline.tasks.train.completion.encode_pairs`: ``prompt + "\\n" + completion + eos``), with the
distillation loss (:func:`~.distill.distillation_loss`) on the completion tokens only: the positions the
teacher was trained and is served on. Random windows of the joined ``text`` column would cut pairs apart and
spend the steps on prompts. Batches are :func:`~forgeline.tasks.train.completion.pair_batches`', one seeded
shuffle per epoch, so a resumed run draws the same batches.

The table's speed is the LM's (generation tokens per second and latency, :func:`.measure.time_generation`) and
its task metric is ``test/rougeL`` (higher is better), both models scored by
:func:`forgeline.tasks.evaluate.completion.evaluate_completion` on the same test pairs (``eval.max_examples``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks.compress.distill import (
    DistillSettings,
    DistillState,
    OnMetrics,
    run_distillation,
    start_distillation,
)
from forgeline.tasks.compress.measure import GenerationMeasure, footprint, time_generation
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.train.completion import IGNORE_INDEX, EncodedPairs, completion_loss, pair_batches

logger = logging.getLogger(__name__)

METRIC = "rougeL"
"""The completion task metric in the table (``test/rougeL``, the completion gate metric; higher is better)."""
VAL_BATCHES = 20
"""Validation batches (in order) scored at each evaluation: enough for a trend, cheap next to the steps."""


class CompletionMeasure(GenerationMeasure):
    """One completion model's side of the trade-off table."""

    rougeL: float  # noqa: N815 - the metric's own name (test/rougeL)
    bleu: float
    exact_match: float


def encode_split_pairs(tokenizer: Any, dataset_dir: str | Path, split: str, task: PipelineConfig) -> EncodedPairs:
    """A split's pairs encoded as completion training encodes them (loss on the completion)."""
    from forgeline.tasks.train.complete import load_pairs
    from forgeline.tasks.train.completion import encode_pairs

    prompts, completions = load_pairs(dataset_dir, split)
    return encode_pairs(
        tokenizer,
        prompts,
        completions,
        block_size=task.model.block_size,
        loss_on="completion",
        overflow=task.data.prompt_overflow,
    )


def distill_pairs(
    student: Any,
    teacher: Any,
    train: EncodedPairs,
    val: EncodedPairs,
    settings: DistillSettings,
    checkpoint_dir: Path,
    *,
    pad_id: int,
    device: torch.device,
    on_metrics: OnMetrics | None = None,
) -> DistillState:
    """Train the causal LM ``student`` against ``teacher`` on completion tokens for ``max_steps`` steps, resuming.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite losses in a row.
        StageInterrupted: SIGTERM or Ctrl-C (a checkpoint is written first).
    """
    if not len(train):
        raise ValueError("no training pair fits model.block_size: nothing to distil on")
    cfg = settings.train
    optimizer, state = start_distillation(
        student, teacher, settings, checkpoint_dir, device=device, what="completion distillation"
    )
    val_batches = pair_batches(val, cfg.batch_size, pad_id)[:VAL_BATCHES] if len(val) else []
    epochs: dict[int, list[dict[str, torch.Tensor]]] = {}

    def forward(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = _batch(train, epochs, index, cfg.batch_size, pad_id, settings.seed)
        x, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        # Position t predicts label t+1 (HF shifts inside); keep the positions whose next label is a target.
        keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
        with torch.no_grad():
            t_logits = teacher(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
        s_logits = student(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
        return s_logits, t_logits, labels[:, 1:][keep]

    def validate() -> dict[str, float]:
        return {"val/loss": _val_loss(student, val_batches, device)}

    check = validate if val_batches else None  # no validation pair fits: no val/loss

    return run_distillation(
        student, optimizer, state, settings, checkpoint_dir, forward, check, on_metrics, device=device, log_parts=False
    )


def _batch(
    train: EncodedPairs,
    epochs: dict[int, list[dict[str, torch.Tensor]]],
    index: int,
    batch_size: int,
    pad_id: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    n = math.ceil(len(train) / batch_size)
    epoch = index // n
    if epoch not in epochs:
        epochs.clear()  # one epoch's batches held at a time
        epochs[epoch] = pair_batches(train, batch_size, pad_id, seed=seed + epoch)
    return epochs[epoch][index % n]


@torch.no_grad()
def _val_loss(model: Any, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, n = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss) * n, count + n
    model.train()
    return total / max(count, 1)


def measure_completions(
    sources: list[str],
    models: list[Any],
    tokenizer: Any,
    dataset_dir: str | Path,
    task: PipelineConfig,
    *,
    new_tokens: int,
    requests: int,
    fetch: Callable[[str, Path], Path] | None,
) -> list[CompletionMeasure]:
    """Size, generation speed (CPU, batch 1, interleaved) and test ROUGE-L/BLEU/exact match of each model.

    ``sources`` are the models as :func:`~forgeline.tasks.evaluate.completion.evaluate_completion` loads them
    (a registry URI or folder), aligned with ``models`` (the same weights, timed and sized here).
    """
    from forgeline.tasks.evaluate.completion import evaluate_completion
    from forgeline.tasks.train.complete import load_pairs
    from forgeline.tasks.train.completion import encode_prompt

    models = [m.to("cpu") for m in models]
    prompts, _ = load_pairs(dataset_dir, "test") if (Path(dataset_dir) / "test").is_dir() else ([], [])
    prompt_ids = torch.tensor(encode_prompt(tokenizer, prompts[0] if prompts else ""), dtype=torch.long)
    timings = time_generation(models, prompt_ids, new_tokens=new_tokens, requests=requests)
    out = []
    for source, model, (rate, p50, p95) in zip(sources, models, timings, strict=True):
        scores = evaluate_completion(source, dataset_dir, task, fetch=fetch).metrics
        out.append(
            CompletionMeasure(
                parameters=sum(p.numel() for p in model.parameters()),
                **footprint(model),
                tokens_per_sec=rate,
                latency_p50_ms=p50,
                latency_p95_ms=p95,
                rougeL=scores["test/rougeL"],
                bleu=scores["test/bleu"],
                exact_match=scores["test/exact_match"],
            )
        )
    return out
