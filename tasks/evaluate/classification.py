"""The evaluate stage for ``task.kind: classification``: the trained classifier on the test split, and a baseline.

The model folder is a ``save_pretrained`` sequence classifier with its tokenizer; its ``id2label`` names the
classes. Records are scored in batches padded to their longest member and truncated at the block size (the
records are sorted by length first, so little padding is wasted), under ``torch.inference_mode``. The
figures come from :mod:`forgeline.tasks.evaluate.class_metrics`; the TF-IDF baseline
(:mod:`forgeline.tasks.evaluate.baseline`) is trained on the training split and scored on the same records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from forgeline.tasks.config import EvalConfig
from forgeline.tasks.data.cleaning import load_split
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.evaluate.baseline import baseline_scores
from forgeline.tasks.evaluate.class_metrics import (
    confident_mistakes,
    confusion_counts,
    per_class_rows,
    score_predictions,
    write_confusion_png,
)

logger = logging.getLogger(__name__)

CONFUSION_PNG = "confusion_matrix.png"
MISTAKES_SHOWN = 20


class ClassificationEvalResult(BaseModel):
    """Scores of one classifier on the test split, beside the baseline's."""

    metrics: dict[str, float]
    """``test/accuracy``, ``test/{precision,recall,f1}_{macro,weighted}``, ``test/loss`` and ``baseline/...``."""
    per_class: list[dict[str, Any]]
    """Rows ``{"label", "precision", "recall", "f1", "support"}``, one per class of the model."""
    mistakes: list[dict[str, Any]]
    """The most confident mistakes: ``{"text" (shortened), "true", "predicted", "score"}``, surest first."""
    confusion: list[list[int]]
    """Counts, row = true class, column = predicted class, in ``labels`` order."""
    confusion_png: str
    """The confusion matrix drawn as counts and row-normalized."""
    labels: list[str]
    """Class names by id, from the model's ``id2label``."""
    examples: int
    """Test records scored."""


def eval_device(requested: str = "auto") -> str:
    """``cuda`` when asked for or available (``auto``), else ``cpu`` (``train.device``'s values)."""
    import torch

    if requested == "cpu":
        return "cpu"
    return "cuda" if requested == "cuda" or torch.cuda.is_available() else "cpu"


def evaluate_classifier(
    model_dir: str | Path,
    dataset_dir: str | Path,
    cfg: EvalConfig,
    *,
    block_size: int,
    batch_size: int,
    device: str,
    out_dir: Path,
) -> ClassificationEvalResult:
    """Score a saved classifier on the test split (validation if there is none) and fit the baseline.

    Args:
        model_dir: A ``save_pretrained`` sequence classifier and its tokenizer.
        dataset_dir: The cleaned dataset: ``train``/``test`` splits with ``text`` and ``label`` columns.
        cfg: Evaluation settings (``max_examples`` caps the test records, the first ones in stored order).
        block_size: Tokens per record at most (also capped by the model's positions).
        batch_size: Records per forward pass.
        device: ``cpu`` or ``cuda``.
        out_dir: Where the confusion-matrix PNG is written.

    Returns:
        The metrics, the per-class table, the most confident mistakes and the confusion matrix.

    Raises:
        DataError: A test label the model does not know, or an empty test split.
    """
    scored = _score(model_dir, dataset_dir, cfg, block_size=block_size, batch_size=batch_size, device=device)
    texts, names, labels = scored.texts, scored.names, scored.labels
    y_true, y_pred = scored.y_true.tolist(), scored.y_pred.tolist()
    metrics = dict(scored.metrics)
    train_texts, train_names = _records(dataset_dir, "train", None)
    metrics |= baseline_scores(train_texts, train_names, texts, names).metrics
    counts = confusion_counts(y_true, y_pred, len(labels))
    png = write_confusion_png(counts, labels, Path(out_dir) / CONFUSION_PNG)
    result = ClassificationEvalResult(
        metrics=metrics,
        per_class=per_class_rows(y_true, y_pred, labels),
        mistakes=confident_mistakes(
            texts, y_true, y_pred, scored.probs.max(axis=1).tolist(), labels, limit=MISTAKES_SHOWN
        ),
        confusion=counts.tolist(),
        confusion_png=str(png),
        labels=labels,
        examples=len(texts),
    )
    logger.info(
        "eval: accuracy %.4f, macro F1 %.4f, weighted F1 %.4f over %d records (baseline weighted F1 %.4f)",
        metrics["test/accuracy"],
        metrics["test/f1_macro"],
        metrics["test/f1_weighted"],
        len(texts),
        metrics["baseline/f1_weighted"],
    )
    return result


def score_classifier(
    model_dir: str | Path,
    dataset_dir: str | Path,
    cfg: EvalConfig,
    *,
    block_size: int,
    batch_size: int,
    device: str,
) -> dict[str, float]:
    """The model's own ``test/...`` metrics on the held-out split: no baseline, no tables, no files.

    What re-scoring a registered model needs (the champion gate on changed data); the same records and
    code as :func:`evaluate_classifier`, so the two agree. Arguments as there.
    """
    scored = _score(model_dir, dataset_dir, cfg, block_size=block_size, batch_size=batch_size, device=device)
    return scored.metrics


def load_classifier(model_dir: str | Path) -> tuple[Any, Any]:
    """A saved sequence classifier (safetensors only, no remote code) and its tokenizer, with a padding token."""
    from transformers import AutoModelForSequenceClassification

    from forgeline.tasks.data.tokenization import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), use_safetensors=True, trust_remote_code=False
    )
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has neither a padding nor an end-of-text token")
    if model.config.pad_token_id is None:  # GPT-2 pools at the last token that is not padding: it must know which
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def predict_logits(
    model: Any, tokenizer: Any, texts: list[str], *, block_size: int, batch_size: int, device: str
) -> np.ndarray:
    """The model's class logits for each text, ``(len(texts), num_labels)`` float32, in the texts' order.

    Each text is encoded as training encodes it (truncated at ``block_size`` tokens, or the model's positions
    if fewer; an empty text as the end-of-text token), batches are right-padded to their longest record. The
    model is moved to ``device`` and left in eval mode.
    """
    import torch

    if block_size < 1 or batch_size < 1:
        raise ValueError("block_size and batch_size must be positive")
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    max_length = min(block_size, limit) if isinstance(limit, int) else block_size
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"] if texts else []
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = [list(row) if len(row) else [fallback] for row in encoded]  # one position to pool, even for ""
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    model.to(device).eval()
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: little padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            x = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                x[j, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                mask[j, : len(ids[i])] = 1
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits  # (B, classes)
            out[rows] = logits.float().cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------- private
@dataclass
class _Scored:
    texts: list[str]
    names: list[str]  # true label names
    labels: list[str]  # class names by id, from the model
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray  # (records, classes)
    metrics: dict[str, float]  # test/...


def _score(
    model_dir: str | Path, dataset_dir: str | Path, cfg: EvalConfig, *, block_size: int, batch_size: int, device: str
) -> _Scored:
    model, tokenizer = load_classifier(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    label2id = {name: i for i, name in enumerate(labels)}
    texts, names = _records(dataset_dir, _held_out_split(dataset_dir), cfg.max_examples)
    unknown = sorted(set(names) - set(label2id))
    if unknown:
        raise DataError(f"test label(s) the model was not trained on: {', '.join(map(repr, unknown[:5]))}")
    y_true = np.array([label2id[n] for n in names], dtype=np.int64)
    logits = predict_logits(model, tokenizer, texts, block_size=block_size, batch_size=batch_size, device=device)
    log_probs = _log_softmax(logits)
    probs = np.exp(log_probs)
    y_pred = probs.argmax(axis=1)
    metrics = {f"test/{k}": v for k, v in score_predictions(y_true.tolist(), y_pred.tolist()).items()}
    metrics["test/loss"] = float(-log_probs[np.arange(len(y_true)), y_true].mean())  # mean nats per record
    return _Scored(texts, names, labels, y_true, y_pred, probs, metrics)


def _held_out_split(dataset_dir: str | Path) -> str:
    if (Path(dataset_dir) / "test").is_dir() and len(load_split(dataset_dir, "test")):
        return "test"
    logger.warning("no test split (data.fractions.test = 0): evaluating on the validation split")
    return "validation"


def _records(dataset_dir: str | Path, split: str, cap: int | None) -> tuple[list[str], list[str]]:
    data = load_split(dataset_dir, split)
    if cap is not None:
        data = data.select(range(min(cap, len(data))))
    if not len(data):
        raise DataError(f"{dataset_dir}: the {split} split holds no records to evaluate")
    missing = {"text", "label"} - set(data.column_names)
    if missing:
        raise DataError(f"{dataset_dir}/{split}: no {', '.join(sorted(missing))} column (found {data.column_names})")
    return list(data["text"]), [str(label) for label in data["label"]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
