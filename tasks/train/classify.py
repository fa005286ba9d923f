"""The classification training loop: epochs over the shuffled training split, validation metrics, early stop.

The language-model loop's shape (``tasks/train/loop.py``) with labeled records instead of random windows:
the same checkpoints and ``done.json`` marker, resume, non-finite-loss policy, signals, metric journal and
callbacks. Every ``train.eval_interval`` steps the whole validation split is scored (``val/loss``,
``val/accuracy``, ``val/f1_macro``); the best evaluation's weights are kept (``keep_best``) and training stops
after ``patience`` evaluations without improvement. Free of Prefect and MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from forgeline.tasks.config import PipelineConfig, higher_is_better
from forgeline.tasks.train.batches import resolve_device
from forgeline.tasks.train.classify_data import (
    VAL_METRICS,
    batch_indices,
    class_weights,
    classify_loss,
    collate,
    encode_split,
    evaluate_split,
    total_steps,
)
from forgeline.tasks.train.driver import TrainCallbacks, TrainResult, finished_run, run_summary
from forgeline.tasks.train.epochs import EpochTask, finish, open_run, run_steps

logger = logging.getLogger(__name__)


def improvement_metric(cfg: PipelineConfig) -> tuple[str, bool]:
    """The validation metric that decides the best evaluation and early stopping, and whether higher is better.

    ``cfg.tune_metric()`` when it is one the loop logs (``val/f1_macro`` by default), else ``val/loss``.
    """
    name = cfg.tune_metric()[0]
    if name not in VAL_METRICS:
        name = "val/loss"
    return name, higher_is_better(name)


def train_classifier(
    cfg: PipelineConfig,
    *,
    dataset_dir: str | Path,
    run_dir: str | Path,
    callbacks: TrainCallbacks | None = None,
    fetch_model: Callable[[str, Path], Path] | None = None,
) -> TrainResult:
    """Train (or resume, or recognise as finished) a sequence classifier on a cleaned labeled dataset.

    Args:
        cfg: The pipeline config (``task.kind: classification``): model, tokenizer and train sections, seed.
        dataset_dir: A cleaned dataset with ``train``/``validation`` splits (``text``, ``label``) and ``labels.json``.
        run_dir: This config's checkpoint folder; resumed from when it holds a complete checkpoint.
        callbacks: Progress hooks; ``on_eval`` gets the improvement metric's value (it may raise to stop).
        fetch_model: Downloads ``model.init_from`` when it is a registry URI.

    Returns:
        Paths and headline numbers; the model (best evaluation's weights when ``keep_best``) and tokenizer
        are saved under ``run_dir/model``, readable by ``transformers.pipeline("text-classification")``.
    """
    from forgeline.tasks.data.cleaning import iter_split
    from forgeline.tasks.data.labels import read_label_set
    from forgeline.tasks.data.tokenization import load_tokenizer
    from forgeline.tasks.model.classifier import build_classifier, classifier_tokenizer
    from forgeline.tasks.model.modeling import count_parameters

    cb = callbacks or TrainCallbacks()
    run_dir = Path(run_dir)
    if (finished := finished_run(run_dir)) is not None:
        return finished

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train)
    label_set = read_label_set(dataset_dir)
    saved_tok = run_dir / "tokenizer"
    if (saved_tok / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(saved_tok)
    else:
        tokenizer = classifier_tokenizer(
            cfg.tokenizer, cfg.model.init_from, iter_split(dataset_dir, "train"), fetch=fetch_model
        )
        tokenizer.save_pretrained(saved_tok)
    train = encode_split(tokenizer, dataset_dir, "train", label_set, cfg.model.block_size)
    val = encode_split(tokenizer, dataset_dir, "validation", label_set, cfg.model.block_size)
    model = build_classifier(cfg.model, tokenizer, label_set, fetch=fetch_model).to(device)
    train_cfg = cfg.train.model_copy(update={"max_steps": total_steps(cfg.train, len(train))})
    weight = class_weights(cfg.train.class_weights, train.labels, len(label_set.labels))
    run, state, resumed_from = open_run(cfg, train_cfg, model, device, run_dir, cb)

    n_params = count_parameters(model)
    sizes = {
        "parameters": n_params,
        "total_steps": train_cfg.max_steps,
        "train_records": len(train),
        "val_records": len(val),
        "train_tokens": train.tokens,
        "classes": len(label_set.labels),
    }
    summary = run_summary(sizes, tokenizer, device, state.step, 1, train_cfg.batch_size * train_cfg.grad_accum_steps)
    logger.info(
        "training classifier: %s parameters, %d classes, %d train records (batch %d x accum %d), %d steps "
        "(%s), device %s%s",
        f"{n_params:,}",
        len(label_set.labels),
        len(train),
        train_cfg.batch_size,
        train_cfg.grad_accum_steps,
        train_cfg.max_steps,
        f"{cfg.train.epochs:g} epochs" if cfg.train.epochs else "train.max_steps",
        device,
        f", resumed from step {state.step}" if resumed_from is not None else "",
    )
    if cb.on_start:
        cb.on_start(summary)

    w = weight.to(device) if weight is not None else None
    pad_id = int(tokenizer.pad_token_id)

    def fetch(k: int) -> tuple[tuple[torch.Tensor, ...], int]:
        x, mask, y = collate(train, batch_indices(train, train_cfg.batch_size, k, cfg.seed), pad_id)
        return (x.to(device), mask.to(device), y.to(device)), int(mask.sum())

    task = EpochTask(
        metric=improvement_metric(cfg),
        fetch=fetch,
        loss=lambda batch: classify_loss(model, *batch, w),
        evaluate=lambda: evaluate_split(model, val, pad_id, device, train_cfg),
    )
    loop = run_steps(run, state, task)
    return finish(run, state, tokenizer, loop, resumed_from=resumed_from, t_start=t_start, parameters=n_params)


def best_value(result: TrainResult, metric: str, higher: bool) -> float | None:
    """The best value of a validation metric over a run's evaluations (its history), or ``None``."""
    values = [h[metric] for h in result.history if metric in h and math.isfinite(h[metric])]
    if not values:
        return None
    return max(values) if higher else min(values)
