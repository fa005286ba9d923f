"""Commands on the model registry: ``models`` (list), ``promote`` (through the gate), ``rollback``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from forgeline.flows.cli import console, lookup
from forgeline.flows.cli.console import Output, fail, show
from forgeline.flows.cli.format import (
    Column,
    Listing,
    emit,
    iso,
    local,
    metric_head,
    now,
    num,
    plain,
    short,
    to_float,
    who,
)
from forgeline.flows.cli.options import ConfigOpt, OutputOpt, VerboseOpt, load_if_given

logger = logging.getLogger(__name__)

MANUAL_TAG = "forgeline.manual_promotion"


# ---------------------------------------------------------------------------------------------- models
def models(
    name: Annotated[str | None, typer.Argument(help="Registered model name (default: list every model).")] = None,
    output: OutputOpt = Output.TABLE,
    verbose: VerboseOpt = False,
) -> None:
    """Registered models; with NAME, its versions, aliases, gate decisions and alias history.

    --output json prints NAME's versions and alias history as one object; --output csv, the versions.

    Examples:

        forgeline models

        forgeline models forgeline-demo-lm

        forgeline models forgeline-demo-lm --output json
    """
    from forgeline.tasks.tracking import queries

    console.quiet_logging(verbose)
    lookup.open_store()
    if name is None:
        registered = queries.registered_models()
        if not registered:
            fail("no registered models in this store yet; run `forgeline run` first")
        emit(output, models_listing(registered))
        return
    model = queries.registered_model(name)
    if model is None:
        known = ", ".join(sorted(m.name for m in queries.registered_models())) or "none"
        fail(f"no registered model named {name!r} (models: {known})")
    versions = sorted(queries.model_versions(name), key=lambda v: -int(v.version))
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    emit(output, versions_listing(name, versions, aliases), history_listing(name, versions))


def models_listing(registered: list[Any]) -> Listing:
    """One row per registered model: latest version, aliases, last update."""
    columns = [
        Column("name", "name"),
        Column("latest_version", "latest"),
        Column("aliases", "aliases"),
        Column("updated", "updated", lambda r: local(r["updated"])),
    ]
    rows = []
    for model in sorted(registered, key=lambda m: m.name):
        latest = max((int(v.version) for v in model.latest_versions or []), default=None)
        rows.append(
            {
                "name": model.name,
                "latest_version": latest,
                "aliases": {a: str(v) for a, v in sorted((model.aliases or {}).items())},
                "updated": iso(model.last_updated_timestamp),
            }
        )
    return Listing("models", "Registered models", columns, rows)


def versions_listing(name: str, versions: list[Any], aliases: dict[str, list[str]]) -> Listing:
    """One row per version of ``name``: aliases, gate score, data, the gate's decision, the train run.

    The score column is the newest version's gate metric (bits per byte for a language model, macro F1 for a
    classifier); each version shows its own value of it.
    """
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG, metric_tag

    metric = registry_metric(versions)
    key = metric_tag(metric)
    columns = [
        Column("version", "version"),
        Column("created", "created", lambda r: local(r["created"])),
        Column("aliases", "aliases"),
        Column(key, metric_head(metric), lambda r: num(r[key])),
        Column("data_fingerprint", "data", lambda r: (r["data_fingerprint"] or "-")[:12]),
        Column("promoted", "promoted", promoted_cell),
        Column("manual"),
        Column("decision", "decision", lambda r: short(plain(r["decision"]), 70)),
        Column("train_run_id", "train run", lambda r: (r["train_run_id"] or "-")[:12]),
    ]
    rows = []
    for v in versions:
        tags = v.tags or {}
        rows.append(
            {
                "version": str(v.version),
                "created": iso(v.creation_timestamp),
                "aliases": sorted(aliases.get(str(v.version), [])),
                key: to_float(tags.get(key)),
                "data_fingerprint": tags.get(FINGERPRINT_TAG),
                "promoted": {"true": True, "false": False}.get(tags.get("forgeline.promoted", "")),
                "manual": MANUAL_TAG in tags,
                "decision": tags.get("forgeline.decision"),
                "train_run_id": tags.get("train_run_id") or v.run_id,
            }
        )
    return Listing("versions", f"{name}: versions", columns, rows)


def registry_metric(versions: list[Any]) -> str:
    """The gate metric the newest of ``versions`` was gated on (``test/bits_per_byte`` when none says)."""
    from forgeline.tasks.registry.versions import BPB_METRIC, GATE_METRIC_TAG

    newest = max(versions, key=lambda v: int(v.version), default=None)
    return str((newest.tags or {}).get(GATE_METRIC_TAG) or BPB_METRIC) if newest is not None else BPB_METRIC


def version_gate(version: Any, cfg: Any) -> tuple[str, bool]:
    """The metric and direction to gate ``version`` on: the config's when given, else what the version was
    gated on (its ``forgeline.gate_metric`` tag), else bits per byte."""
    from forgeline.tasks.config import higher_is_better
    from forgeline.tasks.registry.versions import BPB_METRIC, GATE_METRIC_TAG, HIGHER_IS_BETTER_TAG

    if cfg is not None:
        return cfg.gate_metric()
    tags = version.tags or {}
    metric = tags.get(GATE_METRIC_TAG) or BPB_METRIC
    stored = tags.get(HIGHER_IS_BETTER_TAG)
    return metric, (stored == "true") if stored in ("true", "false") else higher_is_better(metric)


def promoted_cell(row: Mapping[str, Any]) -> str:
    """``true``, ``false`` or ``-``, and ``(manual)`` when a person promoted the version."""
    text = {True: "true", False: "false"}.get(row["promoted"], "-")
    return text + (" (manual)" if row["manual"] else "")


def history_listing(name: str, versions: list[Any]) -> Listing:
    """The alias history of ``name``, newest first (the gate's own promotions when nothing is recorded)."""
    from forgeline.tasks.tracking.registry_store import alias_history

    entries = alias_history(name)
    columns = [
        Column("at", "when (UTC)", lambda r: (r["at"] or "-")[:16].replace("T", " ")),
        Column("alias", "alias"),
        Column("version", "version"),
        Column("previous", "previous"),
        Column("kind", "how"),
        Column("reason", "why", lambda r: short(plain(r["reason"]), 70)),
    ]
    rows = [{c.key: None if e.get(c.key) is None else str(e[c.key]) for c in columns} for e in reversed(entries)]
    caption = ""
    if not entries:
        promoted = [str(v.version) for v in sorted(versions, key=lambda v: int(v.version)) if gate_promoted(v)]
        caption = f"no alias moves recorded yet; versions the gate promoted: {', '.join(promoted) or 'none'}"
    return Listing("alias_history", f"{name}: alias history (newest first)", columns, rows, caption)


def gate_promoted(version: Any) -> bool:
    """Whether the pipeline's gate (not a person) promoted ``version``."""
    tags = version.tags or {}
    return tags.get("forgeline.promoted") == "true" and MANUAL_TAG not in tags


# --------------------------------------------------------------------------------------------- promote
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    force: Annotated[
        bool, typer.Option("--force", help="Move the alias even if the gate refuses or cannot score.")
    ] = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Make VERSION the champion, through the same gate as the pipeline unless --force.

    The candidate's stored gate metric (registry.metric of --config, else the one the version was gated on:
    test bits per byte for a language model, test macro F1 for a classifier) is compared with the champion's
    on the candidate's data (the champion is re-scored when it was trained on other data and that data is
    still in the local cache). The decision is recorded as version tags and in the alias history.

    Examples:

        forgeline promote forgeline-demo-lm 4

        forgeline promote forgeline-demo-lm 3 --force
    """
    from forgeline.tasks.tracking import queries
    from forgeline.tasks.tracking.registry_store import champion_version, record_alias_move, registry_lock

    console.quiet_logging(verbose)
    cfg = load_if_given(config)
    lookup.open_store(cfg)
    reg = lookup.registry_settings(cfg)
    candidate = lookup.require_version(name, version)
    alias = reg.champion_alias
    with registry_lock(name):
        champ = champion_version(name, alias)
        if champ is not None and str(champ.version) == str(candidate.version):
            show(f"{name} version {candidate.version} is already the {alias}; nothing to do")
            return
        metric, higher = version_gate(candidate, cfg)
        promoted, reason = manual_gate(candidate, champ, reg.min_improvement, metric=metric, higher_is_better=higher)
        record = {
            "at": now(),
            "by": who(),
            "forced": force and not promoted,
            "gate": "passed" if promoted else "refused",
            "reason": reason,
            "previous": str(champ.version) if champ is not None else None,
        }
        if not promoted and not force:
            queries.set_version_tag(name, candidate.version, MANUAL_TAG, json.dumps(record))
            fail(f"refused: {reason} (--force promotes anyway)")
        kind = "promote" if promoted else "force"
        text = f"manual {kind}: {reason}"
        queries.set_alias(name, alias, candidate.version)
        record_alias_move(name, alias, candidate.version, text, previous=record["previous"], kind=kind)
        for key, value in {
            "forgeline.promoted": "true",
            "forgeline.decision": text,
            MANUAL_TAG: json.dumps(record),
        }.items():
            queries.set_version_tag(name, candidate.version, key, value)
    was = f" (was version {champ.version})" if champ is not None else ""
    show(f"{name} version {candidate.version} is now the {alias}{was}: {text}")


def manual_gate(
    candidate: Any,
    champ: Any,
    min_improvement: float,
    *,
    metric: str = "test/bits_per_byte",
    higher_is_better: bool = False,
) -> tuple[bool, str]:
    """The champion gate for a manual promotion, on ``metric``. Returns (promote?, reason)."""
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG, decide_promotion, metric_tag

    tag = metric_tag(metric)

    def decide(champion: float | None) -> Any:
        return decide_promotion(cand, champion, min_improvement, higher_is_better=higher_is_better, metric=metric)

    cand = to_float(candidate.tags.get(tag))
    if cand is None:
        return False, f"version {candidate.version} has no {tag} tag; the gate cannot score it on {metric}"
    if champ is None:
        decision = decide(None)
        return decision.promoted, decision.reason
    cand_fp = candidate.tags.get(FINGERPRINT_TAG)
    champ_score = to_float(champ.tags.get(tag))
    if cand_fp and champ.tags.get(FINGERPRINT_TAG) == cand_fp and champ_score is not None:
        decision = decide(champ_score)
        return decision.promoted, decision.reason
    champ_score, why_not = rescore_on(candidate, f"models:/{champ.name}/{champ.version}", metric)
    if champ_score is None:
        return False, f"champion version {champ.version} was scored on other data and cannot be re-scored: {why_not}"
    decision = decide(champ_score)
    return decision.promoted, decision.reason + " (champion re-scored on the candidate's test split)"


def rescore_on(candidate: Any, champion_uri: str, metric: str = "test/bits_per_byte") -> tuple[float | None, str]:
    """The champion's ``metric`` on the candidate's test split, or ``(None, why not)``.

    Re-scoring needs the candidate's resolved config (for the scoring settings) and its cleaned data in
    the local cache (``data.cache_dir``); a version trained elsewhere has neither.
    """
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG

    fingerprint = candidate.tags.get(FINGERPRINT_TAG)
    if not fingerprint:
        return None, f"version {candidate.version} has no {FINGERPRINT_TAG} tag"
    try:
        cfg = lookup.version_config(candidate)
    except (ValueError, OSError) as exc:
        return None, str(exc)
    dataset_dir = lookup.cache_root(cfg) / "datasets" / fingerprint
    if not has_held_out_split(dataset_dir):
        return None, f"the candidate's cleaned data {fingerprint[:12]} is not in {lookup.cache_root(cfg)}"
    if cfg.gate_metric()[0] != metric:
        cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"metric": metric})})
    from forgeline.flows.rescore import rescore_model

    logger.info("re-scoring %s on %s", champion_uri, dataset_dir)
    try:
        return float(rescore_model(champion_uri, cfg, str(dataset_dir))), ""
    except Exception as exc:  # noqa: BLE001 - the refusal names why; --force still promotes
        return None, console.one_line(exc)


def has_held_out_split(dataset_dir: Path) -> bool:
    """Whether a cleaned dataset folder holds a test or validation split (Arrow folders; older caches: JSONL)."""
    return any(
        (dataset_dir / split).is_dir() or (dataset_dir / f"{split}.jsonl").is_file() for split in ("test", "validation")
    )


# -------------------------------------------------------------------------------------------- rollback
def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Move the champion alias back to the previous champion (from the alias history).

    Repeated rollbacks walk further back. The move is recorded in the alias history and as version tags.

    Example:

        forgeline rollback forgeline-demo-lm
    """
    from forgeline.tasks.registry.history import champion_stack, previous_champion
    from forgeline.tasks.tracking import queries
    from forgeline.tasks.tracking.registry_store import (
        alias_history,
        champion_version,
        record_alias_move,
        registry_lock,
    )

    console.quiet_logging(verbose)
    cfg = load_if_given(config)
    lookup.open_store(cfg)
    alias = lookup.registry_settings(cfg).champion_alias
    lookup.require_model(name)
    versions = {str(v.version): v for v in queries.model_versions(name)}
    with registry_lock(name):
        champ = champion_version(name, alias)
        if champ is None:
            fail(f"{name} has no {alias}; nothing to roll back")
        current = str(champ.version)
        entries = alias_history(name)
        if any(e.get("alias") == alias for e in entries):
            stack = champion_stack(entries, alias, current)
        else:  # nothing recorded yet: the gate's own promotions, in version order
            promoted = [k for k, v in sorted(versions.items(), key=lambda kv: int(kv[0])) if gate_promoted(v)]
            stack = [p for p in promoted if p != current] + [current]
        target = previous_champion(stack, exists=lambda v: v in versions)
        if target is None:
            fail(f"{name}: no previous {alias} to roll back to (version {current} is the only one on record)")
        reason = f"rollback from version {current}"
        queries.set_alias(name, alias, target)
        record_alias_move(name, alias, target, reason, previous=current, kind="rollback")
        queries.set_version_tag(name, current, "forgeline.rolled_back", json.dumps({"at": now(), "by": who()}))
        queries.set_version_tag(
            name, target, "forgeline.restored", json.dumps({"at": now(), "by": who(), "from": current})
        )
    show(f"{name}: {alias} is back on version {target} (was version {current})")
