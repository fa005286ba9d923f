"""The ``compress`` flow: distil (or prune) a registered teacher into a smaller student and register it.

Called by ``forgeline compress`` and, when ``compress.enabled``, by the pipeline after register. The stage
logic is :mod:`forgeline.tasks.compress`; this module only wires it to MLflow and Prefect.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from forgeline.flows.stages import run_tags
from forgeline.tasks.compress.stage import compress_hash, compress_model
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.registry.compressed import register_student, student_tags
from forgeline.tasks.registry.versions import RegisterResult
from forgeline.tasks.tracking import compress_records, models, records, store
from forgeline.tasks.tracking.metrics import MetricBuffer
from forgeline.tasks.tracking.registry_store import MlflowRegistry
from forgeline.tasks.tracking.runs import stage_run
from forgeline.tasks.train.checkpoints import training_dir

logger = logging.getLogger(__name__)


class CompressOutcome(BaseModel):
    """What the CLI prints: the teacher, the registered student and the trade-off table."""

    teacher_uri: str
    run_id: str
    registered: RegisterResult
    table: dict[str, list]
    already_done: bool = False


def student_line(outcome: CompressOutcome) -> str:
    """The student in one line for a run summary: its version and gate, the task metric, size and speed vs teacher.

    For example ``shakespeare-char-small version 1, champion (...): bits_per_byte 2.8170 (teacher 2.7435),
    parameters 0.51x, tokens_per_sec 1.63x``.
    """
    reg, table = outcome.registered, outcome.table
    rows = {
        q: (t, s, r)
        for q, t, s, r in zip(*(table[k] for k in ("quantity", "teacher", "student", "student/teacher")), strict=True)
    }
    verdict = "champion" if reg.promoted else "no alias"
    head = f"{reg.model_name} version {reg.version}, {verdict} ({reg.reason})"
    metric = next((q for q in ("bits_per_byte", "f1_macro", "rougeL") if q in rows), None)
    details = [f"{metric} {rows[metric][1]:.4f} (teacher {rows[metric][0]:.4f})"] if metric else []
    for q in ("parameters", *(q for q in rows if q.endswith("_per_sec"))):
        if q in rows and rows[q][2] is not None:
            details.append(f"{q} {rows[q][2]:.2f}x")
    return head + (": " + ", ".join(details) if details else "")


def student_model_name(config: PipelineConfig) -> str:
    """``compress.model_name``, else ``<registry.model_name>-small``."""
    return config.compress.model_name or f"{config.registry.model_name}-small"


@flow(name="compress", flow_run_name="compress {config.name}", log_prints=False)
def compress_flow(
    config: PipelineConfig,
    teacher_uri: str | None = None,
    dataset_dir: str | None = None,
    fingerprint: str | None = None,
    parent_run_id: str | None = None,
) -> CompressOutcome:
    """Compress ``teacher_uri`` (default: the config's champion) and register the student with its trade-off.

    Args:
        config: The resolved pipeline config (its ``compress`` section describes the student).
        teacher_uri: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``.
        dataset_dir: The cleaned dataset; ``None`` cleans the config's data (a cache hit after a run).
        fingerprint: That dataset's fingerprint.
        parent_run_id: The pipeline's MLflow run, when called from the pipeline (the compress run nests there).
    """
    base_dir = Path.cwd()
    store.setup_tracking(config.tracking, base_dir)
    experiment_id = store.ensure_experiment(config.name, config.tracking, base_dir)
    reg = config.registry
    teacher = compress_records.resolve_teacher(teacher_uri or f"models:/{reg.model_name}@{reg.champion_alias}")
    if dataset_dir is None or fingerprint is None:
        from forgeline.tasks.data.cleaning import clean_dataset

        cleaned = clean_dataset(config.data, base_dir=base_dir)
        dataset_dir, fingerprint = cleaned.dataset_dir, cleaned.fingerprint
    cfg = config.compress
    run_hash = compress_hash(cfg, config.train, seed=config.seed, teacher_id=teacher.uri, fingerprint=fingerprint)
    run_dir = training_dir(config.train.checkpoint_dir, config.name, fingerprint, f"compress-{run_hash}", base_dir)
    tags = {**run_tags(config, base_dir), "data_fingerprint": fingerprint, "forgeline.teacher": teacher.uri}
    with stage_run(experiment_id, "compress", parent_run_id=parent_run_id, tags=tags) as run_id:
        records.log_params(run_id, {f"compress.{k}": v for k, v in cfg.model_dump(mode="json").items()})
        buffer = MetricBuffer(run_id, flush_every=config.tracking.metric_flush_interval)
        try:
            result = compress_model(
                teacher.uri,
                cfg,
                config.train,
                config.eval,
                dataset_dir=dataset_dir,
                run_dir=run_dir,
                block_size=config.model.block_size,
                seed=config.seed,
                run_hash=run_hash,
                fetch=models.download_model,
                on_metrics=buffer.add,
                task=config,
            )
        finally:
            buffer.close()
        compress_records.record_compression(run_id, result)
        prompt = config.eval.prompts[0] if config.eval.prompts else "\n"
        model_uri = compress_records.log_student_once(run_dir, run_id, result.model_dir, prompt)
        registered = register_student(
            MlflowRegistry(),
            student_model_name(config),
            model_uri,
            f"compress-{run_hash}",
            teacher_name=teacher.name,
            teacher_version=teacher.version,
            teacher_metric=result.teacher_metric,
            student_metric=result.student_metric,
            max_quality_drop=cfg.max_quality_drop,
            champion_alias=reg.champion_alias,
            tags={**student_tags(result.student.model_dump()), "data_fingerprint": fingerprint},
            metric=result.metric,
            higher_is_better=result.higher_is_better,
        )
        card = compress_records.student_card(result, teacher, registered, cfg)
        compress_records.publish_card(run_id, registered, card)
        records.set_tags(
            run_id,
            {"model_version": registered.version, "promoted": registered.promoted, "decision": registered.reason},
        )
    return CompressOutcome(
        teacher_uri=teacher.uri,
        run_id=run_id,
        registered=registered,
        table=result.table,
        already_done=result.already_done,
    )
