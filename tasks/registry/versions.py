"""Model registry: log the model, register one version per training lineage, gate the champion alias.

The promotion rule is a pure function (``decide_promotion``); everything else talks to the MLflow
registry. Promotions are serialized by a file lock and re-read the champion inside it, because MLflow
aliases have no compare-and-set.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from forgeline.tasks.locks import acquire_within
from pydantic import BaseModel

logger = logging.getLogger(__name__)

LINEAGE_TAG = "forgeline.lineage"
BPB_TAG = "test_bits_per_byte"
FINGERPRINT_TAG = "data_fingerprint"
TIE_TOLERANCE = 1e-6
PIP_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors", "mlflow"]


class RegistryError(RuntimeError):
    """A registry operation was refused; the message is one line."""


class PromotionDecision(BaseModel):
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


# --------------------------------------------------------------------------------------- logging
def log_transformers_model(run_id: str, model_dir: str | Path, prompt: str) -> str:
    """Log model plus tokenizer with the ``transformers`` flavor (text-generation); returns its URI.

    Generation defaults stay inside the model's context (prompt plus new tokens within ``n_positions``),
    so ``pyfunc.load_model(...).predict([prompt])`` works for short prompts.
    """
    import mlflow
    from forgeline.tasks.model.modeling import load_pretrained_model

    model, tokenizer = load_pretrained_model(str(model_dir))
    context = int(getattr(model.config, "n_positions", 1024))
    generation = {"max_new_tokens": max(1, min(128, context // 2)), "do_sample": True, "top_k": 50}
    # Given only run_id, MLflow files the logged model under the Default experiment (no active run here);
    # create it in the run's experiment, where the UI and searches look for it.
    run = mlflow.MlflowClient().get_run(run_id)
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, params=dict(run.data.params), experiment_id=run.info.experiment_id
    )
    _skip_installed_files_scan()
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        input_example=[prompt],
        model_config=generation,
        pip_requirements=PIP_REQUIREMENTS,
        run_id=run_id,
        model_id=logged.model_id,
    )
    return info.model_uri


def _skip_installed_files_scan() -> None:
    # log_model checks the explicit pip requirements against this environment. Before the first check
    # MLflow maps every installed file to its package (importlib_metadata.packages_distributions(): 1 s on
    # a quiet 2-core machine, 3 s loaded), although for the packages we name it reads the versions from
    # their metadata anyway. Seeding its module->package map with just those makes the check cost
    # milliseconds and changes nothing it reports. If MLflow renames the map, we only lose the speed-up.
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", False) is None:
        requirements_utils._MODULES_TO_PACKAGES = {name: [name] for name in PIP_REQUIREMENTS}


# -------------------------------------------------------------------------------------- registry
def find_lineage_version(model_name: str, lineage: str) -> Any | None:
    """The registered version of a training lineage, if it exists (retries must not add another)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name = '{model_name}' and tags.`{LINEAGE_TAG}` = '{lineage}'")
    except MlflowException:
        return None
    return min(versions, key=lambda v: int(v.version)) if versions else None


def register_version(model_name: str, model_uri: str, lineage: str, tags: dict[str, str]) -> tuple[Any, bool]:
    """Register ``model_uri`` unless this lineage already has a version. Returns (version, existed).

    Raises:
        RegistryError: ``model_uri`` is a logged model whose upload did not complete (not ``READY``).
    """
    import mlflow
    from mlflow import MlflowClient

    with registry_lock(model_name):
        existing = find_lineage_version(model_name, lineage)
        if existing is not None:
            return existing, True
        _require_ready(model_uri)
        mv = mlflow.register_model(model_uri, model_name, tags={LINEAGE_TAG: lineage, **tags})
    _fault_hook("sigkill_after_register")
    client = MlflowClient()
    for _ in range(50):
        mv = client.get_model_version(model_name, mv.version)
        if mv.status == "READY":
            break
        time.sleep(0.1)
    return mv, False


def _require_ready(model_uri: str) -> None:
    # RELIABILITY.md B5: MLflow marks a logged model READY only after all its files are uploaded (FAILED
    # when the upload raised, PENDING when the process died mid-way). A version must never point at one
    # of those partial artifacts.
    from mlflow import MlflowClient

    if not model_uri.startswith("models:/m-"):
        return
    model_id = model_uri.removeprefix("models:/").split("/", 1)[0]
    status = str(MlflowClient().get_logged_model(model_id).status)
    if status != "READY":
        raise RegistryError(
            f"logged model {model_id} is {status}, not READY: its upload did not complete; re-run to log it again"
        )


def _fault_hook(point: str) -> None:
    # Test-only fault injection (RELIABILITY.md C6): die between creating a version and setting its aliases.
    import os
    import signal

    if os.environ.get("FORGELINE_FAULT_KIND") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def champion_version(model_name: str, alias: str) -> Any | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def gate_champion(
    model_name: str,
    version: Any,
    candidate_bpb: float,
    *,
    fingerprint: str,
    min_improvement: float,
    champion_alias: str,
    challenger_alias: str,
    rescore: Any,
) -> RegisterResult:
    """Give the candidate the challenger alias, then move the champion alias to it if it is better.

    Args:
        rescore: ``callable(model_uri) -> bits_per_byte`` scoring a registered model on the
            candidate's test split (used when the champion was scored on other data).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(model_name, challenger_alias, version.version)
    with registry_lock(model_name):
        champ = champion_version(model_name, champion_alias)
        champ_bpb: float | None = None
        if champ is not None and str(champ.version) == str(version.version):
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
            client.set_registered_model_alias(model_name, champion_alias, version.version)
            record_alias_move(
                model_name,
                champion_alias,
                version.version,
                decision.reason,
                previous=champ.version if champ is not None else None,
                kind="gate",
            )
        tags = {"forgeline.promoted": str(decision.promoted).lower(), "forgeline.decision": decision.reason}
        if decision.delta is not None:
            tags["forgeline.delta_bits_per_byte"] = f"{decision.delta:.6f}"
        if champ_bpb is not None:
            tags["forgeline.champion_bits_per_byte"] = repr(champ_bpb)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version.version, key, value)
    logger.info("%s version %s: %s", model_name, version.version, decision.reason)
    previous = str(champ.version) if champ else None
    new_champ = str(version.version) if decision.promoted else previous
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


def _champion_score(champ: Any, fingerprint: str, rescore: Any, model_name: str) -> float:
    # Same data: the stored score is comparable. New data: re-score the champion on the candidate's test split.
    if champ.tags.get(FINGERPRINT_TAG) == fingerprint and BPB_TAG in champ.tags:
        return float(champ.tags[BPB_TAG])
    logger.info("re-scoring champion version %s on the candidate's test split", champ.version)
    return float(rescore(f"models:/{model_name}/{champ.version}"))


@contextlib.contextmanager
def registry_lock(model_name: str, timeout: float = 600.0) -> Iterator[None]:
    """A host-wide lock around registry read-compare-write (MLflow aliases have no compare-and-set).

    It serializes promotions from every process on this machine; teams promoting from several machines
    should run promotions from one deployment (the ``pipeline`` flow on one pool with concurrency 1).
    """
    lock_dir = Path(_lock_root())
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"registry-{model_name}.lock"
    with path.open("a+") as fh:
        if not acquire_within(fh, timeout):
            raise TimeoutError(f"registry lock {path} held for more than {timeout:.0f}s")
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _lock_root() -> str:
    import os

    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).parent / "locks")
    return os.environ.get("FORGELINE_HOME", ".forgeline") + "/locks"


# --------------------------------------------------------------------------------- alias history
ALIAS_HISTORY_TAG = "forgeline.alias_history"
"""Registered-model tag: a JSON list of alias moves, oldest first (trimmed to fit the tag's 5000 chars)."""
_HISTORY_LIMIT = 4800


def alias_history(model_name: str) -> list[dict[str, Any]]:
    """The recorded alias moves of a registered model, oldest first (``[]`` when none were recorded).

    Each entry: ``alias``, ``version``, ``previous`` (the version that held the alias before, or ``None``),
    ``kind`` (``gate``, ``promote``, ``force`` or ``rollback``), ``reason`` and ``at`` (UTC, ISO 8601).
    """
    from mlflow import MlflowClient

    raw = MlflowClient().get_registered_model(model_name).tags.get(ALIAS_HISTORY_TAG)
    if not raw:
        return []
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError:
        logger.warning("%s: unreadable %s tag; ignoring it", model_name, ALIAS_HISTORY_TAG)
        return []
    return [e for e in entries if isinstance(e, dict) and "alias" in e and "version" in e]


def record_alias_move(
    model_name: str,
    alias: str,
    version: str | int,
    reason: str,
    *,
    previous: str | int | None = None,
    kind: str = "gate",
) -> dict[str, Any]:
    """Append one alias move to the model's ``forgeline.alias_history`` tag.

    Call it right after ``set_registered_model_alias`` while holding :func:`registry_lock` (it reads,
    appends and writes the tag; the lock is not re-entrant, so it does not take it itself). The oldest
    entries are dropped when the JSON would exceed the tag size databases other than SQLite enforce.

    Args:
        model_name: Registered model.
        alias: The alias that moved (``champion``).
        version: The version it now points to.
        reason: Why (the gate's decision, ``manual promote``, ``rollback from 3``).
        previous: The version that held the alias before, if any.
        kind: ``gate``, ``promote``, ``force`` or ``rollback``.

    Returns:
        The entry recorded.
    """
    from datetime import UTC, datetime

    from mlflow import MlflowClient

    entry = {
        "alias": alias,
        "version": str(version),
        "previous": None if previous is None else str(previous),
        "kind": kind,
        "reason": reason[:160],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    entries = [*alias_history(model_name), entry]
    blob = json.dumps(entries, separators=(",", ":"))
    while len(blob) > _HISTORY_LIMIT and len(entries) > 1:
        entries = entries[1:]
        blob = json.dumps(entries, separators=(",", ":"))
    MlflowClient().set_registered_model_tag(model_name, ALIAS_HISTORY_TAG, blob)
    return entry


def champion_stack(entries: list[dict[str, Any]], alias: str, current: str | None) -> list[str]:
    """Replay alias moves into the stack of versions that held ``alias``, current one last.

    Promotions push, rollbacks pop. A history with gaps (moves made before recording started, or by code
    that does not record) is patched from each entry's ``previous`` and from ``current``.

    Args:
        entries: :func:`alias_history` output (any alias; others are ignored).
        alias: The alias to replay.
        current: The version the alias points to now, or ``None``.

    Returns:
        Versions, oldest first; the last one is ``current`` when there is one.
    """
    stack: list[str] = []
    for entry in entries:
        if entry.get("alias") != alias:
            continue
        version = str(entry["version"])
        previous = entry.get("previous")
        previous = None if previous is None else str(previous)
        if entry.get("kind") == "rollback":
            if stack and stack[-1] == previous:
                stack.pop()
            while stack and stack[-1] != version and version in stack:
                stack.pop()
            if not stack or stack[-1] != version:
                stack.append(version)
            continue
        if previous is not None and (not stack or stack[-1] != previous):
            stack.append(previous)
        if not stack or stack[-1] != version:
            stack.append(version)
    if current is not None and (not stack or stack[-1] != str(current)):
        stack.append(str(current))
    return stack


def previous_champion(stack: list[str], exists: Any = None) -> str | None:
    """The version a rollback returns to: the one below the top of :func:`champion_stack`.

    Args:
        stack: Versions that held the alias, current last.
        exists: Optional ``callable(version) -> bool``; versions that no longer exist are skipped.

    Returns:
        The previous version, or ``None`` when there is none.
    """
    current = stack[-1] if stack else None
    for version in reversed(stack[:-1]):
        if version != current and (exists is None or exists(version)):
            return version
    return None
