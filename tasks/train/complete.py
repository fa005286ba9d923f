"""The completion training loop: a causal LM on ``prompt + separator + completion + eos``, loss on the completion.

The classification loop's shape (``tasks/train/classify.py``; both run the step loop of ``epochs.py``):
epochs over the training pairs in batches grouped by length (:func:`~forgeline.tasks.train.completion.pair_batches`,
reshuffled per epoch from ``seed + epoch`` so a resumed run draws the batches an uninterrupted one would),
``val/loss`` (mean nats per completion token) every ``train.eval_interval`` steps, the best evaluation's weights
kept (``keep_best``), early stop after ``patience`` evaluations without improvement. The saved model is a
``save_pretrained`` causal LM with its tokenizer, so the language model's logging, ``generate`` and serving apply
unchanged. Free of Prefect and MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks.config import PipelineConfig, TrainConfig
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.train.batches import autocast_context, resolve_device
from forgeline.tasks.train.completion import EncodedPairs, completion_loss, encode_pairs, pair_batches
from forgeline.tasks.train.driver import TrainCallbacks, TrainResult, finished_run, run_summary
from forgeline.tasks.train.epochs import EpochTask, finish, open_run, run_steps

logger = logging.getLogger(__name__)

VAL_METRIC = "val/loss"
"""What decides the best evaluation, early stopping and the search (lower is better)."""


def load_pairs(dataset_dir: str | Path, split: str) -> tuple[list[str], list[str]]:
    """A split's prompts and completions (a missing value reads as empty).

    Raises:
        DataError: The split lacks a ``prompt`` or ``completion`` column (the columns found are listed).
    """
    from forgeline.tasks.data.cleaning import load_split

    ds = load_split(dataset_dir, split)
    missing = [c for c in ("prompt", "completion") if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{dataset_dir}/{split}: no {' or '.join(missing)} column (found: {', '.join(ds.column_names)})"
        )
    return [p or "" for p in ds["prompt"]], [c or "" for c in ds["completion"]]


def encode_split(
    tokenizer: Any, dataset_dir: str | Path, split: str, cfg: PipelineConfig, *, train: bool
) -> EncodedPairs:
    """Encode a split's pairs for ``model.block_size``: prompts too long dropped or cut (``data.prompt_overflow``).

    Raises:
        DataError: No pair of the split fits (one line with the counts and what to change).
    """
    prompts, completions = load_pairs(dataset_dir, split)
    loss_on = (cfg.train.loss_on or "completion") if train else "completion"  # val/loss: completion tokens only
    enc = encode_pairs(
        tokenizer,
        prompts,
        completions,
        block_size=cfg.model.block_size,
        loss_on=loss_on,
        overflow=cfg.data.prompt_overflow,
    )
    if not len(enc):
        raise DataError(
            f"{split} split: none of its {len(prompts)} prompt/completion pairs fits model.block_size "
            f"{cfg.model.block_size} ({enc.prompt_too_long} prompts too long, {enc.completion_too_long} completions "
            f"too long, {enc.empty_completions} empty completions); raise model.block_size or set "
            "data.prompt_overflow: truncate_left"
        )
    if enc.dropped or enc.truncated_prompts:
        logger.warning(
            "%s split: %d of %d pairs left out (%d prompts too long for model.block_size %d, %d completions too "
            "long, %d empty completions); %d prompts cut from the left",
            split,
            enc.dropped,
            len(prompts),
            enc.prompt_too_long,
            cfg.model.block_size,
            enc.completion_too_long,
            enc.empty_completions,
            enc.truncated_prompts,
        )
    return enc


class EpochBatches:
    """Training batch ``k`` of the run: epoch ``k // per_epoch``, shuffled from ``seed + epoch``, grouped by length."""

    def __init__(self, encoded: EncodedPairs, batch_size: int, pad_id: int, seed: int) -> None:
        self.encoded, self.batch_size, self.pad_id, self.seed = encoded, batch_size, pad_id, seed
        self.per_epoch = math.ceil(len(encoded) / batch_size)
        self._epoch, self._batches = -1, []

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._batches = pair_batches(self.encoded, self.batch_size, self.pad_id, seed=self.seed + epoch)
            self._epoch = epoch
        return self._batches[index]


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps: ``train.epochs`` passes capped by ``max_steps``, else ``max_steps``."""
    if cfg.epochs is None:
        return cfg.max_steps
    return max(1, min(cfg.max_steps, math.ceil(cfg.epochs * batches_per_epoch / cfg.grad_accum_steps)))


@torch.no_grad()
def validation_loss(
    model: Any, batches: list[dict[str, torch.Tensor]], device: torch.device, cfg: TrainConfig
) -> dict[str, float]:
    """``val/loss`` (mean nats per completion token, eos included) and ``val/perplexity`` over every batch."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        with autocast_context(device, cfg):
            loss, n = completion_loss(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss) * n
        tokens += n
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {VAL_METRIC: mean, "val/perplexity": math.exp(min(mean, 50.0))}


def train_completion(
    cfg: PipelineConfig,
    *,
    dataset_dir: str | Path,
    run_dir: str | Path,
    callbacks: TrainCallbacks | None = None,
    fetch_model: Callable[[str, Path], Path] | None = None,
) -> TrainResult:
    """Train (or resume, or recognise as finished) a causal LM on a cleaned prompt/completion dataset.

    Args:
        cfg: The pipeline config (``task.kind: completion``): model (sizes or ``init_from``), tokenizer, train.
        dataset_dir: A cleaned dataset with ``train``/``validation`` splits holding ``prompt`` and ``completion``.
        run_dir: This config's checkpoint folder; resumed from when it holds a complete checkpoint.
        callbacks: Progress hooks; ``on_eval`` gets ``val/loss`` (it may raise to stop).
        fetch_model: Downloads ``model.init_from`` when it is a registry URI.

    Returns:
        Paths and headline numbers; the LM (the best evaluation's weights when ``keep_best``) and tokenizer are
        saved under ``run_dir/model``.
    """
    from forgeline.tasks.model.modeling import build_model, count_parameters
    from forgeline.tasks.train.tokens import prepare_tokenizer

    cb = callbacks or TrainCallbacks()
    run_dir = Path(run_dir)
    if (finished := finished_run(run_dir)) is not None:
        return finished
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train)
    tokenizer = prepare_tokenizer(cfg.tokenizer, dataset_dir, run_dir, cfg.model.init_from, fetch=fetch_model)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    train = encode_split(tokenizer, dataset_dir, "train", cfg, train=True)
    val = encode_split(tokenizer, dataset_dir, "validation", cfg, train=False)
    model = build_model(cfg.model, tokenizer, fetch=fetch_model).to(device)
    batches = EpochBatches(train, cfg.train.batch_size, pad_id, cfg.seed)
    train_cfg = cfg.train.model_copy(update={"max_steps": total_steps(cfg.train, batches.per_epoch)})
    run, state, resumed_from = open_run(cfg, train_cfg, model, device, run_dir, cb)
    n_params = count_parameters(model)
    sizes = {
        "parameters": n_params,
        "total_steps": train_cfg.max_steps,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "train_tokens": sum(len(x) for x in train.input_ids),
        "prompts_too_long": train.prompt_too_long + val.prompt_too_long,
        "prompts_truncated": train.truncated_prompts + val.truncated_prompts,
        "completions_too_long": train.completion_too_long + val.completion_too_long,
        "loss_on": cfg.train.loss_on or "completion",
    }
    summary = run_summary(sizes, tokenizer, device, state.step, 1, train_cfg.batch_size * train_cfg.grad_accum_steps)
    logger.info(
        "training completion LM: %s parameters, %d train pairs (batch %d x accum %d), %d steps, device %s%s",
        f"{n_params:,}",
        len(train),
        train_cfg.batch_size,
        train_cfg.grad_accum_steps,
        train_cfg.max_steps,
        device,
        f", resumed from step {state.step}" if resumed_from is not None else "",
    )
    if cb.on_start:
        cb.on_start(summary)

    def fetch(k: int) -> tuple[dict[str, torch.Tensor], int]:
        batch = {name: v.to(device) for name, v in batches[k].items()}
        return batch, int(batch["attention_mask"].sum())

    val_batches = pair_batches(val, cfg.train.batch_size, pad_id)
    task = EpochTask(
        metric=(VAL_METRIC, False),
        fetch=fetch,
        loss=lambda batch: completion_loss(model, batch)[0],
        evaluate=lambda: validation_loss(model, val_batches, device, train_cfg),
    )
    loop = run_steps(run, state, task)
    return finish(run, state, tokenizer, loop, resumed_from=resumed_from, t_start=t_start, parameters=n_params)
