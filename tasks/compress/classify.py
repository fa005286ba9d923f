"""Compressing a sequence classifier: distillation on labeled records, and its side of the trade-off table.

The loss is :func:`~.distill.distillation_loss` on class logits: ``alpha_kd * T^2 * KL`` between the softened
class distributions of teacher and student plus ``alpha_ce`` times the cross-entropy against the labels.
Batches are the classification loop's (a seeded shuffle per epoch, right-padded, last-token pooling).

Teacher logits are cached: the teacher runs once over the training split (in eval mode, so a record's logits
do not depend on the step that draws it) and each step reads its records' rows, ``(records, classes)`` floats.
Classification data is small and every epoch revisits the same records, so the cache replaces
``steps * batch_size`` teacher forwards by one pass (BENCHMARKS.md section 8 has the measurement).

Classifiers do not generate: the table's speed is records per second and the latency of one classification
request (batch 1, one forward pass), and the task metric is ``test/f1_macro`` (higher is better).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from forgeline.tasks.compress.distill import (
    DistillSettings,
    DistillState,
    OnMetrics,
    run_distillation,
    start_distillation,
)
from forgeline.tasks.compress.measure import footprint
from forgeline.tasks.train.classify_data import LabeledSplit, batch_indices, collate, evaluate_split

logger = logging.getLogger(__name__)

METRIC = "f1_macro"
"""The classifier's task metric in the table (``test/f1_macro``, the classification gate metric; higher is better)."""


class ClassifierMeasure(BaseModel):
    """One classifier's side of the trade-off table."""

    parameters: int
    non_embedding_parameters: int
    n_layer: int
    n_inner: int
    bytes_on_disk: int
    records_per_sec: float
    """Classification requests answered per second, one record each (batch 1): in place of tokens/s."""
    latency_p50_ms: float
    latency_p95_ms: float
    f1_macro: float
    accuracy: float


@torch.no_grad()
def teacher_logits(
    teacher: Any, split: LabeledSplit, pad_id: int, device: torch.device, batch_size: int
) -> torch.Tensor:
    """The teacher's class logits of every record of ``split``, in order, ``(records, classes)`` float32 on CPU."""
    teacher.eval()
    rows = []
    for start in range(0, len(split), batch_size):
        index = list(range(start, min(start + batch_size, len(split))))
        x, mask, _ = collate(split, index, pad_id)
        rows.append(teacher(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float().cpu())
    return torch.cat(rows)


def distill_classifier(
    student: Any,
    teacher: Any,
    train: LabeledSplit,
    val: LabeledSplit,
    settings: DistillSettings,
    checkpoint_dir: Path,
    *,
    pad_id: int,
    device: torch.device,
    on_metrics: OnMetrics | None = None,
    cache: bool = True,
) -> DistillState:
    """Train the classifier ``student`` against ``teacher`` for ``settings.train.max_steps`` steps, resuming.

    Args:
        student: A ``GPT2ForSequenceClassification`` with the teacher's labels.
        teacher: The teacher classifier (not trained).
        train: The encoded training split (``batch_indices`` shuffles it per epoch).
        val: The encoded validation split (``val/loss``, ``val/accuracy``, ``val/f1_macro`` at each evaluation).
        settings: Loop settings; ``block_size`` is unused (records are truncated when encoded).
        checkpoint_dir: Checkpoints of this compression; a re-run resumes the latest.
        pad_id: The padding id both models pool around.
        device: Where both models are.
        on_metrics: Per-step metrics.
        cache: Teacher logits computed once for the whole split (True) or per batch under ``no_grad``.

    Raises:
        NonFiniteLossError: ``train.max_nonfinite_steps`` non-finite losses in a row.
        StageInterrupted: SIGTERM or Ctrl-C (a checkpoint is written first).
    """
    cfg = settings.train
    optimizer, state = start_distillation(
        student, teacher, settings, checkpoint_dir, device=device, what="classifier distillation"
    )
    cached = teacher_logits(teacher, train, pad_id, device, cfg.batch_size) if cache else None

    def forward(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        records = batch_indices(train, cfg.batch_size, index, settings.seed)
        x, mask, y = collate(train, records, pad_id)
        x, mask, y = x.to(device), mask.to(device), y.to(device)
        if cached is not None:
            t_logits = cached[records].to(device)  # (B, classes)
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=x, attention_mask=mask).logits
        return student(input_ids=x, attention_mask=mask).logits, t_logits, y

    def validate() -> dict[str, float]:
        return evaluate_split(student, val, pad_id, device, cfg)

    return run_distillation(
        student,
        optimizer,
        state,
        settings,
        checkpoint_dir,
        forward,
        validate,
        on_metrics,
        device=device,
        fault_point=False,
    )


@torch.inference_mode()
def time_requests(
    models: list[Any], tokenizer: Any, texts: list[str], *, block_size: int, requests: int
) -> list[tuple[float, float, float]]:
    """Records per second and latency p50/p95 (ms) of ``requests`` single-record classifications per model.

    Each request is one text (cycling through ``texts``), tokenized and classified in one forward pass on CPU,
    as a server answers it. The models take turns request by request, after one untimed warm-up each.
    """
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model.eval()
        _classify_one(model, tokenizer, texts[0], block_size)
    for r in range(requests):
        text = texts[r % len(texts)]
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            _classify_one(model, tokenizer, text, block_size)
            times[i].append(time.perf_counter() - t0)
    out = []
    for ts in times:
        ms = sorted(t * 1000 for t in ts)
        p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]
        out.append((requests / sum(ts), statistics.median(ms), p95))
    return out


def measure_classifiers(
    models: list[Any],
    tokenizer: Any,
    dataset_dir: str | Path,
    *,
    block_size: int,
    max_examples: int | None,
    requests: int,
) -> list[ClassifierMeasure]:
    """Size, request speed and test macro F1 / accuracy of each classifier, on CPU, timed interleaved.

    The scores are :func:`forgeline.tasks.evaluate.classification.predict_logits` on the evaluate stage's
    held-out records (test, else validation; the first ``max_examples``), so they match ``forgeline run``'s.
    """
    from forgeline.tasks.data.cleaning import load_split
    from forgeline.tasks.evaluate.class_metrics import score_predictions
    from forgeline.tasks.evaluate.classification import _held_out_split, predict_logits

    models = [m.to("cpu") for m in models]
    data = load_split(dataset_dir, _held_out_split(dataset_dir))
    if max_examples is not None:
        data = data.select(range(min(max_examples, len(data))))
    texts, names = list(data["text"]), [str(v) for v in data["label"]]
    timings = time_requests(models, tokenizer, texts, block_size=block_size, requests=requests)
    out = []
    for model, (rate, p50, p95) in zip(models, timings, strict=True):
        id2label = model.config.id2label
        logits = predict_logits(model, tokenizer, texts, block_size=block_size, batch_size=16, device="cpu")
        predicted = [str(id2label[int(i)]) for i in logits.argmax(axis=1)]
        scores = score_predictions(names, predicted)
        out.append(
            ClassifierMeasure(
                parameters=sum(p.numel() for p in model.parameters()),
                **footprint(model),
                records_per_sec=rate,
                latency_p50_ms=p50,
                latency_p95_ms=p95,
                f1_macro=scores["f1_macro"],
                accuracy=scores["accuracy"],
            )
        )
    return out


def _classify_one(model: Any, tokenizer: Any, text: str, block_size: int) -> int:
    limit = int(getattr(model.config, "n_positions", block_size))
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = tokenizer(text, truncation=True, max_length=min(block_size, limit))["input_ids"] or [fallback]
    x = torch.tensor([ids], dtype=torch.long)
    return int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits.argmax(-1))
