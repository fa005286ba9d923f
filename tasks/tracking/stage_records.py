"""What each stage leaves in MLflow: the cleaning report, the training summary and model, the model card.

The Prefect wrappers (``forgeline.flows.stages``) call these with the stage's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from forgeline.tasks.config import DataConfig
from forgeline.tasks.data.cleaning import CleanResult, load_split
from forgeline.tasks.data.labels import class_count_rows
from forgeline.tasks.registry.model_card import (
    ARTIFACT_FILE,
    add_champion_metrics,
    build_model_card,
    card_facts,
    description_text,
)
from forgeline.tasks.registry.versions import RegisterResult
from forgeline.tasks.tracking.classifiers import is_classifier_dir, log_classifier
from forgeline.tasks.tracking.figures import cleaning_report_figure, loss_curve_figure
from forgeline.tasks.tracking.links import ui_run_url
from forgeline.tasks.tracking.metrics import log_metric_history
from forgeline.tasks.tracking.models import log_transformers_model, logged_model_status
from forgeline.tasks.tracking.records import (
    log_artifact,
    log_dict,
    log_figure,
    log_metrics,
    log_text,
    set_tags,
)
from forgeline.tasks.tracking.registry_store import describe_version, get_model_version
from forgeline.tasks.tracking.runs import find_runs
from forgeline.tasks.tracking.store import client, tracking_uri
from forgeline.tasks.tracking.tags import RUN_NAME_TAG
from forgeline.tasks.train.journal import JOURNAL_FILE, history_entries, read_journal
from forgeline.tasks.train.loop import TrainResult

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ clean
def record_cleaning(run_id: str, result: CleanResult) -> None:
    """Cleaning metrics, the report (JSON and two MLflow tables), and each split as an MLflow dataset input."""
    set_tags(run_id, {"data_fingerprint": result.fingerprint, "forgeline.cache_hit": result.cache_hit})
    metrics = {"rows_in": result.rows_in, **{f"dropped/{k}": v for k, v in result.dropped.items()}}
    metrics |= {f"rows/{k}": v for k, v in result.rows_per_split.items()}
    metrics |= {f"bytes/{k}": v for k, v in result.bytes_per_split.items()}
    if result.class_counts:
        metrics["classes"] = len(result.class_counts.get("train", {}))
    log_metrics(run_id, metrics)
    log_dict(run_id, result.model_dump(mode="json"), "cleaning_report.json")
    for name, table in cleaning_tables(result).items():
        client().log_table(run_id, data=table, artifact_file=name)
    log_cleaning_chart(run_id, result)
    for split, rows in result.rows_per_split.items():
        if rows:
            _log_split_input(run_id, result, split)


def cleaning_tables(result: CleanResult) -> dict[str, Any]:
    """The cleaning report as pandas tables: records dropped per rule, rows and bytes per split, records per class."""
    import pandas as pd

    rules = pd.DataFrame({"rule": list(result.dropped), "records": list(result.dropped.values())})
    rules["share_of_input"] = rules["records"] / max(result.rows_in, 1)
    splits = pd.DataFrame(
        {
            "split": list(result.rows_per_split),
            "records": list(result.rows_per_split.values()),
            "bytes": [result.bytes_per_split.get(s, 0) for s in result.rows_per_split],
        }
    )
    tables = {"cleaning_rules.json": rules, "cleaning_splits.json": splits}
    if result.class_counts:  # labeled data: records of each class in each split
        tables["cleaning_classes.json"] = pd.DataFrame(class_count_rows(result.class_counts))
    return tables


def _log_split_input(run_id: str, result: CleanResult, split: str) -> None:
    """A cleaned split as a dataset input: ``mlflow.data.from_huggingface`` gives the source and schema."""
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag

    ds = load_split(result.dataset_dir, split)
    folder = str(Path(result.dataset_dir) / split)
    targets = "label" if "label" in ds.column_names else None
    with warnings.catch_warnings():  # mlflow registers the local-file source twice and warns that it picks one
        warnings.simplefilter("ignore", UserWarning)
        hf = mlflow.data.from_huggingface(
            ds, source=folder, name=f"cleaned-{split}", digest=result.fingerprint[:36], targets=targets
        )
        made = hf._to_mlflow_entity()
    profile = hf.profile | {"rows": len(ds), "bytes": result.bytes_per_split.get(split, 0)}
    entity = Dataset(made.name, made.digest, made.source_type, made.source, made.schema, json.dumps(profile))
    client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", split)])])


def log_cleaning_chart(run_id: str, result: CleanResult) -> None:
    """``cleaning_report.png``: records dropped per rule and records per split.

    The picture is kept next to the cleaned dataset, keyed by the numbers it shows: a cache hit logs the
    same file again instead of drawing it (0.2-0.3 s of matplotlib on every re-run).
    """
    try:
        numbers = json.dumps([result.dropped, result.rows_per_split, result.rows_in], sort_keys=True)
        key = hashlib.sha256(numbers.encode()).hexdigest()[:16]
        folder = Path(tempfile.mkdtemp(prefix="forgeline-chart-"))
        try:
            chart = folder / "cleaning_report.png"
            kept = Path(result.dataset_dir) / f"cleaning_report-{key}.png"
            if kept.is_file():
                shutil.copyfile(kept, chart)
            else:
                _draw_cleaning_chart(result, chart)
                with contextlib.suppress(OSError):  # a read-only cache only loses the shortcut
                    tmp = kept.with_suffix(f".{os.getpid()}.tmp")
                    shutil.copyfile(chart, tmp)
                    os.replace(tmp, kept)
            log_artifact(run_id, chart)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - a chart is a courtesy; the JSON report is logged already
        logger.warning("cleaning chart not logged: %s", exc)


def _draw_cleaning_chart(result: CleanResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = cleaning_report_figure(result.dropped, result.rows_per_split, rows_in=result.rows_in)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------ train
def record_training(run_id: str, result: TrainResult) -> None:
    """Summary metrics, resume tags and the loss curve of a finished training run."""
    summary = {
        "steps": result.steps,
        "tokens_per_sec_mean": result.tokens_per_sec,
        "train_seconds": result.seconds,
        "nonfinite_steps": result.nonfinite_steps,
    }
    if result.best_val_loss is not None:
        summary["best_val_loss"] = result.best_val_loss
    log_metrics(run_id, summary, step=result.steps)
    set_tags(
        run_id,
        {
            "forgeline.resumed_from": result.resumed_from if result.resumed_from is not None else "none",
            "forgeline.already_done": result.already_done,
        },
    )
    if result.history:
        import matplotlib.pyplot as plt

        fig = loss_curve_figure(result.history)
        log_figure(run_id, fig, "loss_curve.png")
        plt.close(fig)


MODEL_MARKER = "logged_model.json"


def log_model(run_dir: Path, run_id: str, result: TrainResult, prompt: str) -> str:
    """Log the trained model to ``run_id`` and remember it (store and URI) in the run folder; its URI.

    The model is logged once per lineage and tracking store (:func:`reusable_model` finds it again, so a retry
    after a crash re-uses it). The same checkpoint folder may later be tracked by another store (a local run,
    then ``forgeline up``), or by the same URI over a new or restored database: there it is logged again.
    A sequence classifier is logged as a ``text-classification`` pipeline (``prompt`` is its input example),
    a language model as ``text-generation``.
    """
    if is_classifier_dir(result.model_dir):
        uri = log_classifier(run_id, result.model_dir, prompt)
    else:
        uri = log_transformers_model(run_id, result.model_dir, prompt)
    marker = run_dir / MODEL_MARKER
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_uri": uri, "run_id": run_id, "tracking_uri": tracking_uri()}))
    tmp.replace(marker)
    return uri


def reusable_model(run_dir: Path) -> str | None:
    """The URI of the model this run folder logged, if the store in use holds it complete (``READY``)."""
    marker = run_dir / MODEL_MARKER
    try:
        logged = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    uri = str(logged.get("model_uri") or "")
    if not uri or logged.get("tracking_uri") != tracking_uri():
        return None
    status = _model_status(uri)
    if status in ("READY", None):  # None: not a logged-model URI, nothing to check
        return uri
    why = "not in" if status == "MISSING" else f"{status} in"
    logger.warning(
        "the model this checkpoint logged (%s) is %s the tracking store %s (a new, replaced or restored store?); "
        "logging it and its training curve there again",
        uri.removeprefix("models:/"),
        why,
        tracking_uri(),
    )
    return None


def _model_status(uri: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return logged_model_status(uri)
    except MlflowException as exc:
        # A deleted, replaced or restored store no longer knows the id the marker remembers.
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return "MISSING"
        raise


def lineage_seen(experiment_id: str, lineage: str, but: str) -> bool:
    """Whether the store holds a train run of ``lineage`` other than run ``but`` (it has seen its earlier steps)."""
    runs = find_runs(experiment_id, {"forgeline.lineage": lineage, RUN_NAME_TAG: "train"}, max_results=2)
    return any(run_id != but for run_id, _ in runs)


def replay_training_curve(run_id: str, result: TrainResult, up_to: int | None = None) -> int:
    """Log a checkpoint's per-step metrics, up to step ``up_to`` (all when ``None``), into ``run_id``.

    For a store that never saw the steps: the checkpoint's journal (``metrics.jsonl``) is replayed in
    batches, or, for a checkpoint older than the journal, its loss history at log and eval intervals.

    Returns:
        How many metric values were logged.
    """
    entries = read_journal(Path(result.run_dir) / JOURNAL_FILE, up_to)
    if not entries:
        entries = [e for e in history_entries(result.history) if up_to is None or e[0] <= up_to]
    if not entries:
        return 0
    count = log_metric_history(run_id, entries)
    last = max(step for step, _, _ in entries)
    set_tags(run_id, {"forgeline.replayed_steps": last})
    logger.info("logged the checkpoint's training curve (steps 1-%d, %d values) to run %s", last, count, run_id)
    return count


# --------------------------------------------------------------------------------------- register
def write_model_card(
    data: DataConfig,
    result: RegisterResult,
    evaluation: Any,
    *,
    config_yaml: str,
    config_hash: str,
    fingerprint: str,
    experiment_id: str,
    train_run_id: str,
    register_run_id: str,
    pipeline_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    dataset_dir: str | None = None,
) -> str | None:
    """Build the card, log it as ``model_card.md`` on the register run and set it as the version's description.

    Never raises: a card that cannot be written is logged as a warning (the model is registered either way).

    Args:
        data: The ``data`` config (sources, split).
        result: The gate's result.
        evaluation: The candidate's evaluation: ``.metrics`` (test figures, and a classifier's baseline
            figures), optional ``.per_class`` rows and ``.samples``.
        config_yaml: The resolved config as YAML.
        config_hash: Its hash.
        fingerprint: Cleaned-data fingerprint.
        experiment_id: For links to runs.
        train_run_id: The train run that logged the model.
        register_run_id: The register run (the artifact goes there).
        pipeline_run_id: The parent pipeline run.
        tags: The pipeline's run tags (git, Prefect).
        dataset_dir: The cleaned dataset folder.

    Returns:
        The markdown, or ``None`` if it could not be stored.
    """
    try:
        uri = tracking_uri()
        facts = card_facts(
            data,
            result,
            evaluation,
            config_yaml=config_yaml,
            config_hash=config_hash,
            fingerprint=fingerprint,
            train_run_id=train_run_id,
            pipeline_run_id=pipeline_run_id,
            tags=tags,
            dataset_dir=dataset_dir,
            run_url=lambda run_id: ui_run_url(uri, experiment_id, run_id),
        )
        previous = facts.get("previous_champion")
        if previous:
            add_champion_metrics(facts, dict(get_model_version(result.model_name, previous).tags or {}), fingerprint)
        card = build_model_card(facts)
        log_text(register_run_id, card, ARTIFACT_FILE)
        describe_version(
            result.model_name,
            result.version,
            description_text(card),
            {"forgeline.model_card_run_id": register_run_id},
        )
    except Exception as exc:  # noqa: BLE001 - the card is documentation; the registered version stands
        logger.warning("model card for %s version %s not written: %s", result.model_name, result.version, exc)
        return None
    logger.info("model card written for %s version %s", result.model_name, result.version)
    return card
