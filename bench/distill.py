"""Does distillation earn its keep? A half-depth student distilled from the teacher against the same student
trained from scratch, for the same steps, seed and data (issue 18, point 5).

The teacher is ``configs/shakespeare_char.yaml``'s model, trained here with the pipeline's own loop (or
reused from ``--teacher-dir``). For each seed the two arms take turns (distilled first on the 1st, 3rd, ... seed,
scratch first on the others, so a machine that gets busier slows both alike):

- ``distilled``: teacher layers evenly spaced (half of them) plus embeddings, final norm and head, trained
  with ``compress``'s loss (T = 2, alpha_kd = alpha_ce = 0.5);
- ``scratch``: the same shape, random weights, plain cross-entropy (alpha_kd = 0).

Both are scored by the stage's own code: validation loss on the loop's fixed batches, bits per byte on the
held-out split, CPU generation (batch 1, KV cache) against the teacher's, interleaved.

    .venv/bin/python bench/distill.py                       # teacher 2000 steps, students 300 steps, 3 seeds
    .venv/bin/python bench/distill.py --smoke               # seconds: checks it works
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forgeline.tasks.compress.stage import compress_model  # noqa: E402
from forgeline.tasks.config import CompressConfig, load_config  # noqa: E402
from forgeline.tasks.data.cleaning import clean_dataset  # noqa: E402
from forgeline.tasks.train.loop import train_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shakespeare_char.yaml")
    parser.add_argument("--teacher-steps", type=int, default=2000)
    parser.add_argument(
        "--stop-teacher-at",
        type=int,
        default=None,
        help="stop the teacher's --teacher-steps schedule after this many steps (a later full run resumes it)",
    )
    parser.add_argument("--steps", type=int, default=300, help="student steps, both arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="mlruns/bench-distill")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script works")
    args = parser.parse_args()
    # Bits per byte over the first 20k held-out tokens: scoring all 111k twice per arm would dominate the run.
    sets = [
        f"train.max_steps={args.teacher_steps}",
        f"train.lr_decay_steps={args.teacher_steps}",
        "eval.max_tokens=50000",
    ]
    if args.smoke:
        sets = ["train.max_steps=20", "train.lr_decay_steps=20", "train.eval_interval=10", "train.eval_batches=2"]
        args.steps, args.seeds = 10, [1]
    cfg = load_config(ROOT / args.config, sets)
    out = Path(args.out) / ("smoke" if args.smoke else "full")
    data = clean_dataset(cfg.data, base_dir=Path.cwd())
    t0 = time.perf_counter()
    teacher_train = cfg.train
    if args.stop_teacher_at:
        teacher_train = cfg.train.model_copy(update={"max_steps": args.stop_teacher_at})
    teacher = train_model(
        teacher_train,
        cfg.model,
        cfg.tokenizer,
        dataset_dir=data.dataset_dir,
        run_dir=out / ("teacher" if not args.stop_teacher_at else f"teacher-at-{args.stop_teacher_at}"),
        seed=cfg.seed,
        config_hash=cfg.config_hash(),
    )
    val = teacher.final_val_loss if teacher.final_val_loss is not None else teacher.best_val_loss
    print(f"teacher: {teacher.steps} steps, val loss {val} ({time.perf_counter() - t0:.0f} s)")
    arms = {
        "distilled": CompressConfig(max_steps=args.steps),
        "scratch": CompressConfig(max_steps=args.steps, init="scratch", alpha_kd=0.0, alpha_ce=1.0),
    }
    if args.smoke:
        arms = {k: v.model_copy(update={"latency_requests": 2, "latency_new_tokens": 4}) for k, v in arms.items()}
    rows = []
    for i, seed in enumerate(args.seeds):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for arm in order:
            t1 = time.perf_counter()
            result = compress_model(
                teacher.model_dir,
                arms[arm],
                cfg.train,
                cfg.eval,
                dataset_dir=data.dataset_dir,
                run_dir=out / f"{arm}-seed{seed}-steps{args.steps}",
                block_size=cfg.model.block_size,
                seed=seed,
                run_hash=f"{arm}-{seed}-{args.steps}",
            )
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "val_loss": result.final_val_loss,
                    "bits_per_byte": result.student.bits_per_byte,
                    "teacher_bits_per_byte": result.teacher.bits_per_byte,
                    "non_embedding_ratio": result.student.non_embedding_parameters
                    / result.teacher.non_embedding_parameters,
                    "speedup": result.student.tokens_per_sec / result.teacher.tokens_per_sec,
                    "seconds": time.perf_counter() - t1,
                }
            )
            print(json.dumps(rows[-1]))
    report(rows)


def report(rows: list[dict]) -> None:
    """A markdown table: per arm, the mean over seeds (and each seed's value loss)."""
    print(
        "\n| arm | val loss per seed | mean val loss | bits/byte | non-emb. params vs teacher | gen. speed vs teacher |"
    )
    print("|---|---|---|---|---|---|")
    for arm in ("distilled", "scratch"):
        mine = [r for r in rows if r["arm"] == arm]
        losses = ", ".join(f"{r['val_loss']:.4f}" for r in mine)
        print(
            f"| {arm} | {losses} | {statistics.mean(r['val_loss'] for r in mine):.4f} | "
            f"{statistics.mean(r['bits_per_byte'] for r in mine):.4f} | "
            f"{statistics.mean(r['non_embedding_ratio'] for r in mine):.2f} | "
            f"{statistics.mean(r['speedup'] for r in mine):.2f}x |"
        )
    gaps = [
        s["val_loss"] - d["val_loss"]
        for d in rows
        if d["arm"] == "distilled"
        for s in rows
        if s["arm"] == "scratch" and s["seed"] == d["seed"]
    ]
    print(f"\nscratch minus distilled val loss per seed: {', '.join(f'{g:+.4f}' for g in gaps)}")


if __name__ == "__main__":
    main()
