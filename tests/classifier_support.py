"""Tiny labeled data and a tiny classifier folder, shared by the classification tests (issue 16).

They stand in for what the data and train stages produce, so the evaluation, registry and serving tests
need neither a data stage nor a training run: ``make_labeled_rows`` writes a small, learnable labeled set;
``make_tiny_classifier`` saves an untrained GPT-2 sequence classifier the way the train stage does
(``save_pretrained`` of model and tokenizer, ``id2label``/``label2id`` from the label set, a pad token).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from transformers import GPT2Config, GPT2ForSequenceClassification

from forgeline.tasks.config import TokenizerConfig
from forgeline.tasks.data.tokenization import build_tokenizer

TOPICS = {
    "vision": ["image", "pixels", "segmentation", "camera", "detection", "convolution"],
    "nlp": ["text", "language", "tokens", "translation", "sentiment", "parsing"],
    "mlops": ["pipeline", "deployment", "monitoring", "registry", "serving", "workflow"],
}


def make_labeled_rows(n: int = 120, seed: int = 0, labels: dict[str, list[str]] | None = None) -> list[dict[str, str]]:
    """``n`` distinct records ``{"title", "description", "tag"}`` whose words give their tag away."""
    rng = random.Random(seed)
    topics = labels or TOPICS
    rows = []
    for i in range(n):
        tag = sorted(topics)[i % len(topics)]
        words = rng.choices(topics[tag], k=6)
        rows.append({"title": f"project {i} {words[0]}", "description": " ".join(words[1:]), "tag": tag})
    return rows


def write_labeled_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """Write rows as a CSV file with a header (title, description, tag)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_tiny_classifier(folder: Path, labels: list[str], texts: list[str], seed: int = 0) -> Path:
    """Save an untrained 1-layer GPT-2 classifier for ``labels`` with a char tokenizer built on ``texts``."""
    import torch

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), texts)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2ForSequenceClassification(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
