"""Prefect wiring for every stage: call the pure stage function, record to MLflow, return a small result.

This is the only module that combines stage logic, Prefect and the tracking module. Each task body
is a few lines; the logic lives in ``tasks/<stage>.py`` and is tested without Prefect.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from forgeline.flows.prefect_progress import TrainProgressFeed
from forgeline.tasks import progress
from forgeline.tasks.config import DataConfig, PipelineConfig
from forgeline.tasks.data.cleaning import CleanResult, clean_dataset, read_split_text, report_rows
from forgeline.tasks.evaluate.evaluation import EvalResult, evaluate_model, score_text
from forgeline.tasks.registry.model_card import write_model_card
from forgeline.tasks.registry.versions import (
    BPB_TAG,
    FINGERPRINT_TAG,
    RegisterResult,
    gate_champion,
    log_transformers_model,
    register_version,
)
from forgeline.tasks.tracking import runs as tracking
from forgeline.tasks.train.training import TrainCallbacks, TrainResult, train_from_config
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

logger = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------ clean
@task(name="clean", task_run_name="clean data")
def clean_task(cfg: DataConfig, ctx: RunContext, data: list[str] | None = None) -> CleanResult:
    """Clean, split and fingerprint the data; log the report and the splits as dataset inputs."""
    with tracking.stage_run(ctx.experiment_id, "clean", parent_run_id=ctx.parent_run_id, tags=ctx.tags) as run_id:
        with progress.reporter().cleaning():
            result = clean_dataset(cfg, data_override=data, base_dir=Path(ctx.base_dir))
        record_cleaning(run_id, result)
        _publish_table("cleaning-report", report_rows(result), f"Cleaning report ({result.fingerprint[:12]})")
    return result


def record_cleaning(run_id: str, result: CleanResult) -> None:
    """Cleaning metrics, the report artifact, and each split as an MLflow dataset input."""
    tracking.set_tags(run_id, {"data_fingerprint": result.fingerprint, "forgeline.cache_hit": result.cache_hit})
    metrics = {"rows_in": result.rows_in, **{f"dropped/{k}": v for k, v in result.dropped.items()}}
    metrics |= {f"rows/{k}": v for k, v in result.rows_per_split.items()}
    metrics |= {f"bytes/{k}": v for k, v in result.bytes_per_split.items()}
    tracking.log_metrics(run_id, metrics)
    tracking.log_dict(run_id, result.model_dump(mode="json"), "cleaning_report.json")
    _log_cleaning_chart(run_id, result)
    for split, rows in result.rows_per_split.items():
        if rows:
            tracking.log_dataset_input(
                run_id,
                name=f"cleaned-{split}",
                digest=result.fingerprint,
                source=str(Path(result.dataset_dir) / f"{split}.jsonl"),
                context=split,
                profile={"rows": rows, "bytes": result.bytes_per_split.get(split, 0)},
            )


def _log_cleaning_chart(run_id: str, result: CleanResult) -> None:
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
            tracking.log_artifact(run_id, chart)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - a chart is a courtesy; the JSON report is logged already
        logger.warning("cleaning chart not logged: %s", exc)


def _draw_cleaning_chart(result: CleanResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = tracking.cleaning_report_figure(result.dropped, result.rows_per_split, rows_in=result.rows_in)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------ train
def run_training(
    cfg: PipelineConfig, dataset_dir: str, fingerprint: str, ctx: RunContext, *, fresh: bool
) -> TrainOutcome:
    """Train in a ``train`` MLflow run with batched per-step metrics, then log the model."""
    run_dir = training_dir(cfg, fingerprint, Path(ctx.base_dir))
    if fresh:
        _clear_run_dir(run_dir)
    lineage = read_lineage(run_dir, create=True)
    tags = {**ctx.tags, "data_fingerprint": fingerprint, "forgeline.lineage": lineage}
    with tracking.stage_run(
        ctx.experiment_id,
        "train",
        parent_run_id=ctx.parent_run_id,
        tags=tags,
        system_metrics=cfg.tracking.log_system_metrics,
    ) as run_id:
        tracking.log_config(run_id, cfg)
        buffer = tracking.MetricBuffer(run_id, flush_every=cfg.tracking.metric_flush_interval)
        live = TrainProgressFeed(cfg.train.max_steps)  # terminal bar + Prefect progress artifact

        def on_start(summary: dict[str, Any]) -> None:
            tracking.log_params(run_id, {f"summary.{k}": v for k, v in summary.items()})
            live.start(summary)

        def on_metrics(step: int, metrics: dict[str, float]) -> None:
            buffer.add(step, metrics)
            live.update(step, metrics)

        callbacks = TrainCallbacks(on_start=on_start, on_metrics=on_metrics)
        try:
            result = train_from_config(cfg, dataset_dir=dataset_dir, run_dir=run_dir, callbacks=callbacks)
        finally:
            buffer.close()
            live.close()
        record_training(run_id, result)
        model_uri = _logged_model_uri(run_dir, run_id, result, cfg.eval.prompts[0])
    return TrainOutcome(train_run_id=run_id, model_uri=model_uri, lineage=lineage, result=result)


def record_training(run_id: str, result: TrainResult) -> None:
    summary = {
        "steps": result.steps,
        "tokens_per_sec_mean": result.tokens_per_sec,
        "train_seconds": result.seconds,
        "nonfinite_steps": result.nonfinite_steps,
    }
    if result.best_val_loss is not None:
        summary["best_val_loss"] = result.best_val_loss
    tracking.log_metrics(run_id, summary, step=result.steps)
    tracking.set_tags(
        run_id,
        {
            "forgeline.resumed_from": result.resumed_from if result.resumed_from is not None else "none",
            "forgeline.already_done": result.already_done,
        },
    )
    if result.history:
        import matplotlib.pyplot as plt

        fig = tracking.loss_curve_figure(result.history)
        tracking.log_figure(run_id, fig, "loss_curve.png")
        plt.close(fig)


def _logged_model_uri(run_dir: Path, run_id: str, result: TrainResult, prompt: str) -> str:
    # The model is logged once per lineage and tracking store; a retry after a crash re-uses the logged model.
    # The same checkpoint folder may later be tracked by another store (a local run, then `forgeline up`):
    # a model logged to the old store does not exist in the new one, so log it again there.
    import mlflow

    store = mlflow.get_tracking_uri()
    marker = run_dir / "logged_model.json"
    if marker.exists():
        logged = json.loads(marker.read_text())
        if logged.get("tracking_uri") == store:
            return logged["model_uri"]
    uri = log_transformers_model(run_id, result.model_dir, prompt)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model_uri": uri, "run_id": run_id, "tracking_uri": store}))
    tmp.replace(marker)
    return uri


def training_dir(cfg: PipelineConfig, fingerprint: str, base_dir: Path) -> Path:
    """The checkpoint folder of this config and data: re-running the same pair resumes it."""
    root = Path(cfg.train.checkpoint_dir)
    if not root.is_absolute():
        root = base_dir / root
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.name)
    return root / safe_name / f"{fingerprint[:12]}-{cfg.config_hash()}"


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
    import shutil

    if run_dir.exists():
        logger.info("--fresh: discarding %s", run_dir)
        shutil.rmtree(run_dir)


# --------------------------------------------------------------------------------------- evaluate
def test_text(dataset_dir: str) -> str:
    """The held-out text: the test split, or validation when the config keeps no test split."""
    text = read_split_text(dataset_dir, "test")
    if not text:
        logger.warning("no test split (data.fractions.test = 0): evaluating on the validation split")
        text = read_split_text(dataset_dir, "validation")
    return text


@task(name="evaluate", task_run_name="evaluate candidate")
def evaluate_task(cfg: PipelineConfig, outcome: TrainOutcome, dataset_dir: str, ctx: RunContext) -> EvalResult:
    """Score the candidate on the held-out split and generate samples from the fixed prompts."""
    from forgeline.tasks.model.modeling import load_pretrained_model
    from forgeline.tasks.train.training import resolve_device

    with tracking.stage_run(ctx.experiment_id, "evaluate", parent_run_id=ctx.parent_run_id, tags=ctx.tags) as run_id:
        device = resolve_device(cfg.train)
        model, tokenizer = load_pretrained_model(outcome.result.model_dir)
        result = evaluate_model(
            model.to(device),
            tokenizer,
            test_text(dataset_dir),
            cfg.eval,
            block_size=cfg.model.block_size,
            seed=cfg.seed,
            device=device,
        )
        tracking.log_metrics(run_id, headline_metrics(result))
        tracking.log_dict(run_id, {"samples": result.samples}, "samples.json")
        tracking.log_text(run_id, samples_markdown(result.samples), "samples.md")
    return result


def headline_metrics(result: EvalResult) -> dict[str, float]:
    return {
        "test/loss": result.loss,
        "test/perplexity": result.perplexity,
        "test/bits_per_byte": result.bits_per_byte,
    }


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    parts = ["# Sample generations\n"]
    for i, sample in enumerate(samples, 1):
        parts.append(f"## Prompt {i}: `{sample['prompt']!r}`\n\n```\n{sample['text']}\n```\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------- register
@task(name="register", task_run_name="register and gate champion")
def register_task(
    cfg: PipelineConfig,
    outcome: TrainOutcome,
    evaluation: EvalResult,
    fingerprint: str,
    dataset_dir: str,
    ctx: RunContext,
) -> RegisterResult:
    """Register one version per lineage, alias it ``challenger``, and move ``champion`` only if better."""
    with tracking.stage_run(ctx.experiment_id, "register", parent_run_id=ctx.parent_run_id, tags=ctx.tags) as run_id:
        reg = cfg.registry
        tags = {
            BPB_TAG: repr(evaluation.bits_per_byte),
            FINGERPRINT_TAG: fingerprint,
            "test_loss": f"{evaluation.loss:.6f}",
            "test_perplexity": f"{evaluation.perplexity:.4f}",
            "train_run_id": outcome.train_run_id,
            "config_hash": cfg.config_hash(),
        }
        version, existed = register_version(reg.model_name, outcome.model_uri, outcome.lineage, tags)
        result = gate_champion(
            reg.model_name,
            version,
            evaluation.bits_per_byte,
            fingerprint=fingerprint,
            min_improvement=reg.min_improvement,
            champion_alias=reg.champion_alias,
            challenger_alias=reg.challenger_alias,
            rescore=lambda uri: rescore_model(uri, cfg, dataset_dir),
        )
        result = result.model_copy(update={"already_registered": existed})
        write_model_card(
            cfg,
            result,
            evaluation,
            fingerprint=fingerprint,
            experiment_id=ctx.experiment_id,
            train_run_id=outcome.train_run_id,
            register_run_id=run_id,
            pipeline_run_id=ctx.parent_run_id,
            tags=ctx.tags,
            dataset_dir=dataset_dir,
        )
        tracking.set_tags(
            run_id, {"model_version": result.version, "promoted": result.promoted, "decision": result.reason}
        )
        if result.delta is not None:
            tracking.log_metrics(run_id, {"delta_bits_per_byte": result.delta})
    return result


def rescore_model(model_uri: str, cfg: PipelineConfig, dataset_dir: str) -> float:
    """Bits per byte of a registered model on this run's held-out split (same code as the candidate)."""
    from forgeline.tasks.evaluate.evaluation import bits_per_byte
    from forgeline.tasks.model.modeling import load_pretrained_model
    from forgeline.tasks.train.training import resolve_device

    device = resolve_device(cfg.train)
    model, tokenizer = load_pretrained_model(model_uri)
    block = getattr(model.config, "n_positions", cfg.model.block_size)
    nats, _, n_bytes = score_text(
        model.to(device),
        tokenizer,
        test_text(dataset_dir),
        block_size=block,
        max_tokens=cfg.eval.max_tokens,
        device=device,
    )
    return bits_per_byte(nats, n_bytes)


def _publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    try:
        create_table_artifact(key=key, table=rows, description=description)
    except Exception as exc:  # noqa: BLE001 - a missing Prefect context must not fail the stage
        logger.debug("table artifact %s not published: %s", key, exc)
