"""The local stack: ``forgeline up`` / ``down`` / ``status`` / ``deploy``.

``up`` starts, on 127.0.0.1, a Prefect server (SQLite), an MLflow server (SQLite backend, artifacts
served by the server) and one Prefect worker per work pool, each a detached process in its own process
group with its log under ``$FORGELINE_HOME/logs``. The PIDs go to ``$FORGELINE_HOME/stack.json`` so that
``down`` stops exactly those processes, and so that every other ``forgeline`` command finds the stack
(:func:`stack_env`). ``FORGELINE_HOME`` defaults to ``.forgeline/`` in the working directory; two stacks
with different homes and ports never touch each other.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

STATE_FILE = "stack.json"
HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_POOLS = ("cpu", "gpu")


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
) -> StackState:
    """Start both servers, wait for their health endpoints, then one worker per pool.

    Args:
        home: ``FORGELINE_HOME``: state, logs, databases and artifacts live here.
        prefect_port: Port of the Prefect server (UI and API).
        mlflow_port: Port of the MLflow server.
        pools: Work pools to start a worker for (a worker creates its pool if missing).
        cwd: Working directory of the processes (the project; flow runs from a local source chdir anyway).
        timeout: Seconds each process may take to become healthy.

    Returns:
        The recorded state.

    Raises:
        RuntimeError: a stack already runs under ``home``, a port is taken, or a process failed to start
            (everything started so far is stopped again).
    """
    existing = read_state(home)
    if existing is not None and any(p.alive() for p in existing.procs):
        raise RuntimeError(f"a stack already runs under {home} (forgeline status; forgeline down)")
    for port in (prefect_port, mlflow_port):
        if _port_taken(port):
            raise RuntimeError(
                f"port {port} on {HOST} is already in use (choose another with --prefect-port/--mlflow-port)"
            )
    cwd = cwd or Path.cwd()
    (home / "prefect").mkdir(parents=True, exist_ok=True)
    (home / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    state = StackState(home=str(home), prefect_port=prefect_port, mlflow_port=mlflow_port)
    env = base_env(home)
    env.pop("PREFECT_API_URL", None)
    server_env = env | {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}",
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(prefect_port),
        "PREFECT_UI_API_URL": state.prefect_api_url,
    }
    mlflow_env = env | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_env.pop("MLFLOW_TRACKING_URI", None)
    try:
        prefect = _spawn(
            "prefect-server",
            [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
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
                "--backend-store-uri",
                f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                str(home / "mlflow" / "artifacts"),
                "--host",
                HOST,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
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
        from flows import cli

        return cli

    @app.command()
    def up(
        home: HomeOpt = None,
        prefect_port: Annotated[int, typer.Option(help="Prefect server port.")] = DEFAULT_PREFECT_PORT,
        mlflow_port: Annotated[int, typer.Option(help="MLflow server port.")] = DEFAULT_MLFLOW_PORT,
        pool: Annotated[
            list[str] | None, typer.Option("--pool", help="Start a worker for this work pool (repeatable).")
        ] = None,
    ) -> None:
        """Start the local stack on 127.0.0.1: Prefect server, MLflow server, one worker per work pool."""
        cli = _cli()
        root = forgeline_home(home)
        t0 = time.monotonic()
        try:
            state = start_stack(
                root, prefect_port=prefect_port, mlflow_port=mlflow_port, pools=tuple(pool or DEFAULT_POOLS)
            )
        except RuntimeError as exc:
            cli._fail(str(exc))
        cli.out.print(f"stack up under {root} in {time.monotonic() - t0:.0f} s", highlight=False)
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
            from flows.deploy import write_prefect_yaml as write

            cli.out.print(f"wrote {write(cfg, str(config))}", highlight=False, soft_wrap=True)
            return
        cli._prefect_env()
        if stack_env(home) is None and not os.environ.get("PREFECT_API_URL"):
            cli._fail(f"no running stack under {forgeline_home(home)} and no PREFECT_API_URL; run: forgeline up")
        from flows.deploy import deploy_all

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
        home: HomeOpt = None,
    ) -> None:
        """Move new data into the incoming folder and emit forgeline.dataset.updated (triggers `retrain`)."""
        cli = _cli()
        cfg = cli._load(config, set_)
        cli._prefect_env()
        stack_env(home)
        from flows.retrain import EVENT, IngestError, emit_dataset_updated, incoming_dir, ingest_files

        try:
            added, fingerprint = ingest_files(paths, cfg, keep=copy)
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
    from flows import cli

    if not os.environ.get("PREFECT_API_URL"):
        cli._fail(
            f"--deployed needs a running stack: none under {forgeline_home()} (run: forgeline up; forgeline deploy)"
        )
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    parameters: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "fresh": fresh, "deployed": True}
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
    from flows import cli
    from tasks import tracking

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
