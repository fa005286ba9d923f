"""GPU benchmark (issue 6, goal 5): nanoGPT's GPU recipe through the pipeline's loop, a bare loop and by hand.

On the lent GPU (``bash bench/gpu.sh``, under 5 minutes of device time) it measures, for
``configs/shakespeare_char_gpu.yaml`` (6 layers, 6 heads, width 384, context 256, batch 64, bf16 autocast,
``torch.compile``):

- ``nanoGPT's model by hand``: bench/nanogpt_reference.py's module at the recipe's size, compiled, bf16,
  AdamW fused (nanoGPT's own choice on CUDA), ``--ref-steps`` steps: ms per step;
- ``bare loop``: Forgeline's model (``build_model``) in a hand-written loop, same settings: ms per step;
- ``pipeline``: ``train_model`` with its MLflow tracking (SQLite) for the whole recipe (5000 steps):
  ms per step, tokens per second, MFU, and the seconds to the first evaluation at validation loss <= 1.47
  (compile included).

Ratios are to the by-hand module measured in the same process (the goal: the pipeline at most 0.6x nanoGPT's
ms per step). The hand-written module has no dropout, so it is a slightly fast reference.

    bash bench/gpu.sh                                  # on the device; JSON to $OUT (or bench/results/)
    .venv/bin/python bench/gpu_step.py --smoke         # CPU, tiny sizes, seconds: checks it works (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nanogpt_reference as ref  # noqa: E402
import torch  # noqa: E402
from time_to_loss import median_step_ms  # noqa: E402
from train_step import make_dataset, train_pipeline  # noqa: E402

from forgeline.tasks.config import PipelineConfig, load_config  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16


def flops_per_token(cfg: PipelineConfig, n_params: int) -> float:
    """nanoGPT's estimate: 6N plus attention's 12 * layers * heads * head size * context."""
    m = cfg.model
    return 6 * n_params + 12 * m.n_layer * m.n_head * (m.n_embd // m.n_head) * m.block_size


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def timed_steps(step, steps: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def steady_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times[len(times) // 3 :])  # after compile and warm-up


def timed_loop(model: torch.nn.Module, loss_of, cfg: PipelineConfig, data: torch.Tensor, steps: int) -> list[float]:  # noqa: ANN001
    """``steps`` optimizer steps of the training loop's shape (random windows, clip, fused AdamW), timed."""
    from forgeline.tasks.train.batches import autocast_context
    from forgeline.tasks.train.schedule import make_optimizer

    m, t = cfg.model, cfg.train
    device = data.device
    opt = make_optimizer(model, t, device)

    def step() -> None:
        ix = torch.randint(len(data) - m.block_size - 1, (t.batch_size,), device=device)
        window = data[ix[:, None] + torch.arange(m.block_size + 1, device=device)]
        with autocast_context(device, t):
            loss = loss_of(window[:, :-1], window[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed_steps(step, steps, device)


def by_hand(cfg: PipelineConfig, data: torch.Tensor, vocab: int, steps: int) -> list[float]:
    m = cfg.model
    ref.LAYERS, ref.HEADS, ref.WIDTH, ref.BLOCK = m.n_layer, m.n_head, m.n_embd, m.block_size
    torch.manual_seed(cfg.seed)
    model = ref.GPT(vocab).to(data.device)
    fwd = torch.compile(model) if cfg.train.compile else model
    return timed_loop(model, fwd, cfg, data, steps)  # the reference module returns the loss itself


def bare_loop(cfg: PipelineConfig, data: torch.Tensor, tokenizer, steps: int) -> list[float]:  # noqa: ANN001
    from forgeline.tasks.model.modeling import build_model
    from forgeline.tasks.train.batches import lm_loss

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer).to(data.device)
    fwd = torch.compile(model) if cfg.train.compile else model
    return timed_loop(model, lambda x, y: lm_loss(fwd, x, y), cfg, data, steps)


def pipeline(cfg: PipelineConfig, dataset_dir: str, tmp: Path, target: float) -> dict:
    from forgeline.tasks.tracking import store
    from forgeline.tasks.tracking.metrics import MetricBuffer
    from forgeline.tasks.tracking.runs import stage_run
    from forgeline.tasks.train.loop import TrainCallbacks

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    store.setup_tracking(cfg.tracking, tmp)
    exp = store.ensure_experiment("bench-gpu", cfg.tracking, tmp)
    with stage_run(exp, "gpu-pipeline") as run_id:
        buffer = MetricBuffer(run_id, flush_every=cfg.tracking.metric_flush_interval)
        t0 = time.perf_counter()
        result = train_pipeline(cfg, dataset_dir, tmp / "run", TrainCallbacks(on_metrics=buffer.add))
        wall = time.perf_counter() - t0
        buffer.close()
    hit = next((h for h in result.history if h.get("val/loss", math.inf) <= target), None)
    return {
        "ms_per_step": median_step_ms(result.history, result.steps, result.loop_seconds),
        "train_wall_s": wall,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "parameters": result.parameters,
        "seconds_to_target": hit["time"] if hit else None,
        "step_at_target": hit["step"] if hit else None,
        "evals": [(h["step"], h["val/loss"], h["time"]) for h in result.history if "val/loss" in h],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare_char_gpu.yaml")
    parser.add_argument("--ref-steps", type=int, default=300, help="steps of the by-hand and bare loops")
    parser.add_argument("--target", type=float, default=1.47, help="validation loss for the time-to-target")
    parser.add_argument("--peak-tflops", type=float, help="device's dense bf16 peak (default: by GPU name)")
    parser.add_argument("--set", action="append", default=[], help="config override for the pipeline run")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the benchmark works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_step.json")
    args = parser.parse_args()
    overrides = ["tracking.log_system_metrics=false", *args.set]
    if args.smoke:
        args.ref_steps, args.target = 6, 4.0
        overrides += ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
        overrides += ["train.max_steps=12", "train.eval_interval=6", "train.eval_batches=2", "train.batch_size=4"]
        overrides += ["train.compile=false", "train.device=cpu", "train.checkpoint_interval=6"]
    cfg = load_config(args.config, overrides)

    from forgeline.tasks.train.batches import resolve_device
    from forgeline.tasks.train.tokens import load_token_splits, prepare_tokenizer

    device = resolve_device(cfg.train)
    with tempfile.TemporaryDirectory(prefix="forgeline-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        dataset_dir = make_dataset(tmp)
        tokenizer = prepare_tokenizer(cfg.tokenizer, dataset_dir, tmp / "tok")
        train_data, _ = load_token_splits(tokenizer, dataset_dir, cfg.model.block_size)
        data = train_data.to(device)
        hand = steady_ms(by_hand(cfg, data, len(tokenizer), args.ref_steps))
        bare = steady_ms(bare_loop(cfg, data, tokenizer, args.ref_steps))
        pipe = pipeline(cfg, dataset_dir, tmp, args.target)
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum_steps
    peak = peak_flops(device, args.peak_tflops)
    rows = {"nanoGPT's model by hand": hand, "bare loop (Forgeline's model)": bare, "pipeline": pipe["ms_per_step"]}
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    print(f"{'loop (median of the steady state)':34} {'ms/step':>8} {'tokens/s':>10} {'MFU':>6} {'vs by hand':>10}")
    table = {}
    for name, ms in rows.items():
        tps = tokens_per_step / (ms / 1000) if ms else None
        mfu = tps * flops_per_token(cfg, pipe["parameters"]) / peak if (tps and peak) else None
        table[name] = {
            "ms_per_step": ms,
            "tokens_per_s": tps,
            "mfu": mfu,
            "ratio_to_by_hand": ms / hand if ms else None,
        }
        print(
            f"{name:34} {ms:8.2f} {tps:10.0f} {(f'{mfu:.1%}' if mfu else '-'):>6} {ms / hand:10.2f}"
            if ms
            else f"{name:34} -"
        )
    print(
        f"pipeline: best val {pipe['best_val_loss']}, val <= {args.target} at step {pipe['step_at_target']} "
        f"after {pipe['seconds_to_target']} s of the loop (compile included); loop {pipe['train_wall_s']:.1f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "device": str(device), "config": str(args.config)}
    args.out.write_text(json.dumps({**payload, "table": table, "pipeline": pipe}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
