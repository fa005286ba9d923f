"""The compress stage: teacher in, a smaller student out, distilled, saved and measured against the teacher.

Free of Prefect and MLflow: the teacher comes through ``fetch`` (the tracking package's download), progress
leaves through ``on_metrics``, and the registry gate is :mod:`forgeline.tasks.registry.compressed`'s.
A language model is distilled on random windows and scored in bits per byte; a sequence classifier on its
labeled records (:mod:`.classify`) and scored in test macro F1; a completion model on its prompt/completion
pairs, loss on the completion tokens (:mod:`.complete`), and scored in test ROUGE-L.
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

from forgeline.tasks.compress.classify import ClassifierMeasure, distill_classifier, measure_classifiers
from forgeline.tasks.compress.complete import CompletionMeasure, distill_pairs, encode_split_pairs, measure_completions
from forgeline.tasks.compress.distill import DistillSettings, OnMetrics, distill
from forgeline.tasks.compress.measure import ModelMeasure, measure_models, tradeoff_table
from forgeline.tasks.compress.student import (
    CompressError,
    StudentSpec,
    build_student,
    check_vocabularies,
    is_classifier,
    resolve_student,
)
from forgeline.tasks.config import CompressConfig, EvalConfig, PipelineConfig, TrainConfig

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
    teacher: ModelMeasure | ClassifierMeasure | CompletionMeasure
    student: ModelMeasure | ClassifierMeasure | CompletionMeasure
    table: dict[str, list[Any]]
    history: list[dict[str, float]] = []
    metric: str = "bits_per_byte"
    """The task metric the gate compares (a field of both measures): ``bits_per_byte``, ``f1_macro`` or ``rougeL``."""
    higher_is_better: bool = False

    @property
    def teacher_metric(self) -> float:
        """The teacher's task metric."""
        return float(getattr(self.teacher, self.metric))

    @property
    def student_metric(self) -> float:
        """The student's task metric."""
        return float(getattr(self.student, self.metric))


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
    """The teacher model and tokenizer: a GPT-2 causal LM or a GPT-2 sequence classifier.

    Raises:
        CompressError: the teacher has no tokenizer or is not a GPT-2 model.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from forgeline.tasks.data.tokenization import load_tokenizer
    from forgeline.tasks.model.modeling import load_pretrained_model, resolved_source

    with resolved_source(source, fetch=fetch) as (model_dir, tok_dir):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        if getattr(config, "model_type", None) != "gpt2":
            raise CompressError(f"teacher {source} is a {config.model_type} model; compress handles GPT-2 models")
        if any(str(a).endswith("ForSequenceClassification") for a in config.architectures or []):
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, use_safetensors=True, trust_remote_code=False
            )
        else:
            model, _ = load_pretrained_model(model_dir)
        tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None
    if tokenizer is None:
        raise CompressError(f"teacher {source} has no tokenizer stored with it")
    if is_classifier(model) and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 pools at the last token that is not padding
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
    task: PipelineConfig | None = None,
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
        task: The pipeline config; with ``task.kind: completion`` the student is distilled on the pairs and
            scored in ROUGE-L (its ``eval``, ``model.block_size`` and ``data.prompt_overflow`` apply).

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
    checkpoints = run_dir / "checkpoints"
    model_dir = run_dir / "model"
    if is_classifier(teacher):
        state, t_measure, s_measure = _compress_classifier(
            teacher,
            student,
            tokenizer,
            settings,
            eval_cfg,
            cfg,
            dataset_dir,
            checkpoints,
            model_dir,
            device,
            on_metrics,
        )
    elif task is not None and task.kind == "completion":
        state, t_measure, s_measure = _compress_completion(
            teacher_source,
            teacher,
            student,
            tokenizer,
            settings,
            task,
            dataset_dir,
            checkpoints,
            model_dir,
            device,
            on_metrics,
            fetch,
        )
    else:
        train_data, val_data = load_token_splits(tokenizer, dataset_dir, block)
        state = distill(
            student, teacher, train_data, val_data, settings, checkpoints, device=device, on_metrics=on_metrics
        )
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
    metric = {ClassifierMeasure: "f1_macro", CompletionMeasure: "rougeL"}.get(type(t_measure), "bits_per_byte")
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
        metric=metric,
        higher_is_better=metric != "bits_per_byte",
    )
    tmp = done.with_suffix(".tmp")
    tmp.write_text(result.model_dump_json())
    os.replace(tmp, done)
    return result


def _compress_classifier(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    settings: DistillSettings,
    eval_cfg: EvalConfig,
    cfg: CompressConfig,
    dataset_dir: str | Path,
    checkpoints: Path,
    model_dir: Path,
    device: torch.device,
    on_metrics: OnMetrics | None,
) -> tuple[Any, ClassifierMeasure, ClassifierMeasure]:
    """Distil a classifier student on the labeled splits, save it, and measure both (records, not tokens)."""
    from transformers import AutoModelForSequenceClassification

    from forgeline.tasks.data.labels import read_label_set
    from forgeline.tasks.train.classify_data import encode_split

    labels = read_label_set(dataset_dir)
    if [teacher.config.id2label[i] for i in range(teacher.config.num_labels)] != labels.labels:
        raise CompressError(
            f"the teacher's labels {list(teacher.config.id2label.values())} are not the dataset's {labels.labels}"
        )
    block = settings.block_size
    train = encode_split(tokenizer, dataset_dir, "train", labels, block)
    val = encode_split(tokenizer, dataset_dir, "validation", labels, block)
    pad_id = int(teacher.config.pad_token_id)
    student.config.pad_token_id = pad_id
    state = distill_classifier(
        student, teacher, train, val, settings, checkpoints, pad_id=pad_id, device=device, on_metrics=on_metrics
    )
    student.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    # Measured as it will be served: from disk.
    student = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    t_measure, s_measure = measure_classifiers(
        [teacher, student],
        tokenizer,
        dataset_dir,
        block_size=block,
        max_examples=eval_cfg.max_examples,
        requests=cfg.latency_requests,
    )
    return state, t_measure, s_measure


def _compress_completion(
    teacher_source: str,
    teacher: Any,
    student: Any,
    tokenizer: Any,
    settings: DistillSettings,
    task: PipelineConfig,
    dataset_dir: str | Path,
    checkpoints: Path,
    model_dir: Path,
    device: torch.device,
    on_metrics: OnMetrics | None,
    fetch: Callable[[str, Path], Path] | None,
) -> tuple[Any, CompletionMeasure, CompletionMeasure]:
    """Distil a completion student on the training pairs, save it, and measure both on the test pairs."""
    from forgeline.tasks.model.modeling import load_pretrained_model

    train = encode_split_pairs(tokenizer, dataset_dir, "train", task)
    val = encode_split_pairs(tokenizer, dataset_dir, "validation", task)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    state = distill_pairs(
        student, teacher, train, val, settings, checkpoints, pad_id=pad_id, device=device, on_metrics=on_metrics
    )
    student.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    student, _ = load_pretrained_model(str(model_dir))  # measured as it will be served: from disk
    c = task.compress
    with torch.inference_mode():
        t_measure, s_measure = measure_completions(
            [teacher_source, str(model_dir)],
            [teacher, student],
            tokenizer,
            dataset_dir,
            task,
            new_tokens=c.latency_new_tokens,
            requests=c.latency_requests,
            fetch=fetch,
        )
    return state, t_measure, s_measure


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
