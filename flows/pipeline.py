"""The ``pipeline`` flow: clean, (tune), train, evaluate, register. It reads like a table of contents."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from forgeline.flows.compress import compress_flow, student_line
from forgeline.flows.seam import run_train, run_tune
from forgeline.flows.stages import (
    RunContext,
    clean_task,
    evaluate_task,
    read_lineage,
    register_task,
    run_tags,
    training_dir,
)
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.evaluate.baseline import BASELINE_NAME, model_metrics, model_vs_baseline
from forgeline.tasks.registry.versions import LINEAGE_TAG
from forgeline.tasks.tracking import records, store
from forgeline.tasks.tracking.links import ui_model_version_url, ui_run_url
from forgeline.tasks.tracking.registry_store import find_lineage_version
from forgeline.tasks.tracking.runs import reap_orphan_runs, stage_run
from forgeline.tasks.train.loop import TrainResult

logger = logging.getLogger(__name__)


class PipelineResult(BaseModel):
    """The run summary the CLI prints."""

    experiment_name: str
    experiment_id: str
    run_id: str
    tracking_uri: str
    fingerprint: str
    model_name: str
    version: str | None = None
    promoted: bool = False
    decision: str = ""
    champion_version: str | None = None
    metrics: dict[str, float] = {}
    reused: bool = False
    resumed_from: int | None = None
    timings: dict[str, float] = {}  # seconds per part of the run; "train_loop" is the only non-fixed cost
    student: str | None = None  # the compressed student in one line (compress.enabled), see student_line


@flow(name="pipeline", flow_run_name="pipeline {config.name}")
def pipeline_flow(
    config: PipelineConfig, data: list[str] | None = None, fresh: bool = False, deployed: bool = False
) -> PipelineResult:
    """Clean the data, tune (when ``tune.n_trials > 0``), train, evaluate, register and gate the champion.

    Args:
        config: The whole pipeline config (the Prefect UI renders it as a form).
        data: Local files, globs or directories replacing ``data.sources``.
        fresh: Train anew even if this config and data already produced a model.
        deployed: Run tune and train as flow runs of their deployments on the GPU pool (flows/seam.py).
    """
    clock = Laps()
    base_dir = Path.cwd()
    uri = store.setup_tracking(config.tracking, base_dir)
    experiment_id = store.ensure_experiment(config.name, config.tracking, base_dir)
    reap_orphan_runs(experiment_id)
    tags = run_tags(config, base_dir)
    with stage_run(experiment_id, "pipeline", tags=tags) as run_id:
        ctx = RunContext(experiment_id=experiment_id, parent_run_id=run_id, tags=tags, base_dir=str(base_dir))
        records.log_config(run_id, config)
        clock.lap("tracking_setup")
        cleaned = clean_task(config.data, ctx, data)
        ctx = ctx.model_copy(update={"tags": {**tags, "data_fingerprint": cleaned.fingerprint}})
        records.set_tags(run_id, {"data_fingerprint": cleaned.fingerprint})
        clock.lap("clean")
        config = run_tune(config, cleaned.dataset_dir, cleaned.fingerprint, run_id, deployed)
        clock.lap("tune")
        summary = PipelineResult(
            experiment_name=config.name,
            experiment_id=experiment_id,
            run_id=run_id,
            tracking_uri=uri,
            fingerprint=cleaned.fingerprint,
            model_name=config.registry.model_name,
        )
        existing = None if fresh else _existing_version(config, cleaned.fingerprint, base_dir)
        if existing is not None:
            return _reuse(summary, existing, run_id)
        outcome = run_train(config, cleaned.dataset_dir, cleaned.fingerprint, run_id, fresh, deployed)
        clock.lap("train", loop=outcome.result.loop_seconds if not outcome.result.already_done else 0.0)
        evaluation = evaluate_task(config, outcome, cleaned.dataset_dir, ctx)
        clock.lap("evaluate")
        registered = register_task(config, outcome, evaluation, cleaned.fingerprint, cleaned.dataset_dir, ctx)
        clock.lap("register")
        student = None
        if config.compress.enabled and registered.champion_version is not None:  # issue 18: compress the champion
            champion = f"models:/{config.registry.model_name}/{registered.champion_version}"
            compressed = compress_flow(config, champion, cleaned.dataset_dir, cleaned.fingerprint, parent_run_id=run_id)
            student = student_line(compressed)
            records.set_tags(run_id, {"forgeline.student": student})
            clock.lap("compress")
        metrics = run_metrics(evaluation.metrics, outcome.result, kept_best=config.keep_best())
        records.log_metrics(run_id, metrics | {f"time/{k}": v for k, v in clock.laps.items()})
        records.set_tags(run_id, {"model_version": registered.version, "promoted": registered.promoted})
        summary = summary.model_copy(
            update={
                "version": registered.version,
                "promoted": registered.promoted,
                "decision": registered.reason,
                "champion_version": registered.champion_version,
                "metrics": metrics,
                "resumed_from": outcome.result.resumed_from,
                "timings": clock.laps,
                "student": student,
            }
        )
        _publish_summary(summary)
    return summary


def run_metrics(evaluated: dict[str, float], trained: TrainResult, *, kept_best: bool) -> dict[str, float]:
    """The pipeline run's headline metrics: the evaluation's (a classifier's with the baseline's) and ``val/loss``.

    ``val/loss`` is that of the weights evaluated: the best evaluation's when training kept the best weights
    (``train.keep_best``, a classifier's default), else the last one's.
    """
    metrics = dict(evaluated)
    val_loss = trained.best_val_loss if kept_best and trained.best_val_loss is not None else trained.final_val_loss
    if val_loss is not None:
        metrics["val/loss"] = val_loss
    return metrics


class Laps:
    """Wall time per part of the run; a lap may set aside the training loop (the one non-fixed cost)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str, loop: float = 0.0) -> None:
        now = time.perf_counter()
        total = now - self._last
        self._last = now
        if loop:
            self.laps[f"{name}_loop"] = loop
            self.laps[f"{name}_overhead"] = max(0.0, total - loop)
        else:
            self.laps[name] = total


def _existing_version(config: PipelineConfig, fingerprint: str, base_dir: Path) -> object | None:
    lineage = read_lineage(training_dir(config, fingerprint, base_dir))
    if lineage is None:
        return None
    version = find_lineage_version(config.registry.model_name, lineage)
    # A version whose champion gate never finished (a crash after registering) goes through the gate again.
    return version if version is not None and "forgeline.promoted" in version.tags else None


def _reuse(summary: PipelineResult, version: object, run_id: str) -> PipelineResult:
    number = str(version.version)  # type: ignore[attr-defined]
    logger.info(
        "this config and data already produced %s version %s; nothing to train (use --fresh to train anew)",
        summary.model_name,
        number,
    )
    records.set_tags(run_id, {"forgeline.reused_version": number, LINEAGE_TAG: version.tags.get(LINEAGE_TAG, "")})  # type: ignore[attr-defined]
    return summary.model_copy(update={"version": number, "reused": True, "decision": "already registered"})


def _publish_summary(summary: PipelineResult) -> None:
    try:
        rows = headline_rows(summary.metrics)
        rows.append({"metric": "model_version", "value": summary.version} | _no_baseline(rows))
        rows.append({"metric": "promoted", "value": summary.promoted} | _no_baseline(rows))
        create_table_artifact(key="headline-metrics", table=rows, description="Headline metrics")
        create_markdown_artifact(
            key="pipeline-summary", markdown=summary_markdown(summary), description="Pipeline run summary"
        )
        link = mlflow_run_url(summary)
        if link:
            create_link_artifact(key="mlflow-run", link=link, description="The pipeline's MLflow run")
    except Exception as exc:  # noqa: BLE001 - artifacts are a courtesy; the run itself succeeded
        logger.debug("summary artifacts not published: %s", exc)


def headline_rows(metrics: dict[str, float]) -> list[dict[str, object]]:
    """Rows of the ``headline-metrics`` table: metric and value, plus the baseline's value where it has one."""
    baseline = {key: base for key, _, base in model_vs_baseline(metrics)}
    if not baseline:
        return [{"metric": k, "value": round(v, 5)} for k, v in metrics.items()]
    return [
        {"metric": k, "value": round(v, 5), "baseline": round(baseline[k], 5) if k in baseline else None}
        for k, v in model_metrics(metrics).items()
    ]


def _no_baseline(rows: list[dict[str, object]]) -> dict[str, object]:
    return {"baseline": None} if rows and "baseline" in rows[0] else {}


def summary_markdown(summary: PipelineResult) -> str:
    """The pipeline run as markdown: headline metrics (beside the baseline's), the champion decision, links."""
    run_link = mlflow_run_url(summary)
    version_link = mlflow_model_version_url(summary)
    verdict = "promoted to champion" if summary.promoted else "not promoted"
    pairs = model_vs_baseline(summary.metrics)
    lines = [
        f"# Pipeline run: {summary.experiment_name}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| `{k}` | {v:.4f} |" for k, v in model_metrics(summary.metrics).items()),
        "",
    ]
    if pairs:
        lines += [
            f"## Model vs baseline ({BASELINE_NAME}, same test split)",
            "",
            "| metric | model | baseline | model - baseline |",
            "|---|---|---|---|",
            *(f"| `{k}` | {m:.4f} | {b:.4f} | {m - b:+.4f} |" for k, m, b in pairs),
            "",
        ]
    lines += [
        f"**Model:** `{summary.model_name}` version {summary.version}"
        + (f" ([MLflow]({version_link}))" if version_link else ""),
        "",
        f"**Champion gate:** {verdict}: {summary.decision}"
        + (f" (champion is version {summary.champion_version})" if summary.champion_version else ""),
        "",
        f"**MLflow run:** [{summary.run_id}]({run_link})" if run_link else f"**MLflow run:** `{summary.run_id}`",
        "",
        f"**Data fingerprint:** `{summary.fingerprint[:16]}`",
    ]
    if summary.student:
        lines += ["", f"**Compressed student:** {summary.student}"]
    return "\n".join(lines) + "\n"


def mlflow_model_version_url(summary: PipelineResult) -> str | None:
    """The MLflow UI link of the registered model version (same UI address as :func:`mlflow_run_url`)."""
    if summary.version is None:
        return None
    return ui_model_version_url(summary.tracking_uri, summary.model_name, summary.version)


def mlflow_run_url(summary: PipelineResult) -> str | None:
    """The MLflow UI link of the pipeline run (the local UI's default address for a SQLite store)."""
    return ui_run_url(summary.tracking_uri, summary.experiment_id, summary.run_id)
