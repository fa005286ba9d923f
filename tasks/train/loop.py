"""The training loop: nanoGPT-style random windows, warm-up then cosine decay, resumable checkpoints.

Free of Prefect and MLflow: progress leaves through callbacks, which the wiring connects to the
tracking package (and the tuner to Optuna's pruner).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks import faults
from forgeline.tasks.config import ModelConfig, TokenizerConfig, TrainConfig
from forgeline.tasks.train.batches import (
    autocast_context,
    estimate_loss,
    fixed_batches,
    make_loss_fn,
    resolve_device,
    sample_batch,
)
from forgeline.tasks.train.checkpoints import load_latest_checkpoint
from forgeline.tasks.train.distributed import Parallel, global_batch, rank_seed
from forgeline.tasks.train.driver import (
    DONE_FILE as DONE_FILE,  # re-exported, as finished_result: callers import both from here
)
from forgeline.tasks.train.driver import (
    TrainCallbacks,
    TrainResult,
    finished_run,
    loop_result,
    restore_checkpoint,
    run_summary,
    stopped_by_signal,
    write_done,
)
from forgeline.tasks.train.driver import finished_result as finished_result
from forgeline.tasks.train.journal import JOURNAL_FILE, DiscardJournal, MetricJournal
from forgeline.tasks.train.readout import StepReadout
from forgeline.tasks.train.schedule import get_lr, make_optimizer
from forgeline.tasks.train.shards import Shards, draws_random, plan_shards, trainable
from forgeline.tasks.train.signals import stop_on_signal
from forgeline.tasks.train.state import TrainState, record_eval, save_state, skip_nonfinite
from forgeline.tasks.train.tokens import load_token_splits, prepare_tokenizer

logger = logging.getLogger(__name__)


def train_model(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    tok_cfg: TokenizerConfig,
    *,
    dataset_dir: str | Path,
    run_dir: str | Path,
    seed: int,
    config_hash: str,
    callbacks: TrainCallbacks | None = None,
    fetch_model: Callable[[str, Path], Path] | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train (or resume, or recognise as finished) a causal LM on a cleaned dataset.

    Args:
        train_cfg: Loop settings.
        model_cfg: Model sizes or ``init_from``.
        tok_cfg: Tokenizer settings.
        dataset_dir: A cleaned dataset (``train``/``validation`` splits).
        run_dir: This config's checkpoint folder; resumed from when it holds a complete checkpoint.
        seed: Seeds weights, batches and dropout.
        config_hash: Stored in checkpoints; a checkpoint of another config is refused.
        callbacks: Progress hooks.
        fetch_model: Downloads ``model_cfg.init_from`` when it is a registry URI (the tracking package's).
        parallel: This rank's place in a torchrun job (``tasks/train/distributed.py``); ``None``: one process.

    Returns:
        Paths and headline numbers; the model and tokenizer are saved under ``run_dir/model``.
    """
    from forgeline.tasks.model.modeling import build_model, count_parameters  # transformers: only when training

    cb = callbacks or TrainCallbacks()
    par = parallel or Parallel()
    run_dir = Path(run_dir)
    if (finished := finished_run(run_dir)) is not None:
        return finished

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    device = resolve_device(train_cfg)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as nanoGPT
    tokenizer = prepare_tokenizer(tok_cfg, dataset_dir, run_dir, model_cfg.init_from, fetch=fetch_model)
    train_data, val_data = load_token_splits(tokenizer, dataset_dir, model_cfg.block_size)
    train_data = train_data.to(device)  # the token stream stays where the batches are cut
    model = build_model(model_cfg, tokenizer, fetch=fetch_model).to(device)
    optimizer = make_optimizer(model, train_cfg, device)
    gen = torch.Generator(device=device).manual_seed(rank_seed(seed, par.rank))
    state = TrainState(history=[])

    ckpt = load_latest_checkpoint(run_dir / "checkpoints", config_hash)
    resumed_from = None
    if ckpt is not None:
        restore_checkpoint(ckpt, model, optimizer, device)
        if par.is_main and ckpt["rng"]["batches"].numel() == gen.get_state().numel():
            gen.set_state(ckpt["rng"]["batches"])
        else:  # another rank, or a checkpoint of another device's generator
            par.reseed(gen, seed, ckpt["step"])
        state = TrainState.from_checkpoint(ckpt)
        resumed_from = state.step
        logger.info("resumed from step %d (%s)", state.step, run_dir / "checkpoints")

    wrapped = par.wrap(model, device)
    loss_fn = make_loss_fn(wrapped, train_cfg)
    tokens_per_step = global_batch(train_cfg, par.world_size) * model_cfg.block_size
    n_params = count_parameters(model)
    sizes = {
        "parameters": n_params,
        "tokens_per_step": tokens_per_step,
        "total_steps": train_cfg.max_steps,
        "train_tokens": len(train_data),
        "val_tokens": len(val_data),
    }
    summary = run_summary(sizes, tokenizer, device, state.step, par.world_size, global_batch(train_cfg, par.world_size))
    logger.info(
        "training: %s parameters, %d tokens/step (batch %d x context %d x accum %d x ranks %d), %d steps, "
        "%d train tokens, device %s%s",
        f"{n_params:,}",
        tokens_per_step,
        train_cfg.batch_size,
        model_cfg.block_size,
        train_cfg.grad_accum_steps,
        par.world_size,
        train_cfg.max_steps,
        len(train_data),
        device,
        f", resumed from step {state.step}" if resumed_from is not None else "",
    )
    if cb.on_start:
        cb.on_start(summary)

    val_batches = fixed_batches(val_data, train_cfg, model_cfg.block_size, seed + 1, device)
    journal = MetricJournal(run_dir / JOURNAL_FILE, state.step) if par.is_main else DiscardJournal()
    count = plan_shards(
        train_cfg.cpu_shards,
        device=device,
        batch_size=train_cfg.batch_size,
        compiled=train_cfg.compile,
        distributed=par.distributed,
        random=draws_random(model),
    )
    with Shards(count) as shards:
        result = _loop(
            loss_fn,
            wrapped,
            model,
            optimizer,
            train_data,
            val_batches,
            gen,
            state,
            train_cfg,
            model_cfg,
            device,
            run_dir,
            config_hash,
            cb,
            journal,
            par,
            shards,
        )
    model_dir = run_dir / "model"
    kept_best = bool(train_cfg.keep_best) and state.best_weights is not None
    if kept_best:
        model.load_state_dict(state.best_weights)
        logger.info("keeping the weights of step %s (best val/loss %.4f)", state.best_step, state.best_val)
    if par.is_main:
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    out = loop_result(
        run_dir,
        result,
        state,
        resumed_from=resumed_from,
        t_start=t_start,
        parameters=n_params,
        device=device,
        best_val_loss=state.best_val if math.isfinite(state.best_val) else None,
        best_step=state.best_step,
        kept_best=kept_best,
    )
    if par.is_main:
        write_done(run_dir, out)
    return out


def _loop(
    loss_fn: Any,
    wrapped: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: torch.Tensor,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
    gen: torch.Generator,
    state: TrainState,
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    device: torch.device,
    run_dir: Path,
    config_hash: str,
    cb: TrainCallbacks,
    journal: MetricJournal,
    par: Parallel,
    shards: Shards,
) -> dict[str, Any]:
    tokens_per_step = global_batch(cfg, par.world_size) * model_cfg.block_size
    final_val = None
    stopped_early = False
    rate_t0, rate_steps, tokens_per_sec = time.perf_counter(), 0, 0.0
    loop_t0, loop_steps = rate_t0, 0
    # History "time": seconds of training loop since the run began (a resumed run continues the clock).
    t_offset = max((h.get("time", 0.0) for h in state.history or []), default=0.0) - loop_t0
    # No host sync inside a step: losses and norms stay on the device until a log, eval or checkpoint step.
    readout = StepReadout(
        journal,
        cb.on_metrics,
        on_nonfinite=lambda step: skip_nonfinite(state, cfg, run_dir, step),
        on_finite=lambda: setattr(state, "nonfinite_run", 0),
    )
    skip_on_device = bool(optimizer.defaults.get("fused"))  # fused AdamW skips a step whose found_inf is 1
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    params = trainable(model)

    def autocast() -> Any:  # entered on each shard's thread: autocast is per thread
        return autocast_context(device, cfg)

    model.train()
    with stop_on_signal() as stop:
        while state.step < cfg.max_steps:
            step = state.step
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            poison = faults.nan_loss(step + 1)
            for micro in range(cfg.grad_accum_steps):
                x, y = sample_batch(train_data, cfg.batch_size, model_cfg.block_size, gen)
                with par.micro_batch(last=micro == cfg.grad_accum_steps - 1):
                    loss_sum += shards.backward(
                        loss_fn,
                        x,
                        y,
                        params,
                        divisor=cfg.grad_accum_steps,
                        context=autocast,
                        transform=_poisoned if poison else None,
                    )
            if par.distributed:  # every rank must take the same decisions: agreed on the host each step
                mean, stopping = par.agree(loss_sum, cfg.grad_accum_steps, stop.is_set())
                train_loss = torch.tensor(mean, device=device)
            else:
                train_loss, stopping = loss_sum / cfg.grad_accum_steps, stop.is_set()
            state.step = step + 1
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if skip_on_device:
                optimizer.found_inf = (~torch.isfinite(train_loss)).float()
                optimizer.step()
            elif math.isfinite(train_loss.item()):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            readout.add(state.step, lr, train_loss, grad_norm)
            rate_steps += 1
            loop_steps += 1
            at_log = state.step % cfg.log_interval == 0 or state.step == cfg.max_steps
            at_eval = state.step % cfg.eval_interval == 0 or state.step == cfg.max_steps
            saved = state.step % cfg.checkpoint_interval == 0 or state.step == cfg.max_steps or stopping
            hit = not (at_log or at_eval or saved)
            if hit:  # nothing to read at this step
                faults.hit("train.step", step=state.step)
                if not (stop.is_set() and not par.distributed):
                    continue
                saved = stopping = True  # a signal came during this step: read it, checkpoint and stop
            metrics = readout.drain()
            if metrics is None:  # this step was non-finite: skipped (no metrics, evaluation or checkpoint)
                continue
            if at_log:
                now = time.perf_counter()  # after the drain's sync: the device's time, not the host's
                tokens_per_sec = rate_steps * tokens_per_step / max(now - rate_t0, 1e-9)
                rate_t0, rate_steps = now, 0
                metrics["tokens_per_sec"] = tokens_per_sec
                state.history.append({"step": state.step, "train/loss": metrics["train/loss"], "time": t_offset + now})
                logger.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s",
                    state.step,
                    cfg.max_steps,
                    metrics["train/loss"],
                    lr,
                    tokens_per_sec,
                )
            if at_eval:
                final_val = estimate_loss(wrapped, val_batches, device, cfg, loss_fn, shards)
                metrics["val/loss"] = final_val
                state.history.append(
                    {"step": state.step, "val/loss": final_val, "time": t_offset + time.perf_counter()}
                )
                logger.info("step %d: val/loss %.4f", state.step, final_val)
                record_eval(state, model, cfg, final_val)
            readout.emit(state.step, metrics)
            if "val/loss" in metrics and cb.on_eval:
                cb.on_eval(state.step, metrics["val/loss"])
            patience = cfg.patience
            stopped_early = bool(patience) and state.bad_evals >= patience  # 0: never
            saved = saved or stopped_early
            if saved and par.is_main:  # rank 0 writes for all: every rank holds the same weights
                journal.flush()  # first: the journal must cover every step of the newest checkpoint
                save_state(model, optimizer, gen, state, run_dir, config_hash, cfg, device)
            if not hit:
                faults.hit("train.step", step=state.step)
            # One process may stop on a signal that came during this step's end; ranks stop only as agreed.
            stopping = stopping or (stop.is_set() and not par.distributed)
            if stopping:
                if not saved:
                    journal.flush()
                    save_state(model, optimizer, gen, state, run_dir, config_hash, cfg, device)
                raise stopped_by_signal(stop, state.step)
            if stopped_early:
                logger.info("early stopping at step %d: no improvement in %d evaluations", state.step, patience)
                break
    elapsed = time.perf_counter() - loop_t0
    mean_rate = loop_steps * tokens_per_step / elapsed if elapsed > 0 and loop_steps else tokens_per_sec
    return {
        "final_train": readout.last_train,
        "final_val": final_val,
        "stopped_early": stopped_early,
        "tokens_per_sec": mean_rate,
        "loop_seconds": elapsed,
    }


def _poisoned(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan")  # the nan_loss fault point: this step's loss, as a diverged run's
