"""The Optuna objective: suggest, train the trial's config, report each evaluation, prune, return the metric.

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
from forgeline.tasks.train.loop import TrainCallbacks, train_model
from forgeline.tasks.tune.space import suggest_params, trial_config
from forgeline.tasks.tune.study import StudySpec

logger = logging.getLogger(__name__)


def make_objective(
    spec: StudySpec, fetch_model: Callable[[str, Path], Path] | None = None
) -> Callable[[optuna.Trial], float]:
    """The objective: train the trial's config, report val loss per evaluation, return the best.

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

        def on_eval(step: int, val_loss: float) -> None:
            faults.hit("tune.eval", trial=trial.number)
            if not math.isfinite(val_loss):
                raise ValueError(f"validation loss is {val_loss} at step {step}")
            if fault == "diverge":
                val_loss *= 10.0
            trial.report(val_loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val/loss {val_loss:.4f} at step {step}")

        logger.info("trial %d: %s", trial.number, _fmt_params(params))
        try:
            result = train_model(
                cfg.train,
                cfg.model,
                cfg.tokenizer,
                dataset_dir=spec.dataset_dir,
                run_dir=run_dir,
                seed=cfg.seed,
                config_hash=cfg.config_hash(),
                callbacks=TrainCallbacks(on_eval=on_eval),
                fetch_model=fetch,
            )
        except Exception:  # TrialPruned included: the trial is over, its checkpoints are not needed
            _drop_weights(run_dir)
            raise
        _drop_weights(run_dir)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("train_seconds", round(result.seconds, 3))
        value = result.best_val_loss
        if fault == "nan" or value is None:
            return math.nan  # Optuna fails a NaN value: counted, never chosen
        return float(value)

    return objective


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
