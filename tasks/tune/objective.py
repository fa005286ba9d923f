"""The Optuna objective: suggest, train the trial's config, report each evaluation, prune, return the metric.

Language models train with ``train_model`` and report ``val/loss``; classifiers train with
``train_classifier`` and report ``tune.metric`` (``val/f1_macro`` by default), higher or lower as it says.
Completion models report ``val/loss`` to the pruner; with a generation ``tune.metric`` (``val/rougeL``...)
the finished trial's model then decodes the validation split and that metric is the trial's value, and the
loss is reported negated (the study maximizes: :func:`~forgeline.tasks.tune.study.report_sign`).

It stays pure: tracking attaches from outside (``run_study``'s ``on_progress``). A trial that raises or
returns NaN is FAILED, counted, and never chosen.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from forgeline.tasks import faults
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.evaluate.completion import score_validation
from forgeline.tasks.train.classify import best_value
from forgeline.tasks.train.kinds import train_task_model
from forgeline.tasks.train.loop import TrainCallbacks, TrainResult
from forgeline.tasks.tune.space import suggest_params, trial_config
from forgeline.tasks.tune.study import StudySpec, pruning_metric, report_sign, study_metric

logger = logging.getLogger(__name__)


def make_objective(
    spec: StudySpec, fetch_model: Callable[[str, Path], Path] | None = None
) -> Callable[[optuna.Trial], float]:
    """The objective: train the trial's config, report the validation metric per evaluation, return its best.

    The value is :func:`~forgeline.tasks.tune.study.study_metric`'s: ``tune.metric`` (by default
    ``val/f1_macro``) for classification and completion (``val/loss`` by default; a generation metric is
    scored on the validation split after training), ``val/loss`` otherwise; the study's direction follows
    it. Each evaluation reports :func:`~forgeline.tasks.tune.study.pruning_metric` to the pruner.

    A trial retried after a crash trains in its original trial's folder and resumes from its last
    checkpoint. Finished trials keep ``done.json`` and the tokenizer, not checkpoints or weights.

    Args:
        spec: The study.
        fetch_model: Downloads ``model.init_from`` when it is a registry URI.
    """
    base = spec.config
    trials_dir = Path(spec.trials_dir)
    fetch = fetch_model if fetch_model is not None else _prefetched(spec.init_source)

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, base.tune)
        cfg = trial_config(base, params)
        origin = _retried_from(trial)
        run_dir = trials_dir / f"trial-{(origin if origin is not None else trial.number):04d}"
        if origin is None and run_dir.exists():
            shutil.rmtree(run_dir)  # a leftover of an earlier study of the same name: never reuse it
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config_hash", cfg.config_hash())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if origin is not None:
            logger.info("trial %d retries crashed trial %d with the same parameters", trial.number, origin)
        fault = faults.trial_fault(trial.number)
        metric, higher = pruning_metric(cfg)
        sign = report_sign(cfg)

        def on_eval(step: int, value: float) -> None:
            faults.hit("tune.eval", trial=trial.number)
            if not math.isfinite(value):
                raise ValueError(f"validation {metric} is {value} at step {step}")
            if fault == "diverge":
                value = value / 10.0 if higher else value * 10.0
            trial.report(sign * value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4f} at step {step}")

        logger.info("trial %d: %s", trial.number, _fmt_params(params))
        try:
            result = train_task_model(cfg, spec.dataset_dir, run_dir, TrainCallbacks(on_eval=on_eval), fetch)
            value = _trial_value(cfg, result, spec.dataset_dir, trial)
        except Exception:  # TrialPruned included: the trial is over, its checkpoints are not needed
            _drop_weights(run_dir)
            raise
        _drop_weights(run_dir)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("train_seconds", round(result.seconds, 3))
        if fault == "nan" or value is None:
            return math.nan  # Optuna fails a NaN value: counted, never chosen
        return float(value)

    return objective


def _trial_value(cfg: PipelineConfig, result: TrainResult, dataset_dir: str, trial: optuna.Trial) -> float | None:
    name, higher = study_metric(cfg)
    if cfg.kind == "classification":
        return best_value(result, name, higher)
    if name == "val/loss":
        return result.best_val_loss
    # A generation metric: the trial's (best-kept) model decodes the validation split once, after training.
    scores = score_validation(result.model_dir, dataset_dir, cfg)
    trial.set_user_attr("val_metrics", {k: round(v, 6) for k, v in scores.items()})
    logger.info("trial %d: %s %.4f on the validation split", trial.number, name, scores[name])
    return scores[name]


def _retried_from(trial: optuna.Trial) -> int | None:
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    origin = attrs.get("failed_trial")
    return int(origin) if origin is not None else None


def _prefetched(folder: str | None) -> Callable[[str, Path], Path] | None:
    # Worker processes: the registry model was downloaded once by the process that started them.
    if not folder:
        return None
    return lambda _uri, _dst: Path(folder)


def _drop_weights(run_dir: Path) -> None:
    for sub in ("checkpoints", "model"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
