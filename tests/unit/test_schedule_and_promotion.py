"""The LR schedule (nanoGPT's get_lr) and the champion promotion rule."""

from __future__ import annotations

import math

import pytest

from forgeline.tasks.config import TrainConfig
from forgeline.tasks.registry.versions import decide_promotion
from forgeline.tasks.train.schedule import get_lr


def test_lr_warmup_then_cosine_to_min() -> None:
    cfg = TrainConfig(max_steps=2000, learning_rate=1e-3, min_lr=1e-4, warmup_steps=100)
    assert get_lr(0, cfg) == pytest.approx(1e-3 * 1 / 101)
    assert get_lr(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert get_lr(100, cfg) == pytest.approx(1e-3)
    mid = 100 + (2000 - 100) // 2
    assert get_lr(mid, cfg) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-3)
    assert get_lr(2000, cfg) == pytest.approx(1e-4)
    assert get_lr(5000, cfg) == pytest.approx(1e-4)
    lrs = [get_lr(s, cfg) for s in range(100, 2001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_lr_decay_steps_shorter_than_training() -> None:
    cfg = TrainConfig(max_steps=100, learning_rate=1e-2, min_lr=1e-3, warmup_steps=0, lr_decay_steps=50)
    assert get_lr(0, cfg) == pytest.approx(1e-2)
    assert get_lr(60, cfg) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted", "reason"),
    [
        (1.5, None, 0.0, True, "first version"),
        (1.4, 1.5, 0.0, True, "better"),
        (1.6, 1.5, 0.0, False, "not better"),
        (1.5, 1.5, 0.0, False, "not better"),  # equal never promotes
        (1.4999996, 1.5, 0.0, False, "not better"),  # a rounding-sized difference is a tie
        (1.45, 1.5, 0.1, False, "not better by 0.1"),  # better, but not by the margin
        (1.35, 1.5, 0.1, True, "better"),
        (math.nan, 1.5, 0.0, False, "not finite"),
        (math.nan, None, 0.0, False, "not finite"),
    ],
)
def test_promotion_rule(candidate: float, champion: float | None, margin: float, promoted: bool, reason: str) -> None:
    decision = decide_promotion(candidate, champion, margin)
    assert decision.promoted is promoted
    assert reason in decision.reason
    if champion is not None and math.isfinite(candidate):
        assert decision.delta == pytest.approx(champion - candidate)
