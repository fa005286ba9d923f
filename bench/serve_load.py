"""Serving under load: requests per second and p50/p95 latency at 1, 4 and 8 concurrent clients.

A model with the demo's architecture (configs/default.yaml: 4 layers, width 128, context 64, char tokenizer)
is trained briefly in a temporary project (or ``--model`` names one in ``$MLFLOW_TRACKING_URI``), then served
on loopback by each server in turn:

- ``mlflow``: ``mlflow models serve --env-manager local`` (what ``forgeline serve`` ran before issue 14);
- ``forgeline``: ``forgeline serve`` (MLflow's scoring protocol, one forward at a time per worker, requests
  that wait batched into one forward, torch threads set so workers share the cores).

``NAME:T`` pins torch threads: ``mlflow:1`` runs MLflow's server with ``OMP_NUM_THREADS=1``, ``forgeline:2``
passes ``--threads 2``. Every level is measured on every server in turn, so they see the same load.

Each client is a thread with its own keep-alive connection that posts ``{"inputs": ["def "]}`` (the model's
default generation settings: 32 new tokens for the demo's context) back to back for ``--seconds``; a request
counts as an error unless it answers 200 with one generated string. The clients run in this process, so they
share the machine with the server (as a client on the same host would).

    .venv/bin/python bench/serve_load.py                      # both servers, 1/4/8 clients, 20 s each
    .venv/bin/python bench/serve_load.py --servers forgeline forgeline:2 --rounds 3 --seconds 10
    .venv/bin/python bench/serve_load.py --model models:/forgeline-demo-lm@champion   # a model already there
    .venv/bin/python bench/serve_load.py --smoke              # tiny run: checks the benchmark works (CI)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds for training the bench model on a loaded 2-core machine
SERVERS = ("mlflow", "mlflow:1", "forgeline")
_SCRUB = ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_HOME")


def base_env(project: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        PYTHONPATH=str(ROOT),
        PREFECT_HOME=str(project / ".prefect"),
        FORGELINE_HOME=str(project / ".forgeline"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
    )
    # `mlflow models serve` runs `uvicorn` from PATH: this interpreter's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def train_model(project: Path, env: dict[str, str], *, smoke: bool) -> str:
    """Train the demo architecture for a few steps in ``project``; returns its champion URI."""
    cfg = yaml.safe_load((ROOT / "configs" / ("smoke.yaml" if smoke else "default.yaml")).read_text())
    cfg["name"] = "bench-serve"
    cfg["registry"]["model_name"] = "bench-serve-lm"
    cfg["data"]["sources"][0]["max_bytes"] = 120_000
    cfg["tune"] = {"n_trials": 0}
    cfg["train"].update(max_steps=20, eval_interval=10, checkpoint_interval=10, warmup_steps=5)
    cfg["eval"]["max_tokens"] = 2000
    config = project / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "forgeline", "run", "--config", str(config)]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training the bench model failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return "models:/bench-serve-lm@champion"


def server_kind(text: str) -> str:
    name, _, threads = text.partition(":")
    if name not in ("mlflow", "forgeline") or (threads and not threads.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected mlflow or forgeline, optionally :THREADS")
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(kind: str, uri: str, port: int, workers: int) -> list[str]:
    name, _, threads = kind.partition(":")
    if name == "mlflow":
        return [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"] + [
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    return [sys.executable, "-m", "forgeline", "serve", uri, "--port", str(port), "--workers", str(workers)] + (
        ["--threads", threads] if threads else []
    )


def start_server(cmd: list[str], port: int, project: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:5]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"server not up after 300 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def post(conn: http.client.HTTPConnection, body: bytes) -> bool:
    """One request; whether it answered 200 with exactly one generated string."""
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        return False
    predictions = json.loads(payload).get("predictions")
    return isinstance(predictions, list) and len(predictions) == 1 and isinstance(predictions[0], str)


def client(port: int, body: bytes, deadline: float, latencies: list[float], errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            ok = post(conn, body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            errors.append(type(exc).__name__)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            continue
        if ok:
            latencies.append(time.perf_counter() - t0)  # list.append is atomic: threads share the list
        else:
            errors.append("bad answer")
    conn.close()


def measure(port: int, clients: int, seconds: float, body: bytes) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.monotonic()
    deadline = t0 + seconds
    threads = [threading.Thread(target=client, args=(port, body, deadline, latencies, errors)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - t0  # includes the requests still in flight at the deadline
    ordered = sorted(latencies) or [float("nan")]
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


def run_levels(args: argparse.Namespace, uri: str, project: Path, env: dict[str, str]) -> list[dict[str, object]]:
    """Start every server, then measure each level on each in turn (interleaved: they see the same load)."""
    body = json.dumps({"inputs": ["def "]}).encode()
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        for kind in args.servers:
            port = free_port()
            cmd = server_command(kind, uri, port, args.workers)
            threads = kind.partition(":")[2]
            server_env = {**env, "OMP_NUM_THREADS": threads} if kind.startswith("mlflow:") else env
            servers[kind] = port, start_server(cmd, port, project, server_env, project / f"{kind}.log")
            measure(port, 1, 0.5 if args.smoke else 3.0, body)  # warm-up: first calls allocate and compile
        rows: list[dict[str, object]] = []
        for round_ in range(args.rounds):
            for clients in args.clients:
                for kind, (port, _) in servers.items():
                    load = os.getloadavg()[0]
                    row = {
                        "server": kind,
                        "round": round_,
                        "load_1min": load,
                        **measure(port, clients, args.seconds, body),
                    }
                    print(
                        f"{kind:10s} {clients:2d} clients  {row['requests']:5d} requests  {row['errors']} errors  "
                        f"{row['rps']:6.1f} req/s  p50 {row['p50_ms']:7.1f} ms  p95 {row['p95_ms']:7.1f} ms  "
                        f"(load {load:.1f})",
                        flush=True,
                    )
                    rows.append(row)
        return rows
    finally:
        for _, proc in servers.values():
            stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model URI in $MLFLOW_TRACKING_URI (default: train one here)")
    parser.add_argument(
        "--servers", nargs="+", type=server_kind, default=list(SERVERS), help="mlflow, forgeline, NAME:THREADS"
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], help="concurrent clients per level")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--rounds", type=int, default=1, help="times to measure every level on every server")
    parser.add_argument("--smoke", action="store_true", help="smoke model, forgeline only, 2 s per level (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    args = parser.parse_args()
    if args.smoke:
        args.servers, args.seconds = ["forgeline"], 2.0
    load_before = os.getloadavg()
    project = Path(tempfile.mkdtemp(prefix="forgeline-serve-bench-"))
    try:
        env = base_env(project)
        if args.model:
            uri = args.model
            env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlruns/mlflow.db'}")
        else:
            t0 = time.perf_counter()
            uri = train_model(project, env, smoke=args.smoke)
            print(f"trained {uri} in {time.perf_counter() - t0:.0f} s", flush=True)
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
        rows = run_levels(args, uri, project, env)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    payload = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "workers": args.workers,
        "seconds_per_level": args.seconds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
