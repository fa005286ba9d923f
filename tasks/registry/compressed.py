"""The student gate: a compressed model becomes champion of its own registered model only if it is good enough.

Good enough is relative to its teacher, not to earlier students: the metric may be at most
``compress.max_quality_drop`` worse, in the metric's own direction (bits per byte may rise that much, relative;
a classifier's macro F1 may fall that much). A student that fails the gate is still registered, with the reason, and
no alias.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from forgeline.tasks.registry.versions import PromotionDecision, RegisterResult, RegistryStore, register_version

logger = logging.getLogger(__name__)

TEACHER_TAG = "forgeline.teacher"
TEACHER_VERSION_TAG = "forgeline.teacher_version"
QUALITY_DROP_TAG = "forgeline.quality_drop"


def decide_student(
    teacher_metric: float,
    student_metric: float,
    max_quality_drop: float,
    *,
    higher_is_better: bool = False,
    metric: str = "bits/byte",
) -> PromotionDecision:
    """Whether the student's metric is within ``max_quality_drop`` (relative) of the teacher's.

    Args:
        teacher_metric: The teacher's score on the held-out split (must be finite and above 0).
        student_metric: The student's, on the same records.
        max_quality_drop: ``compress.max_quality_drop`` (0.1: at most 10% worse).
        higher_is_better: The metric's direction (F1: worse is lower; bits per byte: worse is higher).
        metric: Its name in the reason.

    ``delta`` is the relative drop (0.05: 5% worse; negative: the student is better).
    """
    if not math.isfinite(student_metric):
        return PromotionDecision(promoted=False, reason=f"student score is not finite ({student_metric})")
    if not math.isfinite(teacher_metric) or teacher_metric <= 0:
        return PromotionDecision(promoted=False, reason=f"teacher score is not usable ({teacher_metric})")
    drop = (student_metric - teacher_metric) / teacher_metric
    if higher_is_better:
        drop = -drop
    scores = f"{student_metric:.4f} vs teacher {teacher_metric:.4f} {metric}"
    if drop <= max_quality_drop:
        return PromotionDecision(
            promoted=True, reason=f"within {max_quality_drop:.1%} of the teacher: {scores} ({drop:+.1%})", delta=drop
        )
    return PromotionDecision(
        promoted=False,
        reason=f"quality drop {drop:.1%} exceeds compress.max_quality_drop {max_quality_drop:.1%}: {scores}",
        delta=drop,
    )


def register_student(
    store: RegistryStore,
    model_name: str,
    model_uri: str,
    lineage: str,
    *,
    teacher_name: str,
    teacher_version: str,
    teacher_metric: float,
    student_metric: float,
    max_quality_drop: float,
    champion_alias: str,
    tags: dict[str, str],
    metric: str = "bits_per_byte",
    higher_is_better: bool = False,
) -> RegisterResult:
    """Register the student (once per lineage), tag it with its teacher, and make it champion if it passes.

    Args:
        store: The registry.
        model_name: The student's registered model (``<model>-small``).
        model_uri: The logged student.
        lineage: One version per compression (teacher version, data and settings).
        teacher_name: The teacher's registered model.
        teacher_version: Its version.
        teacher_metric: The teacher's ``metric`` on the held-out split.
        student_metric: The student's, on the same split.
        max_quality_drop: ``compress.max_quality_drop``.
        champion_alias: The alias the gate moves.
        tags: More version tags (metrics, sizes).
        metric: The task metric compared (``bits_per_byte``; a classifier's ``f1_macro``), tagged ``test_<metric>``.
        higher_is_better: Its direction.
    """
    decision = decide_student(
        teacher_metric,
        student_metric,
        max_quality_drop,
        higher_is_better=higher_is_better,
        metric="bits/byte" if metric == "bits_per_byte" else metric,
    )
    all_tags = {
        TEACHER_TAG: teacher_name,
        TEACHER_VERSION_TAG: teacher_version,
        f"test_{metric}": repr(student_metric),
        **tags,
    }
    version, existed = register_version(store, model_name, model_uri, lineage, all_tags)
    number = str(version.version)
    previous: str | None = None
    with store.lock(model_name):
        champ = store.champion(model_name, champion_alias)
        previous = str(champ.version) if champ is not None else None
        if decision.promoted and previous != number:
            store.set_alias(model_name, champion_alias, number)
            store.record_alias_move(model_name, champion_alias, number, decision.reason, previous=previous, kind="gate")
        version_tags = {"forgeline.promoted": str(decision.promoted).lower(), "forgeline.decision": decision.reason}
        if decision.delta is not None:
            version_tags[QUALITY_DROP_TAG] = f"{decision.delta:.6f}"
        store.set_version_tags(model_name, number, version_tags)
    logger.info("%s version %s: %s", model_name, number, decision.reason)
    return RegisterResult(
        model_name=model_name,
        version=number,
        model_uri=f"models:/{model_name}/{number}",
        promoted=decision.promoted,
        reason=decision.reason,
        delta=decision.delta,
        candidate_bits_per_byte=student_metric if metric == "bits_per_byte" else None,
        champion_bits_per_byte=teacher_metric if metric == "bits_per_byte" else None,
        metric=f"test/{metric}",
        higher_is_better=higher_is_better,
        candidate_score=student_metric,
        champion_score=teacher_metric,
        previous_champion=previous,
        champion_version=number if decision.promoted else previous,
        already_registered=existed,
    )


def student_tags(measures: dict[str, Any]) -> dict[str, str]:
    """Version tags of a student's size and speed (``parameters``, ``bytes_on_disk``...)."""
    return {f"student.{k}": str(v) for k, v in measures.items()}
