"""The completion training loop: a causal LM on ``prompt + separator + completion + eos``, loss on the completion.

The classification loop's shape (``tasks/train/classify.py``, whose state, checkpoint, non-finite-loss and
finish helpers it shares): epochs over the training pairs in batches grouped by length
(:func:`~forgeline.tasks.train.completion.pair_batches`, reshuffled per epoch from ``seed + epoch`` so a resumed
run draws the batches an uninterrupted one would), ``val/loss`` (mean nats per completion token) every
``train.eval_interval`` steps, the best evaluation's weights kept (``keep_best``), early stop after ``patience``
evaluations without improvement. The saved model is a ``save_pretrained`` causal LM with its tokenizer, so the
language model's logging, ``generate`` and serving apply unchanged. Free of Prefect and MLflow.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks import faults
from forgeline.tasks.config import PipelineConfig, TrainConfig
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.errors import StageInterrupted
from forgeline.tasks.train.batches import autocast_context, resolve_device
from forgeline.tasks.train.checkpoints import load_latest_checkpoint
from forgeline.tasks.train.classify import _checkpoint, _fmt, _skip_nonfinite, _State
from forgeline.tasks.train.completion import EncodedPairs, completion_loss, encode_pairs, pair_batches
from forgeline.tasks.train.journal import JOURNAL_FILE, MetricJournal
from forgeline.tasks.train.loop import DONE_FILE, TrainCallbacks, TrainResult, finished_result
from forgeline.tasks.train.schedule import get_lr, make_optimizer
from forgeline.tasks.train.signals import stop_on_signal

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


@dataclass
class _Run:
    cfg: TrainConfig  # max_steps = the run's steps (epochs resolved)
    model: Any
    optimizer: torch.optim.Optimizer
    train: EpochBatches
    val: list[dict[str, torch.Tensor]]
    device: torch.device
    run_dir: Path
    config_hash: str
    patience: int | None
    keep_best: bool
    cb: TrainCallbacks
    journal: MetricJournal


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
    done = run_dir / DONE_FILE
    if done.exists():
        return finished_result(run_dir, done)
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
    optimizer = make_optimizer(model, train_cfg, device)
    state, config_hash, resumed_from = _State(), cfg.config_hash(), None
    ckpt = load_latest_checkpoint(run_dir / "checkpoints", config_hash)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        state = _State(
            step=ckpt["step"],
            best_score=ckpt["best_val"],
            best_metrics=dict(ckpt["best_metrics"]),
            bad_evals=ckpt["bad_evals"],
            nonfinite=ckpt["nonfinite"],
            history=list(ckpt["history"]),
            best_model=ckpt.get("best_model"),
        )
        resumed_from = state.step
        logger.info("resumed from step %d (%s)", state.step, run_dir / "checkpoints")
    n_params = count_parameters(model)
    summary = {
        "parameters": n_params,
        "total_steps": train_cfg.max_steps,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "train_tokens": sum(len(x) for x in train.input_ids),
        "prompts_too_long": train.prompt_too_long + val.prompt_too_long,
        "prompts_truncated": train.truncated_prompts + val.truncated_prompts,
        "completions_too_long": train.completion_too_long + val.completion_too_long,
        "loss_on": cfg.train.loss_on or "completion",
        "vocab_size": len(tokenizer),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "start_step": state.step,
        "world_size": 1,
        "global_batch": train_cfg.batch_size * train_cfg.grad_accum_steps,
    }
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
    run = _Run(
        cfg=train_cfg,
        model=model,
        optimizer=optimizer,
        train=batches,
        val=pair_batches(val, cfg.train.batch_size, pad_id),
        device=device,
        run_dir=run_dir,
        config_hash=config_hash,
        patience=cfg.patience(),
        keep_best=cfg.keep_best(),
        cb=cb,
        journal=MetricJournal(run_dir / JOURNAL_FILE, state.step),
    )
    result = _loop(run, state)
    if run.keep_best and state.best_model is not None:
        model.load_state_dict(state.best_model)
        logger.info("keeping the best evaluation's weights: %s", _fmt(state.best_metrics))
    model_dir = run_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = TrainResult(
        run_dir=str(run_dir),
        model_dir=str(model_dir),
        steps=state.step,
        resumed_from=resumed_from,
        best_val_loss=state.best_metrics.get(VAL_METRIC),
        final_val_loss=result["final_val"],
        final_train_loss=result["final_train"],
        nonfinite_steps=state.nonfinite,
        stopped_early=result["stopped_early"],
        tokens_per_sec=result["tokens_per_sec"],
        loop_seconds=result["loop_seconds"],
        seconds=time.perf_counter() - t_start,
        parameters=n_params,
        device=str(device),
        history=state.history,
    )
    tmp = done.with_suffix(".tmp")
    tmp.write_text(out.model_dump_json())
    os.replace(tmp, done)
    return out


def _loop(run: _Run, state: _State) -> dict[str, Any]:
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    final_train = final_val = None
    stopped_early = run.patience is not None and state.bad_evals >= run.patience
    loop_t0, loop_tokens = time.perf_counter(), 0
    t_offset = max((h.get("time", 0.0) for h in state.history), default=0.0) - loop_t0
    model.train()
    with stop_on_signal() as stop:
        while state.step < cfg.max_steps and not stopped_early:
            step = state.step
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            poison = faults.nan_loss(step + 1)
            for micro in range(cfg.grad_accum_steps):
                batch = {k: v.to(run.device) for k, v in run.train[step * cfg.grad_accum_steps + micro].items()}
                loop_tokens += int(batch["attention_mask"].sum())
                with autocast_context(run.device, cfg):
                    loss, _ = completion_loss(model, batch)
                if poison:
                    loss = loss * float("nan")
                (loss / cfg.grad_accum_steps).backward()
                loss_sum += float(loss.detach())
            train_loss = loss_sum / cfg.grad_accum_steps
            state.step = step + 1
            if not math.isfinite(train_loss):
                _skip_nonfinite(optimizer, state, cfg, run.run_dir)
                continue
            state.nonfinite_run = 0
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            final_train = train_loss
            metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm}
            last = state.step == cfg.max_steps
            if state.step % cfg.log_interval == 0 or last:
                state.history.append(
                    {"step": state.step, "train/loss": train_loss, "time": t_offset + time.perf_counter()}
                )
                logger.info("step %d/%d  loss %.4f  lr %.2e", state.step, cfg.max_steps, train_loss, lr)
            if state.step % cfg.eval_interval == 0 or last:
                scores = validation_loss(model, run.val, run.device, cfg)
                metrics.update(scores)
                final_val = scores[VAL_METRIC]
                state.history.append({"step": state.step, **scores, "time": t_offset + time.perf_counter()})
                logger.info("step %d: %s", state.step, _fmt(scores))
                if scores[VAL_METRIC] < state.best_score:
                    state.best_score, state.best_metrics, state.bad_evals = scores[VAL_METRIC], scores, 0
                    if run.keep_best:
                        state.best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    state.bad_evals += 1
            run.journal.add(state.step, metrics)
            if run.cb.on_metrics:
                run.cb.on_metrics(state.step, metrics)
            if VAL_METRIC in metrics and run.cb.on_eval:
                run.cb.on_eval(state.step, metrics[VAL_METRIC])
            stopped_early = run.patience is not None and state.bad_evals >= run.patience
            saved = state.step % cfg.checkpoint_interval == 0 or last or stopped_early or stop.is_set()
            if saved:
                run.journal.flush()  # first: the journal must cover every step of the newest checkpoint
                _checkpoint(run, state)  # type: ignore[arg-type] - the fields it reads are the classifier run's
            faults.hit("train.step", step=state.step)
            if stop.is_set():
                raise StageInterrupted(
                    f"stopped by a signal after step {state.step}; checkpoint saved", int(getattr(stop, "signum", 15))
                )
            if stopped_early:
                logger.info(
                    "early stopping at step %d: no val/loss improvement in %d evaluations", state.step, run.patience
                )
                break
    elapsed = time.perf_counter() - loop_t0
    return {
        "final_train": final_train,
        "final_val": final_val,
        "stopped_early": stopped_early,
        "tokens_per_sec": loop_tokens / elapsed if elapsed > 0 else 0.0,
        "loop_seconds": elapsed,
    }
