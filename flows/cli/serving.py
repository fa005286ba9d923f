"""Commands that use or show a model and its runs: ``generate``, ``serve``, ``ui``."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from forgeline.flows.cli import console, lookup
from forgeline.flows.cli.console import EXIT_BAD_INPUT, err, fail, out
from forgeline.flows.cli.options import ConfigOpt, VerboseOpt, load_if_given

MAX_SEED = 2**31 - 1  # forgeline.tasks.config.MAX_SEED, kept literal: the CLI must not import the config at startup
logger = logging.getLogger(__name__)


def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text. Repeatable.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model URI or folder (default: models:/<registry.model_name>@champion)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to sample per prompt.")] = 100,
    temperature: Annotated[float, typer.Option(min=1e-6, help="Softmax temperature (> 0).")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample from the k most likely tokens.")] = 50,
    seed: Annotated[
        int | None,
        typer.Option(min=0, max=MAX_SEED, help="Random seed (same seed, same text) (default: random)."),
    ] = None,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Generate text from a registered model (prints prompt plus continuation).

    Examples:

        forgeline generate --prompt "def " --seed 1

        forgeline generate --model models:/forgeline-demo-lm/3 --prompt "import " --max-new-tokens 50
    """
    import torch

    from forgeline.tasks.evaluate.evaluation import generate_samples
    from forgeline.tasks.tracking.models import load_model

    console.quiet_logging(verbose)
    uri = model or lookup.champion_uri(config)
    if uri.startswith("models:/") or model is None:
        lookup.open_store(load_if_given(config))
        lookup.resolve_model_uri(uri)
    elif uri.startswith((".", "/", "~")) and not Path(uri).expanduser().exists():
        fail(f"{uri}: no such model folder")
    elif ":/" not in uri and not Path(uri).expanduser().exists() and not hub_reachable():
        # Otherwise transformers retries the hub for half a minute and logs every try.
        fail(f"{uri}: no such model folder, and the Hugging Face Hub is offline (give a folder or a models:/ URI)")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
        logger.debug("seed %d", seed)
    refuse_classifier(uri)
    try:
        lm, tokenizer = load_model(uri)
    except Exception as exc:  # noqa: BLE001 - one line for any load failure
        fail(f"cannot load {uri}: {console.one_line(exc)}")
    if tokenizer is None:
        fail(f"{uri} has no tokenizer stored with it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples = generate_samples(
        lm.to(device),
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        device=device,
    )
    for i, sample in enumerate(samples):
        if i:
            typer.echo("")
        typer.echo(sample["prompt"] + sample["text"])


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a bare model name could come from the Hugging Face Hub (not offline, its host answers)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def refuse_classifier(uri: str) -> None:
    """End ``generate`` in one line when ``uri`` is a registered text classifier (it labels, it does not write)."""
    if not uri.startswith("models:/"):
        return
    from forgeline.tasks.tracking.classifiers import model_task

    try:
        task = model_task(uri)
    except Exception:  # noqa: BLE001 - loading the model below says what is wrong with it
        return
    if task == "text-classification":
        fail(f"{uri} is a text classifier: use `forgeline predict --model {uri} --text ...`", EXIT_BAD_INPUT)


def serve(
    model: Annotated[
        str | None, typer.Argument(help="Model URI (default: models:/<registry.model_name>@champion).")
    ] = None,
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="Port to listen on.")] = 5001,
    host: Annotated[
        str, typer.Option("--host", "-h", help="Bind address (keep 127.0.0.1: the endpoint has no auth).")
    ] = "127.0.0.1",
    workers: Annotated[
        int, typer.Option(min=1, help="Server worker processes (the cores are shared out between them).")
    ] = 1,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads per worker (default: the cores but one, shared out).")
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Prompts per forward at most, over waiting requests.")] = 32,
    max_prompts: Annotated[
        int, typer.Option(min=1, help="Prompts per request at most (more: 400), so no request holds all others.")
    ] = 128,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Under concurrent load, wait at most this long (and a quarter of a forward) for the requests a "
            "forward expects (0: take only what waits).",
        ),
    ] = 50.0,
    config: ConfigOpt = None,
) -> None:
    """Serve a model with MLflow's scoring protocol (GET /ping, POST /invocations), by default the champion.

    MLflow's scoring server (same requests and answers as `mlflow models serve`, `"params"` included) under
    uvicorn, in this environment (nothing is downloaded). Each worker runs one forward at a time (torch
    threads: the cores but one, shared out between the workers); requests that arrive meanwhile share the
    next forward. Stop it with Ctrl-C
    or SIGTERM.

    A request is refused with a one-line 400 when it is not a string or a list of strings, holds more than
    --max-prompts of them, a prompt longer than the model's context, or params out of range.

    A text classifier answers {"predictions": [{"label": ..., "score": ...}, ...]}, one per input, and
    refuses "params" (400: a classifier has no generation settings).

    Examples:

        forgeline serve --port 5001

        curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
            -d '{"inputs": ["def "], "params": {"max_new_tokens": 30}}'

        curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
            -d '{"inputs": ["A pipeline that deploys models"]}'
    """
    from forgeline.tasks.tracking.serving import check_servable, serve_environment

    console.quiet_logging(False)
    uri = model or lookup.champion_uri(config)
    tracking_uri = lookup.open_store(load_if_given(config))
    if uri.startswith("models:/"):
        lookup.resolve_model_uri(uri)
    elif not Path(uri).exists() and ":/" not in uri:
        fail(f"{uri}: no such model folder (give a models:/NAME@ALIAS or models:/NAME/VERSION URI)")
    try:  # here, in one line, rather than as a traceback from every uvicorn worker
        check_servable(uri)
    except ValueError as exc:
        fail(str(exc))
    if port_busy(host, port):
        fail(f"port {port} on {host} is already in use; pick another with --port")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[yellow]warning:[/] {host}:{port} serves the model without authentication")
    cmd = serve_command(host=host, port=port, workers=workers)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.update(
        serve_environment(
            uri, workers=workers, threads=threads, max_batch=max_batch, wait_ms=batch_wait_ms, max_prompts=max_prompts
        )
    )
    err.print(
        f'serving {uri} on http://{host}:{port}  (GET /ping, POST /invocations {{"inputs": [...]}})',
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def serve_command(*, host: str, port: int, workers: int = 1) -> list[str]:
    """The uvicorn command line that serves the app of :mod:`forgeline.tasks.tracking.serving`.

    The model and the batching settings travel in the environment (``serve_environment``), which every
    worker process inherits.
    """
    from forgeline.tasks.tracking.serving import APP_FACTORY

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        APP_FACTORY,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",  # a line per request costs more than a small model's forward under load
    ]


def port_busy(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def ui(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port for the MLflow UI.")] = 5000,
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
    from forgeline.tasks.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(TrackingConfig())
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    out.print(f"MLflow UI on http://{host}:{port}  ({' '.join(cmd[1:])})", highlight=False)
    os.execvp(cmd[0], cmd)
