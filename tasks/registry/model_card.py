"""Model cards: one markdown page per registered version.

:func:`build_model_card` is pure (a dict of facts in, markdown out) and is what the tests exercise.
:func:`card_facts` gathers the facts at the end of the register stage; the register wrapper
(``forgeline.flows.stages.write_model_card``) stores the card as the ``model_card.md`` artifact of the
register run and as the model version's description.

Facts (every key optional except ``model_name`` and ``version``)::

    model_name, version, model_uri, promoted, decision, champion_version, previous_champion
    fingerprint, sources (list[str]), split, rows_per_split, bytes_per_split
    config_yaml (the resolved config), config_hash
    metrics: {"test/bits_per_byte": 2.41, ...}        the candidate's (a classifier's: test/f1_macro...,
                                                      and baseline/accuracy... shown beside them)
    champion_metrics: {"test/bits_per_byte": 2.50}    the champion's, on the same test split
    gate_metric, higher_is_better                     what the champion gate compared
    per_class: [{"label": ..., "precision": ..., "recall": ..., "f1": ..., "support": ...}]
    samples: [{"prompt": ..., "text": ...}]
    lineage: {"mlflow_run_id", "mlflow_run_url", "pipeline_run_id", "experiment_id",
              "prefect_flow_run_id", "prefect_flow_run_url", "git_commit", "git_dirty"}
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forgeline.tasks.config import DataConfig, higher_is_better
from forgeline.tasks.registry.versions import BPB_METRIC, metric_tag

logger = logging.getLogger(__name__)

ARTIFACT_FILE = "model_card.md"
DESCRIPTION_LIMIT = 5000
"""Model version descriptions are ``String(5000)`` in MLflow's database schema."""

_METRIC_ORDER = (
    "test/bits_per_byte",
    "test/f1_macro",
    "test/accuracy",
    "test/precision_macro",
    "test/recall_macro",
    "test/f1_weighted",
    "test/precision_weighted",
    "test/recall_weighted",
    "test/loss",
    "test/perplexity",
    "val/loss",
)
BASELINE = "baseline/"
"""Metrics under this prefix are the baseline's (TF-IDF + logistic regression), shown beside the model's."""


def build_model_card(facts: dict[str, Any]) -> str:
    """Render a model card as markdown.

    Args:
        facts: See the module docstring; missing facts are left out (or shown as ``-``).

    Returns:
        The markdown text, ending with a newline.
    """
    name = str(facts.get("model_name", "model"))
    version = str(facts.get("version", "?"))
    parts = [f"# {name} version {version}", ""]
    parts += _summary(facts)
    parts += _metrics_section(facts)
    parts += _per_class_section(facts.get("per_class") or [])
    parts += _data_section(facts)
    parts += _samples_section(facts.get("samples") or [])
    parts += _lineage_section(facts.get("lineage") or {})
    config_yaml = facts.get("config_yaml")
    if config_yaml:
        parts += ["## Resolved config", ""]
        if facts.get("config_hash"):
            parts += [f"Config hash `{facts['config_hash']}`.", ""]
        parts += ["```yaml", str(config_yaml).rstrip(), "```", ""]
    return "\n".join(parts).rstrip() + "\n"


def description_text(card: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card cut to fit a model version description, pointing at the full artifact when cut.

    Args:
        card: The full markdown.
        limit: Most characters allowed.

    Returns:
        ``card`` itself when it fits, else a prefix cut at a line end plus a note.
    """
    if len(card) <= limit:
        return card
    note = f"\n\n_(cut to fit; the full card is the `{ARTIFACT_FILE}` artifact of the register run)_\n"
    head = card[: limit - len(note) - 4]  # room to close a code block
    head = head[: head.rfind("\n")] if "\n" in head else head
    if head.count("```") % 2:  # do not leave a code block open
        head += "\n```"
    return head + note


# ----------------------------------------------------------------------------------------- sections
def _summary(facts: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if facts.get("model_uri"):
        lines.append(f"- **Model URI:** `{facts['model_uri']}`")
    if "promoted" in facts:
        verdict = "promoted to champion" if facts["promoted"] else "not promoted"
        decision = facts.get("decision")
        lines.append(f"- **Champion gate:** {verdict}" + (f" ({decision})" if decision else ""))
    if facts.get("previous_champion"):
        lines.append(f"- **Champion at registration:** version {facts['previous_champion']}")
    if facts.get("gate_metric"):
        direction = "higher" if facts.get("higher_is_better") else "lower"
        lines.append(f"- **Gate metric:** `{facts['gate_metric']}` ({direction} is better)")
    return [*lines, ""] if lines else []


def _metrics_section(facts: dict[str, Any]) -> list[str]:
    metrics: dict[str, float] = facts.get("metrics") or {}
    champion: dict[str, float] = facts.get("champion_metrics") or {}
    if not metrics:
        return []
    champ_version = facts.get("previous_champion")
    champ_head = f"champion (v{champ_version})" if champ_version else "champion"
    own = {k: v for k, v in metrics.items() if not k.startswith(BASELINE)}
    baseline = {k.removeprefix(BASELINE): v for k, v in metrics.items() if k.startswith(BASELINE)}
    heads = ["metric", "this version", *(["baseline"] if baseline else []), champ_head, "difference"]
    lines = ["## Metrics", "", "| " + " | ".join(heads) + " |", "|---" + "|---:" * (len(heads) - 1) + "|"]
    keys = [k for k in _METRIC_ORDER if k in own] + sorted(k for k in own if k not in _METRIC_ORDER)
    for key in keys:
        value = own[key]
        other = champion.get(key)
        diff = "-" if other is None else _signed(value - other, key)
        cells = [key, _fmt(value)]
        if baseline:
            cells.append(_fmt(baseline.get(key.rsplit("/", 1)[-1])))
        lines.append("| " + " | ".join([*cells, _fmt(other), diff]) + " |")
    if all(not higher_is_better(k) for k in keys):
        note = "Lower is better for every metric shown"
    else:
        note = "Higher is better for accuracy, precision, recall and F1, lower for loss"
    lines += ["", f"{note}; the champion is scored on this version's test split.", ""]
    if baseline:
        lines += ["The baseline is TF-IDF (character 2-5-grams) with logistic regression on the same split.", ""]
    return lines


def _per_class_section(rows: Any) -> list[str]:
    if isinstance(rows, dict):  # {label: {precision: ..., ...}}
        rows = [{"label": label, **dict(values)} for label, values in rows.items()]
    rows = [dict(r) for r in rows if isinstance(r, dict)]
    if not rows:
        return []
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["## Per class", "", "| " + " | ".join(keys) + " |", "|---" + "|---:" * (len(keys) - 1) + "|"]
    for row in rows:
        cells = [_fmt(v) if isinstance(v, float) else str(v if v is not None else "-") for v in map(row.get, keys)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return [*lines, ""]


def _data_section(facts: dict[str, Any]) -> list[str]:
    keys = ("fingerprint", "sources", "split", "rows_per_split", "bytes_per_split")
    if not any(facts.get(k) for k in keys):
        return []
    lines = ["## Data", ""]
    if facts.get("fingerprint"):
        lines.append(f"- **Fingerprint:** `{facts['fingerprint']}`")
    sources = facts.get("sources") or []
    if sources:
        lines.append("- **Sources:** " + ", ".join(f"`{s}`" for s in sources))
    if facts.get("split"):
        lines.append(f"- **Split:** {facts['split']}")
    rows = facts.get("rows_per_split") or {}
    size = facts.get("bytes_per_split") or {}
    if rows or size:
        lines += ["", "| split | records | bytes |", "|---|---:|---:|"]
        for split in dict.fromkeys([*rows, *size]):
            lines.append(f"| {split} | {rows.get(split, '-')} | {size.get(split, '-')} |")
    return [*lines, ""]


def _samples_section(samples: list[dict[str, Any]]) -> list[str]:
    if not samples:
        return []
    lines = ["## Sample generations", ""]
    for sample in samples:
        prompt = str(sample.get("prompt", ""))
        text = str(sample.get("text", ""))
        lines += [f"Prompt `{prompt!r}`:", "", "```text", (prompt + text).replace("```", "`\u200b``"), "```", ""]
    return lines


def _lineage_section(lineage: dict[str, Any]) -> list[str]:
    rows: list[str] = []
    run_id = lineage.get("mlflow_run_id")
    if run_id:
        url = _link(lineage.get("mlflow_run_url"))
        rows.append("- **MLflow train run:** " + (f"[`{run_id}`]({url})" if url else f"`{run_id}`"))
    if lineage.get("pipeline_run_id"):
        url = _link(lineage.get("pipeline_run_url"))
        rid = lineage["pipeline_run_id"]
        rows.append("- **MLflow pipeline run:** " + (f"[`{rid}`]({url})" if url else f"`{rid}`"))
    flow_run = lineage.get("prefect_flow_run_id")
    if flow_run:
        url = _link(lineage.get("prefect_flow_run_url"))
        rows.append("- **Prefect flow run:** " + (f"[`{flow_run}`]({url})" if url else f"`{flow_run}`"))
    commit = lineage.get("git_commit")
    if commit:
        dirty = str(lineage.get("git_dirty", "")).lower() == "true"
        rows.append(f"- **Git commit:** `{commit}`" + (" (with uncommitted changes)" if dirty else ""))
    return ["## Lineage", "", *rows, ""] if rows else []


def _link(url: Any) -> str | None:
    # Only real web addresses become links (an unset UI base renders as "None/flow-runs/...").
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4f}"


def _signed(diff: float, key: str) -> str:
    text = f"{diff:+.4f}"
    gain = diff if higher_is_better(key) else -diff
    if gain > 0:
        return f"{text} (better)"
    if gain < 0:
        return f"{text} (worse)"
    return text


# -------------------------------------------------------------------------------------------- facts
def card_facts(
    data: DataConfig,
    result: Any,
    evaluation: Any,
    *,
    config_yaml: str,
    config_hash: str,
    fingerprint: str,
    train_run_id: str,
    pipeline_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    dataset_dir: str | None = None,
    run_url: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Collect a card's facts from what the register stage holds (reads nothing from a tracking store).

    Args:
        data: The ``data`` config (sources and split).
        result: The ``RegisterResult`` of the gate.
        evaluation: The candidate's ``EvalResult``.
        config_yaml: The resolved config as YAML.
        config_hash: Its hash.
        fingerprint: Cleaned-data fingerprint.
        train_run_id: The train run that logged the model.
        pipeline_run_id: The parent pipeline run.
        tags: The pipeline's run tags (git commit, Prefect flow run id and URL).
        dataset_dir: The cleaned dataset folder (its ``report.json`` gives rows and bytes per split).
        run_url: The UI page of a run id, for links (none when not given).

    Returns:
        The facts dict :func:`build_model_card` takes.
    """
    tags = tags or {}
    link = run_url or (lambda _run_id: None)
    metric = getattr(result, "metric", BPB_METRIC)
    champion = {}
    champ_score = getattr(result, "champion_score", None)
    if champ_score is None and metric == BPB_METRIC:
        champ_score = getattr(result, "champion_bits_per_byte", None)
    if champ_score is not None:
        champion[metric] = champ_score
    facts: dict[str, Any] = {
        "model_name": result.model_name,
        "version": result.version,
        "model_uri": result.model_uri,
        "promoted": result.promoted,
        "decision": result.reason,
        "previous_champion": result.previous_champion if result.previous_champion != result.version else None,
        "fingerprint": fingerprint,
        "sources": [_source_text(s) for s in data.sources],
        "split": data.split,
        "config_yaml": config_yaml,
        "config_hash": config_hash,
        "metrics": evaluation_metrics(evaluation),
        "champion_metrics": champion,
        "gate_metric": metric if metric != BPB_METRIC else None,
        "higher_is_better": bool(getattr(result, "higher_is_better", False)),
        "per_class": _rows(getattr(evaluation, "per_class", None)),
        "samples": list(getattr(evaluation, "samples", None) or []),
        "lineage": {
            "mlflow_run_id": train_run_id,
            "mlflow_run_url": link(train_run_id),
            "pipeline_run_id": pipeline_run_id,
            "pipeline_run_url": link(pipeline_run_id) if pipeline_run_id else None,
            "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
            "prefect_flow_run_url": tags.get("prefect.flow_run_url"),
            "git_commit": tags.get("forgeline.git_commit") or tags.get("mlflow.source.git.commit"),
            "git_dirty": tags.get("forgeline.git_dirty"),
        },
    }
    report = Path(dataset_dir) / "report.json" if dataset_dir else None
    if report is not None and report.is_file():
        try:
            data_report = json.loads(report.read_text(encoding="utf-8"))
            facts["rows_per_split"] = data_report.get("rows_per_split") or {}
            facts["bytes_per_split"] = data_report.get("bytes_per_split") or {}
            if data_report.get("sources"):
                facts["sources"] = [str(s) for s in data_report["sources"]]
        except (OSError, ValueError) as exc:
            logger.debug("cleaning report %s not read: %s", report, exc)
    return facts


def evaluation_metrics(evaluation: Any) -> dict[str, float]:
    """An evaluation's figures under their MLflow names (``.metrics``; the three language-model ones otherwise)."""
    metrics = getattr(evaluation, "metrics", None)
    if isinstance(metrics, dict):
        return {str(k): float(v) for k, v in metrics.items()}
    return {
        "test/bits_per_byte": evaluation.bits_per_byte,
        "test/loss": evaluation.loss,
        "test/perplexity": evaluation.perplexity,
    }


def _rows(per_class: Any) -> Any:
    if per_class is None:
        return []
    if isinstance(per_class, dict):
        return per_class
    return [r.model_dump() if hasattr(r, "model_dump") else r for r in per_class]


def add_champion_metrics(facts: dict[str, Any], champion_tags: dict[str, str], fingerprint: str) -> None:
    """The champion's stored test figures, when it was scored on the same data (else not comparable).

    Args:
        facts: From :func:`card_facts` (its ``champion_metrics`` gain the missing values).
        champion_tags: The tags of the champion's model version (``test_loss``, ``test_f1_macro``...).
        fingerprint: The candidate's data fingerprint.
    """
    if champion_tags.get("data_fingerprint") != fingerprint:
        return
    champion = facts.setdefault("champion_metrics", {})
    keys = [k for k in facts.get("metrics") or {} if not k.startswith(BASELINE)]
    for key in keys or ("test/bits_per_byte", "test/loss", "test/perplexity"):
        tag = metric_tag(key)
        if key not in champion and tag in champion_tags:
            try:
                champion[key] = float(champion_tags[tag])
            except ValueError:
                continue


def _source_text(source: Any) -> str:
    data = source.model_dump(mode="json") if hasattr(source, "model_dump") else dict(source)
    kind = data.pop("kind", "source")
    detail = ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, [], {}, ""))
    return f"{kind}: {detail}" if detail else str(kind)
