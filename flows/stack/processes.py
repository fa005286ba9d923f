"""The stack's processes: start the servers and workers detached, stop exactly those, restart lost workers.

``up`` starts, on 127.0.0.1, a Prefect server, an MLflow server (artifacts served by the server) and one
Prefect worker per work pool, each a detached process in its own process group with its log under
``$FORGELINE_HOME/logs``. The PIDs go to ``$FORGELINE_HOME/stack.json`` so that ``down`` stops exactly
those processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from forgeline.flows.stack.exposure import HOST, loopback_hosts, loopback_origins
from forgeline.flows.stack.state import Proc, StackState, http_ok, read_state, servers_alive, state_path, write_state
from forgeline.flows.stack.stores import (
    MLFLOW_OWN_ARTIFACTS_ENV,
    MLFLOW_OWN_BACKEND_ENV,
    STORE_ENVS,
    TUNE_STORAGE_ENV,
    Backends,
    check_database_reachable,
    resolve_backends,
)

DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_POOLS = ("cpu", "gpu")


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _import_root() -> str:
    """The folder ``forgeline`` is imported from (a clone's root for an editable install, else site-packages)."""
    spec = importlib.util.find_spec("forgeline")  # found, not imported: the stack stays below the API
    assert spec is not None and spec.origin is not None
    return str(Path(spec.origin).resolve().parents[1])


def base_env(home: Path) -> dict[str, str]:
    """Environment shared by every process of the stack."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "forgeline",  # our loggers, in the flow runs' logs
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _spawn(role: str, cmd: list[str], env: dict[str, str], home: Path, cwd: Path) -> Proc:
    """Start ``cmd`` detached in its own session (process group), output appended to its log."""
    import psutil

    log = home / "logs" / f"{role}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(  # noqa: S603 - our own fixed commands
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
        )
    return Proc(role=role, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), cmd=cmd, log=str(log))


def _wait_until(check: Any, proc: Proc, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not proc.alive():
            raise RuntimeError(f"{what} exited during start-up; see {proc.log}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} not healthy after {timeout:.0f} s; see {proc.log}")


def _log_says(path: str, text: str) -> bool:
    try:
        return text in Path(path).read_text(encoding="utf-8", errors="replace").rsplit("\n==== ", 1)[-1]
    except OSError:
        return False


def start_stack(
    home: Path,
    *,
    prefect_port: int = DEFAULT_PREFECT_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    pools: tuple[str, ...] = DEFAULT_POOLS,
    cwd: Path | None = None,
    timeout: float = 120.0,
    backends: Backends | None = None,
) -> StackState:
    """Start both servers, wait for their health endpoints, then one worker per pool.

    Args:
        home: ``FORGELINE_HOME``: state, logs, and (by default) databases and artifacts live here.
        prefect_port: Port of the Prefect server (UI and API).
        mlflow_port: Port of the MLflow server.
        pools: Work pools to start a worker for (a worker creates its pool if missing).
        cwd: Working directory of the processes (the project; flow runs from a local source chdir anyway).
        timeout: Seconds each process may take to become healthy.
        backends: The stores; default :func:`resolve_backends` (the environment, else SQLite under ``home``).

    Returns:
        The recorded state.

    Raises:
        RuntimeError: a stack already runs under ``home``, a port is taken, a database does not answer, or
            a process failed to start (everything started so far is stopped again).
    """
    existing = read_state(home)
    if existing is not None and any(p.alive() for p in existing.procs):
        raise RuntimeError(f"a stack already runs under {home} (forgeline status; forgeline down)")
    for port in (prefect_port, mlflow_port):
        if _port_taken(port):
            raise RuntimeError(
                f"port {port} on {HOST} is already in use (choose another with --prefect-port/--mlflow-port)"
            )
    try:
        backends = backends or resolve_backends(home)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from None
    check_database_reachable(backends.prefect_database_url, "Prefect database")
    check_database_reachable(backends.mlflow_backend_store_uri, "MLflow backend store")
    if backends.tune_storage:
        check_database_reachable(backends.tune_storage, "Optuna storage")
    cwd = cwd or Path.cwd()
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    if "://" not in backends.mlflow_artifacts_destination:
        Path(backends.mlflow_artifacts_destination).mkdir(parents=True, exist_ok=True)
    state = StackState(home=str(home), prefect_port=prefect_port, mlflow_port=mlflow_port, stores=backends.described())
    env = base_env(home)
    env.pop("PREFECT_API_URL", None)
    for name in STORE_ENVS:  # each process gets only the store it uses, below
        env.pop(name, None)
    server_env = env | {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": backends.prefect_database_url,
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "PREFECT_UI_API_URL": state.prefect_api_url,
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(loopback_origins(prefect_port)),
        # `python -m forgeline.flows.stack` must find this very package, whatever the working directory.
        "PYTHONPATH": os.pathsep.join(filter(None, [_import_root(), env.get("PYTHONPATH")])),
    }
    # The stores go by environment, not argv: a password in a URL would show in `ps` and stack.json.
    mlflow_env = env | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        MLFLOW_OWN_BACKEND_ENV: backends.mlflow_backend_store_uri,
        MLFLOW_OWN_ARTIFACTS_ENV: backends.mlflow_artifacts_destination,
    }
    mlflow_env.pop("MLFLOW_TRACKING_URI", None)
    try:
        prefect = _spawn(
            "prefect-server",
            [sys.executable, "-m", "forgeline.flows.stack", "serve-prefect", str(prefect_port)],
            server_env,
            home,
            cwd,
        )
        state.procs.append(prefect)
        write_state(state)
        mlflow = _spawn(
            "mlflow-server",
            [
                _bin("mlflow"),
                "server",
                "--host",
                HOST,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
                "--allowed-hosts",
                ",".join(loopback_hosts(mlflow_port)),
                "--cors-allowed-origins",
                ",".join(loopback_origins(mlflow_port)),
            ],
            mlflow_env,
            home,
            cwd,
        )
        state.procs.append(mlflow)
        write_state(state)
        _wait_until(lambda: http_ok(f"{state.prefect_api_url}/health"), prefect, "prefect server", timeout)
        _wait_until(lambda: http_ok(f"{state.mlflow_url}/health"), mlflow, "mlflow server", timeout)
        worker_env = env | {
            "PREFECT_API_URL": state.prefect_api_url,
            "MLFLOW_TRACKING_URI": state.mlflow_url,
            "FORGELINE_HOME": str(home),
            # flow runs send heartbeats; `forgeline deploy`'s automation crashes runs whose heartbeats stop
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"),
        }
        if backends.tune_storage:
            worker_env[TUNE_STORAGE_ENV] = backends.tune_storage  # flow runs inherit the worker's environment
        workers = []
        for pool in pools:
            worker = _spawn(
                f"worker-{pool}",
                [
                    _bin("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    f"forgeline-{pool}",
                ],
                worker_env,
                home,
                cwd,
            )
            state.procs.append(worker)
            workers.append(worker)
            write_state(state)
        for worker in workers:
            _wait_until(lambda w=worker: _log_says(w.log, "started!"), worker, f"{worker.role}", timeout)
    except BaseException:
        stop_stack(home)
        raise
    return state


def _port_taken(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def _terminate(proc: Proc, grace: float) -> str:
    """SIGTERM the process group (and any stray descendant), SIGKILL after ``grace`` seconds."""
    import psutil

    if not proc.alive():
        return "not running"
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return "not running"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)  # the group leader's pid is the group id (start_new_session)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, left = psutil.wait_procs(family, timeout=grace)
    if not left:
        return "stopped"
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for member in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(left, timeout=5)
    return "killed"


def stop_stack(home: Path, grace: float = 10.0) -> dict[str, str]:
    """Stop the recorded processes: workers first, then the servers. Removes ``stack.json``.

    Returns:
        role -> ``stopped``, ``killed`` (after the grace period) or ``not running``.
    """
    state = read_state(home)
    if state is None:
        return {}
    order = sorted(state.procs, key=lambda p: (not p.role.startswith("worker-"), p.role))
    results = {p.role: _terminate(p, grace) for p in order}
    with contextlib.suppress(FileNotFoundError):
        state_path(home).unlink()
    return results


def restart_missing_workers(home: Path, timeout: float = 120.0) -> list[str] | None:
    """Start again the recorded workers that died (killed, crashed) while both servers still run.

    A restarted worker gets the same command and the environment of a live sibling worker (``up`` gives
    every worker the same one), so its flow runs see the same servers and stores.

    Returns:
        The roles restarted; ``None`` when there is no running stack or no worker is missing.

    Raises:
        RuntimeError: every worker is gone (no environment to copy: ``forgeline down``, then ``up``), or a
            restarted worker did not start.
    """
    import psutil

    state = read_state(home)
    if state is None or not servers_alive(state):
        return None
    workers = [p for p in state.procs if p.role.startswith("worker-")]
    dead = [p for p in workers if not p.alive()]
    if not dead:
        return None
    live = next((p for p in workers if p.alive()), None)
    if live is None:
        raise RuntimeError(f"every worker under {home} is gone; restart the stack: forgeline down; forgeline up")
    env = psutil.Process(live.pid).environ()
    for old in dead:
        new = _spawn(old.role, old.cmd, env, home, Path(psutil.Process(live.pid).cwd()))
        state.procs[state.procs.index(old)] = new
        write_state(state)
        _wait_until(lambda w=new: _log_says(w.log, "started!"), new, new.role, timeout)
    return [p.role for p in dead]


def describe(state: StackState) -> list[tuple[str, str, str]]:
    """``(role, up/down, detail)`` rows for ``forgeline status``."""
    rows = []
    for proc in state.procs:
        up = proc.alive()
        if proc.role == "prefect-server":
            up = up and http_ok(f"{state.prefect_api_url}/health")
            detail = f"{state.prefect_url}  (API {state.prefect_api_url})"
        elif proc.role == "mlflow-server":
            up = up and http_ok(f"{state.mlflow_url}/health")
            detail = state.mlflow_url
        else:
            detail = f"pool {proc.role.removeprefix('worker-')}"
        rows.append((proc.role, "up" if up else "down", f"pid {proc.pid}  {detail}  log {proc.log}"))
    return rows
