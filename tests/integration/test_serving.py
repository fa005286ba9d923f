"""Serving the smoke champion for real: generation params through every door, and 8 clients at once (H6).

One smoke pipeline run fills the registry; `forgeline serve` and `mlflow models serve --env-manager local` run
as subprocesses on loopback, like a user would start them. No timings are asserted here: throughput and
latency figures come from ``bench/serve_load.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

CHAMPION = "models:/forgeline-smoke-lm@champion"
START_TIMEOUT = 180  # seconds; a server loads the model in ~10-25 s on 2 busy cores
PROMPTS = ["def ", "import ", "class ", "The "]


@pytest.fixture(scope="module")
def served(module_project: Any) -> Iterator[Any]:
    """The smoke model, registered and champion (its context is 32 tokens: 16 new ones by default)."""
    result = module_project.run_in_process()
    assert result.promoted
    yield module_project


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(base: str, payload: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(
        base + "/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def _server(project: Any, cmd: list[str], port: int) -> Iterator[str]:
    log = project.root / f"server-{port}.log"
    env = {**project.env, "MLFLOW_TRACKING_URI": project.tracking_uri}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # mlflow's uvicorn
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=project.root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"{cmd[2:4]} exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(base + "/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no /ping after {START_TIMEOUT}s:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def forgeline_server(served: Any) -> Iterator[str]:
    """`forgeline serve --config smoke.yaml` (the champion) on a free loopback port; its base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "forgeline", "serve", "--config", "smoke.yaml", "--port", str(port)]
    with _server(served, cmd, port) as base:
        yield base


def _predict_over_http(base: str) -> Any:
    def predict(prompts: list[str], params: dict[str, Any]) -> list[str]:
        status, body = _post(base, {"inputs": prompts, "params": params})
        assert status == 200, body
        return body["predictions"]

    return predict


def _assert_params_reach_generation(predict: Any) -> None:
    """max_new_tokens=1 adds at most one character (char tokenizer); the default (16) adds more."""
    short = predict(PROMPTS, {"max_new_tokens": 1})
    assert len(short) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, short, strict=True):
        assert text.startswith(prompt.strip()) and len(text) <= len(prompt) + 1, (prompt, text)
    # Sampling at temperature 2 adds text; at least one of four continuations is more than 1 visible char.
    long = predict(PROMPTS, {"temperature": 2.0})
    assert max(len(text) - len(prompt) for prompt, text in zip(PROMPTS, long, strict=True)) > 1, long


def test_pyfunc_predict_passes_params_to_generation(served: Any) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(CHAMPION)
    names = {param.name for param in model.metadata.get_params_schema().params}
    assert names == {"max_new_tokens", "temperature", "top_k", "do_sample"}
    _assert_params_reach_generation(lambda prompts, params: model.predict(prompts, params=params))


def test_forgeline_serve_passes_params(forgeline_server: str) -> None:
    _assert_params_reach_generation(_predict_over_http(forgeline_server))


def test_eight_concurrent_clients_all_answered_in_shared_forwards(forgeline_server: str) -> None:
    """H6: 8 clients at once, mixed params: no errors, every answer complete and for its own request."""
    base = forgeline_server
    before = _batching(base)
    failures: list[str] = []
    answers: dict[tuple[int, int], list[str]] = {}
    start = threading.Barrier(8)

    def client(c: int) -> None:
        start.wait()
        for r in range(4):
            prompts = [f"{c}{r}{prompt}" for prompt in PROMPTS[: 1 + (c + r) % 3]]
            params = {"max_new_tokens": 1} if c % 2 else {"max_new_tokens": 8, "top_k": 5}
            try:
                status, body = _post(base, {"inputs": prompts, "params": params})
            except OSError as exc:
                failures.append(f"client {c} request {r}: {exc!r}")
                continue
            if status != 200:
                failures.append(f"client {c} request {r}: {status} {body}")
                continue
            answers[(c, r)] = body["predictions"]
            budget = params["max_new_tokens"]
            for prompt, text in zip(prompts, body["predictions"], strict=True):
                if not (text.startswith(prompt.strip()) and len(text) <= len(prompt) + budget):
                    failures.append(f"client {c} request {r}: {prompt!r} answered {text!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures
    assert len(answers) == 32
    assert all(len(texts) == 1 + (c + r) % 3 for (c, r), texts in answers.items())
    after = _batching(base)
    assert after["requests"] - before["requests"] == 32
    # Requests that waited went into shared forwards (one per group of equal params), not one forward each.
    assert after["forwards"] - before["forwards"] < 32, (before, after)


BAD_REQUESTS = [
    ({"inputs": ["x" * 3_000_000]}, "more than the model's context can hold"),  # refused before tokenizing
    ({"inputs": ["x" * 40], "params": {"max_new_tokens": 5}}, "shorten the prompt"),
    ({"inputs": [["x" * 40]]}, "item 0 is list"),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [["x" * 40, "y"]]}}, "(got 2 columns)"),
    ({"inputs": ["def ", 5]}, "item 1 is int 5"),
    ({"inputs": ["def "], "params": [1, 2]}, '"params" must be an object'),
    ({"inputs": ["def "], "params": {"max_new_tokens": 0}}, "params.max_new_tokens must be an integer >= 1"),
    ({"inputs": ["def "], "params": {"temperature": 0}}, "params.temperature must be a number > 0"),
    ({"inputs": ["def "], "params": {"top_k": -1}}, "params.top_k must be an integer >= 1"),
    ({"inputs": ["def "], "params": {"seed": 1}}, "unknown params 'seed'"),
    ({"inputs": ["def "] * 129}, "129 inputs in one request; this server takes at most 128"),
]


def test_bad_requests_get_one_line_400s_and_no_tracebacks(served: Any, forgeline_server: str) -> None:
    """Each bad request: HTTP 400, a short one-line message that does not echo the input, nothing in the log."""
    for payload, pattern in BAD_REQUESTS:
        status, body = _post(forgeline_server, payload)
        answer = json.loads(body)
        assert status == 400 and pattern in answer["message"], (pattern, status, str(body)[:300])
        assert "stack_trace" not in answer and "\n" not in answer["message"] and len(answer["message"]) < 300
    status, body = _post(forgeline_server, {"inputs": ["def "], "params": {"max_new_tokens": 2}})
    assert status == 200 and len(body["predictions"]) == 1  # and the server still answers
    log = served.root / f"server-{forgeline_server.rsplit(':', 1)[1]}.log"
    assert "Traceback" not in log.read_text()


def _batching(base: str) -> dict[str, int]:
    with urllib.request.urlopen(base + "/batching", timeout=30) as resp:
        return json.loads(resp.read())


def test_mlflow_models_serve_passes_params(served: Any) -> None:
    """MLflow's own server reads the same params schema (it ignored "params" before)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    with _server(served, cmd, port) as base:
        _assert_params_reach_generation(_predict_over_http(base))


@pytest.mark.slow
def test_serve_load_benchmark_smoke_mode(tmp_path: Path) -> None:
    """bench/serve_load.py trains its own model, serves it and reports rps, p50 and p95 per level (no timings)."""
    out = tmp_path / "serve_load.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "serve_load.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["server"], row["clients"]) for row in rows] == [("forgeline", 1), ("forgeline", 4), ("forgeline", 8)]
    assert all(row["errors"] == 0 and row["requests"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0 for row in rows)
