"""Classification scores from predictions: accuracy, averaged and per-class P/R/F1, mistakes, confusion matrix.

Pure functions over label sequences (names or ids); scikit-learn computes every figure, so nothing is
downloaded. A precision or recall whose denominator is zero (a class never predicted, or absent from the
split) counts as 0 rather than warning. The averages run over the classes present in the true or the
predicted labels (scikit-learn's default); the per-class table lists every class the model knows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

AVERAGES = ("macro", "weighted")
MISTAKE_TEXT_CHARS = 160
PER_CLASS_COLUMNS = ["label", "precision", "recall", "f1", "support"]
MISTAKE_COLUMNS = ["text", "true", "predicted", "score"]


def score_predictions(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> dict[str, float]:
    """Accuracy and macro / weighted precision, recall and F1 of predictions against the truth.

    Args:
        y_true: True labels (names or ids).
        y_pred: Predicted labels, same length and kind.

    Returns:
        ``accuracy``, ``precision_macro``, ``recall_macro``, ``f1_macro``, and the same three ``_weighted``.

    Raises:
        ValueError: Empty or mismatched inputs.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if not len(y_true) or len(y_true) != len(y_pred):
        raise ValueError(f"need as many predictions as labels, and at least one: {len(y_true)} vs {len(y_pred)}")
    scores = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for average in AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        scores |= {f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)}
    return scores


def per_class_rows(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One row per class id ``0..len(labels)-1``: ``label``, ``precision``, ``recall``, ``f1``, ``support``."""
    from sklearn.metrics import precision_recall_fscore_support

    ids = list(range(len(labels)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    return [
        {"label": labels[i], "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i in ids
    ]


def confident_mistakes(
    texts: Sequence[str],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    scores: Sequence[float],
    labels: Sequence[str],
    *,
    limit: int = 20,
    width: int = MISTAKE_TEXT_CHARS,
) -> list[dict[str, Any]]:
    """The wrong predictions the model was surest of, surest first.

    Args:
        texts: The records' texts.
        y_true: True class ids.
        y_pred: Predicted class ids.
        scores: The probability the model gave its prediction.
        labels: Class names by id.
        limit: Most rows returned.
        width: Texts longer than this are cut, ending in an ellipsis.

    Returns:
        Rows ``{"text", "true", "predicted", "score"}``.
    """
    wrong = [i for i in range(len(texts)) if y_true[i] != y_pred[i]]
    wrong.sort(key=lambda i: -scores[i])  # stable: equal scores keep record order
    return [
        {
            "text": shorten(texts[i], width),
            "true": labels[y_true[i]],
            "predicted": labels[y_pred[i]],
            "score": float(scores[i]),
        }
        for i in wrong[:limit]
    ]


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with a trailing ellipsis when longer."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(0, width - 1)].rstrip() + "…"


def confusion_counts(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` counts: row = true class, column = predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))


def row_normalized(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall of each class on the diagonal); an empty row stays zero."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)


def write_confusion_png(counts: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """Draw the confusion matrix twice, as counts and row-normalized, into a PNG (matplotlib, Agg).

    Args:
        counts: Output of :func:`confusion_counts`.
        labels: Class names by id.
        path: Where the PNG goes (parent folders are created).

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    side = min(12.0, 2.0 + 0.5 * n)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.5, side), dpi=110)
    try:
        panels = ((counts, "Counts", "d"), (row_normalized(counts), "Row-normalized (recall on the diagonal)", ".2f"))
        for ax, (values, title, fmt) in zip(axes, panels, strict=True):
            image = ax.imshow(values, cmap="Blues", vmin=0)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks(range(n), labels, rotation=45, ha="right")
            ax.set_yticks(range(n), labels)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(title)
            if n <= 20:  # beyond that the numbers overlap; the colours still read
                cut = values.max() / 2 if values.size else 0
                for (row, col), value in np.ndenumerate(values):
                    colour = "white" if value > cut else "black"
                    ax.text(col, row, format(value, fmt), ha="center", va="center", color=colour, fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
