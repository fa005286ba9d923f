"""Fixed cost of ``forgeline run`` on the smoke config: everything but the training loop.

Each measured run is a real ``python -m flows run --config smoke.yaml --fresh`` in one project folder
(warmed once, so the MLflow store, the cleaned-data cache and Prefect's database exist, as on any
second run). The run summary's ``time`` row gives the breakdown; the process wall time is measured
too (it adds interpreter exit: Prefect flushing logs, the temporary server stopping). Variants run
interleaved (a, b, a, b, ...), each in a fresh process:

- ``prefect-default``: Prefect starts its temporary server at the flow's first API call
  (``FORGELINE_EARLY_SERVER=0``), as before;
- ``early-server``: the CLI starts that server before the heavy imports, so the two overlap;
- ``running-servers`` (``--servers``): against ``forgeline up`` (Prefect and MLflow servers) in a
  temporary ``FORGELINE_HOME``, stopped with ``forgeline down`` at the end.

    .venv/bin/python bench/fixed_cost.py                        # 4 rounds of the two serverless variants
    .venv/bin/python bench/fixed_cost.py --rounds 3 --servers   # ... and against running servers
    .venv/bin/python bench/fixed_cost.py --servers-only         # only against running servers
    .venv/bin/python bench/fixed_cost.py --smoke                # one early-server run: checks it works (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TIMEOUT = 600  # seconds per CLI call; a smoke run takes 15-40 s on a loaded 2-core machine
_TIME_ROW = re.compile(r"fixed ([\d.]+) s \((.*?)\) \+ training loop ([\d.]+) s")
MEASURES = (
    "fixed",
    "startup",
    "tracking_setup",
    "clean",
    "tune",
    "train_overhead",
    "evaluate",
    "register",
    "training_loop",
    "wall_s",
)
"""The summary's parts (seconds; a part under 0.05 s is not printed there and counts as 0) and the wall time."""
_SCRUB = ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_HOME")


def base_env(prefect_home: Path, forgeline_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(prefect_home),
        FORGELINE_HOME=str(forgeline_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MPLBACKEND="Agg",
        COLUMNS="400",  # one line per summary row
    )
    return env


def forgeline(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "forgeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"forgeline {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc, wall


def parse_time_row(stdout: str) -> dict[str, float]:
    """The summary's 'fixed X s (startup a, tracking setup b, ...) + training loop c s' as numbers."""
    found = _TIME_ROW.search(stdout)
    if found is None:
        raise RuntimeError(f"no time row in the run summary:\n{stdout[-3000:]}")
    parts = {"fixed": float(found[1]), "training_loop": float(found[3])}
    for item in found[2].split(", "):
        name, _, value = item.rpartition(" ")
        parts[name.replace(" ", "_")] = float(value)
    return parts


def run_once(project: Path, env: dict[str, str], variant: str) -> dict[str, object]:
    variant_env = {**env, "FORGELINE_EARLY_SERVER": "0" if variant == "prefect-default" else "1"}
    proc, wall = forgeline(["run", "--config", "smoke.yaml", "--fresh"], project, variant_env)
    return {"variant": variant, "wall_s": wall, **parse_time_row(proc.stdout)}


def summarize(rows: list[dict[str, object]], variants: list[str]) -> list[dict[str, object]]:
    table = []
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        for key in MEASURES:
            values = [float(r.get(key, 0.0)) for r in mine]  # type: ignore[arg-type]
            table.append(
                {
                    "variant": variant,
                    "measure": key,
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                }
            )
    base = [r for r in rows if r["variant"] == variants[0]]
    for variant in variants[1:]:
        # Ratios pair each run with the baseline run of the same round (interleaved: same load).
        mine = [r for r in rows if r["variant"] == variant]
        ratios = [float(m["fixed"]) / float(b["fixed"]) for m, b in zip(mine, base, strict=False)]  # type: ignore[arg-type]
        table.append(
            {
                "variant": f"{variant} / {variants[0]}",
                "measure": "fixed ratio",
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "n": len(ratios),
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (one run per variant each)")
    parser.add_argument("--servers", action="store_true", help="also measure against `forgeline up` servers")
    parser.add_argument("--servers-only", action="store_true", help="only the runs against `forgeline up` servers")
    parser.add_argument("--smoke", action="store_true", help="one early-server run: checks the benchmark works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fixed_cost.json")
    args = parser.parse_args()
    variants = ["early-server"] if args.smoke else ["prefect-default", "early-server"]
    variants = [] if args.servers_only else variants
    rounds = 1 if args.smoke else args.rounds
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="forgeline-fixed-cost-") as tmp_str:
        tmp = Path(tmp_str)
        project = tmp / "project"
        project.mkdir()
        shutil.copy(SMOKE, project / "smoke.yaml")
        env = base_env(tmp / "prefect-home", tmp / "no-stack")
        if variants and not args.smoke:
            forgeline(["run", "--config", "smoke.yaml"], project, env)  # warm: stores, cache, Prefect db
        for _ in range(rounds):
            for variant in variants:
                rows.append(run_once(project, env, variant))
                print(json.dumps(rows[-1]), flush=True)
        if args.servers or args.servers_only:
            rows += servers_rounds(tmp, env, rounds)
            variants.append("running-servers")
    table = summarize(rows, variants)
    print(f"{'variant':<34} {'measure':<14} {'median':>7} {'min':>7} {'max':>7} {'n':>3}")
    for t in table:
        print(f"{t['variant']:<34} {t['measure']:<14} {t['median']:7.2f} {t['min']:7.2f} {t['max']:7.2f} {t['n']:3d}")
    load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "load_avg_1_5_15": load, "runs": rows, "table": table}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; wrote {args.out}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def servers_rounds(tmp: Path, env: dict[str, str], rounds: int) -> list[dict[str, object]]:
    """Runs against a local stack: Prefect and MLflow servers already up (not interleaved: one stack)."""
    # A project folder of its own: checkpoints of the serverless runs name models in the local store.
    project = tmp / "project-servers"
    project.mkdir()
    shutil.copy(SMOKE, project / "smoke.yaml")
    home = tmp / "stack"
    stack_env = {**env, "FORGELINE_HOME": str(home)}
    ports = [str(free_port()), str(free_port())]
    forgeline(["up", "--prefect-port", ports[0], "--mlflow-port", ports[1]], project, stack_env)
    rows: list[dict[str, object]] = []
    try:
        forgeline(["run", "--config", "smoke.yaml"], project, stack_env)  # warm: the server's store
        for _ in range(rounds):
            rows.append(run_once(project, stack_env, "running-servers"))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        subprocess.run(
            [sys.executable, "-m", "forgeline", "down"], cwd=project, env=stack_env, timeout=TIMEOUT, check=False
        )
    return rows


if __name__ == "__main__":
    main()
