"""One call that trains whatever ``task.kind`` the config names, in this process.

The train stage, a search trial and the benchmarks all train a config's model the same way: a classifier with
:func:`~forgeline.tasks.train.classify.train_classifier`, a completion model with
:func:`~forgeline.tasks.train.complete.train_completion`, a language model with
:func:`~forgeline.tasks.train.loop.train_model` on the config's slices.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.train.classify import train_classifier
from forgeline.tasks.train.complete import train_completion
from forgeline.tasks.train.driver import TrainCallbacks, TrainResult
from forgeline.tasks.train.loop import train_model


def train_task_model(
    cfg: PipelineConfig,
    dataset_dir: str,
    run_dir: Path,
    callbacks: TrainCallbacks | None = None,
    fetch_model: Callable[[str, Path], Path] | None = None,
) -> TrainResult:
    """Train ``cfg``'s model for its task kind in one process, resuming a checkpoint in ``run_dir``.

    Args:
        cfg: The whole pipeline config.
        dataset_dir: The cleaned dataset.
        run_dir: The run's folder (checkpoints, model, ``done.json``).
        callbacks: Hooks the wiring attaches.
        fetch_model: Downloads ``model.init_from`` when it is a registry URI.
    """
    if cfg.kind == "classification":
        return train_classifier(
            cfg, dataset_dir=dataset_dir, run_dir=run_dir, callbacks=callbacks, fetch_model=fetch_model
        )
    if cfg.kind == "completion":
        return train_completion(
            cfg, dataset_dir=dataset_dir, run_dir=run_dir, callbacks=callbacks, fetch_model=fetch_model
        )
    return train_model(
        cfg.train,
        cfg.model,
        cfg.tokenizer,
        dataset_dir=dataset_dir,
        run_dir=run_dir,
        seed=cfg.seed,
        config_hash=cfg.config_hash(),
        callbacks=callbacks,
        fetch_model=fetch_model,
    )
