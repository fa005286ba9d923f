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

from pydantic import BaseModel

from forgeline.tasks import faults

logger = logging.getLogger(__name__)

LINEAGE_TAG = "forgeline.lineage"
BPB_TAG = "test_bits_per_byte"
FINGERPRINT_TAG = "data_fingerprint"
TIE_TOLERANCE = 1e-6


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
    delta: float | None = None  # champion_bpb - candidate_bpb (positive is better)


class RegisterResult(BaseModel):
    """What the registry stage did."""

    model_name: str
    version: str
    model_uri: str
    promoted: bool
    reason: str
    delta: float | None = None
    candidate_bits_per_byte: float
    champion_bits_per_byte: float | None = None
    previous_champion: str | None = None
    champion_version: str | None = None
    already_registered: bool = False


def decide_promotion(candidate_bpb: float, champion_bpb: float | None, min_improvement: float) -> PromotionDecision:
    """The champion gate: the candidate must beat the champion's bits per byte by ``min_improvement``.

    Args:
        candidate_bpb: Candidate's test bits per byte.
        champion_bpb: Champion's, on the same test split; ``None`` when there is no champion.
        min_improvement: Required margin (>= 0). An equal score never promotes.

    Returns:
        Whether to promote, why, and the improvement.
    """
    if not math.isfinite(candidate_bpb):
        return PromotionDecision(promoted=False, reason=f"candidate score is not finite ({candidate_bpb})")
    if champion_bpb is None:
        return PromotionDecision(promoted=True, reason="first version: no champion yet")
    delta = champion_bpb - candidate_bpb
    # Differences below TIE_TOLERANCE bits/byte are rounding, not improvement: a tie never promotes.
    if delta > TIE_TOLERANCE and delta >= min_improvement:
        return PromotionDecision(
            promoted=True,
            reason=f"better: {candidate_bpb:.4f} vs champion {champion_bpb:.4f} bits/byte (improvement {delta:.4f})",
            delta=delta,
        )
    return PromotionDecision(
        promoted=False,
        reason=(
            f"not better by {min_improvement:g}: {candidate_bpb:.4f} vs champion {champion_bpb:.4f} bits/byte "
            f"(improvement {delta:.4f})"
        ),
        delta=delta,
    )


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
    candidate_bpb: float,
    *,
    fingerprint: str,
    min_improvement: float,
    champion_alias: str,
    challenger_alias: str,
    rescore: Callable[[str], float] | None,
) -> RegisterResult:
    """Give the candidate the challenger alias, then move the champion alias to it if it is better.

    Args:
        store: The registry.
        model_name: Registered model.
        version: The candidate's model version.
        candidate_bpb: Its test bits per byte.
        fingerprint: The cleaned data it was scored on.
        min_improvement: ``registry.min_improvement``.
        champion_alias: ``registry.champion_alias``.
        challenger_alias: ``registry.challenger_alias``.
        rescore: ``callable(model_uri) -> bits_per_byte`` scoring a registered model on the
            candidate's test split (used when the champion was scored on other data).
    """
    number = str(version.version)
    store.set_alias(model_name, challenger_alias, number)
    with store.lock(model_name):
        champ = store.champion(model_name, champion_alias)
        champ_bpb: float | None = None
        if champ is not None and str(champ.version) == number:
            return _result(
                model_name,
                version,
                candidate_bpb,
                PromotionDecision(promoted=True, reason="already champion"),
                champ_bpb,
                str(champ.version),
                str(champ.version),
            )
        if champ is not None:
            champ_bpb = _champion_score(champ, fingerprint, rescore, model_name)
        decision = decide_promotion(candidate_bpb, champ_bpb, min_improvement)
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
        tags = {"forgeline.promoted": str(decision.promoted).lower(), "forgeline.decision": decision.reason}
        if decision.delta is not None:
            tags["forgeline.delta_bits_per_byte"] = f"{decision.delta:.6f}"
        if champ_bpb is not None:
            tags["forgeline.champion_bits_per_byte"] = repr(champ_bpb)
        store.set_version_tags(model_name, number, tags)
    logger.info("%s version %s: %s", model_name, number, decision.reason)
    previous = str(champ.version) if champ else None
    new_champ = number if decision.promoted else previous
    return _result(model_name, version, candidate_bpb, decision, champ_bpb, previous, new_champ)


def _result(
    name: str,
    version: Any,
    bpb: float,
    decision: PromotionDecision,
    champ_bpb: float | None,
    previous: str | None,
    current: str | None,
) -> RegisterResult:
    return RegisterResult(
        model_name=name,
        version=str(version.version),
        model_uri=f"models:/{name}/{version.version}",
        promoted=decision.promoted,
        reason=decision.reason,
        delta=decision.delta,
        candidate_bits_per_byte=bpb,
        champion_bits_per_byte=champ_bpb,
        previous_champion=previous,
        champion_version=current,
    )


def _champion_score(champ: Any, fingerprint: str, rescore: Callable[[str], float] | None, model_name: str) -> float:
    # Same data: the stored score is comparable. New data: re-score the champion on the candidate's test split.
    if champ.tags.get(FINGERPRINT_TAG) == fingerprint and BPB_TAG in champ.tags:
        return float(champ.tags[BPB_TAG])
    if rescore is None:
        raise RegistryError(f"champion version {champ.version} was scored on other data and no rescore was given")
    logger.info("re-scoring champion version %s on the candidate's test split", champ.version)
    return float(rescore(f"models:/{model_name}/{champ.version}"))
