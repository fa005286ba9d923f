"""The classification loop's data: encoded splits, epoch batches, class weights, validation metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forgeline.tasks.config import TrainConfig
from forgeline.tasks.data.labels import LabelSet
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.train.batches import autocast_context

VAL_METRICS = ("val/loss", "val/accuracy", "val/f1_macro")


@dataclass
class LabeledSplit:
    """One split, tokenized: each record's ids (truncated at the context) and its class id."""

    ids: list[list[int]]
    labels: torch.Tensor  # (N,) int64
    _orders: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        """Tokens in the split (after truncation)."""
        return sum(len(x) for x in self.ids)


def encode_split(
    tokenizer: Any, dataset_dir: str | Path, split: str, label_set: LabelSet, block_size: int
) -> LabeledSplit:
    """Tokenize a split's ``text`` (truncated at ``block_size`` tokens) and map its ``label`` to class ids.

    Raises:
        DataError: The split is empty, lacks ``text``/``label``, or holds a label the training split lacks.
    """
    from forgeline.tasks.data.cleaning import load_split

    ds = load_split(dataset_dir, split)
    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{dataset_dir}/{split}: no {' or '.join(missing)} column (found: {', '.join(ds.column_names)})"
        )
    if len(ds) == 0:
        raise DataError(f"{dataset_dir}/{split}: no records")
    label2id = label_set.label2id
    labels = [str(v) for v in ds["label"]]
    unknown = sorted({v for v in labels if v not in label2id})
    if unknown:
        raise DataError(f"{dataset_dir}/{split}: label {unknown[0]!r} is not in the training split's labels")
    encoded = tokenizer(list(ds["text"]), truncation=True, max_length=block_size)["input_ids"]
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    ids = [list(x) if len(x) else [fallback] for x in encoded]  # an empty text still needs one position to pool
    return LabeledSplit(ids=ids, labels=torch.tensor([label2id[v] for v in labels], dtype=torch.long))


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimizer steps: ``train.epochs`` passes over ``n_train`` records capped by ``max_steps``, else ``max_steps``."""
    if cfg.epochs is None:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum_steps
    return max(1, min(cfg.max_steps, math.ceil(cfg.epochs * n_train / per_step)))


def batch_indices(split: LabeledSplit, batch_size: int, micro_index: int, seed: int) -> list[int]:
    """Records of micro-batch ``micro_index``: a seeded shuffle per epoch, read in order, across epochs.

    A function of its arguments alone, so a resumed run draws exactly the batches an uninterrupted one would.
    """
    n = len(split)
    out = []
    for pos in range(micro_index * batch_size, (micro_index + 1) * batch_size):
        epoch, offset = divmod(pos, n)
        order = split._orders.get(epoch)
        if order is None:
            split._orders.clear()  # one epoch (rarely two) in use at a time
            order = split._orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(order[offset]))
    return out


def collate(split: LabeledSplit, index: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs ``(B, T)``, attention mask ``(B, T)`` and labels ``(B,)``, right-padded to the longest record."""
    rows = [split.ids[i] for i in index]
    width = max(len(r) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        x[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return x, mask, split.labels[index]


def class_weights(kind: str, labels: torch.Tensor, num_labels: int) -> torch.Tensor | None:
    """``balanced``: ``n / (classes * count)`` per class (scikit-learn's formula); ``none``: ``None``."""
    if kind == "none":
        return None
    counts = torch.bincount(labels, minlength=num_labels).float()
    weights = len(labels) / (num_labels * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def classify_loss(
    model: Any, x: torch.Tensor, mask: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean (optionally class-weighted) cross-entropy of the model's logits ``(B, classes)`` against ``y``."""
    logits = model(input_ids=x, attention_mask=mask).logits
    return F.cross_entropy(logits.float(), y, weight=weight)


@torch.no_grad()
def evaluate_split(
    model: Any, split: LabeledSplit, pad_id: int, device: torch.device, cfg: TrainConfig
) -> dict[str, float]:
    """``val/loss`` (unweighted cross-entropy), ``val/accuracy`` and ``val/f1_macro`` on every record of a split."""
    from sklearn.metrics import accuracy_score, f1_score

    was_training = model.training
    model.eval()
    total, preds = 0.0, []
    for start in range(0, len(split), cfg.batch_size):
        index = list(range(start, min(start + cfg.batch_size, len(split))))
        x, mask, y = collate(split, index, pad_id)
        with autocast_context(device, cfg):
            logits = model(input_ids=x.to(device), attention_mask=mask.to(device)).logits.float()
        total += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
    model.train(was_training)
    truth, pred = split.labels.numpy(), torch.cat(preds).numpy()
    return {
        "val/loss": total / len(split),
        "val/accuracy": float(accuracy_score(truth, pred)),
        "val/f1_macro": float(f1_score(truth, pred, average="macro", zero_division=0)),
    }
