"""A cleaned labeled dataset folder and a tiny classification config, for the classifier training tests.

They stand in for the data stage: ``write_labeled_dataset`` writes ``train``/``validation``/``test`` Arrow splits
with ``text`` and ``label`` columns and ``labels.json``, as a cleaned classification dataset holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.data.labels import LabelSet, write_label_set
from tests.classifier_support import make_labeled_rows

SPLITS = ("train", "validation", "test")


def write_labeled_dataset(root: Path, n: int = 60, seed: int = 0, topics: dict[str, list[str]] | None = None) -> Path:
    """``n`` learnable records split 3:1:1 with every class in every split; returns the dataset folder."""
    import datasets

    rows = make_labeled_rows(n, seed, topics)
    by_split: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    for i, row in enumerate(rows):  # labels cycle with period len(topics), splits with 5: all meet
        by_split["validation" if i % 5 == 0 else "test" if i % 5 == 1 else "train"].append(row)
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split, part in by_split.items():
        texts = [f"{r['title']}\n{r['description']}" for r in part]
        labels = [r["tag"] for r in part]
        datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(root / split))
        counts[split] = {label: labels.count(label) for label in sorted(set(labels))}
    write_label_set(root, LabelSet(labels=sorted(counts["train"]), counts=counts))
    return root


def classification_config(model: dict[str, Any] | None = None, **train: Any) -> PipelineConfig:
    """A 1-layer, width-16 GPT-2 classifier config with a char tokenizer; ``train`` keys override the loop's."""
    loop = {
        "max_steps": 12,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 0,
        "eval_interval": 4,
        "log_interval": 2,
        "checkpoint_interval": 4,
        "device": "cpu",
        "dtype": "float32",
        **train,
    }
    sizes = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 48, **(model or {})}
    return PipelineConfig.model_validate(
        {
            "task": {"kind": "classification"},
            "data": {"label_column": "tag"},
            "tokenizer": {"kind": "char"},
            "model": sizes,
            "train": loop,
        }
    )
