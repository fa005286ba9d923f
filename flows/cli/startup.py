"""The start-up and exit savings of ``forgeline run``, in one room (BENCHMARKS.md says what each buys).

- :func:`start_prefect_server_early`: Prefect's temporary API server, booted while torch, transformers and
  MLflow import instead of at the flow's first API call.
- :func:`warm_imports` and :func:`preload_store_code`: imports the run needs anyway, made while it waits.
- :func:`no_heartbeats`: no flow-run heartbeats on that temporary server, where nothing reads them.
- :func:`run_with_fast_exit`: end the process once the exit hooks ran, skipping the interpreter's teardown.

Each leans on a documented behaviour of its library (Prefect's ``create_app(ephemeral=True, final=True)``
and settings, ``atexit``'s last-registered-first order, ``os._exit``); ``tests/unit/test_startup.py`` fails
when one of them changes. ``FORGELINE_EARLY_SERVER=0`` and ``FORGELINE_FAST_EXIT=0`` turn the two big ones off.
"""

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forgeline.tasks.config import PipelineConfig

logger = logging.getLogger(__name__)

# uvicorn calls this factory in the server process (see temporary_server_app).
SERVER_FACTORY = f"{__name__}:temporary_server_app"


# --------------------------------------------------------------------------------------- early server
class EarlyPrefectServer:
    """Prefect's temporary API server, started before the heavy imports instead of at the first API call.

    Without ``PREFECT_API_URL`` Prefect starts this same server (uvicorn on ``create_app``, UI off) at a
    flow's first API call and waits for it, on the critical path after the heavy imports. Started here, the
    two overlap on two cores. The socket is bound and listening before the child starts (``uvicorn --fd``),
    so there is no port race and early requests just wait in the backlog. The server stops at interpreter
    exit, after Prefect's own exit hooks have flushed logs and events to it, and on Linux also when this
    process is killed (parent-death signal).
    """

    def __init__(self, process: subprocess.Popen[bytes], api_url: str, timeout: float) -> None:
        self.process = process
        self.api_url = api_url
        self.timeout = timeout
        self.started = time.monotonic()
        atexit.register(self.stop)

    def warm_up(self) -> None:
        """In a daemon thread: once ``/health`` answers, make the server's first requests, which are slow.

        The first call to each of the server's database-backed routes is slow; made here, on the other
        core while the command still imports, they are not on the flow's critical path.
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
            logger.debug("warming Prefect's temporary server: %s", exc)

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


def temporary_server_app() -> Any:
    """The ASGI app of Prefect's temporary server: API only, ephemeral services, built once in its process.

    What Prefect's own temporary server runs; Prefect asks for it with private environment variables, this
    asks ``create_app``'s documented arguments (``uvicorn --factory`` calls this in the server process).
    """
    from prefect.server.api.server import create_app

    return create_app(ephemeral=True, final=True)


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
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", **settings.to_environment_variables(exclude_unset=True)}
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
            SERVER_FACTORY,
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


def no_heartbeats(server: EarlyPrefectServer | None) -> contextlib.AbstractContextManager[object]:
    """Flow-run heartbeats off on our temporary server, where nothing watches them.

    Prefect beats from a thread that sleeps in 1 s slices and joins it when each flow ends: half a second on
    average for the pipeline flow and again for its train subflow. Only the stack's crash automation
    (``forgeline up``) reads heartbeats; against a stack they stay on.
    """
    if server is None:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


# ----------------------------------------------------------------------------------------------- imports
def warm_imports() -> None:
    """Import what every run imports later anyway (tracking, the cleaning chart), while the server boots."""
    import matplotlib

    matplotlib.use("Agg")  # the only backend the pipeline draws with
    import matplotlib.pyplot  # noqa: F401

    from forgeline.tasks.tracking import queries

    queries.import_mlflow()


def preload_store_code(cfg: PipelineConfig) -> None:
    """Import MLflow's SQLite store code in a thread while the flow run is created on the API.

    Creating the flow runs mostly waits for Prefect's server; the import fills that wait instead of
    following it. Only the embedded SQLite store needs this code; the flow's first use of the store simply
    waits for the thread's import to finish.
    """
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:").startswith("sqlite:"):
        return
    from forgeline.tasks.tracking import queries

    def preload() -> None:
        try:
            queries.import_sqlite_store()
        except Exception as exc:  # noqa: BLE001 - a head start only; the flow imports it again and reports
            logger.debug("preloading MLflow's store code: %s", exc)

    threading.Thread(target=preload, name="forgeline-preload-store", daemon=True).start()


# -------------------------------------------------------------------------------------------- fast exit
_EXIT: dict[str, int | None] = {"status": None}


def run_with_fast_exit(command: Callable[[], object]) -> None:
    """Run ``command`` (the Typer app); at exit, end the process without the interpreter's teardown.

    With torch, transformers, Prefect and MLflow loaded, the teardown (module and object destructors,
    garbage collection) takes over a second after the last line is printed. The exit hook is registered
    before ``command`` runs, so it is the first registered and, as ``atexit`` runs hooks last-registered
    first, it runs after every other: Prefect's log and event flushes, the early server's stop, and the
    ``weakref.finalize`` callbacks (temporary directories), whose hook is registered with the first
    finalizer, which the command line's own imports do not create. ``FORGELINE_FAST_EXIT=0`` keeps the
    normal exit; a traceback or ``sys.exit("message")`` always takes it.
    """
    if os.environ.get("FORGELINE_FAST_EXIT", "1") != "0":
        atexit.register(_exit_without_teardown)
    try:
        command()
    except SystemExit as exc:
        _EXIT["status"] = _exit_status(exc.code)
        raise
    except BaseException:  # Python prints the traceback (or handles Ctrl-C) and exits as it always does
        _EXIT["status"] = None
        raise


def _exit_status(code: object) -> int | None:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    return None  # sys.exit("message"): Python prints it and exits 1 its own way


def _exit_without_teardown() -> None:
    """The last exit hook: flush what is ours to flush, then end the process with the recorded status."""
    status = _EXIT["status"]
    if status is None:
        return
    try:
        logging.shutdown()  # logging's own exit hook was registered earlier, so it would run after this one
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except Exception:  # noqa: BLE001 - if anything is odd, let the interpreter exit normally
        return
    os._exit(status)
