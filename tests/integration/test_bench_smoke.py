"""The benchmarks run in their smoke mode (they are never timed tests: this only checks they work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # six benchmark scripts, two of them whole runs
@pytest.mark.parametrize(
    "script",
    [
        "train_step.py",
        "clean_throughput.py",
        "fixed_cost.py",
        "time_to_loss.py",
        "model_variants.py",
        "ddp_scaling.py",
    ],
)
def test_benchmark_smoke_mode(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median" in proc.stdout or "MB/s" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["date"]
    if script == "fixed_cost.py":
        # A real serverless `forgeline run` (the CLI's early temporary server) with its summary breakdown.
        (run,) = payload["runs"]
        assert run["variant"] == "early-server"
        assert run["startup"] > 0 and run["fixed"] >= run["startup"] and run["training_loop"] > 0
    if script == "time_to_loss.py":
        # The hand-written nanoGPT recipe and a whole `forgeline run`, same seed, same steps, both measured.
        ref, ours = payload["runs"]["nanoGPT recipe by hand"][0], payload["runs"]["forgeline run"][0]
        assert ref["steps"] == ours["steps"] == 20
        assert ours["wall_s"] > 0 and ref["wall_s"] > 0 and ours["final_val"] < 4.6 and ref["final_val"] < 4.6
        assert [e["step"] for e in ours["evals"]] == [20]  # the train run's evaluations only
    if script == "model_variants.py":
        steps = payload["median ms per step"]
        assert len(steps) == 8 and all(len(v) == 1 and v[0] > 0 for v in steps.values())
    if script == "clean_throughput.py":
        (row,) = payload["rows"]
        assert row["rows_in"] > 10_000 and row["dropped"]["duplicate"] > 1_000 and len(row["fingerprint"]) == 64


@pytest.mark.slow  # 29 s on 2 cores: the GPU recipe's smoke run on CPU
def test_gpu_benchmark_smoke_mode(tmp_path: Path) -> None:
    # In the default suite: the GPU benchmark (issue 20) is prepared but has never met a GPU, so this is its check.
    corpus = tmp_path / "input.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    out = tmp_path / "result.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--data", str(corpus), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median" in proc.stdout
    payload = json.loads(out.read_text())
    table, pipe = payload["table"], payload["pipeline"]
    assert {"nanoGPT's model by hand", "pipeline"} == set(table)
    assert all(row["ms_per_step"] > 0 for row in table.values())
    assert pipe["steps"] == 12 and [step for step, _, _ in pipe["evals"]] == [6, 12]
    assert set(payload["phase_s"]) == {"by hand", "pipeline"}
