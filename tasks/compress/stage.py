"""The compress stage: teacher in, a smaller student out, distilled, saved and measured against the teacher.

Free of Prefect and MLflow: the teacher comes through ``fetch`` (the tracking package's download), progress
leaves through ``on_metrics``, and the registry gate is :mod:`forgeline.tasks.registry.compressed`'s.
Task types other than the causal LM plug in at :func:`load_teacher` and :data:`~.measure.METRIC`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from forgeline.tasks.compress.distill import DistillSettings, OnMetrics, distill
from forgeline.tasks.compress.measure import ModelMeasure, measure_models, tradeoff_table
from forgeline.tasks.compress.student import (
    CompressError,
    StudentSpec,
    build_student,
    check_vocabularies,
    resolve_student,
)
from forgeline.tasks.config import CompressConfig, EvalConfig, TrainConfig

logger = logging.getLogger(__name__)

DONE_FILE = "done.json"
_NOT_IN_HASH = {"enabled", "model_name", "max_quality_drop", "latency_requests", "latency_new_tokens"}


class CompressResult(BaseModel):
    """What a finished compression leaves behind: the student's folder and both sides of the trade-off."""

    run_dir: str
    model_dir: str
    spec: StudentSpec
    steps: int
    resumed_from: int | None = None
    already_done: bool = False
    final_val_loss: float | None = None
    nonfinite_steps: int = 0
    teacher: ModelMeasure
    student: ModelMeasure
    table: dict[str, list[Any]]
    history: list[dict[str, float]] = []


def compress_hash(cfg: CompressConfig, train_cfg: TrainConfig, *, seed: int, teacher_id: str, fingerprint: str) -> str:
    """What determines the student's weights: the teacher version, the data, the student and loop settings."""
    payload = {
        "compress": cfg.model_dump(mode="json", exclude=_NOT_IN_HASH),
        "train": train_cfg.model_dump(mode="json", exclude={"checkpoint_dir"}),
        "seed": seed,
        "teacher": teacher_id,
        "fingerprint": fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def distill_train_config(cfg: CompressConfig, train_cfg: TrainConfig) -> TrainConfig:
    """``train`` with the compress section's steps and learning rate (warm-up at most a tenth of the steps)."""
    lr = cfg.learning_rate or train_cfg.learning_rate
    return train_cfg.model_copy(
        update={
            "max_steps": cfg.max_steps,
            "learning_rate": lr,
            "min_lr": min(train_cfg.min_lr, lr),
            "warmup_steps": min(train_cfg.warmup_steps, cfg.max_steps // 10),
            "lr_decay_steps": None,
            "early_stopping_patience": None,
            "eval_interval": min(train_cfg.eval_interval, cfg.max_steps),
            "checkpoint_interval": min(train_cfg.checkpoint_interval, cfg.max_steps),
        }
    )


def load_teacher(source: str, fetch: Callable[[str, Path], Path] | None) -> tuple[Any, Any]:
    """The teacher model and tokenizer (a causal LM today; classification and completion plug in here).

    Raises:
        CompressError: the teacher has no tokenizer or is not a GPT-2 causal LM.
    """
    from forgeline.tasks.model.modeling import load_pretrained_model

    model, tokenizer = load_pretrained_model(source, fetch=fetch)
    if tokenizer is None:
        raise CompressError(f"teacher {source} has no tokenizer stored with it")
    if getattr(model.config, "model_type", None) != "gpt2":
        raise CompressError(f"teacher {source} is a {model.config.model_type} model; compress handles GPT-2 LMs")
    return model, tokenizer


def compress_model(
    teacher_source: str,
    cfg: CompressConfig,
    train_cfg: TrainConfig,
    eval_cfg: EvalConfig,
    *,
    dataset_dir: str | Path,
    run_dir: str | Path,
    block_size: int,
    seed: int,
    run_hash: str,
    fetch: Callable[[str, Path], Path] | None = None,
    on_metrics: OnMetrics | None = None,
) -> CompressResult:
    """Build the student from the teacher, distil it on the training split, save it and measure both.

    Args:
        teacher_source: A registered version URI (``fetch`` downloads it) or a model folder.
        cfg: The ``compress`` section.
        train_cfg: Batches, intervals, device; steps and learning rate come from ``cfg``.
        eval_cfg: Token cap and the prompt of the timed generations.
        dataset_dir: The cleaned dataset (``train``/``validation``/``test`` splits).
        run_dir: This compression's folder (checkpoints, the student); re-running resumes it.
        block_size: Training window (cropped to the teacher's positions).
        seed: Seeds the student's init, batches and sampling.
        run_hash: :func:`compress_hash`; a checkpoint of another hash is refused.
        fetch: Downloads registry URIs.
        on_metrics: Per-step metrics (``train/loss``, ``kd_loss``, ``ce_loss``, ``val/loss``...).

    Raises:
        CompressError: student not smaller than the teacher, layers out of range, another vocabulary.
    """
    from forgeline.tasks.evaluate.candidate import held_out_text
    from forgeline.tasks.model.modeling import load_pretrained_model
    from forgeline.tasks.train.batches import resolve_device
    from forgeline.tasks.train.tokens import load_token_splits

    run_dir = Path(run_dir)
    done = run_dir / DONE_FILE
    if done.exists():
        logger.info("compression already complete: %s", run_dir)
        return CompressResult.model_validate_json(done.read_text()).model_copy(update={"already_done": True})
    teacher, tokenizer = load_teacher(teacher_source, fetch)
    student, student_tok, spec = _make_student(teacher, cfg, seed=seed, fetch=fetch)
    check_vocabularies(teacher, tokenizer, student, student_tok)
    if _count(student) >= _count(teacher):
        raise CompressError(
            f"the student ({_count(student):,} parameters) is not smaller than the teacher ({_count(teacher):,})"
        )
    block = min(block_size, int(teacher.config.n_positions), int(student.config.n_positions))
    train_data, val_data = load_token_splits(tokenizer, dataset_dir, block)
    device = resolve_device(train_cfg)
    settings = DistillSettings(
        train=distill_train_config(cfg, train_cfg),
        block_size=block,
        temperature=cfg.temperature,
        alpha_kd=cfg.alpha_kd,
        alpha_ce=cfg.alpha_ce,
        seed=seed,
        run_hash=run_hash,
    )
    teacher.to(device)
    student.to(device)
    state = distill(
        student, teacher, train_data, val_data, settings, run_dir / "checkpoints", device=device, on_metrics=on_metrics
    )
    model_dir = run_dir / "model"
    student.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    student, _ = load_pretrained_model(str(model_dir))  # measured as it will be served: from disk
    held_out = held_out_text(str(dataset_dir))
    prompt = eval_cfg.prompts[0] if eval_cfg.prompts else ""
    with torch.inference_mode():
        t_measure, s_measure = measure_models(
            [teacher, student],
            tokenizer,
            held_out,
            max_tokens=eval_cfg.max_tokens,
            prompt=prompt,
            new_tokens=cfg.latency_new_tokens,
            requests=cfg.latency_requests,
        )
    result = CompressResult(
        run_dir=str(run_dir),
        model_dir=str(model_dir),
        spec=spec,
        steps=state.step,
        resumed_from=state.resumed_from,
        final_val_loss=state.final_val,
        nonfinite_steps=state.nonfinite,
        teacher=t_measure,
        student=s_measure,
        table=tradeoff_table(t_measure, s_measure),
        history=state.history,
    )
    tmp = done.with_suffix(".tmp")
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, done)
    return result


def _make_student(
    teacher: Any, cfg: CompressConfig, *, seed: int, fetch: Callable[[str, Path], Path] | None
) -> tuple[Any, Any | None, StudentSpec]:
    if cfg.student_from:
        from forgeline.tasks.model.modeling import load_pretrained_model

        student, student_tok = load_pretrained_model(cfg.student_from, fetch=fetch)
        c = student.config
        inner = int(c.n_inner) if c.n_inner else 4 * int(c.n_embd)
        spec = StudentSpec(
            layers=None, n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, n_inner=inner, from_teacher=False
        )
        return student, student_tok, spec
    spec = resolve_student(cfg, teacher.config)
    return build_student(teacher, spec, seed=seed), None, spec


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
