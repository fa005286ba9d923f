"""Commands that run the pipeline or feed it: ``run``, ``validate``, ``ingest``; and the run summary."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from forgeline.flows.cli import console, startup
from forgeline.flows.cli.console import EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail, out
from forgeline.flows.cli.options import (
    ConfigOpt,
    DataOpt,
    HomeOpt,
    SetOpt,
    VerboseOpt,
    check_data,
    config_path,
    load,
)

if TYPE_CHECKING:
    from forgeline.flows.pipeline import PipelineResult


def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard checkpoints and train anew.")] = False,
    verbose: VerboseOpt = False,
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
    cfg = load(config, set_)
    console.prefect_env()
    data_paths = check_data(data)
    from forgeline.flows.stack import stack_env

    stack_env()  # after `forgeline up`, talk to that stack's servers (docs/deployed.md)
    if deployed:
        from forgeline.flows.cli.stack import run_deployed

        console.configure_logging(verbose)
        run_deployed(cfg, data_paths, fresh)
        return
    server = startup.start_prefect_server_early()  # boots on the other core while torch & co. import below
    console.configure_logging(verbose)
    from forgeline.flows.pipeline import pipeline_flow
    from forgeline.tasks import progress
    from forgeline.tasks.data.cleaning import DataError
    from forgeline.tasks.errors import StageInterrupted

    progress.enable(console.err)  # bars on a terminal; plain log lines otherwise
    try:
        if server is not None:
            startup.warm_imports()
            server.wait_ready()
        startup.preload_store_code(cfg)
        with startup.no_heartbeats(server):
            result = pipeline_flow(cfg.for_flow_run(), data=data_paths, fresh=fresh)
    except KeyboardInterrupt:
        fail("interrupted; re-run the same command to resume from the last checkpoint", code=EXIT_INTERRUPTED)
    except StageInterrupted as exc:
        fail(f"{exc}; re-run the same command to resume", code=128 + exc.signum)  # 130 Ctrl-C, 143 SIGTERM
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line and a non-zero exit
        if verbose:
            console.err.print_exception()
        fail(console.one_line(exc), code=EXIT_BAD_INPUT if isinstance(exc, DataError) else 1)
    print_summary(result)


def validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a config (and overrides) without running anything; print the resolved config."""
    from forgeline.tasks.config import dump_config

    cfg = load(config, set_)
    out.print(dump_config(cfg), highlight=False, soft_wrap=True)
    out.print(f"[green]ok[/]: {config_path(config)} is valid (config hash {cfg.config_hash()})", highlight=False)


def ingest(
    paths: Annotated[list[str], typer.Argument(help="New data files or folders.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    copy: Annotated[bool, typer.Option("--copy", help="Copy the files instead of moving them.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Emit the event even if nothing is new.")] = False,
    wait: Annotated[
        float, typer.Option("--wait", min=0, help="Seconds to wait for files still being written, then refuse.")
    ] = 60.0,
    home: HomeOpt = None,
) -> None:
    """Move new data into the incoming folder and emit forgeline.dataset.updated (triggers `retrain`)."""
    cfg = load(config, set_)
    console.prefect_env()
    from forgeline.flows.stack import stack_env

    stack_env(home)
    from forgeline.flows.contract import EVENT
    from forgeline.flows.retrain import IngestError, emit_dataset_updated, incoming_dir, ingest_files

    try:
        added, fingerprint = ingest_files(paths, cfg, keep=copy, wait=wait)
    except (IngestError, OSError) as exc:
        fail(str(exc), code=EXIT_BAD_INPUT)
    where = incoming_dir(cfg)
    out.print(
        f"{len(added)} new file(s) in {where}; incoming fingerprint {fingerprint}", highlight=False, soft_wrap=True
    )
    if not added and not force:
        out.print("nothing new: no event emitted (--force to emit anyway)", highlight=False)
        return
    if emit_dataset_updated(cfg, fingerprint, len(added)):
        out.print(f"emitted {EVENT} (fingerprint {fingerprint})", highlight=False, soft_wrap=True)
    else:
        out.print(f"no Prefect server (forgeline up): {EVENT} not emitted", highlight=False)


# ------------------------------------------------------------------------------------------- summary
def print_summary(result: PipelineResult) -> None:
    """The run summary table, then where to see the run in the MLflow UI."""
    from rich.table import Table

    from forgeline.flows.pipeline import mlflow_run_url
    from forgeline.tasks.evaluate.baseline import model_metrics, model_vs_baseline

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
        pairs = model_vs_baseline(result.metrics)  # classification: the TF-IDF baseline beside the model
        baseline = {key: base for key, _, base in pairs}
        for key, value in model_metrics(result.metrics).items():
            beside = f"   baseline {baseline[key]:.4f} ({value - baseline[key]:+.4f})" if key in baseline else ""
            table.add_row(key, f"{value:.4f}{beside}")
        if pairs:
            table.add_row("TF-IDF baseline", baseline_verdict(pairs))
        verdict = "promoted to champion" if result.promoted else "not promoted"
        table.add_row("champion", f"{verdict}: {result.decision}")
        if result.student:
            table.add_row("student", result.student)
    if result.timings:
        table.add_row("time", time_breakdown(result.timings))
    out.print(table)
    if result.tracking_uri.startswith("sqlite:///"):
        ui = f"mlflow ui --backend-store-uri {result.tracking_uri} --port 5000"
        out.print(f"Open the MLflow UI:  [bold]{ui}[/]", soft_wrap=True, highlight=False)
    out.print(f"Run page: {mlflow_run_url(result)}", soft_wrap=True, highlight=False)


def baseline_verdict(pairs: list[tuple[str, float, float]]) -> str:
    """'ahead of the model on f1_weighted by 0.0700': the baseline against the model, on weighted F1 if present."""
    key, model, base = next((p for p in pairs if p[0] == "test/f1_weighted"), pairs[0])
    name = key.removeprefix("test/")
    if base == model:
        return f"level with the model on {name}"
    side = "ahead of" if base > model else "behind"
    return f"{side} the model on {name} by {abs(base - model):.4f}"


def time_breakdown(timings: dict[str, float], elapsed: float | None = None) -> str:
    """'fixed 9.1 s (startup 4.2, clean 0.3, ...) + training loop 60.2 s': everything but the loop is overhead.

    Args:
        timings: Seconds per stage, as the pipeline measured them (``train_loop`` is the loop alone).
        elapsed: Seconds since the process started (default: :func:`process_age`); the rest is start-up.
    """
    elapsed = process_age() if elapsed is None else elapsed
    loop = timings.get("train_loop", 0.0)
    parts: dict[str, Any] = {"startup": max(0.0, elapsed - sum(timings.values())), **timings}
    parts.pop("train_loop", None)
    fixed = sum(parts.values())
    detail = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts.items() if v >= 0.05)
    return f"fixed {fixed:.1f} s ({detail}) + training loop {loop:.1f} s"


def process_age() -> float:
    """Seconds since this process started.

    psutil's ``create_time`` adds the boot time, which Linux reports in whole seconds: it can put the start
    most of a second too early. Boot-relative clocks (``/proc/self/stat`` against ``/proc/uptime``) agree to
    10 ms; psutil is the fallback elsewhere.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            started = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime", encoding="ascii") as fh:
            return max(0.0, float(fh.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        import psutil

        return time.time() - psutil.Process().create_time()
