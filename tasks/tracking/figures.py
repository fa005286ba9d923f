"""Charts logged with runs: loss curves and the cleaning report. Matplotlib only (Agg), no MLflow."""

from __future__ import annotations

from typing import Any


def loss_curve_figure(history: list[dict[str, float]]) -> Any:
    """Train and validation loss against step and, when entries carry ``time``, against wall time.

    Args:
        history: ``TrainResult.history``: dicts with ``step``, ``train/loss`` or ``val/loss``, and
            ``time`` (seconds since the training loop started; older histories lack it).

    Returns:
        A matplotlib figure: one panel (step) or two (step, wall time).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = any("time" in h for h in history)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4), dpi=110, squeeze=False)
    # Fixed margins instead of tight_layout, which measures every label (0.1 s on each run's chart).
    fig.subplots_adjust(left=0.07 if timed else 0.11, right=0.98, bottom=0.13, top=0.91, wspace=0.2)
    panels = [("step", "step")] + ([("time", "wall time (s since training started)")] if timed else [])
    for ax, (x_key, x_label) in zip(axes[0], panels, strict=True):
        for key, style in (
            ("train/loss", {"linewidth": 1, "alpha": 0.8}),
            ("val/loss", {"marker": "o", "linewidth": 1.5}),
        ):
            points = [(h[x_key], h[key]) for h in history if key in h and x_key in h]
            if points:
                ax.plot(*zip(*points, strict=True), label=key, **style)
        ax.set_xlabel(x_label)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"Loss against {x_key if x_key == 'step' else 'wall time'}")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def cleaning_report_figure(dropped: dict[str, int], rows_per_split: dict[str, int], rows_in: int | None = None) -> Any:
    """Bar charts of the cleaning report: records dropped per rule, and records per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    rules = list(dropped) or ["(none)"]
    counts = [dropped.get(r, 0) for r in rules]
    bars = left.barh(rules, counts, color="#c0504d")
    left.bar_label(bars, padding=2, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("records dropped")
    left.set_title("Dropped per rule" + (f" ({rows_in:,} read)" if rows_in is not None else ""))
    splits = list(rows_per_split)
    bars = right.bar(splits, [rows_per_split[s] for s in splits], color="#4f81bd")
    right.bar_label(bars, padding=2, fontsize=8)
    right.set_ylabel("records")
    right.set_title("Records per split")
    for ax in (left, right):
        ax.grid(axis="x" if ax is left else "y", alpha=0.3)
    fig.tight_layout()
    return fig
