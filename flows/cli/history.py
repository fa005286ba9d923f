"""Commands that look back at recorded runs: ``compare`` (rank them), ``reproduce`` (re-run one exactly)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from forgeline.flows.cli import console, lookup
from forgeline.flows.cli.console import EXIT_BAD_INPUT, EXIT_INTERRUPTED, Output, fail, show
from forgeline.flows.cli.format import (
    Column,
    Listing,
    emit,
    is_finite,
    iso,
    local,
    metric_head,
    num,
    seconds_between,
    span,
    to_float,
)
from forgeline.flows.cli.options import ConfigOpt, DataOpt, OutputOpt, VerboseOpt, check_data, find_config

REPRODUCES_TAG = "forgeline.reproduces"


# --------------------------------------------------------------------------------------------- compare
def compare(
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Experiment name (default: the config's name).")
    ] = None,
    config: ConfigOpt = None,
    top: Annotated[int, typer.Option("--top", "-n", min=1, help="How many runs to show.")] = 10,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            "-m",
            help="Metric to rank by (default: the config's registry metric: test/bits_per_byte for a language "
            "model, test/f1_macro for a classifier).",
        ),
    ] = None,
    higher_is_better: Annotated[
        bool | None,
        typer.Option(
            "--higher-is-better/--lower-is-better",
            help="Rank the largest (or smallest) value first (default: the metric's direction: F1 and accuracy "
            "higher, loss and bits per byte lower).",
        ),
    ] = None,
    output: OutputOpt = Output.TABLE,
    verbose: VerboseOpt = False,
) -> None:
    """The best pipeline runs of an experiment: key params, metrics, duration, status.

    Runs without the metric (failed, interrupted or re-used runs) come after the ranked ones. Classifier runs
    show their test F1 and accuracy with the baseline's (TF-IDF + logistic regression) beside them.

    A terminal too narrow for the table gets one block per run.

    --output csv or json prints every metric, the key params and the params that differ, for scripts.

    Examples:

        forgeline compare --config configs/smoke.yaml

        forgeline compare --experiment forgeline-demo --top 5 --metric val/loss

        forgeline compare --output csv > runs.csv
    """
    from forgeline.tasks.tracking import queries

    console.quiet_logging(verbose)
    cfg = None if experiment is not None and config is None else find_config(config, required=experiment is None)
    name = experiment or cfg.name
    lookup.open_store(cfg)
    experiment_id = queries.experiment_id(name)
    if experiment_id is None:
        known = ", ".join(queries.experiment_names()) or "none"
        fail(f"no experiment named {name!r} in this store (experiments: {known})")
    runs = queries.pipeline_runs(experiment_id)
    if not runs:
        fail(f"experiment {name!r} has no pipeline runs yet; run `forgeline run` first")
    logged = sorted({key for r in runs for key in r.data.metrics})
    if metric is not None and metric not in logged:
        fail(
            f"no pipeline run of {name!r} logged metric {metric!r} (metrics: {', '.join(logged) or 'none'})",
            EXIT_BAD_INPUT,
        )
    metric, higher = ranking(cfg, runs, metric, higher_is_better)
    ranked = rank_runs(runs, metric, higher_is_better=higher)[:top]
    title = f"{name}: best {len(ranked)} of {len(runs)} pipeline runs by {metric}"
    title += " (highest first)" if higher else ""
    emit(output, compare_listing(ranked, metric, title=title))


def ranking(cfg: Any, runs: list[Any], metric: str | None, higher: bool | None) -> tuple[str, bool]:
    """The metric to rank by and its direction: as given, else the config's gate metric, else the runs' own.

    Without a config, runs that hold a classifier's ``test/f1_macro`` and no bits per byte rank by F1.
    """
    from forgeline.tasks.config import GATE_METRIC
    from forgeline.tasks.config import higher_is_better as direction

    if metric is None:
        if cfg is not None:
            metric, cfg_higher = cfg.gate_metric()
            return metric, cfg_higher if higher is None else higher
        keys = {key for r in runs for key in r.data.metrics}
        lm, classifier = GATE_METRIC["lm"], GATE_METRIC["classification"]
        metric = classifier if classifier in keys and lm not in keys else lm
    return metric, direction(metric) if higher is None else higher


def rank_runs(runs: list[Any], metric: str, *, higher_is_better: bool = False) -> list[Any]:
    """Runs with ``metric`` best first, then the rest newest first."""
    scored = [r for r in runs if is_finite(r.data.metrics.get(metric))]
    rest = [r for r in runs if not is_finite(r.data.metrics.get(metric))]
    scored.sort(key=lambda r: r.data.metrics[metric], reverse=higher_is_better)
    rest.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    return scored + rest


KEY_PARAMS = {
    "model.n_layer": "layers",
    "model.n_embd": "width",
    "train.max_steps": "steps",
    "train.learning_rate": "lr",
}
HEADLINE = ("test/bits_per_byte", "test/loss", "val/loss")
CLASSIFIER_HEADLINE = (
    "test/f1_macro",
    "test/accuracy",
    "baseline/accuracy",
    "test/f1_weighted",
    "baseline/f1_weighted",
)
"""A classifier's figures beside the baseline's: whether the transformer earns its cost."""


def headline(runs: list[Any]) -> tuple[str, ...]:
    """The metrics the table shows: a classifier's F1 and accuracy (and the baseline's) or a language model's."""
    keys = {key for r in runs for key in r.data.metrics}
    return CLASSIFIER_HEADLINE if "test/f1_macro" in keys or "test/accuracy" in keys else HEADLINE


def compare_listing(runs: list[Any], metric: str, *, title: str) -> Listing:
    """Pipeline runs, one row each: the table shows the key params and headline metrics; CSV and JSON add
    every other metric and each param whose value differs between ``runs``."""
    shown_metrics = list(dict.fromkeys([metric, *headline(runs)]))
    all_metrics = sorted({key for r in runs for key in r.data.metrics} - set(shown_metrics))
    param_keys = sorted({key for r in runs for key in r.data.params} - set(KEY_PARAMS))
    differing = [k for k in param_keys if len({r.data.params.get(k) for r in runs}) > 1]

    def version_cell(row: Any) -> str:
        reused = row["reused_version"]
        return row["version"] or (f"{reused} (reused)" if reused else "-")

    def duration_cell(row: Any) -> str:
        return "running" if row["duration_s"] is None and row["status"] == "RUNNING" else span(row["duration_s"])

    columns = [
        Column("run_id", "run", lambda r: r["run_id"][:12]),
        Column("started", "started", lambda r: local(r["started"])),
        Column("status", "status"),
        Column("duration_s", "duration", duration_cell),
        Column("version", "version", version_cell),
        Column("reused_version"),
        *(Column(key, head, right=True) for key, head in KEY_PARAMS.items()),
        *(Column(key, metric_head(key), lambda r, k=key: num(r[k]), right=True) for key in shown_metrics),
        *(Column(key) for key in all_metrics),
        *(Column(key) for key in differing),
    ]
    rows = []
    for run in runs:
        info, data = run.info, run.data
        seconds = seconds_between(info.start_time, info.end_time)
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "started": iso(info.start_time),
            "status": info.status,
            "duration_s": None if seconds is None else round(seconds, 3),
            "version": data.tags.get("model_version"),
            "reused_version": data.tags.get("forgeline.reused_version"),
        }
        row |= {key: data.params.get(key) for key in [*KEY_PARAMS, *differing]}
        row |= {key: to_float(data.metrics.get(key)) for key in [*shown_metrics, *all_metrics]}
        rows.append(row)
    return Listing("runs", title, columns, rows)


# ------------------------------------------------------------------------------------------- reproduce
def reproduce(
    model: Annotated[str, typer.Argument(help="Registered version: models:/NAME/VERSION or models:/NAME@ALIAS.")],
    data: DataOpt = None,
    tolerance: Annotated[
        float, typer.Option(min=0, help="Largest difference in a metric still called the same.")
    ] = 0.01,
    verbose: VerboseOpt = False,
) -> None:
    """Re-run a registered version's exact resolved config on its data; compare the new metrics with the old.

    Refuses when the data now cleans to a different fingerprint (point --data at the data the version was
    trained on, if not its config's). The new run trains from scratch and registers a new version (tagged
    forgeline.reproduces); the champion gate treats it like any other.

    Example:

        forgeline reproduce models:/forgeline-demo-lm/3
    """
    from forgeline.tasks.data.cleaning import DataError, clean_dataset
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG
    from forgeline.tasks.tracking import queries

    console.quiet_logging(verbose, progress=True)
    console.prefect_env()
    if not model.startswith("models:/"):
        fail(
            f"{model}: reproduce needs a registered model URI (models:/NAME/VERSION or models:/NAME@ALIAS)",
            EXIT_BAD_INPUT,
        )
    lookup.open_store()
    version = lookup.resolve_model_uri(model)
    expected = version.tags.get(FINGERPRINT_TAG)
    if not expected:
        fail(f"{version.name} version {version.version} has no {FINGERPRINT_TAG} tag; cannot check its data")
    data_paths = check_data(data)
    try:
        data_cfg = lookup.version_data_config(version)
        cleaned = clean_dataset(data_cfg, data_override=data_paths, base_dir=Path.cwd())
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        fail(str(exc), code=EXIT_BAD_INPUT if isinstance(exc, DataError) else 1)
    if cleaned.fingerprint != expected:
        fail(
            f"data changed: {version.name} version {version.version} was trained on data {expected[:12]}, "
            f"the data now cleans to {cleaned.fingerprint[:12]}; refusing to reproduce "
            "(point --data at the original data)"
        )
    try:
        cfg = lookup.version_config(version)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    old = lookup.version_metrics(version)
    from forgeline.flows.pipeline import pipeline_flow

    try:
        result = pipeline_flow(cfg.for_flow_run(), data=data_paths, fresh=True)
    except KeyboardInterrupt:
        fail("interrupted", code=EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - one line and a non-zero exit
        fail(console.one_line(exc))
    original = f"models:/{version.name}/{version.version}"
    queries.tag_quietly(result.run_id, result.model_name, result.version, REPRODUCES_TAG, original)
    table, same = reproduce_table(old, result.metrics, version.version, result.version, tolerance)
    show(table)
    verdict = "reproduced: every metric within" if same else "differs: some metric differs by more than"
    show(f"{verdict} {tolerance:g} of version {version.version} (new version {result.version})")


def reproduce_table(
    old: dict[str, float], new: dict[str, float], old_version: str, new_version: str | None, tolerance: float
) -> tuple[Any, bool]:
    """The old-versus-new metrics table and whether every shared metric is within ``tolerance``."""
    from rich.table import Table

    table = Table(title="Reproduction", title_justify="left")
    for head in ("metric", f"version {old_version}", f"reproduced (version {new_version or '-'})", "difference"):
        table.add_column(head, justify="right")
    same = True
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        diff = "-"
        if a is not None and b is not None:
            delta = b - a
            diff = f"{delta:+.6f}"
            same = same and abs(delta) <= tolerance
        table.add_row(key, num(a, 6), num(b, 6), diff)
    return table, same
