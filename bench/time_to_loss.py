"""Time to validation loss: ``forgeline run`` on nanoGPT's CPU recipe against the hand-written script.

Each round runs, in fresh processes and interleaved, ``bench/nanogpt_reference.py`` (nanoGPT's recipe by
hand) and ``forgeline run --config configs/shakespeare_char.yaml --fresh`` (the whole pipeline: clean,
train, evaluate, register) with the same seed. Forgeline runs in a project folder warmed by one short run
(cleaned data cached and Prefect's database made, as nanoGPT's ``prepare.py`` is run once before
``train.py``). For each it records the whole process's wall time, ms per step, the validation loss after
the last step (20 batches, as nanoGPT's ``--eval_iters=20``), the loss over the whole validation text,
and the seconds from process start to the first evaluation at or below the target.

    .venv/bin/python bench/time_to_loss.py --rounds 2               # ~6 min on 2 cores
    .venv/bin/python bench/time_to_loss.py --smoke                  # 20 steps each: checks it works (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CONFIG = ROOT / "configs" / "shakespeare_char.yaml"
RESULTS = ROOT / "bench" / "results"
_SCRUB = ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_HOME")


def reference(data: Path, seed: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"ref-{seed}.json"
    cmd = [sys.executable, str(ROOT / "bench" / "nanogpt_reference.py"), "--data", str(data)]
    subprocess.run([*cmd, "--seed", str(seed), "--steps", str(steps), "--out", str(out)], check=True)
    r = json.loads(out.read_text())
    r["evals"] = [{"step": e["step"], "val": e["val"], "t": e["t"]} for e in r["evals"]]
    return r


def forgeline(data: Path, seed: int, steps: int, project: Path, env: dict[str, str], warm: bool = False) -> dict:
    sets = [f"seed={seed}", f"data.roots=['{data.parent}']", f"train.max_steps={steps}"]
    sets += [f"train.lr_decay_steps={steps}", f"train.eval_interval={min(250, steps)}"]
    cmd = [sys.executable, "-m", "forgeline", "run", "--config", str(CONFIG), "--data", str(data), "--fresh"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"forgeline run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if warm:
        return {}
    done = max((project / "mlruns" / "checkpoints").glob("*/*/done.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(done.read_text())
    with sqlite3.connect(project / "mlruns" / "mlflow.db") as db:
        rows = db.execute(
            "SELECT m.step, m.value, m.timestamp FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
            "JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'mlflow.runName' AND t.value = 'train' "
            "WHERE m.key = 'val/loss' AND r.start_time >= ? ORDER BY m.step",  # the train run's evaluations
            (int(t0 * 1000),),
        ).fetchall()
        whole = db.execute(
            "SELECT m.value FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
            "WHERE m.key = 'test/loss' AND r.start_time >= ? ORDER BY m.timestamp DESC LIMIT 1",
            (int(t0 * 1000),),
        ).fetchone()
    evals = [{"step": s, "val": v, "t": ts / 1000 - t0} for s, v, ts in rows]
    loop_ms = median_step_ms(result["history"], result["steps"], result["loop_seconds"])
    return {
        "seed": seed,
        "steps": result["steps"],
        "wall_s": wall,
        "ms_per_step": loop_ms,
        "evals": evals,
        "final_val": result["final_val_loss"],
        "whole_val_loss": whole[0] if whole else None,
    }


def _stand_in_corpus(tmp: Path) -> Path:
    from train_step import corpus_text  # Tiny Shakespeare is missing here: this is its stand-in

    folder = tmp / "corpus"
    folder.mkdir()
    path = folder / "input.txt"
    path.write_text(corpus_text(), encoding="utf-8")
    return path


def median_step_ms(history: list[dict], steps: int, loop_seconds: float) -> float:
    """Median ms per step between logged train losses, leaving out the spans that hold an evaluation."""
    logged = [h for h in history if "train/loss" in h]
    evals = {h["step"] for h in history if "val/loss" in h}
    spans = [
        1000 * (b["time"] - a["time"]) / (b["step"] - a["step"])
        for a, b in zip(logged, logged[1:], strict=False)
        if b["step"] > a["step"] and not any(a["step"] <= e < b["step"] for e in evals)
    ]
    return statistics.median(spans) if spans else 1000 * loop_seconds / max(1, steps)


def time_to(evals: list[dict], target: float) -> float | None:
    return next((e["t"] for e in evals if e["val"] <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="*", help="one seed per round (default 1337, 1338, ...)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--target", type=float, default=1.89)
    parser.add_argument("--data", type=Path, default=SHAKESPEARE)
    parser.add_argument("--smoke", action="store_true", help="1 round of 20 steps: checks it works")
    parser.add_argument("--out", type=Path, help="JSON result file (default bench/results/time_to_loss.json)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.steps, args.target = 1, 20, 3.5
    seeds = args.seeds or [1337 + i for i in range(args.rounds)]
    rows: dict[str, list[dict]] = {"nanoGPT recipe by hand": [], "forgeline run": []}
    with tempfile.TemporaryDirectory(prefix="forgeline-ttl-") as tmp_name:
        tmp = Path(tmp_name)
        if not args.data.exists():
            if not args.smoke:
                raise SystemExit(f"{args.data}: Tiny Shakespeare not found (pass --data)")
            args.data = _stand_in_corpus(tmp)  # the smoke mode only checks that the benchmark works
        project = tmp / "project"
        project.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
        env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp / "prefect"), FORGELINE_HOME=str(tmp / "home"))
        forgeline(args.data, seeds[0], 2, project, env, warm=True)
        for seed in seeds:
            # The 1-minute load average before and after each process: this machine is shared.
            load0 = os.getloadavg()[0]
            rows["nanoGPT recipe by hand"].append(reference(args.data, seed, args.steps, tmp))
            load1 = os.getloadavg()[0]
            rows["forgeline run"].append(forgeline(args.data, seed, args.steps, project, env))
            rows["nanoGPT recipe by hand"][-1]["load"] = [load0, load1]
            rows["forgeline run"][-1]["load"] = [load1, os.getloadavg()[0]]
            for name, runs in rows.items():
                r = runs[-1]
                print(
                    f"seed {seed} {name}: wall {r['wall_s']:.1f} s, {r['ms_per_step']:.1f} ms/step, "
                    f"val {r['final_val']:.4f}, whole val {r['whole_val_loss']:.4f}, "
                    f"to <= {args.target}: {time_to(r['evals'], args.target)}, "
                    f"load {r['load'][0]:.1f}-{r['load'][1]:.1f}",
                    flush=True,
                )
            if args.out:  # after each round: a deadline keeps the rounds done
                report(rows, args, seeds[: len(rows["forgeline run"])])
    report(rows, args, seeds)


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(rows: dict[str, list[dict]], args: argparse.Namespace, seeds: list[int]) -> None:
    ref, ours = rows["nanoGPT recipe by hand"], rows["forgeline run"]
    print(f"\n{args.steps} steps, seeds {seeds}, target val loss <= {args.target}; median (min-max), n={len(seeds)}")
    print(f"| measure | {' | '.join(rows)} |\n|---|---|---|")
    for label, key in (("whole job wall s", "wall_s"), ("ms per step", "ms_per_step")):
        print(f"| {label} | " + " | ".join(_stat([r[key] for r in runs]) for runs in rows.values()) + " |")
    for label, key in (
        ("val loss after last step (20 batches)", "final_val"),
        ("loss on whole validation text", "whole_val_loss"),
    ):
        print(
            f"| {label} | "
            + " | ".join(_stat([r[key] for r in runs if r[key] is not None]) for runs in rows.values())
            + " |"
        )
    hits = [[time_to(r["evals"], args.target) for r in runs] for runs in rows.values()]
    print(
        "| s to val <= target (runs reaching it) | "
        + " | ".join(
            f"{_stat([h for h in hs if h is not None])} ({sum(h is not None for h in hs)}/{len(hs)})" for hs in hits
        )
        + " |"
    )
    ratios = [o["wall_s"] / r["wall_s"] for o, r in zip(ours, ref, strict=True)]
    print(f"| whole job, forgeline / by hand (per seed) | {_stat(ratios)} | |")
    out = args.out or RESULTS / ("time_to_loss-smoke.json" if args.smoke else "time_to_loss.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "seeds": seeds, "steps": args.steps, "target": args.target}
    out.write_text(json.dumps({**payload, "runs": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
