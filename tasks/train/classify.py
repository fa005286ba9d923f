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
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks import faults
from forgeline.tasks.config import PipelineConfig, TrainConfig, higher_is_better
from forgeline.tasks.errors import NonFiniteLossError, StageInterrupted
from forgeline.tasks.train.batches import autocast_context, resolve_device
from forgeline.tasks.train.checkpoints import load_latest_checkpoint, save_checkpoint
from forgeline.tasks.train.classify_data import (
    VAL_METRICS,
    LabeledSplit,
    batch_indices,
    class_weights,
    classify_loss,
    collate,
    encode_split,
    evaluate_split,
    total_steps,
)
from forgeline.tasks.train.journal import JOURNAL_FILE, MetricJournal
from forgeline.tasks.train.loop import DONE_FILE, TrainCallbacks, TrainResult, finished_result
from forgeline.tasks.train.schedule import get_lr, make_optimizer
from forgeline.tasks.train.signals import stop_on_signal

logger = logging.getLogger(__name__)


def improvement_metric(cfg: PipelineConfig) -> tuple[str, bool]:
    """The validation metric that decides the best evaluation and early stopping, and whether higher is better.

    ``cfg.tune_metric()`` when it is one the loop logs (``val/f1_macro`` by default), else ``val/loss``.
    """
    name = cfg.tune_metric()[0]
    if name not in VAL_METRICS:
        name = "val/loss"
    return name, higher_is_better(name)


@dataclass
class _State:
    step: int = 0
    best_score: float = math.inf  # the improvement metric, negated when higher is better: lower is better
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    nonfinite: int = 0
    nonfinite_run: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_model: dict[str, torch.Tensor] | None = None


@dataclass
class _Run:
    cfg: TrainConfig  # max_steps = the run's steps (epochs resolved), so the schedule decays over them
    model: Any
    optimizer: torch.optim.Optimizer
    train: LabeledSplit
    val: LabeledSplit
    weight: torch.Tensor | None
    pad_id: int
    seed: int
    device: torch.device
    run_dir: Path
    config_hash: str
    metric: tuple[str, bool]
    patience: int | None
    keep_best: bool
    cb: TrainCallbacks
    journal: MetricJournal


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
    done = run_dir / DONE_FILE
    if done.exists():
        return finished_result(run_dir, done)

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
    optimizer = make_optimizer(model, train_cfg, device)
    weight = class_weights(cfg.train.class_weights, train.labels, len(label_set.labels))
    state = _State()
    config_hash = cfg.config_hash()

    ckpt = load_latest_checkpoint(run_dir / "checkpoints", config_hash)
    resumed_from = None
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
        "train_records": len(train),
        "val_records": len(val),
        "train_tokens": train.tokens,
        "classes": len(label_set.labels),
        "vocab_size": len(tokenizer),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "start_step": state.step,
        "world_size": 1,
        "global_batch": train_cfg.batch_size * train_cfg.grad_accum_steps,
    }
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

    run = _Run(
        cfg=train_cfg,
        model=model,
        optimizer=optimizer,
        train=train,
        val=val,
        weight=weight.to(device) if weight is not None else None,
        pad_id=int(tokenizer.pad_token_id),
        seed=cfg.seed,
        device=device,
        run_dir=run_dir,
        config_hash=config_hash,
        metric=improvement_metric(cfg),
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
        best_val_loss=state.best_metrics.get("val/loss"),
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


def best_value(result: TrainResult, metric: str, higher: bool) -> float | None:
    """The best value of a validation metric over a run's evaluations (its history), or ``None``."""
    values = [h[metric] for h in result.history if metric in h and math.isfinite(h[metric])]
    if not values:
        return None
    return max(values) if higher else min(values)


def _loop(run: _Run, state: _State) -> dict[str, Any]:
    cfg, model, optimizer = run.cfg, run.model, run.optimizer
    final_train = final_val = None
    # A run killed after its early-stop checkpoint, before done.json, stops again without another step.
    stopped_early = run.patience is not None and state.bad_evals >= run.patience
    loop_t0, loop_tokens = time.perf_counter(), 0
    t_offset = max((h.get("time", 0.0) for h in state.history), default=0.0) - loop_t0
    metric, higher = run.metric
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
                index = batch_indices(run.train, cfg.batch_size, step * cfg.grad_accum_steps + micro, run.seed)
                x, mask, y = collate(run.train, index, run.pad_id)
                loop_tokens += int(mask.sum())
                x, mask, y = x.to(run.device), mask.to(run.device), y.to(run.device)
                with autocast_context(run.device, cfg):
                    loss = classify_loss(model, x, mask, y, run.weight)
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
                scores = evaluate_split(model, run.val, run.pad_id, run.device, cfg)
                metrics.update(scores)
                final_val = scores["val/loss"]
                state.history.append({"step": state.step, **scores, "time": t_offset + time.perf_counter()})
                logger.info("step %d: %s", state.step, _fmt(scores))
                score = -scores[metric] if higher else scores[metric]
                if score < state.best_score:
                    state.best_score, state.best_metrics, state.bad_evals = score, scores, 0
                    if run.keep_best:
                        state.best_model = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    state.bad_evals += 1
            run.journal.add(state.step, metrics)
            if run.cb.on_metrics:
                run.cb.on_metrics(state.step, metrics)
            if metric in metrics and run.cb.on_eval:
                run.cb.on_eval(state.step, metrics[metric])
            stopped_early = run.patience is not None and state.bad_evals >= run.patience
            saved = state.step % cfg.checkpoint_interval == 0 or last or stopped_early or stop.is_set()
            if saved:
                run.journal.flush()  # first: the journal must cover every step of the newest checkpoint
                _checkpoint(run, state)
            faults.hit("train.step", step=state.step)
            if stop.is_set():
                if not saved:
                    run.journal.flush()
                    _checkpoint(run, state)
                signum = getattr(stop, "signum", signal.SIGTERM)
                name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
                raise StageInterrupted(
                    f"stopped by a signal after step {state.step} ({name}); checkpoint saved", int(signum)
                )
            if stopped_early:
                logger.info(
                    "early stopping at step %d: no %s improvement in %d evaluations", state.step, metric, run.patience
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


def _skip_nonfinite(optimizer: torch.optim.Optimizer, state: _State, cfg: TrainConfig, run_dir: Path) -> None:
    # Policy (as the LM loop's): drop this step's gradients and count it; K in a row fails. No checkpoint.
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite += 1
    state.nonfinite_run += 1
    logger.warning(
        "non-finite loss at step %d (skipped; %d in a row, limit %d)",
        state.step,
        state.nonfinite_run,
        cfg.max_nonfinite_steps,
    )
    if state.nonfinite_run >= cfg.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"loss was non-finite for {state.nonfinite_run} steps in a row (last at step {state.step}); "
            f"last good checkpoint kept in {run_dir / 'checkpoints'}"
        )


def _checkpoint(run: _Run, state: _State) -> None:
    rng = {"torch": torch.get_rng_state()}  # batches are a function of (seed, step): no generator to save
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    payload = {
        "step": state.step,
        "config_hash": run.config_hash,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"kind": "warmup_cosine", "step": state.step},
        "rng": rng,
        "best_val": state.best_score,
        "best_metrics": state.best_metrics,
        "bad_evals": state.bad_evals,
        "nonfinite": state.nonfinite,
        "history": state.history,
    }
    if state.best_model is not None:
        payload["best_model"] = state.best_model
    save_checkpoint(run.run_dir / "checkpoints", state.step, payload, keep=run.cfg.keep_checkpoints)


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
