"""GPU benchmark (issue 20): nanoGPT's GPU recipe through the pipeline's loop against nanoGPT's model by hand.

On a lent GPU (``bash bench/gpu.sh``, one command of at most ``PLANNED_SECONDS`` plus margin) it measures, for
``configs/shakespeare_char_gpu.yaml`` (6 layers, 6 heads, width 384, context 256, batch 64, dropout 0.2,
bf16 autocast, ``torch.compile``), in one process:

- ``nanoGPT's model by hand``: bench/nanogpt_reference.py's module at the recipe's size, compiled as nanoGPT
  compiles it (default mode), bf16, fused AdamW, ``--ref-steps`` steps: ms per step;
- ``pipeline``: ``train_model`` with its MLflow tracking (SQLite), ``train.compile_mode`` as given
  (``reduce-overhead``: CUDA graphs), the recipe's schedule (5000-step cosine) cut at ``--steps`` (2000:
  nanoGPT's documented 1.4623 is at step 2000): ms per step, tokens per second, MFU, best validation loss, and
  the seconds of the loop (compile included) to the first evaluation at validation loss <= 1.47.

The JSON is written after each phase, so a timeout keeps what was measured. The hand-written module has no
dropout, so it is a slightly fast reference. Without CUDA it refuses to run (exit 2) unless ``--smoke``.
Tiny Shakespeare is read from ``--data`` (default: the config's source path); a missing file is an error.

    bash bench/gpu.sh                                  # on the device; JSON to $OUT (or bench/results/)
    bash bench/gpu.sh --smoke                          # CPU, tiny sizes, seconds: checks it works (tests)
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


PLANNED_SECONDS = 420
"""The phases' budget on an H100/H200: two compiles (about 60 s and 120 s with CUDA graphs), 200 steps by hand,
2000 pipeline steps (about 20 s) and 8 evaluations of 200 batches, with margin; ``gpu.sh``'s timeout is above it."""


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
    fwd = torch.compile(model) if cfg.train.compile else model  # nanoGPT: default mode
    return timed_loop(model, fwd, cfg, data, steps)  # the reference module returns the loss itself


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
        "compile_mode": cfg.train.compile_mode if cfg.train.compile else None,
        "steps": result.steps,
        "train_wall_s": wall,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "parameters": result.parameters,
        "seconds_to_target": hit["time"] if hit else None,
        "step_at_target": hit["step"] if hit else None,
        "evals": [(h["step"], h["val/loss"], h["time"]) for h in result.history if "val/loss" in h],
    }


def row(cfg: PipelineConfig, ms: float, hand: float | None, n_params: int, peak: float | None) -> dict:
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum_steps
    tps = tokens_per_step / (ms / 1000)
    mfu = tps * flops_per_token(cfg, n_params) / peak if peak else None
    return {"ms_per_step": ms, "tokens_per_s": tps, "mfu": mfu, "ratio_to_by_hand": ms / hand if hand else None}


def refuse(message: str) -> None:
    print(f"gpu_step.py: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare_char_gpu.yaml")
    parser.add_argument("--data", type=Path, help="Tiny Shakespeare (default: the config's source path)")
    parser.add_argument("--ref-steps", type=int, default=200, help="steps of nanoGPT's model by hand")
    parser.add_argument("--steps", type=int, default=2000, help="pipeline steps (of the recipe's 5000-step schedule)")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="train.compile_mode of the pipeline run")
    parser.add_argument("--target", type=float, default=1.47, help="validation loss for the time-to-target")
    parser.add_argument("--peak-tflops", type=float, help="device's dense bf16 peak (default: by GPU name)")
    parser.add_argument("--set", action="append", default=[], help="config override for the pipeline run")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the benchmark works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_step.json")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        refuse(
            f"no CUDA device here (torch {torch.__version__}): this benchmark measures a GPU; "
            "run it where one is, or pass --smoke to check it on the CPU"
        )
    overrides = ["tracking.log_system_metrics=false", f"train.max_steps={args.steps}"]
    overrides += [f"train.compile_mode={args.compile_mode}", *args.set]
    if args.smoke:
        args.ref_steps, args.target = 6, 4.0
        overrides += ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]
        overrides += ["train.max_steps=12", "train.eval_interval=6", "train.eval_batches=2", "train.batch_size=4"]
        overrides += ["train.compile=false", "train.device=cpu", "train.checkpoint_interval=6"]
    cfg = load_config(args.config, overrides)
    data_path = args.data or ROOT / cfg.data.sources[0].paths[0]
    if not data_path.is_file():
        refuse(f"Tiny Shakespeare not found at {data_path} (pass --data PATH)")

    from forgeline.tasks.train.batches import resolve_device
    from forgeline.tasks.train.tokens import load_token_splits, prepare_tokenizer

    device = resolve_device(cfg.train)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # nanoGPT: TF32 matmuls; the pipeline sets the same
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    payload: dict = {"date": time.strftime("%Y-%m-%d"), "device": name, "config": str(args.config), "table": {}}
    payload["argv"] = sys.argv[1:]

    def save() -> None:  # after every phase: a timeout keeps what was measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2))

    print(f"device {device} ({name})")
    with tempfile.TemporaryDirectory(prefix="forgeline-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        dataset_dir = make_dataset(tmp, data_path.read_text(encoding="utf-8"))
        tokenizer = prepare_tokenizer(cfg.tokenizer, dataset_dir, tmp / "tok")
        train_data, _ = load_token_splits(tokenizer, dataset_dir, cfg.model.block_size)
        data = train_data.to(device)
        t0 = time.perf_counter()
        hand = steady_ms(by_hand(cfg, data, len(tokenizer), args.ref_steps))
        payload["phase_s"] = {"by hand": time.perf_counter() - t0}
        payload["table"]["nanoGPT's model by hand"] = {"ms_per_step": hand}
        save()
        print(f"nanoGPT's model by hand: {hand:.2f} ms/step (median of the steady state)", flush=True)
        t0 = time.perf_counter()
        pipe = pipeline(cfg, dataset_dir, tmp, args.target)
        n_params = pipe["parameters"]
        payload["phase_s"]["pipeline"] = time.perf_counter() - t0
        payload["pipeline"] = pipe
        payload["table"] = {
            "nanoGPT's model by hand": row(cfg, hand, hand, n_params, peak),
            "pipeline": row(cfg, pipe["ms_per_step"], hand, n_params, peak),
        }
        save()
    print(f"{'loop (median of the steady state)':34} {'ms/step':>8} {'tokens/s':>10} {'MFU':>6} {'vs by hand':>10}")
    for label, r in payload["table"].items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{label:34} {r['ms_per_step']:8.2f} {r['tokens_per_s']:10.0f} {mfu:>6} {r['ratio_to_by_hand']:10.2f}")
    print(
        f"pipeline ({pipe['compile_mode']}): best val {pipe['best_val_loss']}, val <= {args.target} at step "
        f"{pipe['step_at_target']} after {pipe['seconds_to_target']} s of the loop (compile included); "
        f"loop {pipe['train_wall_s']:.1f} s"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
