"""Prefect wiring for every stage: call the pure stage function, record to MLflow, return a small result.

This is the only module that combines stage logic, Prefect and the tracking package. Each task body
is a few lines; the logic lives in ``tasks/<stage>/`` and is tested without Prefect. The whole config
stops here: each stage function gets its own slice.

Clean and evaluate are idempotent (content-addressed output; a read-only score), so Prefect retries them
after a transient failure; bad input (``forgeline.tasks.errors.is_transient``) fails at once.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from forgeline.flows.distributed import train_in_ranks
from forgeline.flows.prefect_progress import TrainProgressFeed
from forgeline.flows.rescore import rescore_model
from forgeline.tasks import progress
from forgeline.tasks.config import DataConfig, PipelineConfig, dump_config
from forgeline.tasks.data.cleaning import CleanResult, clean_dataset, report_rows
from forgeline.tasks.data.labels import class_count_rows
from forgeline.tasks.errors import is_transient
from forgeline.tasks.evaluate import completion as completion_eval
from forgeline.tasks.evaluate.candidate import evaluate_candidate
from forgeline.tasks.evaluate.class_metrics import MISTAKE_COLUMNS, PER_CLASS_COLUMNS
from forgeline.tasks.evaluate.classification import ClassificationEvalResult, eval_device, evaluate_classifier
from forgeline.tasks.evaluate.evaluation import EvalResult
from forgeline.tasks.locks import owned_lock
from forgeline.tasks.registry.versions import (
    BPB_METRIC,
    FINGERPRINT_TAG,
    GATE_METRIC_TAG,
    TASK_TAG,
    RegisterResult,
    RegistryError,
    gate_champion,
    metric_tags,
    register_version,
)
from forgeline.tasks.tracking import models, records, stage_records
from forgeline.tasks.tracking.metrics import MetricBuffer
from forgeline.tasks.tracking.registry_store import MlflowRegistry
from forgeline.tasks.tracking.runs import stage_run
from forgeline.tasks.tracking.tags import git_tags
from forgeline.tasks.train import checkpoints
from forgeline.tasks.train.distributed import global_batch, world_size
from forgeline.tasks.train.kinds import train_task_model
from forgeline.tasks.train.loop import TrainCallbacks, TrainResult

logger = logging.getLogger(__name__)

RETRIES = 2
RETRY_DELAYS = [2, 5]  # seconds before the first and the second retry


class RunContext(BaseModel):
    """Where a stage records: small, serializable, the same in-process or across a deployment."""

    experiment_id: str
    parent_run_id: str | None = None
    tags: dict[str, str] = {}
    base_dir: str


class TrainOutcome(BaseModel):
    """The train stage's hand-off: ids and paths only."""

    train_run_id: str
    model_uri: str
    lineage: str
    result: TrainResult


def retry_transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed run unless it failed on bad input (see ``is_transient``)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - an unreadable failure is treated like any other: retried
        return True
    return not isinstance(exc, BaseException) or is_transient(exc)


def prefect_tags() -> dict[str, str]:
    """The current Prefect flow run's id and UI URL, when there is one."""
    try:
        from prefect.runtime import flow_run

        run_id = flow_run.id
        if not run_id:
            return {}
        tags = {"prefect.flow_run_id": str(run_id)}
        url = flow_run.ui_url
        if url and str(url).startswith("http"):
            tags["prefect.flow_run_url"] = str(url)
        return tags
    except Exception:  # noqa: BLE001 - tags are best effort; outside Prefect there is simply none
        return {}


def run_tags(config: PipelineConfig, base_dir: Path) -> dict[str, str]:
    """The tags of every run a flow starts: git commit, Prefect flow run, config hash."""
    return {**git_tags(base_dir), **prefect_tags(), "config_hash": config.config_hash()}


# ------------------------------------------------------------------------------------------ clean
@task(
    name="clean",
    task_run_name="clean data",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)
def clean_task(cfg: DataConfig, ctx: RunContext, data: list[str] | None = None) -> CleanResult:
    """Clean, split and fingerprint the data; log the report and the splits as dataset inputs."""
    with stage_run(ctx.experiment_id, "clean", parent_run_id=ctx.parent_run_id, tags=ctx.tags) as run_id:
        with progress.reporter().cleaning():
            result = clean_dataset(cfg, data_override=data, base_dir=Path(ctx.base_dir))
        stage_records.record_cleaning(run_id, result)
        _publish_table("cleaning-report", report_rows(result), f"Cleaning report ({result.fingerprint[:12]})")
        if result.class_counts:
            rows = class_count_rows(result.class_counts)
            _publish_table("class-counts", rows, f"Records per class and split ({result.fingerprint[:12]})")
    return result


# ------------------------------------------------------------------------------------------ train
def run_training(
    cfg: PipelineConfig, dataset_dir: str, fingerprint: str, ctx: RunContext, *, fresh: bool
) -> TrainOutcome:
    """Train in a ``train`` MLflow run with batched per-step metrics, then log the model.

    One process at a time trains a lineage: a second run of the same config and data waits for the first
    (a log line names it), then finds its finished checkpoint instead of writing into it. With several
    ranks (``train.nproc_per_node``, ``train.nnodes``) training runs under torchrun while this process
    holds the lock and the run (``flows/distributed.py``).
    """
    run_dir = training_dir(cfg, fingerprint, Path(ctx.base_dir))

    def waiting(holder: str) -> None:
        logger.warning("waiting for %s, which is training this config and data in %s", holder, run_dir)

    with owned_lock(lineage_lock_path(run_dir), on_wait=waiting):
        return _train_locked(cfg, dataset_dir, run_dir, fingerprint, ctx, fresh=fresh)


def lineage_lock_path(run_dir: Path) -> Path:
    """The lock of one training lineage: beside its folder, so ``--fresh`` can empty the folder under it."""
    return run_dir.with_name(run_dir.name + ".lock")


def _train_locked(
    cfg: PipelineConfig, dataset_dir: str, run_dir: Path, fingerprint: str, ctx: RunContext, *, fresh: bool
) -> TrainOutcome:
    if fresh:
        _clear_run_dir(run_dir)
    lineage = read_lineage(run_dir, create=True)
    tags = {**ctx.tags, "data_fingerprint": fingerprint, "forgeline.lineage": lineage}
    with stage_run(
        ctx.experiment_id,
        "train",
        parent_run_id=ctx.parent_run_id,
        tags=tags,
        system_metrics=cfg.tracking.log_system_metrics,
    ) as run_id:
        records.log_config(run_id, cfg)
        ranks = 1 if cfg.kind in ("classification", "completion") else world_size(cfg.train)
        records.log_params(run_id, {"world_size": ranks, "global_batch": global_batch(cfg.train, ranks)})
        buffer = MetricBuffer(run_id, flush_every=cfg.tracking.metric_flush_interval)
        live = TrainProgressFeed(cfg.train.max_steps)  # terminal bar + Prefect progress artifact

        def on_start(summary: dict[str, Any]) -> None:
            records.log_params(run_id, {f"summary.{k}": v for k, v in summary.items()})
            live.start(summary)

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            buffer.add(step, metrics)
            live.update(step, metrics)

        try:
            if ranks > 1:  # rank 0 logs the params and metrics to run_id itself; this process only shows them
                result = train_in_ranks(
                    cfg, dataset_dir, run_dir, run_id, Path(ctx.base_dir), on_start=live.start, on_metrics=live.update
                )
            else:  # classification and completion always: tasks/config.py refuses several ranks for them
                callbacks = TrainCallbacks(on_start=on_start, on_metrics=on_metrics)
                result = train_task_model(cfg, dataset_dir, run_dir, callbacks, fetch_model=models.download_model)
        finally:
            buffer.close()
            live.close()
        stage_records.record_training(run_id, result)
        model_uri = stage_records.reusable_model(run_dir)
        _replay_unseen_steps(run_id, result, ctx.experiment_id, lineage, logs_model=model_uri is None)
        if model_uri is None:
            model_uri = stage_records.log_model(run_dir, run_id, result, cfg.eval.prompts[0])
    return TrainOutcome(train_run_id=run_id, model_uri=model_uri, lineage=lineage, result=result)


def _replay_unseen_steps(
    run_id: str, result: TrainResult, experiment_id: str, lineage: str, *, logs_model: bool
) -> None:
    # The store in use may never have seen the steps this run did not train: it is new, replaced, or restored
    # from a backup older than the checkpoint. The version registered from this run must show its curve.
    if result.already_done:
        if logs_model:  # the finished checkpoint's model goes into this run: it becomes the version's run
            stage_records.replay_training_curve(run_id, result)
    elif result.resumed_from and not stage_records.lineage_seen(experiment_id, lineage, but=run_id):
        stage_records.replay_training_curve(run_id, result, up_to=result.resumed_from)


def training_dir(cfg: PipelineConfig, fingerprint: str, base_dir: Path) -> Path:
    """The checkpoint folder of this config and data: re-running the same pair resumes it."""
    return checkpoints.training_dir(cfg.train.checkpoint_dir, cfg.name, fingerprint, cfg.config_hash(), base_dir)


def read_lineage(run_dir: Path, *, create: bool = False) -> str | None:
    """The id of the training lineage in ``run_dir`` (one registered version per lineage)."""
    path = run_dir / "lineage"
    if path.exists():
        return path.read_text().strip()
    if not create:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lineage = uuid.uuid4().hex
    path.write_text(lineage)
    return lineage


def _clear_run_dir(run_dir: Path) -> None:
    if run_dir.exists():
        logger.info("--fresh: discarding %s", run_dir)
        shutil.rmtree(run_dir)


# --------------------------------------------------------------------------------------- evaluate
@task(
    name="evaluate",
    task_run_name="evaluate candidate",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_transient,
)
def evaluate_task(
    cfg: PipelineConfig, outcome: TrainOutcome, dataset_dir: str, ctx: RunContext
) -> EvalResult | ClassificationEvalResult | completion_eval.CompletionEvalResult:
    """Score the candidate on the held-out split.

    A language model also generates samples from the fixed prompts; a classifier is scored beside the TF-IDF
    baseline, with its per-class table, most confident mistakes and confusion matrix.
    """
    with stage_run(ctx.experiment_id, "evaluate", parent_run_id=ctx.parent_run_id, tags=ctx.tags) as run_id:
        if cfg.kind == "completion":
            completed = completion_eval.evaluate_completion(outcome.result.model_dir, dataset_dir, cfg)
            records.log_metrics(run_id, completed.metrics)
            _record_completion(run_id, completed)
            return completed
        if cfg.kind == "classification":
            scored = evaluate_classifier(
                outcome.result.model_dir,
                dataset_dir,
                cfg.eval,
                block_size=cfg.model.block_size,
                batch_size=cfg.train.batch_size,
                device=eval_device(cfg.train.device),
                out_dir=Path(outcome.result.model_dir).parent / "evaluation",
            )
            records.log_metrics(run_id, headline_metrics(scored))
            _record_classification(run_id, scored)
            return scored
        result = evaluate_candidate(
            outcome.result.model_dir, dataset_dir, cfg.eval, cfg.train, block_size=cfg.model.block_size, seed=cfg.seed
        )
        records.log_metrics(run_id, headline_metrics(result))
        records.log_dict(run_id, {"samples": result.samples}, "samples.json")
        records.log_text(run_id, samples_markdown(result.samples), "samples.md")
    return result


def headline_metrics(result: EvalResult | ClassificationEvalResult) -> dict[str, float]:
    """The evaluation's headline numbers under their MLflow metric names.

    A language model's loss, perplexity and bits per byte; a classifier's accuracy, precision, recall and F1
    (macro and weighted), loss, and the baseline's accuracy and F1 (``baseline/...``).
    """
    return dict(result.metrics)


def _record_classification(run_id: str, result: ClassificationEvalResult) -> None:
    records.log_table(run_id, result.per_class, "per_class.json", columns=PER_CLASS_COLUMNS)
    records.log_table(run_id, result.mistakes, "confident_mistakes.json", columns=MISTAKE_COLUMNS)
    records.log_dict(run_id, {"labels": result.labels, "counts": result.confusion}, "confusion_matrix.json")
    records.log_artifact(run_id, result.confusion_png)
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in result.per_class]
    _publish_table("per-class", rounded, f"Per-class precision, recall, F1 and support ({result.examples} records)")
    mistakes = [{**row, "score": round(row["score"], 4)} for row in result.mistakes]
    _publish_table("confident-mistakes", mistakes, "The wrong predictions the model was surest of")


def _record_completion(run_id: str, result: completion_eval.CompletionEvalResult) -> None:
    records.set_tags(run_id, {"bleu_signature": result.bleu_signature, "test_pairs_left_out": result.prompts_too_long})
    records.log_table(run_id, result.examples, "completions.json", columns=completion_eval.COMPLETION_COLUMNS)
    records.log_text(run_id, completion_eval.examples_markdown(result), "completions_worst_best.md")
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in result.examples]
    _publish_table("completions", rounded[:500], f"Prompt, reference, prediction and scores ({result.scored} pairs)")


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """The sample generations as a markdown page (the ``samples.md`` artifact)."""
    parts = ["# Sample generations\n"]
    for i, sample in enumerate(samples, 1):
        parts.append(f"## Prompt {i}: `{sample['prompt']!r}`\n\n```\n{sample['text']}\n```\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------- register
@task(name="register", task_run_name="register and gate champion")
def register_task(
    cfg: PipelineConfig,
    outcome: TrainOutcome,
    evaluation: Any,
    fingerprint: str,
    dataset_dir: str,
    ctx: RunContext,
) -> RegisterResult:
    """Register one version per lineage, alias it ``challenger``, and move ``champion`` only if better.

    The gate compares ``cfg.gate_metric()`` (``registry.metric``, or the task's: bits per byte for a language
    model, macro F1 for a classifier); every figure of ``evaluation.metrics`` becomes a version tag.
    """
    metric, higher = cfg.gate_metric()
    scores = {key: float(value) for key, value in evaluation.metrics.items()}
    if metric not in scores:
        raise RegistryError(
            f"registry.metric {metric!r} is not one of the evaluation's metrics ({', '.join(sorted(scores))})"
        )
    with stage_run(ctx.experiment_id, "register", parent_run_id=ctx.parent_run_id, tags=ctx.tags) as run_id:
        reg = cfg.registry
        tags = {
            **metric_tags(scores),
            FINGERPRINT_TAG: fingerprint,
            TASK_TAG: cfg.kind,
            GATE_METRIC_TAG: metric,
            "train_run_id": outcome.train_run_id,
            "config_hash": cfg.config_hash(),
        }
        store = MlflowRegistry()
        version, existed = register_version(store, reg.model_name, outcome.model_uri, outcome.lineage, tags)
        result = gate_champion(
            store,
            reg.model_name,
            version,
            scores[metric],
            fingerprint=fingerprint,
            min_improvement=reg.min_improvement,
            champion_alias=reg.champion_alias,
            challenger_alias=reg.challenger_alias,
            rescore=lambda uri: rescore_model(uri, cfg, dataset_dir),
            metric=metric,
            higher_is_better=higher,
        )
        result = result.model_copy(update={"already_registered": existed})
        stage_records.write_model_card(
            cfg.data,
            result,
            evaluation,
            config_yaml=dump_config(cfg),
            config_hash=cfg.config_hash(),
            fingerprint=fingerprint,
            experiment_id=ctx.experiment_id,
            train_run_id=outcome.train_run_id,
            register_run_id=run_id,
            pipeline_run_id=ctx.parent_run_id,
            tags=ctx.tags,
            dataset_dir=dataset_dir,
        )
        records.set_tags(
            run_id, {"model_version": result.version, "promoted": result.promoted, "decision": result.reason}
        )
        if result.delta is not None:
            gate_delta = {"gate/improvement": result.delta}
            if metric == BPB_METRIC:
                gate_delta["delta_bits_per_byte"] = result.delta
            records.log_metrics(run_id, gate_delta)
    return result


def _publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    try:
        create_table_artifact(key=key, table=rows, description=description)
    except Exception as exc:  # noqa: BLE001 - a missing Prefect context must not fail the stage
        logger.debug("table artifact %s not published: %s", key, exc)
