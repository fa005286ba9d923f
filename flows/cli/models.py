"""Commands on the model registry: ``models`` (list), ``promote`` (through the gate), ``rollback``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from forgeline.flows.cli import console, lookup
from forgeline.flows.cli.console import Output, fail, show
from forgeline.flows.cli.format import Column, Listing, emit, iso, local, now, num, plain, short, to_float, who
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
    """One row per version of ``name``: aliases, score, data, the gate's decision, the train run."""
    from forgeline.tasks.registry.versions import BPB_TAG, FINGERPRINT_TAG

    columns = [
        Column("version", "version"),
        Column("created", "created", lambda r: local(r["created"])),
        Column("aliases", "aliases"),
        Column("test_bits_per_byte", "test bpb", lambda r: num(r["test_bits_per_byte"])),
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
                "test_bits_per_byte": to_float(tags.get(BPB_TAG)),
                "data_fingerprint": tags.get(FINGERPRINT_TAG),
                "promoted": {"true": True, "false": False}.get(tags.get("forgeline.promoted", "")),
                "manual": MANUAL_TAG in tags,
                "decision": tags.get("forgeline.decision"),
                "train_run_id": tags.get("train_run_id") or v.run_id,
            }
        )
    return Listing("versions", f"{name}: versions", columns, rows)


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

    The candidate's stored test bits per byte is compared with the champion's on the candidate's data
    (the champion is re-scored when it was trained on other data and that data is still in the local
    cache). The decision is recorded as version tags and in the alias history.

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
        promoted, reason = manual_gate(candidate, champ, reg.min_improvement)
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


def manual_gate(candidate: Any, champ: Any, min_improvement: float) -> tuple[bool, str]:
    """The champion gate for a manual promotion. Returns (promote?, reason)."""
    from forgeline.tasks.registry.versions import BPB_TAG, FINGERPRINT_TAG, decide_promotion

    cand_bpb = to_float(candidate.tags.get(BPB_TAG))
    if cand_bpb is None:
        return False, f"version {candidate.version} has no {BPB_TAG} tag; the gate cannot score it"
    if champ is None:
        decision = decide_promotion(cand_bpb, None, min_improvement)
        return decision.promoted, decision.reason
    cand_fp = candidate.tags.get(FINGERPRINT_TAG)
    champ_bpb = to_float(champ.tags.get(BPB_TAG))
    if cand_fp and champ.tags.get(FINGERPRINT_TAG) == cand_fp and champ_bpb is not None:
        decision = decide_promotion(cand_bpb, champ_bpb, min_improvement)
        return decision.promoted, decision.reason
    champ_bpb, why_not = rescore_on(candidate, f"models:/{champ.name}/{champ.version}")
    if champ_bpb is None:
        return False, f"champion version {champ.version} was scored on other data and cannot be re-scored: {why_not}"
    decision = decide_promotion(cand_bpb, champ_bpb, min_improvement)
    return decision.promoted, decision.reason + " (champion re-scored on the candidate's test split)"


def rescore_on(candidate: Any, champion_uri: str) -> tuple[float | None, str]:
    """The champion's bits per byte on the candidate's test split, or ``(None, why not)``.

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
    if not (dataset_dir / "test.jsonl").exists() and not (dataset_dir / "validation.jsonl").exists():
        return None, f"the candidate's cleaned data {fingerprint[:12]} is not in {lookup.cache_root(cfg)}"
    from forgeline.flows.stages import rescore_model

    logger.info("re-scoring %s on %s", champion_uri, dataset_dir)
    return float(rescore_model(champion_uri, cfg, str(dataset_dir))), ""


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
