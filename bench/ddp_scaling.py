"""Data-parallel scaling: one process against two torchrun ranks (gloo on CPU), the pipeline's own loop.

nanoGPT's Shakespeare-char CPU model (``configs/shakespeare_char.yaml``). Variants, each run ``--rounds``
times in turn: one process with the recipe's batch 12 and with batch 24 (the global batch of two ranks), each
with 2 threads and with 1, and two ranks of batch 12 with one thread each (torchrun's default). Reports the
median over rounds of ms per optimizer step and global tokens per second (the loop's mean over its steps).

    .venv/bin/python bench/ddp_scaling.py                # 3 rounds x 3 variants x 100 steps
    .venv/bin/python bench/ddp_scaling.py --smoke        # smoke model, seconds: checks it works
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = [  # name, processes, batch per process, threads per process
    ("1 process x 2 threads, batch 12", 1, 12, 2),
    ("1 process x 1 thread, batch 12", 1, 12, 1),
    ("1 process x 2 threads, batch 24", 1, 24, 2),
    ("1 process x 1 thread, batch 24", 1, 24, 1),
    ("2 ranks x 1 thread, batch 12 each (global 24)", 2, 12, 1),
]


def worker(spec: dict) -> None:
    """One rank (or the single process): train and, as rank 0, write the result."""
    from forgeline.tasks.config import load_config
    from forgeline.tasks.train.distributed import Parallel, init_ranks, leave_ranks
    from forgeline.tasks.train.loop import train_model

    cfg = load_config(spec["config"], spec["overrides"])
    par = init_ranks(cfg.train) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else Parallel()
    result = train_model(
        cfg.train, cfg.model, cfg.tokenizer, dataset_dir=spec["dataset"], run_dir=spec["run_dir"],
        seed=cfg.seed, config_hash=cfg.config_hash(), parallel=par,
    )  # fmt: skip
    if par.is_main:
        Path(spec["out"]).write_text(result.model_dump_json())
    leave_ranks()


def run_variant(tmp: Path, variant: tuple, steps: int, smoke: bool, dataset: str, i: int) -> dict:
    name, nproc, batch, threads = variant
    config = ROOT / "configs" / ("smoke.yaml" if smoke else "shakespeare_char.yaml")
    overrides = [
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"train.eval_interval={steps}",
        f"train.checkpoint_interval={steps}",
        "train.eval_batches=2",
        f"train.log_interval={steps}",
        f"train.nproc_per_node={nproc}",
    ]
    out = tmp / f"{i}-{nproc}-{batch}-{threads}.json"
    spec = {"config": str(config), "overrides": overrides, "dataset": dataset, "run_dir": str(tmp / out.stem)}
    spec["out"] = str(out)
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    cmd = [sys.executable, *me]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=env)
    result = json.loads(out.read_text())
    return {
        "variant": name,
        "ms_per_step": 1000 * result["loop_seconds"] / result["steps"],
        "tokens_per_sec": result["tokens_per_sec"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Smoke model, few steps, one round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of all variants.")
    parser.add_argument("--steps", type=int, default=100, help="Optimizer steps per run.")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from train_step import make_dataset

    rounds, steps = (1, 10) if args.smoke else (args.rounds, args.steps)
    rows: dict[str, list[dict]] = {v[0]: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        dataset = make_dataset(tmp)
        for i in range(rounds):
            for variant in VARIANTS:
                rows[variant[0]].append(run_variant(tmp, variant, steps, args.smoke, dataset, i))
    print(f"load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} cores; median of {rounds} round(s)")
    print("| variant | ms/step (median) | global tokens/s (median) |")
    print("|---|---|---|")
    table = []
    for name, runs in rows.items():
        ms = statistics.median(r["ms_per_step"] for r in runs)
        tps = statistics.median(r["tokens_per_sec"] for r in runs)
        table.append({"variant": name, "ms_per_step": ms, "tokens_per_sec": tps, "runs": runs})
        print(f"| {name} | {ms:.1f} | {tps:,.0f} |")
    if args.out:
        payload = {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": steps, "rows": table}
        args.out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
