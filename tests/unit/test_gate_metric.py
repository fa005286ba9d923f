"""The champion gate on any metric: higher-is-better (F1) and lower-is-better (bits per byte), margins, re-scoring.

A dict-backed store stands in for MLflow's registry; the integration test
(tests/integration/test_classification_registry.py) runs the same gate against a real SQLite store.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.registry.versions import (
    BPB_TAG,
    FINGERPRINT_TAG,
    GATE_METRIC_TAG,
    RegisterResult,
    RegistryError,
    decide_promotion,
    gate_champion,
    metric_tag,
    metric_tags,
)

F1 = "test/f1_macro"


class FakeStore:
    """Versions, aliases and tags in dicts; records every alias move."""

    def __init__(self) -> None:
        self.versions: dict[str, SimpleNamespace] = {}
        self.aliases: dict[str, str] = {}
        self.moves: list[tuple[str, str, str | None, str]] = []

    @contextlib.contextmanager
    def lock(self, model_name: str) -> Iterator[None]:
        yield

    def add(self, number: str, tags: dict[str, str]) -> SimpleNamespace:
        version = SimpleNamespace(version=number, tags=dict(tags))
        self.versions[number] = version
        return version

    def champion(self, model_name: str, alias: str) -> Any:
        number = self.aliases.get(alias)
        return None if number is None else self.versions[number]

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.aliases[alias] = version

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        self.versions[version].tags.update(tags)

    def record_alias_move(
        self, model_name: str, alias: str, version: str, reason: str, *, previous: str | None, kind: str
    ) -> None:
        self.moves.append((alias, version, previous, kind))


def gate(store: FakeStore, number: str, score: float, **kw: Any) -> RegisterResult:
    """Add version ``number`` scored ``score`` on data ``fp`` and gate it on macro F1 (higher is better)."""
    fingerprint = kw.pop("fingerprint", "fp")
    version = store.add(number, {**metric_tags({F1: score}), FINGERPRINT_TAG: fingerprint})
    settings = {"min_improvement": 0.0, "rescore": None, "metric": F1, "higher_is_better": True} | kw
    return gate_champion(
        store,
        "clf",
        version,
        score,
        fingerprint=fingerprint,
        champion_alias="champion",
        challenger_alias="challenger",
        **settings,
    )


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted", "reason"),
    [
        (0.7, None, 0.0, True, "first version"),
        (0.8, 0.7, 0.0, True, "better: 0.8000 vs champion 0.7000 test/f1_macro"),
        (0.6, 0.7, 0.0, False, "not better"),  # lower F1 is worse
        (0.7, 0.7, 0.0, False, "not better"),  # a tie never promotes
        (0.7000004, 0.7, 0.0, False, "not better"),  # rounding-sized
        (0.74, 0.7, 0.05, False, "not better by 0.05"),  # better, not by the margin
        (0.76, 0.7, 0.05, True, "better"),
        (math.nan, 0.7, 0.0, False, "not finite"),
    ],
)
def test_higher_is_better_rule(
    candidate: float, champion: float | None, margin: float, promoted: bool, reason: str
) -> None:
    decision = decide_promotion(candidate, champion, margin, higher_is_better=True, metric=F1)
    assert decision.promoted is promoted
    assert reason in decision.reason
    if champion is not None and math.isfinite(candidate):
        assert decision.delta == pytest.approx(candidate - champion)  # positive is better


def test_lower_is_better_rule_keeps_its_bits_per_byte_wording() -> None:
    decision = decide_promotion(1.4, 1.5, 0.0)
    assert decision.promoted and decision.reason.startswith("better: 1.4000 vs champion 1.5000 bits/byte")
    assert decision.delta == pytest.approx(0.1)
    # The same numbers as F1 are worse: direction, not the numbers, decides.
    assert not decide_promotion(1.4, 1.5, 0.0, higher_is_better=True, metric=F1).promoted


def test_gate_promotes_a_higher_f1_and_refuses_a_lower_one() -> None:
    store = FakeStore()
    first = gate(store, "1", 0.70)
    assert first.promoted and first.metric == F1 and first.higher_is_better
    assert first.candidate_score == 0.70 and first.candidate_bits_per_byte is None
    better = gate(store, "2", 0.75)
    assert better.promoted and better.champion_score == pytest.approx(0.70) and better.previous_champion == "1"
    assert better.delta == pytest.approx(0.05)
    worse = gate(store, "3", 0.72)
    assert not worse.promoted and "not better" in worse.reason and worse.champion_version == "2"
    assert store.aliases == {"champion": "2", "challenger": "3"}
    assert [m[:3] for m in store.moves] == [("champion", "1", None), ("champion", "2", "1")]
    tags = store.versions["3"].tags
    assert tags["forgeline.promoted"] == "false" and tags[GATE_METRIC_TAG] == F1
    assert tags["forgeline.higher_is_better"] == "true"
    assert float(tags["forgeline.champion_score"]) == pytest.approx(0.75)
    assert float(tags["forgeline.improvement"]) == pytest.approx(-0.03)
    assert "forgeline.delta_bits_per_byte" not in tags  # bits-per-byte tags only for a bits-per-byte gate


def test_gate_margin_on_f1() -> None:
    store = FakeStore()
    gate(store, "1", 0.70)
    assert not gate(store, "2", 0.72, min_improvement=0.05).promoted
    assert gate(store, "3", 0.76, min_improvement=0.05).promoted


def test_champion_rescored_on_new_data_with_the_gate_metric() -> None:
    store = FakeStore()
    gate(store, "1", 0.70, fingerprint="old")
    asked: list[str] = []

    def rescore(uri: str) -> float:
        asked.append(uri)
        return 0.90  # on the new test split the champion does much better than its stored 0.70

    refused = gate(store, "2", 0.80, fingerprint="new", rescore=rescore)
    assert asked == ["models:/clf/1"]
    assert not refused.promoted and refused.champion_score == pytest.approx(0.90)
    promoted = gate(store, "3", 0.95, fingerprint="new", rescore=lambda uri: 0.90)
    assert promoted.promoted and store.aliases["champion"] == "3"


def test_champion_without_the_metric_tag_is_rescored_or_refused() -> None:
    store = FakeStore()
    store.add("1", {BPB_TAG: "1.5", FINGERPRINT_TAG: "fp"})  # gated on bits per byte before registry.metric changed
    store.aliases["champion"] = "1"
    with pytest.raises(RegistryError, match="has no test_f1_macro tag"):
        gate(store, "2", 0.8)
    assert gate(store, "3", 0.8, rescore=lambda uri: 0.6).promoted


def test_lm_gate_keeps_its_tags() -> None:
    store = FakeStore()
    v1 = store.add("1", {BPB_TAG: "2.0", FINGERPRINT_TAG: "fp"})
    gate_champion(
        store,
        "lm",
        v1,
        2.0,
        fingerprint="fp",
        min_improvement=0.0,
        champion_alias="c",
        challenger_alias="ch",
        rescore=None,
    )
    v2 = store.add("2", {BPB_TAG: "1.8", FINGERPRINT_TAG: "fp"})
    result = gate_champion(
        store,
        "lm",
        v2,
        1.8,
        fingerprint="fp",
        min_improvement=0.0,
        champion_alias="c",
        challenger_alias="ch",
        rescore=None,
    )
    assert result.promoted and result.candidate_bits_per_byte == 1.8 and result.champion_bits_per_byte == 2.0
    assert result.candidate_score == 1.8 and result.metric == "test/bits_per_byte" and not result.higher_is_better
    tags = store.versions["2"].tags
    assert float(tags["forgeline.delta_bits_per_byte"]) == pytest.approx(0.2)
    assert float(tags["forgeline.champion_bits_per_byte"]) == 2.0


def test_register_result_built_from_bits_per_byte_fields_has_scores() -> None:
    result = RegisterResult(
        model_name="m", version="2", model_uri="models:/m/2", promoted=False, reason="x",
        candidate_bits_per_byte=2.1, champion_bits_per_byte=2.0,
    )  # fmt: skip
    assert (result.candidate_score, result.champion_score) == (2.1, 2.0)


def test_gate_metric_per_task_and_override() -> None:
    assert PipelineConfig().gate_metric() == ("test/bits_per_byte", False)
    classifier = PipelineConfig.model_validate({"task": {"kind": "classification"}, "data": {"label_column": "tag"}})
    assert classifier.gate_metric() == (F1, True)
    accuracy = classifier.model_copy(
        update={"registry": classifier.registry.model_copy(update={"metric": "test/accuracy"})}
    )
    assert accuracy.gate_metric() == ("test/accuracy", True)
    assert metric_tag("test/bits_per_byte") == BPB_TAG and metric_tag("baseline/f1_weighted") == "baseline_f1_weighted"
