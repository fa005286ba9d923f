"""The local stack: ``forgeline up`` / ``down`` / ``status`` / ``deploy``.

``up`` starts, on 127.0.0.1, a Prefect server, an MLflow server (artifacts served by the server) and one
Prefect worker per work pool, each a detached process in its own process group with its log under
``$FORGELINE_HOME/logs``. The PIDs go to ``$FORGELINE_HOME/stack.json`` so that ``down`` stops exactly
those processes, and so that every other ``forgeline`` command finds the stack (:func:`stack_env`).
``FORGELINE_HOME`` defaults to ``.forgeline/`` in the working directory; two stacks with different homes
and ports never touch each other.

Stores (:class:`Backends`): SQLite under ``FORGELINE_HOME`` unless an option or environment variable
names a database (PostgreSQL for all three: the Prefect server, MLflow's backend store and the Optuna
storage the workers' tune runs use). Passwords in those URLs travel only in the environment of the one
process that needs them; ``stack.json``, logs, process command lines and ``forgeline status`` show them
masked.

Exposure: both servers bind 127.0.0.1 and answer only requests whose ``Host`` names this machine's
loopback address and port, and whose ``Origin`` (when sent) is the server's own. MLflow does that itself
(``--allowed-hosts``, ``--cors-allowed-origins``); Prefect has no such setting, so its app is served
through :class:`HostOriginGuard` (:func:`serve_prefect`) instead of ``prefect server start``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from forgeline.tasks.config import mask_url_secrets

logger = logging.getLogger(__name__)

STATE_FILE = "stack.json"
HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_POOLS = ("cpu", "gpu")

# Where `forgeline up` reads its stores from when no option names them (each tool's own variable second).
PREFECT_DATABASE_ENV = "FORGELINE_PREFECT_DATABASE_URL"
MLFLOW_BACKEND_ENV = "FORGELINE_MLFLOW_BACKEND_STORE_URI"
MLFLOW_ARTIFACTS_ENV = "FORGELINE_MLFLOW_ARTIFACTS_DESTINATION"
TUNE_STORAGE_ENV = (
    "FORGELINE_TUNE_STORAGE"  # read by forgeline.tasks.tune.tuning.resolve_storage_url when tune.storage is null
)
PREFECT_OWN_DATABASE_ENVS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
MLFLOW_OWN_BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"
MLFLOW_OWN_ARTIFACTS_ENV = "MLFLOW_ARTIFACTS_DESTINATION"
# Never handed to a process that does not need them (they may hold passwords).
STORE_ENVS = (
    PREFECT_DATABASE_ENV,
    MLFLOW_BACKEND_ENV,
    MLFLOW_ARTIFACTS_ENV,
    TUNE_STORAGE_ENV,
    *PREFECT_OWN_DATABASE_ENVS,
    MLFLOW_OWN_BACKEND_ENV,
    MLFLOW_OWN_ARTIFACTS_ENV,
)


# ------------------------------------------------------------------------------------------- stores
def _split_scheme(url: str) -> tuple[str, str]:
    """``("postgresql", "user:pw@host/db")`` for ``postgresql+asyncpg://user:pw@host/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{mask_url_secrets(url)!r} is not a URL (expected SCHEME://...)")
    return scheme.split("+", 1)[0].lower(), rest


def prefect_database_url(url: str) -> str:
    """The Prefect server's SQLAlchemy URL: PostgreSQL through asyncpg, SQLite through aiosqlite.

    Raises:
        ValueError: a scheme Prefect's server cannot use (it supports PostgreSQL and SQLite only).
    """
    base, rest = _split_scheme(url)
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"Prefect database {mask_url_secrets(url)!r}: the Prefect server supports postgresql and sqlite")


def sync_database_url(url: str) -> str:
    """A URL for a synchronous SQLAlchemy client (MLflow, Optuna).

    PostgreSQL without a driver, or with asyncpg, gets ``postgresql+psycopg2://``: SQLAlchemy 2.1's default
    PostgreSQL driver is psycopg 3, which Forgeline does not install (``psycopg2-binary`` is in the
    ``postgres`` extra). Any other URL, and any other explicit driver, is returned as given.
    """
    base, rest = _split_scheme(url)
    scheme = url.partition("://")[0].lower()
    if base in ("postgresql", "postgres") and (scheme in ("postgresql", "postgres") or scheme.endswith("+asyncpg")):
        return f"postgresql+psycopg2://{rest}"
    return url


@dataclass(frozen=True)
class Backends:
    """The stores of one stack, as the processes receive them (passwords included: never log this)."""

    prefect_database_url: str
    mlflow_backend_store_uri: str
    mlflow_artifacts_destination: str
    tune_storage: str | None = None

    def described(self) -> dict[str, str]:
        """What ``stack.json`` and ``forgeline status`` show: every URL with its password masked."""
        return {
            "prefect database": mask_url_secrets(self.prefect_database_url),
            "mlflow backend": mask_url_secrets(self.mlflow_backend_store_uri),
            "mlflow artifacts": mask_url_secrets(self.mlflow_artifacts_destination),
            "optuna storage": mask_url_secrets(self.tune_storage)
            if self.tune_storage
            else "per config (tune.storage; default sqlite mlruns/optuna.db)",
        }


def resolve_backends(
    home: Path,
    *,
    prefect_database: str | None = None,
    mlflow_backend_store: str | None = None,
    mlflow_artifacts: str | None = None,
    tune_storage: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Backends:
    """Each store from its argument, else ``FORGELINE_*``, else the tool's own variable, else SQLite in ``home``.

    Args:
        home: ``FORGELINE_HOME`` (the SQLite files and local artifacts live under it).
        prefect_database: Prefect server database URL (``postgresql://...`` gets the asyncpg driver).
        mlflow_backend_store: MLflow backend store URI (``postgresql://...``, ``sqlite:///...``).
        mlflow_artifacts: MLflow ``--artifacts-destination`` (a folder, or ``s3://...`` and friends).
        tune_storage: Optuna storage handed to the workers as ``$FORGELINE_TUNE_STORAGE``.
        environ: The environment to read (default ``os.environ``).

    Raises:
        ValueError: a URL a server cannot use.
    """
    env = os.environ if environ is None else environ

    def pick(value: str | None, *names: str) -> str | None:
        return value or next((env[n] for n in names if env.get(n)), None)

    prefect = pick(prefect_database, PREFECT_DATABASE_ENV, *PREFECT_OWN_DATABASE_ENVS)
    mlflow = pick(mlflow_backend_store, MLFLOW_BACKEND_ENV, MLFLOW_OWN_BACKEND_ENV)
    tune = pick(tune_storage, TUNE_STORAGE_ENV)
    return Backends(
        prefect_database_url=prefect_database_url(prefect or f"sqlite:///{home / 'prefect' / 'prefect.db'}"),
        mlflow_backend_store_uri=sync_database_url(mlflow or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"),
        mlflow_artifacts_destination=pick(mlflow_artifacts, MLFLOW_ARTIFACTS_ENV, MLFLOW_OWN_ARTIFACTS_ENV)
        or str(home / "mlflow" / "artifacts"),
        tune_storage=sync_database_url(tune) if tune else None,
    )


def check_database_reachable(url: str, what: str, timeout: float = 5.0) -> None:
    """Fail fast, before any server starts, when a network database does not accept connections.

    Raises:
        RuntimeError: the host:port of a PostgreSQL (or other networked) URL refuses or times out.
    """
    import socket

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not SQLAlchemy's syntax: the server itself says what is wrong
        return
    if parsed.get_backend_name() == "sqlite" or not parsed.host:
        return  # a file, or a Unix socket the driver finds itself
    port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(parsed.get_backend_name(), 0)
    try:
        with socket.create_connection((parsed.host, port), timeout=timeout):
            return
    except OSError as exc:
        raise RuntimeError(
            f"{what} {mask_url_secrets(url)}: cannot connect to {parsed.host}:{port} ({exc.strerror or exc})"
        ) from None


# ----------------------------------------------------------------------------------------- exposure
def loopback_hosts(port: int) -> list[str]:
    """``Host`` header values the stack's servers accept: their own loopback address and port."""
    return [f"{HOST}:{port}", f"localhost:{port}"]


def loopback_origins(port: int) -> list[str]:
    """``Origin`` header values the stack's servers accept: pages they serve themselves."""
    return [f"http://{host}" for host in loopback_hosts(port)]


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HostOriginGuard:
    """ASGI middleware: 403 for a request whose ``Host`` is not allowed or whose ``Origin`` is foreign.

    The ``Host`` check defeats DNS rebinding (a page on ``evil.example`` whose name resolves to
    127.0.0.1); the ``Origin`` check refuses cross-site requests from a browser, reads included, where CORS
    alone would still let the request through and only hide the answer. Requests without ``Origin``
    (Python clients, workers, curl) pass on ``Host`` alone. Websocket handshakes get the same checks.
    """

    def __init__(self, app: Any, hosts: Iterable[str], origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.origins = frozenset(o.lower().rstrip("/") for o in origins)

    def refusal(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Why a request with these headers is refused, or ``None`` when it may pass."""
        host = origin = None
        for name, value in headers:
            if name.lower() == b"host":
                host = value.decode("latin-1").strip().lower()
            elif name.lower() == b"origin":
                origin = value.decode("latin-1").strip().lower().rstrip("/")
        if host not in self.hosts:
            return f"Host {host!r} is not allowed (this server answers only {', '.join(sorted(self.hosts))})"
        if origin is not None and origin not in self.origins:
            return f"Origin {origin!r} is not allowed"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: the server's start-up and shutdown
            return
        reason = self.refusal(scope.get("headers") or [])
        if reason is None:
            await self.app(scope, receive, send)
            return
        logger.warning("refused %s %s: %s", scope["type"], scope.get("path", ""), reason)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing before accepting answers the handshake with 403
            await send({"type": "websocket.close", "code": 1008})
            return
        body = f"forbidden: {reason}\n".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def serve_prefect(port: int) -> None:
    """Run the Prefect server (API, UI and services, as ``prefect server start`` does) behind the guard.

    Prefect settings (database, CORS, logging) come from the environment :func:`start_stack` prepares.
    """
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import (
        PREFECT_SERVER_API_KEEPALIVE_TIMEOUT,
        PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL,
        PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT,
        PREFECT_SERVER_LOGGING_LEVEL,
    )

    app = HostOriginGuard(create_app(final=True), loopback_hosts(port), loopback_origins(port))
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        timeout_keep_alive=PREFECT_SERVER_API_KEEPALIVE_TIMEOUT.value(),
        ws_ping_interval=PREFECT_SERVER_API_WEBSOCKET_PING_INTERVAL.value(),
        ws_ping_timeout=PREFECT_SERVER_API_WEBSOCKET_PING_TIMEOUT.value(),
        log_level=str(PREFECT_SERVER_LOGGING_LEVEL.value()).lower(),
    )


# -------------------------------------------------------------------------------------------- state
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


# ---------------------------------------------------------------------------------------- processes
def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def base_env(home: Path) -> dict[str, str]:
    """Environment shared by every process of the stack."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
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
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])),
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


# ---------------------------------------------------------------------------------------- commands
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", envvar="FORGELINE_HOME", help="Stack state, logs and stores (default: ./.forgeline)."),
]


def register(app: typer.Typer) -> None:
    """Add ``up``, ``down``, ``status``, ``deploy`` and ``ingest`` to the ``forgeline`` app."""

    def _cli() -> Any:
        from forgeline.flows import cli

        return cli

    @app.command()
    def up(
        home: HomeOpt = None,
        prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = DEFAULT_PREFECT_PORT,
        mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = DEFAULT_MLFLOW_PORT,
        pool: Annotated[
            list[str] | None, typer.Option("--pool", help="Start a worker for this work pool (repeatable).")
        ] = None,
        prefect_database_url: Annotated[
            str | None,
            typer.Option(
                envvar=PREFECT_DATABASE_ENV,
                help="Prefect server database, e.g. postgresql://USER:PASS@HOST:5432/prefect (asyncpg is added); "
                "else $PREFECT_SERVER_DATABASE_CONNECTION_URL, else SQLite under --home.",
            ),
        ] = None,
        mlflow_backend_store_uri: Annotated[
            str | None,
            typer.Option(
                envvar=MLFLOW_BACKEND_ENV,
                help="MLflow backend store, e.g. postgresql://USER:PASS@HOST:5432/mlflow; "
                "else $MLFLOW_BACKEND_STORE_URI, else SQLite under --home.",
            ),
        ] = None,
        mlflow_artifacts_destination: Annotated[
            str | None,
            typer.Option(
                envvar=MLFLOW_ARTIFACTS_ENV,
                help="Where the MLflow server keeps artifacts: a folder or an object store (s3://BUCKET/PATH); "
                "default: under --home.",
            ),
        ] = None,
        tune_storage: Annotated[
            str | None,
            typer.Option(
                envvar=TUNE_STORAGE_ENV,
                help="Optuna storage for tune runs on the workers (configs with tune.storage: null), "
                "e.g. postgresql://USER:PASS@HOST:5432/optuna.",
            ),
        ] = None,
    ) -> None:
        """Start the local stack on 127.0.0.1: Prefect server, MLflow server, one worker per work pool.

        Stores are SQLite under --home unless a database URL is given (an option, or its environment
        variable). Passwords are masked in everything the stack prints or records.
        """
        cli = _cli()
        root = forgeline_home(home)
        t0 = time.monotonic()
        try:
            restarted = restart_missing_workers(root)
        except RuntimeError as exc:
            cli._fail(str(exc))
        if restarted:  # the servers run: bring back only the workers that died
            cli.out.print(f"stack already up under {root}; restarted {', '.join(restarted)}", highlight=False)
            return
        try:
            backends = resolve_backends(
                root,
                prefect_database=prefect_database_url,
                mlflow_backend_store=mlflow_backend_store_uri,
                mlflow_artifacts=mlflow_artifacts_destination,
                tune_storage=tune_storage,
            )
            state = start_stack(
                root,
                prefect_port=prefect_port,
                mlflow_port=mlflow_port,
                pools=tuple(pool or DEFAULT_POOLS),
                backends=backends,
            )
        except (RuntimeError, ValueError) as exc:
            cli._fail(mask_url_secrets(str(exc)))
        cli.out.print(f"stack up under {root} in {time.monotonic() - t0:.0f} s", highlight=False)
        for what, where in state.stores.items():
            cli.out.print(f"{what + ':':18} {where}", highlight=False, soft_wrap=True)
        cli.out.print(f"Prefect UI:  {state.prefect_url}", highlight=False)
        cli.out.print(f"MLflow UI:   {state.mlflow_url}", highlight=False)
        cli.out.print("Next: forgeline deploy; then forgeline run --config PATH --deployed", highlight=False)

    @app.command()
    def down(
        home: HomeOpt = None,
        grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
    ) -> None:
        """Stop the processes `forgeline up` started (workers first, then the servers)."""
        root = forgeline_home(home)
        results = stop_stack(root, grace=grace)
        if not results:
            _cli().out.print(f"no stack recorded under {root}", highlight=False)
            return
        for role, outcome in results.items():
            _cli().out.print(f"{role:16} {outcome}", highlight=False)

    @app.command()
    def status(home: HomeOpt = None) -> None:
        """Say which processes of the stack are up, with both UI URLs. Exit 1 if anything is down."""
        root = forgeline_home(home)
        state = read_state(root)
        if state is None:
            _cli().out.print(f"no stack under {root} (start one with: forgeline up)", highlight=False)
            raise typer.Exit(1)
        rows = describe(state)
        for role, up_down, detail in rows:
            _cli().out.print(f"{role:16} {up_down:5} {detail}", highlight=False, soft_wrap=True)
        for what, where in state.stores.items():
            _cli().out.print(f"{what + ':':18} {mask_url_secrets(where)}", highlight=False, soft_wrap=True)
        _cli().out.print(f"Prefect UI:  {state.prefect_url}\nMLflow UI:   {state.mlflow_url}", highlight=False)
        if any(up_down != "up" for _, up_down, _ in rows):
            raise typer.Exit(1)

    @app.command()
    def deploy(
        config: Annotated[
            Path, typer.Option("--config", "-c", help="Config whose deploy: section (pools) and defaults to use.")
        ] = Path("configs/default.yaml"),
        set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key.")] = None,
        home: HomeOpt = None,
        write_prefect_yaml: Annotated[
            bool, typer.Option("--write-prefect-yaml", help="Only write prefect.yaml (same deployments); no server.")
        ] = False,
    ) -> None:
        """Create or update the work pools, the crash automation and the deployments (pipeline ... watch)."""
        cli = _cli()
        cfg = cli._load(config, set_)
        if write_prefect_yaml:
            from forgeline.flows.deploy import write_prefect_yaml as write

            cli.out.print(f"wrote {write(cfg, str(config))}", highlight=False, soft_wrap=True)
            return
        cli._prefect_env()
        if stack_env(home) is None and not os.environ.get("PREFECT_API_URL"):
            cli._fail(f"no running stack under {forgeline_home(home)} and no PREFECT_API_URL; run: forgeline up")
        from forgeline.flows.deploy import deploy_all

        try:
            made = deploy_all(cfg)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            cli._fail(f"deploy failed: {type(exc).__name__}: {exc}")
        for line in made:
            cli.out.print(line, highlight=False, soft_wrap=True)

    @app.command()
    def ingest(
        paths: Annotated[list[str], typer.Argument(help="New data files or folders.")],
        config: Annotated[
            Path, typer.Option("--config", "-c", help="Config whose deploy.incoming_dir and name to use.")
        ] = Path("configs/default.yaml"),
        set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key.")] = None,
        copy: Annotated[bool, typer.Option("--copy", help="Copy the files instead of moving them.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Emit the event even if nothing is new.")] = False,
        wait: Annotated[
            float, typer.Option("--wait", min=0, help="Seconds to wait for files still being written, then refuse.")
        ] = 60.0,
        home: HomeOpt = None,
    ) -> None:
        """Move new data into the incoming folder and emit forgeline.dataset.updated (triggers `retrain`)."""
        cli = _cli()
        cfg = cli._load(config, set_)
        cli._prefect_env()
        stack_env(home)
        from forgeline.flows.retrain import EVENT, IngestError, emit_dataset_updated, incoming_dir, ingest_files

        try:
            added, fingerprint = ingest_files(paths, cfg, keep=copy, wait=wait)
        except (IngestError, OSError) as exc:
            cli._fail(str(exc), code=2)
        where = incoming_dir(cfg)
        cli.out.print(
            f"{len(added)} new file(s) in {where}; incoming fingerprint {fingerprint}", highlight=False, soft_wrap=True
        )
        if not added and not force:
            cli.out.print("nothing new: no event emitted (--force to emit anyway)", highlight=False)
            return
        if emit_dataset_updated(cfg, fingerprint, len(added)):
            cli.out.print(f"emitted {EVENT} (fingerprint {fingerprint})", highlight=False, soft_wrap=True)
        else:
            cli.out.print(f"no Prefect server (forgeline up): {EVENT} not emitted", highlight=False)


# ------------------------------------------------------------------------------------ run --deployed
def run_deployed(cfg: Any, data: list[str] | None, fresh: bool, poll: float = 1.0) -> None:
    """Submit the ``pipeline`` deployment with ``cfg`` and wait, printing each state change.

    Called by ``forgeline run --deployed`` after :func:`stack_env`. Child flow runs (``train`` on the GPU
    pool) are reported as they appear. Exits non-zero with one line when the run does not complete.
    """
    from forgeline.flows import cli

    if not os.environ.get("PREFECT_API_URL"):
        cli._fail(
            f"--deployed needs a running stack: none under {forgeline_home()} (run: forgeline up; forgeline deploy)"
        )
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    config = cfg.for_flow_run().model_dump(mode="json")  # the server stores and shows parameters
    parameters: dict[str, Any] = {"config": config, "fresh": fresh, "deployed": True}
    if data:
        # The flow run's working directory is the project folder: hand it absolute paths.
        parameters["data"] = [p if Path(p).is_absolute() else str(Path.cwd() / p) for p in data]
    try:
        flow_run = run_deployment("pipeline/pipeline", parameters=parameters, timeout=0, as_subflow=False)
    except ObjectNotFound:
        cli._fail("no `pipeline` deployment on this Prefect server; run: forgeline deploy")
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    cli.out.print(f"submitted {flow_run.name}: {ui}/runs/flow-run/{flow_run.id}", highlight=False, soft_wrap=True)
    seen: dict[str, str] = {}
    try:
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(flow_run.id)
                children = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id]))
                )
                for item in [run, *children]:
                    state = item.state.name if item.state else "?"
                    if seen.get(str(item.id)) != state:
                        seen[str(item.id)] = state
                        where = f"pool {item.work_pool_name}" if item.work_pool_name else "in-process"
                        cli.out.print(f"{time.strftime('%H:%M:%S')} {item.name} ({where}): {state}", highlight=False)
                if run.state is not None and run.state.is_final():
                    break
                time.sleep(poll)
    except KeyboardInterrupt:
        cli._fail(
            f"stopped waiting; the flow run goes on (cancel it in the UI or: prefect flow-run cancel {flow_run.id})",
            code=130,
        )
    if not run.state.is_completed():
        message = (run.state.message or "").strip().splitlines()
        cli._fail(f"{run.name} ended {run.state.name}" + (f": {message[0]}" if message else ""))
    _print_deployed_summary(cfg, str(flow_run.id))


def _print_deployed_summary(cfg: Any, flow_run_id: str) -> None:
    """What the pipeline's MLflow run says (found by its Prefect flow run id)."""
    from forgeline.flows import cli
    from forgeline.tasks.tracking import runs as tracking

    try:
        uri = tracking.setup_tracking(cfg.tracking)
        experiment = tracking.client().get_experiment_by_name(cfg.name)
        runs = tracking.client().search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}' and tags.`mlflow.runName` = 'pipeline'",
        )
    except Exception as exc:  # noqa: BLE001 - the run completed; the summary is a courtesy
        cli.out.print(f"completed (MLflow summary unavailable: {exc})", highlight=False)
        return
    if not runs:
        cli.out.print("completed", highlight=False)
        return
    run = runs[0]
    tags, metrics = run.data.tags, run.data.metrics
    version = tags.get("model_version") or tags.get("forgeline.reused_version", "?")
    cli.out.print(f"completed: {cfg.registry.model_name} version {version}", highlight=False)
    if "promoted" in tags:
        cli.out.print(f"promoted to champion: {tags['promoted']}", highlight=False)
    for key in ("test/bits_per_byte", "test/loss", "val/loss"):
        if key in metrics:
            cli.out.print(f"{key}: {metrics[key]:.4f}", highlight=False)
    cli.out.print(
        f"MLflow run: {tracking.ui_run_url(uri, run.info.experiment_id, run.info.run_id)}",
        highlight=False,
        soft_wrap=True,
    )


def _main(argv: list[str]) -> None:
    """``python -m forgeline.flows.stack serve-prefect PORT``: how :func:`start_stack` runs the Prefect server."""
    if len(argv) != 2 or argv[0] != "serve-prefect" or not argv[1].isdigit():
        raise SystemExit("usage: python -m forgeline.flows.stack serve-prefect PORT")
    serve_prefect(int(argv[1]))


if __name__ == "__main__":
    _main(sys.argv[1:])
