"""The ``forgeline`` command (also ``python -m flows``)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="forgeline",
    help=(
        "Forgeline: clean data, tune, train, evaluate and register transformer language models, "
        "tracked in MLflow and orchestrated by Prefect.\n\n"
        "Quick start:  forgeline run --config configs/default.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Pipeline config (YAML).", show_default=True)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: dotted.key=value (value read as YAML). Repeatable."),
]
DataOpt = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", help="Use these local files, globs or directories as the data. Repeatable."),
]


def _configure_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    for name in ("forgeline",):
        logging.getLogger(name).setLevel(level)
    # Library chatter (hub model cards, weight-loading bars) says nothing useful about a local run.
    for name in ("mlflow.transformers", "mlflow.models.model", "transformers", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _prefect_env() -> None:
    # Before Prefect is imported: our library loggers show up in Prefect's run logs; no analytics.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,flows")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


class EarlyPrefectServer:
    """Prefect's temporary API server, started before the heavy imports instead of at the first API call.

    Without ``PREFECT_API_URL`` Prefect starts this same server (uvicorn on ``create_app``, UI off) at a
    flow's first API call and waits for it: about 5-9 s on the critical path, after 5+ s of importing
    torch, transformers and MLflow. Started here, the two overlap on two cores. The socket is bound and
    listening before the child starts (``uvicorn --fd``), so there is no port race and early requests
    just wait in the backlog. The server stops at interpreter exit, after Prefect's own exit hooks have
    flushed logs and events to it, and on Linux also when this process is killed (parent-death signal).
    """

    def __init__(self, process: subprocess.Popen[bytes], api_url: str, timeout: float) -> None:
        self.process = process
        self.api_url = api_url
        self.timeout = timeout
        self.started = time.monotonic()
        atexit.register(self.stop)

    def warm_up(self) -> None:
        """In a daemon thread: once ``/health`` answers, make the server's first requests, which are slow.

        The first call to each of the server's database-backed routes costs it 0.2-0.3 s; made here, on
        the other core while the CLI still imports, they are not on the flow's critical path.
        """
        threading.Thread(target=self._warm, name="forgeline-warm-prefect", daemon=True).start()

    def _warm(self) -> None:
        import json
        import urllib.request

        try:
            self.wait_ready()
            urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=10).read()
            for route in ("flows", "flow_runs", "task_runs", "artifacts"):
                request = urllib.request.Request(
                    f"{self.api_url}/{route}/filter",
                    data=json.dumps({"limit": 1}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(request, timeout=10).read()
        except (OSError, RuntimeError, ValueError) as exc:  # only a head start; the flow reports real failures
            logging.getLogger(__name__).debug("warming Prefect's temporary server: %s", exc)

    def wait_ready(self) -> None:
        """Block until ``/health`` answers; fail with one line if the server exits or never answers.

        Raises:
            RuntimeError: The server exited or did not answer within ``timeout`` seconds.
        """
        import urllib.request

        deadline = self.started + self.timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Prefect's temporary server did not answer within {self.timeout:.0f} s "
                    "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one: forgeline up)"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Terminate the server (idempotent); kill it if it does not stop within 5 s."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` making the child get SIGTERM when this process dies, even by SIGKILL.

    Prefect's own temporary server outlives a killed parent; started early, it would for longer.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _warm_imports() -> None:
    """Import what every run imports later anyway (tracking setup, the cleaning chart), while the server boots."""
    import matplotlib

    matplotlib.use("Agg")  # the only backend the pipeline draws with (tasks/tracking.py)
    import matplotlib.pyplot  # noqa: F401
    import mlflow  # noqa: F401


def _preload_store_code(cfg) -> None:  # noqa: ANN001 - PipelineConfig, imported lazily
    """Import MLflow's SQLite store code (0.8 s) in a thread while the flow run is created on the API.

    Creating the flow runs mostly waits for Prefect's server; the import fills that wait instead of
    following it. Only the embedded SQLite store needs this code; MLflow itself is imported already, and
    the flow's first use of the store simply waits for the thread's import to finish.
    """
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:").startswith("sqlite:"):
        return

    def preload() -> None:
        try:
            import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a head start only; the flow imports it again and reports
            logging.getLogger(__name__).debug("preloading MLflow's store code: %s", exc)

    threading.Thread(target=preload, name="forgeline-preload-store", daemon=True).start()


def start_prefect_server_early() -> EarlyPrefectServer | None:
    """Start Prefect's temporary server now when Prefect would start one anyway; else return ``None``.

    Call before importing the flows: the server boots while they import. Nothing changes when an API
    URL is configured (environment, profile or settings file), or when ``FORGELINE_EARLY_SERVER=0``.

    Returns:
        The started server (this process's ``PREFECT_API_URL`` now points at it), or ``None``.
    """
    if os.environ.get("FORGELINE_EARLY_SERVER", "1") == "0" or os.environ.get("PREFECT_API_URL"):
        return None
    import prefect
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:  # a profile or settings file names a server: Prefect will use it
        return None
    # The same command and environment Prefect's SubprocessASGIServer uses, on a socket bound here.
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **settings.to_environment_variables(exclude_unset=True),
    }
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(prefect.__file__).resolve().parents[1]),
            "--factory",
            "prefect.server.api.server:create_app",
            "--fd",
            str(sock.fileno()),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        process = subprocess.Popen(command, env=env, pass_fds=[sock.fileno()], preexec_fn=_die_with_parent())
    finally:
        sock.close()  # the child holds its own copy
    api_url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = api_url
    refresh_global_settings_context()  # Prefect read its settings at import, before the line above
    timeout = max(float(settings.server.ephemeral.startup_timeout_seconds), 90.0)  # a first run creates the db
    server = EarlyPrefectServer(process, api_url, timeout)
    server.warm_up()
    return server


def _no_heartbeats(server: EarlyPrefectServer | None) -> contextlib.AbstractContextManager[object]:
    """Flow-run heartbeats off on our temporary server, where nothing watches them.

    Prefect 3.9 beats every 180 s by default from a thread that sleeps in 1 s slices, and joins it when
    each flow ends: 0.5 s on average for the pipeline flow and again for its train subflow. Only the
    stack's crash automation (``forgeline up``) reads heartbeats; against a stack they stay on.
    """
    if server is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Path, overrides: list[str] | None):  # noqa: ANN202 - PipelineConfig, imported lazily
    from forgeline.tasks.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc), code=2)


@app.command()
def run(
    config: ConfigOpt = Path("configs/default.yaml"),
    set_: SetOpt = None,
    data: DataOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard checkpoints and train anew.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    deployed: Annotated[
        bool, typer.Option("--deployed", help="Submit the `pipeline` deployment to the stack (forgeline up) and wait.")
    ] = False,
) -> None:
    """Run the pipeline in-process: clean, train, evaluate, register (Prefect local, no server needed).

    Re-running the same config resumes from the last checkpoint; after a completed run it re-uses the
    registered version unless --fresh is given.

    Examples:

      forgeline run --config configs/default.yaml

      forgeline run --config configs/smoke.yaml --set train.max_steps=20 --set model.n_layer=1

      forgeline run --config configs/shakespeare_char.yaml --data ../shared/data/tinyshakespeare/input.txt

      forgeline run --data 'notes/*.md' --data more_texts/ --fresh
    """
    cfg = _load(config, set_)
    _prefect_env()
    data_paths = _check_data(data)
    from forgeline.flows.stack import run_deployed, stack_env

    stack_env()  # after `forgeline up`, talk to that stack's servers (docs/deployed.md)
    if deployed:
        _configure_logging(verbose)
        run_deployed(cfg, data_paths, fresh)
        return
    server = start_prefect_server_early()  # boots on the other core while torch & co. import below
    _configure_logging(verbose)
    from forgeline.flows.pipeline import pipeline_flow
    from forgeline.tasks import progress
    from forgeline.tasks.data.cleaning import DataError
    from forgeline.tasks.errors import StageInterrupted

    progress.enable(console)  # bars on a terminal; plain log lines otherwise
    try:
        if server is not None:
            _warm_imports()
            server.wait_ready()
        _preload_store_code(cfg)
        with _no_heartbeats(server):
            result = pipeline_flow(cfg.for_flow_run(), data=data_paths, fresh=fresh)
    except KeyboardInterrupt:
        _fail("interrupted; re-run the same command to resume from the last checkpoint", code=130)
    except StageInterrupted as exc:
        _fail(f"{exc}; re-run the same command to resume", code=128 + exc.signum)  # 130 Ctrl-C, 143 SIGTERM
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line and a non-zero exit
        if verbose:
            console.print_exception()
        _fail(_one_line(exc), code=2 if isinstance(exc, DataError) else 1)  # 2: bad input (docs/troubleshooting.md)
    _print_summary(result)


def _check_data(data: list[str] | None) -> list[str] | None:
    if not data:
        return None
    from forgeline.tasks.data.cleaning import DataError, resolve_data_override

    try:
        resolve_data_override(data)
    except DataError as exc:
        _fail(str(exc), code=2)
    return data


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    known = {
        "ConfigError",
        "DataError",
        "TrackingError",
        "CheckpointError",
        "NonFiniteLossError",
        "ValueError",
    }
    return first if type(exc).__name__ in known and first else f"{type(exc).__name__}: {first}"


def _time_breakdown(timings: dict[str, float]) -> str:
    """'fixed 9.1 s (startup 4.2, clean 0.3, ...) + training loop 60.2 s': everything but the loop is overhead."""
    elapsed = _process_age()
    loop = timings.get("train_loop", 0.0)
    parts = {"startup": max(0.0, elapsed - sum(timings.values())), **timings}
    parts.pop("train_loop", None)
    fixed = sum(parts.values())
    detail = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts.items() if v >= 0.05)
    return f"fixed {fixed:.1f} s ({detail}) + training loop {loop:.1f} s"


def _process_age() -> float:
    """Seconds since this process started.

    psutil's ``create_time`` adds the boot time, which Linux reports in whole seconds: on our machine it
    put the start 0.7 s too early. Boot-relative clocks (``/proc/self/stat`` against ``/proc/uptime``)
    agree to 10 ms; psutil is the fallback elsewhere.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            started = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", encoding="ascii") as fh:
            return max(0.0, float(fh.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()


def _print_summary(result) -> None:  # noqa: ANN001 - PipelineResult
    from forgeline.flows.pipeline import mlflow_run_url
    from rich.table import Table

    table = Table(title="Forgeline run summary", show_header=False, title_justify="left")
    table.add_row("experiment", f"{result.experiment_name} (id {result.experiment_id})")
    table.add_row("pipeline run", result.run_id)
    table.add_row("data fingerprint", result.fingerprint[:16])
    if result.reused:
        table.add_row(
            "model",
            f"{result.model_name} version {result.version} "
            "(already produced by this config and data; --fresh trains anew)",
        )
    else:
        table.add_row("model", f"{result.model_name} version {result.version}")
        if result.resumed_from is not None:
            table.add_row("resumed", f"from step {result.resumed_from}")
        for key, value in result.metrics.items():
            table.add_row(key, f"{value:.4f}")
        verdict = "promoted to champion" if result.promoted else "not promoted"
        table.add_row("champion", f"{verdict}: {result.decision}")
    if result.timings:
        table.add_row("time", _time_breakdown(result.timings))
    out.print(table)
    if result.tracking_uri.startswith("sqlite:///"):
        ui = f"mlflow ui --backend-store-uri {result.tracking_uri} --port 5000"
        out.print(f"Open the MLflow UI:  [bold]{ui}[/]", soft_wrap=True, highlight=False)
    out.print(f"Run page: {mlflow_run_url(result)}", soft_wrap=True, highlight=False)


@app.command()
def validate(config: ConfigOpt = Path("configs/default.yaml"), set_: SetOpt = None) -> None:
    """Check a config (and overrides) without running anything; print the resolved config."""
    from forgeline.tasks.config import dump_config

    cfg = _load(config, set_)
    out.print(dump_config(cfg), highlight=False, soft_wrap=True)
    out.print(f"[green]ok[/]: {config} is valid (config hash {cfg.config_hash()})", highlight=False)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Bind address (keep 127.0.0.1 unless you add auth).")] = "127.0.0.1",
) -> None:
    """Open the MLflow UI on the embedded SQLite store under mlruns/ (or show the running stack's UIs).

    After `forgeline up` the stack's servers already serve both UIs: this prints their URLs instead of
    starting a second MLflow server on a store the stack does not use.
    """
    from forgeline.flows.stack import stack_env

    state = stack_env()
    if state is not None:
        out.print(f"MLflow UI on {state.mlflow_url}\nPrefect UI on {state.prefect_url}", highlight=False)
        return
    from forgeline.tasks.config import TrackingConfig
    from forgeline.tasks.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(TrackingConfig())
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
    ]
    out.print(f"MLflow UI on http://{host}:{port}  ({' '.join(cmd[1:])})", highlight=False)
    os.execvp(cmd[0], cmd)


from forgeline.flows.commands import register  # noqa: E402 - the everyday commands, added to `app` above

register(app)
from forgeline.flows.stack import register as register_stack  # noqa: E402 - up, down, status, deploy

register_stack(app)


def main() -> None:
    """Entry point of the ``forgeline`` console script."""
    fast = os.environ.get("FORGELINE_FAST_EXIT", "1") != "0"
    if fast:
        atexit.register(_exit_without_teardown)  # registered first: runs after every other exit hook
    try:
        app()
    except SystemExit as exc:
        _EXIT["status"] = _exit_status(exc.code)
        raise
    except BaseException:  # Python prints the traceback (or handles Ctrl-C) and exits as it always does
        _EXIT["status"] = None
        raise


_EXIT: dict[str, int | None] = {"status": None}


def _exit_status(code: object) -> int | None:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return None  # sys.exit("message"): Python prints it and exits 1 its own way


def _exit_without_teardown() -> None:
    """End the process once the exit hooks ran (logs and events flushed, servers stopped), skipping teardown.

    With torch, transformers, Prefect and MLflow loaded, the interpreter's own teardown (module and object
    destructors, garbage collection) takes 1-1.7 s after the last line is printed. Nothing of ours is left
    to flush by then: logging is shut down here, the standard streams flushed, pending ``weakref.finalize``
    callbacks (temporary directories) run. ``FORGELINE_FAST_EXIT=0`` keeps the normal exit.
    """
    import weakref

    status = _EXIT["status"]
    if status is None:
        return
    try:
        exit_func = getattr(weakref.finalize, "_exitfunc", None)
        if exit_func is not None:
            exit_func()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except Exception:  # noqa: BLE001 - if anything is odd, let the interpreter exit normally
        return
    os._exit(status)


if __name__ == "__main__":
    main()
