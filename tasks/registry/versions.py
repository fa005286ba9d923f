"""Model registry stage: one version per training lineage, and the gate that moves the champion alias.

The promotion rule is a pure function (:func:`decide_promotion`). :func:`register_version` and
:func:`gate_champion` decide what happens; a :class:`RegistryStore` (the tracking package's
``MlflowRegistry``) carries it out. Promotions hold the store's lock and re-read the champion inside it,
because MLflow aliases have no compare-and-set.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, model_validator

from forgeline.tasks import faults

logger = logging.getLogger(__name__)

LINEAGE_TAG = "forgeline.lineage"
BPB_METRIC = "test/bits_per_byte"
BPB_TAG = "test_bits_per_byte"
FINGERPRINT_TAG = "data_fingerprint"
GATE_METRIC_TAG = "forgeline.gate_metric"
"""Version tag: the metric the gate compared (``test/bits_per_byte``, ``test/f1_macro``...)."""
HIGHER_IS_BETTER_TAG = "forgeline.higher_is_better"
TASK_TAG = "forgeline.task"
"""Version tag: the ``task.kind`` of the config that trained it (``lm``, ``classification``...)."""
TIE_TOLERANCE = 1e-6


def metric_tag(metric: str) -> str:
    """The version tag holding ``metric``: ``test/f1_macro`` is ``test_f1_macro`` (``test_bits_per_byte`` for lm)."""
    return metric.replace("/", "_")


def metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    """Every metric as a version tag (:func:`metric_tag`), its value in full (``repr``)."""
    return {metric_tag(key): repr(float(value)) for key, value in metrics.items()}


class RegistryError(RuntimeError):
    """A registry operation was refused; the message is one line."""


class RegistryStore(Protocol):
    """What the registry stage needs from a model registry (``forgeline.tasks.tracking.registry_store``)."""

    def lock(self, model_name: str) -> contextlib.AbstractContextManager[None]: ...
    def find_lineage_version(self, model_name: str, lineage: str) -> Any | None: ...
    def logged_model_status(self, model_uri: str) -> str | None: ...
    def create_version(self, model_name: str, model_uri: str, tags: dict[str, str]) -> Any: ...
    def wait_ready(self, model_name: str, version: str) -> Any: ...
    def champion(self, model_name: str, alias: str) -> Any | None: ...
    def set_alias(self, model_name: str, alias: str, version: str) -> None: ...
    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None: ...
    def record_alias_move(
        self, model_name: str, alias: str, version: str, reason: str, *, previous: str | None, kind: str
    ) -> None: ...


class PromotionDecision(BaseModel):
    """The champion gate's verdict."""

    promoted: bool
    reason: str
    delta: float | None = None
    """The candidate's improvement on the champion in the metric's units (positive is better): for bits per
    byte ``champion - candidate``, for F1 ``candidate - champion``."""


class RegisterResult(BaseModel):
    """What the registry stage did."""

    model_name: str
    version: str
    model_uri: str
    promoted: bool
    reason: str
    delta: float | None = None
    candidate_bits_per_byte: float | None = None
    champion_bits_per_byte: float | None = None
    previous_champion: str | None = None
    champion_version: str | None = None
    already_registered: bool = False
    metric: str = BPB_METRIC
    """The gate's metric (``registry.metric`` or the task's)."""
    higher_is_better: bool = False
    candidate_score: float | None = None
    """The candidate's ``metric`` (for bits per byte also ``candidate_bits_per_byte``)."""
    champion_score: float | None = None
    """The champion's ``metric`` on the candidate's test split, when there was a champion to compare."""

    @model_validator(mode="after")
    def _fill_scores(self) -> RegisterResult:
        # Results built with only the bits-per-byte fields (older callers) carry the same figures as scores.
        if self.metric == BPB_METRIC:
            if self.candidate_score is None:
                self.candidate_score = self.candidate_bits_per_byte
            if self.champion_score is None:
                self.champion_score = self.champion_bits_per_byte
        return self


def decide_promotion(
    candidate: float,
    champion: float | None,
    min_improvement: float,
    *,
    higher_is_better: bool = False,
    metric: str = BPB_METRIC,
) -> PromotionDecision:
    """The champion gate: the candidate must beat the champion's score by ``min_improvement``.

    Args:
        candidate: Candidate's score (test bits per byte, test F1...).
        champion: Champion's, on the same test split; ``None`` when there is no champion.
        min_improvement: Required margin (>= 0), in the metric's units. An equal score never promotes.
        higher_is_better: The metric's direction (F1, accuracy: higher; loss, bits per byte: lower).
        metric: Its name, for the reason.

    Returns:
        Whether to promote, why, and the improvement.
    """
    if not math.isfinite(candidate):
        return PromotionDecision(promoted=False, reason=f"candidate score is not finite ({candidate})")
    if champion is None:
        return PromotionDecision(promoted=True, reason="first version: no champion yet")
    delta = candidate - champion if higher_is_better else champion - candidate
    unit = "bits/byte" if metric == BPB_METRIC else metric
    scores = f"{candidate:.4f} vs champion {champion:.4f} {unit} (improvement {delta:.4f})"
    # Differences below TIE_TOLERANCE are rounding, not improvement: a tie never promotes.
    if delta > TIE_TOLERANCE and delta >= min_improvement:
        return PromotionDecision(promoted=True, reason=f"better: {scores}", delta=delta)
    return PromotionDecision(promoted=False, reason=f"not better by {min_improvement:g}: {scores}", delta=delta)


# -------------------------------------------------------------------------------------- versions
def register_version(
    store: RegistryStore, model_name: str, model_uri: str, lineage: str, tags: dict[str, str]
) -> tuple[Any, bool]:
    """Register ``model_uri`` unless this lineage already has a version. Returns (version, existed).

    Raises:
        RegistryError: ``model_uri`` is a logged model whose upload did not complete (not ``READY``).
    """
    with store.lock(model_name):
        existing = store.find_lineage_version(model_name, lineage)
        if existing is not None:
            return existing, True
        _require_ready(store, model_uri)
        mv = store.create_version(model_name, model_uri, {LINEAGE_TAG: lineage, **tags})
    faults.hit("registry.register")  # RELIABILITY.md C6: a version without aliases must be gated on re-run
    return store.wait_ready(model_name, str(mv.version)), False


def _require_ready(store: RegistryStore, model_uri: str) -> None:
    # RELIABILITY.md B5: a version must never point at a partial upload (PENDING after a crash, FAILED after
    # an upload that raised).
    status = store.logged_model_status(model_uri)
    if status is not None and status != "READY":
        model_id = model_uri.removeprefix("models:/").split("/", 1)[0]
        raise RegistryError(
            f"logged model {model_id} is {status}, not READY: its upload did not complete; re-run to log it again"
        )


def gate_champion(
    store: RegistryStore,
    model_name: str,
    version: Any,
    candidate_score: float,
    *,
    fingerprint: str,
    min_improvement: float,
    champion_alias: str,
    challenger_alias: str,
    rescore: Callable[[str], float] | None,
    metric: str = BPB_METRIC,
    higher_is_better: bool = False,
) -> RegisterResult:
    """Give the candidate the challenger alias, then move the champion alias to it if it is better.

    Args:
        store: The registry.
        model_name: Registered model.
        version: The candidate's model version.
        candidate_score: Its ``metric`` on its test split.
        fingerprint: The cleaned data it was scored on.
        min_improvement: ``registry.min_improvement``.
        champion_alias: ``registry.champion_alias``.
        challenger_alias: ``registry.challenger_alias``.
        rescore: ``callable(model_uri) -> metric`` scoring a registered model on the candidate's test split
            (used when the champion was scored on other data, or has no ``metric`` tag).
        metric: The gate's metric (``PipelineConfig.gate_metric()``); the champion's score is its version tag
            :func:`metric_tag`.
        higher_is_better: The metric's direction.
    """
    number = str(version.version)
    gate = Gate(metric=metric, higher_is_better=higher_is_better, min_improvement=min_improvement)
    store.set_alias(model_name, challenger_alias, number)
    with store.lock(model_name):
        champ = store.champion(model_name, champion_alias)
        champ_score: float | None = None
        if champ is not None and str(champ.version) == number:
            decision = PromotionDecision(promoted=True, reason="already champion")
            return gate.result(model_name, version, candidate_score, decision, None, str(champ.version), number)
        if champ is not None:
            champ_score = _champion_score(champ, fingerprint, rescore, model_name, metric)
        decision = decide_promotion(
            candidate_score, champ_score, min_improvement, higher_is_better=higher_is_better, metric=metric
        )
        if decision.promoted:
            store.set_alias(model_name, champion_alias, number)
            store.record_alias_move(
                model_name,
                champion_alias,
                number,
                decision.reason,
                previous=str(champ.version) if champ is not None else None,
                kind="gate",
            )
        store.set_version_tags(model_name, number, gate.decision_tags(decision, champ_score))
    logger.info("%s version %s: %s", model_name, number, decision.reason)
    previous = str(champ.version) if champ else None
    new_champ = number if decision.promoted else previous
    return gate.result(model_name, version, candidate_score, decision, champ_score, previous, new_champ)


class Gate(BaseModel):
    """The gate's settings, and what it writes: version tags and the result."""

    metric: str
    higher_is_better: bool
    min_improvement: float

    def decision_tags(self, decision: PromotionDecision, champ_score: float | None) -> dict[str, str]:
        """The verdict as version tags (bits per byte keeps its older tag names too)."""
        tags = {
            "forgeline.promoted": str(decision.promoted).lower(),
            "forgeline.decision": decision.reason,
            GATE_METRIC_TAG: self.metric,
            HIGHER_IS_BETTER_TAG: str(self.higher_is_better).lower(),
        }
        if decision.delta is not None:
            tags["forgeline.improvement"] = f"{decision.delta:.6f}"
        if champ_score is not None:
            tags["forgeline.champion_score"] = repr(champ_score)
        if self.metric == BPB_METRIC:
            if decision.delta is not None:
                tags["forgeline.delta_bits_per_byte"] = f"{decision.delta:.6f}"
            if champ_score is not None:
                tags["forgeline.champion_bits_per_byte"] = repr(champ_score)
        return tags

    def result(
        self,
        name: str,
        version: Any,
        score: float,
        decision: PromotionDecision,
        champ_score: float | None,
        previous: str | None,
        current: str | None,
    ) -> RegisterResult:
        """The :class:`RegisterResult` of one gate decision."""
        bpb = self.metric == BPB_METRIC
        return RegisterResult(
            model_name=name,
            version=str(version.version),
            model_uri=f"models:/{name}/{version.version}",
            promoted=decision.promoted,
            reason=decision.reason,
            delta=decision.delta,
            candidate_bits_per_byte=score if bpb else None,
            champion_bits_per_byte=champ_score if bpb else None,
            previous_champion=previous,
            champion_version=current,
            metric=self.metric,
            higher_is_better=self.higher_is_better,
            candidate_score=score,
            champion_score=champ_score,
        )


def _champion_score(
    champ: Any, fingerprint: str, rescore: Callable[[str], float] | None, model_name: str, metric: str
) -> float:
    # Same data: the stored score is comparable. New data (or no stored score for this metric): re-score the
    # champion on the candidate's test split.
    tag = metric_tag(metric)
    if champ.tags.get(FINGERPRINT_TAG) == fingerprint and tag in champ.tags:
        return float(champ.tags[tag])
    if rescore is None:
        why = "was scored on other data" if tag in champ.tags else f"has no {tag} tag"
        raise RegistryError(f"champion version {champ.version} {why} and no rescore was given")
    logger.info("re-scoring champion version %s on the candidate's test split (%s)", champ.version, metric)
    return float(rescore(f"models:/{model_name}/{champ.version}"))
