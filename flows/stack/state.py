"""The stack's record: ``$FORGELINE_HOME/stack.json`` (its processes and URLs) and finding a running stack.

``FORGELINE_HOME`` defaults to ``.forgeline/`` in the working directory; two stacks with different homes and
ports never touch each other. Every ``forgeline`` command finds the stack through :func:`stack_env`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forgeline.flows.stack.exposure import HOST

logger = logging.getLogger(__name__)

STATE_FILE = "stack.json"


def forgeline_home(home: str | Path | None = None) -> Path:
    """``home``, else ``$FORGELINE_HOME``, else ``.forgeline/`` in the working directory (absolute)."""
    raw = home or os.environ.get("FORGELINE_HOME") or ".forgeline"
    return Path(raw).expanduser().resolve()


@dataclass
class Proc:
    """One process of the stack: enough to find it again and to refuse a recycled PID."""

    role: str
    pid: int
    create_time: float
    cmd: list[str]
    log: str

    def alive(self) -> bool:
        """Whether this very process (same PID and start time) still runs and is not a zombie."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            same = abs(proc.create_time() - self.create_time) < 1.0
            return same and proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


@dataclass
class StackState:
    """What ``stack.json`` holds."""

    home: str
    prefect_port: int
    mlflow_port: int
    host: str = HOST
    started_at: float = field(default_factory=time.time)
    procs: list[Proc] = field(default_factory=list)
    stores: dict[str, str] = field(default_factory=dict)  # Backends.described(): passwords masked

    @property
    def prefect_url(self) -> str:
        """The Prefect UI (the API is under ``/api``)."""
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    def proc(self, role: str) -> Proc | None:
        return next((p for p in self.procs if p.role == role), None)


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def read_state(home: Path) -> StackState | None:
    """The recorded stack under ``home``, or ``None`` if there is none (or the file is unreadable)."""
    path = state_path(home)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        procs = [Proc(**p) for p in raw.pop("procs", [])]
        return StackState(**raw, procs=procs)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None


def write_state(state: StackState) -> None:
    """Write ``stack.json`` atomically (a reader never sees half a file)."""
    home = Path(state.home)
    home.mkdir(parents=True, exist_ok=True)
    tmp = state_path(home).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
    os.replace(tmp, state_path(home))


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback health checks
            return 200 <= resp.status < 300
    except OSError:
        return False


def servers_alive(state: StackState) -> bool:
    """Both servers' processes run and their health endpoints answer."""
    prefect, mlflow = state.proc("prefect-server"), state.proc("mlflow-server")
    return bool(
        prefect
        and mlflow
        and prefect.alive()
        and mlflow.alive()
        and http_ok(f"{state.prefect_api_url}/health")
        and http_ok(f"{state.mlflow_url}/health")
    )


def stack_env(home: str | Path | None = None) -> StackState | None:
    """Point this process (and its children) at a running stack, if ``$FORGELINE_HOME`` has one.

    Sets ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` when ``stack.json`` exists and both servers
    answer; variables already set in the environment win. Call before Prefect or MLflow is imported.

    Returns:
        The stack's state, or ``None`` when no stack is running there (nothing is changed then).
    """
    state = read_state(forgeline_home(home))
    if state is None or not servers_alive(state):
        return None
    os.environ.setdefault("PREFECT_API_URL", state.prefect_api_url)
    os.environ.setdefault("MLFLOW_TRACKING_URI", state.mlflow_url)
    return state
