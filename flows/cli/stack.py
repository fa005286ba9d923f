"""Commands for the local stack: ``up``, ``down``, ``status``, ``deploy``, and ``run --deployed``.

The stack itself (stores, exposure, ``stack.json``, processes) is :mod:`forgeline.flows.stack`; these
commands start, stop, show and use it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from forgeline.flows.cli import console
from forgeline.flows.cli.console import EXIT_INTERRUPTED, fail, out
from forgeline.flows.cli.options import ConfigOpt, HomeOpt, SetOpt, config_path, load
from forgeline.flows.stack import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_POOLS,
    DEFAULT_PREFECT_PORT,
    MLFLOW_ARTIFACTS_ENV,
    MLFLOW_BACKEND_ENV,
    PREFECT_DATABASE_ENV,
    TUNE_STORAGE_ENV,
    describe,
    forgeline_home,
    read_state,
    resolve_backends,
    restart_missing_workers,
    stack_env,
    start_stack,
    stop_stack,
)
from forgeline.tasks.config import mask_url_secrets

if TYPE_CHECKING:
    from forgeline.tasks.config import PipelineConfig


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
    root = forgeline_home(home)
    t0 = time.monotonic()
    try:
        restarted = restart_missing_workers(root)
    except RuntimeError as exc:
        fail(str(exc))
    if restarted:  # the servers run: bring back only the workers that died
        out.print(f"stack already up under {root}; restarted {', '.join(restarted)}", highlight=False)
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
        fail(mask_url_secrets(str(exc)))
    out.print(f"stack up under {root} in {time.monotonic() - t0:.0f} s", highlight=False)
    for what, where in state.stores.items():
        out.print(f"{what + ':':18} {where}", highlight=False, soft_wrap=True)
    out.print(f"Prefect UI:  {state.prefect_url}", highlight=False)
    out.print(f"MLflow UI:   {state.mlflow_url}", highlight=False)
    out.print("Next: forgeline deploy; then forgeline run --config PATH --deployed", highlight=False)


def down(
    home: HomeOpt = None,
    grace: Annotated[float, typer.Option(help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
) -> None:
    """Stop the processes `forgeline up` started (workers first, then the servers)."""
    root = forgeline_home(home)
    results = stop_stack(root, grace=grace)
    if not results:
        out.print(f"no stack recorded under {root}", highlight=False)
        return
    for role, outcome in results.items():
        out.print(f"{role:16} {outcome}", highlight=False)


def status(home: HomeOpt = None) -> None:
    """Say which processes of the stack are up, with both UI URLs. Exit 1 if anything is down."""
    root = forgeline_home(home)
    state = read_state(root)
    if state is None:
        out.print(f"no stack under {root} (start one with: forgeline up)", highlight=False)
        raise typer.Exit(1)
    rows = describe(state)
    for role, up_down, detail in rows:
        out.print(f"{role:16} {up_down:5} {detail}", highlight=False, soft_wrap=True)
    for what, where in state.stores.items():
        out.print(f"{what + ':':18} {mask_url_secrets(where)}", highlight=False, soft_wrap=True)
    out.print(f"Prefect UI:  {state.prefect_url}\nMLflow UI:   {state.mlflow_url}", highlight=False)
    if any(up_down != "up" for _, up_down, _ in rows):
        raise typer.Exit(1)


def deploy(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    home: HomeOpt = None,
    write_prefect_yaml: Annotated[
        bool, typer.Option("--write-prefect-yaml", help="Only write prefect.yaml (same deployments); no server.")
    ] = False,
) -> None:
    """Create or update the work pools, the crash automation and the deployments (pipeline ... watch)."""
    cfg = load(config, set_)
    if write_prefect_yaml:
        from forgeline.flows.deploy import write_prefect_yaml as write

        out.print(f"wrote {write(cfg, str(config_path(config)))}", highlight=False, soft_wrap=True)
        return
    console.prefect_env()
    if stack_env(home) is None and not os.environ.get("PREFECT_API_URL"):
        fail(f"no running stack under {forgeline_home(home)} and no PREFECT_API_URL; run: forgeline up")
    from forgeline.flows.deploy import deploy_all

    try:
        made = deploy_all(cfg)
    except Exception as exc:  # noqa: BLE001 - one line for the user
        fail(f"deploy failed: {type(exc).__name__}: {exc}")
    for line in made:
        out.print(line, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ run --deployed
def run_deployed(cfg: PipelineConfig, data: list[str] | None, fresh: bool, poll: float = 1.0) -> None:
    """Submit the ``pipeline`` deployment with ``cfg`` and wait, printing each state change.

    Called by ``forgeline run --deployed`` after :func:`forgeline.flows.stack.stack_env`. Child flow runs
    (``train`` on the GPU pool) are reported as they appear. Exits non-zero with one line when the run does
    not complete.
    """
    if not os.environ.get("PREFECT_API_URL"):
        fail(f"--deployed needs a running stack: none under {forgeline_home()} (run: forgeline up; forgeline deploy)")
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from forgeline.flows.contract import PIPELINE_DEPLOYMENT

    config = cfg.for_flow_run().model_dump(mode="json")  # the server stores and shows parameters
    parameters: dict[str, Any] = {"config": config, "fresh": fresh, "deployed": True}
    if data:
        # The flow run's working directory is the project folder: hand it absolute paths.
        parameters["data"] = [p if Path(p).is_absolute() else str(Path.cwd() / p) for p in data]
    try:
        flow_run = run_deployment(PIPELINE_DEPLOYMENT, parameters=parameters, timeout=0, as_subflow=False)
    except ObjectNotFound:
        fail("no `pipeline` deployment on this Prefect server; run: forgeline deploy")
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    out.print(f"submitted {flow_run.name}: {ui}/runs/flow-run/{flow_run.id}", highlight=False, soft_wrap=True)
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
                        out.print(f"{time.strftime('%H:%M:%S')} {item.name} ({where}): {state}", highlight=False)
                if run.state is not None and run.state.is_final():
                    break
                time.sleep(poll)
    except KeyboardInterrupt:
        fail(
            f"stopped waiting; the flow run goes on (cancel it in the UI or: prefect flow-run cancel {flow_run.id})",
            code=EXIT_INTERRUPTED,
        )
    if not run.state.is_completed():
        message = (run.state.message or "").strip().splitlines()
        fail(f"{run.name} ended {run.state.name}" + (f": {message[0]}" if message else ""))
    print_deployed_summary(cfg, str(flow_run.id))


def print_deployed_summary(cfg: PipelineConfig, flow_run_id: str) -> None:
    """What the pipeline's MLflow run says (found by its Prefect flow run id)."""
    from forgeline.tasks.evaluate.baseline import model_vs_baseline
    from forgeline.tasks.tracking import links, queries, store

    try:
        uri = store.setup_tracking(cfg.tracking)
        run = queries.pipeline_run_of_flow_run(cfg.name, flow_run_id)
    except Exception as exc:  # noqa: BLE001 - the run completed; the summary is a courtesy
        out.print(f"completed (MLflow summary unavailable: {exc})", highlight=False)
        return
    if run is None:
        out.print("completed", highlight=False)
        return
    tags, metrics = run.data.tags, run.data.metrics
    version = tags.get("model_version") or tags.get("forgeline.reused_version", "?")
    out.print(f"completed: {cfg.registry.model_name} version {version}", highlight=False)
    if "promoted" in tags:
        out.print(f"promoted to champion: {tags['promoted']}", highlight=False)
    if "forgeline.student" in tags:
        out.print(f"student: {tags['forgeline.student']}", highlight=False)
    baseline = {key: base for key, _, base in model_vs_baseline(metrics)}  # a classifier's TF-IDF baseline
    headline = ("test/bits_per_byte", "test/f1_macro", "test/f1_weighted", "test/accuracy", "test/loss", "val/loss")
    for key in dict.fromkeys((cfg.gate_metric()[0], *headline)):  # the gate's metric first, whatever the task
        if key in metrics:
            beside = f" (baseline {baseline[key]:.4f})" if key in baseline else ""
            out.print(f"{key}: {metrics[key]:.4f}{beside}", highlight=False)
    out.print(
        f"MLflow run: {links.ui_run_url(uri, run.info.experiment_id, run.info.run_id)}",
        highlight=False,
        soft_wrap=True,
    )
