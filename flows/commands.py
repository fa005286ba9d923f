"""Everyday commands on top of the pipeline: compare, models, promote, rollback, generate, serve, reproduce.

They are registered on the ``forgeline`` app by :func:`register` (called at the end of ``flows/cli.py``).
Each talks to the MLflow store the pipeline uses: the running stack's MLflow server after ``forgeline up``
(found through ``$FORGELINE_HOME``, see :func:`forgeline.flows.stack.stack_env`), ``$MLFLOW_TRACKING_URI`` when set
(it wins), else SQLite under ``./mlruns`` (or the ``tracking`` section of ``--config`` when one is given).
Every failure ends as one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("configs/default.yaml")
MANUAL_TAG = "forgeline.manual_promotion"
REPRODUCES_TAG = "forgeline.reproduces"

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config whose experiment name, registry settings and tracking URI to use (default: configs/default.yaml).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def _cli() -> ModuleType:
    # forgeline.flows.cli imports this module at its end; reach back lazily to share its consoles and helpers.
    from forgeline.flows import cli

    return cli


def _fail(message: str, code: int = 1) -> None:
    _cli()._fail(message, code)


def _print(renderable: Any) -> None:
    _cli().out.print(renderable, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ setup
def _config(config: Path | None, *, required: bool) -> Any:
    """The config given with --config, else configs/default.yaml if present, else ``None``."""
    path = config if config is not None else DEFAULT_CONFIG
    if config is None and not path.exists():
        if required:
            _fail(f"no --config given and {DEFAULT_CONFIG} does not exist here; pass --config PATH", code=2)
        return None
    return _cli()._load(path, None)


def _tracking(cfg: Any = None, *, must_exist: bool = True) -> str:
    """Point MLflow at the store; refuse to create an empty SQLite store for a read-only command."""
    from forgeline.tasks.config import TrackingConfig
    from forgeline.tasks.tracking.runs import TrackingError, resolve_tracking_uri, setup_tracking

    tracking_cfg = cfg.tracking if cfg is not None else TrackingConfig()
    try:
        uri = resolve_tracking_uri(tracking_cfg)
        if must_exist and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            _fail(
                f"no MLflow store at {uri.removeprefix('sqlite:///')}; run `forgeline run` here first "
                "(or set MLFLOW_TRACKING_URI)"
            )
        return setup_tracking(tracking_cfg)
    except TrackingError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _quiet(verbose: bool, *, progress: bool = False) -> None:
    """Logging for a command: our INFO lines only with ``progress`` (or --verbose); no download bars."""
    _cli()._configure_logging(verbose)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not (verbose or progress):
        for name in ("forgeline",):
            logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _registry_cfg(cfg: Any) -> Any:
    from forgeline.tasks.config import RegistryConfig

    return cfg.registry if cfg is not None else RegistryConfig()


# --------------------------------------------------------------------------------------- compare
def compare(
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Experiment name (default: the config's name).")
    ] = None,
    config: ConfigOpt = None,
    top: Annotated[int, typer.Option("--top", "-n", min=1, help="How many runs to show.")] = 10,
    metric: Annotated[str, typer.Option("--metric", "-m", help="Metric to rank by.")] = "test/bits_per_byte",
    higher_is_better: Annotated[
        bool, typer.Option("--higher-is-better", help="Rank the largest value first (default: smallest).")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Table of the best pipeline runs of an experiment: key params, metrics, duration, status.

    Runs without the metric (failed, interrupted or re-used runs) come after the ranked ones.

    Examples:

        forgeline compare --config configs/smoke.yaml

        forgeline compare --experiment forgeline-demo --top 5 --metric val/loss
    """
    _quiet(verbose)
    cfg = None if experiment is not None and config is None else _config(config, required=experiment is None)
    name = experiment or cfg.name
    _tracking(cfg)
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments(max_results=50))) or "none"
        _fail(f"no experiment named {name!r} in this store (experiments: {known})")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'pipeline'", max_results=1000)
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        _fail(f"experiment {name!r} has no pipeline runs yet; run `forgeline run` first")
    ranked = rank_runs(runs, metric, higher_is_better=higher_is_better)[:top]
    _print(compare_table(ranked, metric, title=f"{name}: best {len(ranked)} of {len(runs)} pipeline runs by {metric}"))


def rank_runs(runs: list[Any], metric: str, *, higher_is_better: bool = False) -> list[Any]:
    """Runs with ``metric`` best first, then the rest newest first."""
    scored = [r for r in runs if _finite(r.data.metrics.get(metric))]
    rest = [r for r in runs if not _finite(r.data.metrics.get(metric))]
    scored.sort(key=lambda r: r.data.metrics[metric], reverse=higher_is_better)
    rest.sort(key=lambda r: r.info.start_time or 0, reverse=True)
    return scored + rest


def compare_table(runs: list[Any], metric: str, *, title: str) -> Any:
    """A rich table of pipeline runs (one row each)."""
    from rich.table import Table

    metric_cols = list(dict.fromkeys([metric, "test/bits_per_byte", "test/loss", "val/loss"]))
    params = [
        ("model.n_layer", "layers"),
        ("model.n_embd", "width"),
        ("train.max_steps", "steps"),
        ("train.learning_rate", "lr"),
    ]
    table = Table(title=title, title_justify="left")
    for head in ("run", "started", "status", "duration", "version"):
        table.add_column(head, no_wrap=True)
    for _, head in params:
        table.add_column(head, justify="right")
    for col in metric_cols:
        table.add_column(col, justify="right")
    for run in runs:
        tags, data = run.data.tags, run.data
        version = tags.get("model_version") or (
            f"{tags['forgeline.reused_version']} (reused)" if tags.get("forgeline.reused_version") else "-"
        )
        cells = [
            run.info.run_id[:12],
            _when(run.info.start_time),
            run.info.status,
            _duration(run.info.start_time, run.info.end_time),
            version,
        ]
        cells += [data.params.get(key, "-") for key, _ in params]
        cells += [_num(data.metrics.get(col)) for col in metric_cols]
        table.add_row(*cells)
    return table


# ---------------------------------------------------------------------------------------- models
def models(
    name: Annotated[str | None, typer.Argument(help="Registered model name (default: list every model).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Registered models; with NAME, its versions, aliases, gate decisions and alias history.

    Examples:

        forgeline models

        forgeline models forgeline-demo-lm
    """
    from mlflow.exceptions import MlflowException

    _quiet(verbose)
    _tracking()
    client = _client()
    if name is None:
        registered = client.search_registered_models(max_results=200)
        if not registered:
            _fail("no registered models in this store yet; run `forgeline run` first")
        _print(_models_table(registered))
        return
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models(max_results=200))) or "none"
        _fail(f"no registered model named {name!r} (models: {known})")
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version))
    aliases: dict[str, list[str]] = {}
    for alias, number in (client.get_registered_model(name).aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    _print(_versions_table(name, versions, aliases))
    _print(_history_table(name, versions))


def _models_table(registered: list[Any]) -> Any:
    from rich.table import Table

    table = Table(title="Registered models", title_justify="left")
    for head in ("name", "latest version", "aliases", "updated"):
        table.add_column(head)
    for model in sorted(registered, key=lambda m: m.name):
        latest = max((int(v.version) for v in model.latest_versions or []), default=None)
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted((model.aliases or {}).items())) or "-"
        table.add_row(model.name, str(latest or "-"), aliases, _when(model.last_updated_timestamp))
    return table


def _versions_table(name: str, versions: list[Any], aliases: dict[str, list[str]]) -> Any:
    from forgeline.tasks.registry.versions import BPB_TAG, FINGERPRINT_TAG
    from rich.table import Table

    table = Table(title=f"{name}: versions", title_justify="left")
    for head in ("version", "created", "aliases", "test bits/byte", "data", "promoted", "decision", "train run"):
        table.add_column(head, overflow="fold")
    for v in versions:
        tags = v.tags or {}
        promoted = tags.get("forgeline.promoted", "-")
        if MANUAL_TAG in tags:
            promoted += " (manual)"
        table.add_row(
            str(v.version),
            _when(v.creation_timestamp),
            ", ".join(sorted(aliases.get(str(v.version), []))) or "-",
            tags.get(BPB_TAG, "-"),
            tags.get(FINGERPRINT_TAG, "-")[:12],
            promoted,
            _short(tags.get("forgeline.decision", "-"), 70),
            (tags.get("train_run_id") or v.run_id or "-")[:12],
        )
    return table


def _history_table(name: str, versions: list[Any]) -> Any:
    from forgeline.tasks.registry.versions import alias_history
    from rich.table import Table

    entries = alias_history(name)
    table = Table(title=f"{name}: alias history (newest first)", title_justify="left")
    for head in ("when (UTC)", "alias", "version", "previous", "how", "why"):
        table.add_column(head, overflow="fold")
    for e in reversed(entries):
        table.add_row(
            str(e.get("at", "-")),
            str(e["alias"]),
            str(e["version"]),
            str(e.get("previous") or "-"),
            str(e.get("kind", "-")),
            _short(str(e.get("reason", "")), 70),
        )
    if not entries:
        promoted = [str(v.version) for v in sorted(versions, key=lambda v: int(v.version)) if _gate_promoted(v)]
        note = ", ".join(promoted) or "none"
        table.caption = f"no alias moves recorded yet; versions the gate promoted: {note}"
    return table


# --------------------------------------------------------------------------------- promote, rollback
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    force: Annotated[
        bool, typer.Option("--force", help="Move the alias even if the gate refuses or cannot score.")
    ] = False,
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Make VERSION the champion, through the same gate as the pipeline unless --force.

    The candidate's stored test bits per byte is compared with the champion's on the candidate's data
    (the champion is re-scored when it was trained on other data and that data is still in the local
    cache). The decision is recorded as version tags and in the alias history.

    Examples:

        forgeline promote forgeline-demo-lm 4

        forgeline promote forgeline-demo-lm 3 --force
    """
    from forgeline.tasks.registry.versions import champion_version, record_alias_move, registry_lock

    _quiet(verbose)
    cfg = _config(config, required=False) if config is not None else None
    _tracking(cfg)
    reg = _registry_cfg(cfg)
    client = _client()
    candidate = _get_version(client, name, version)
    alias = reg.champion_alias
    with registry_lock(name):
        champ = champion_version(name, alias)
        if champ is not None and str(champ.version) == str(candidate.version):
            _print(f"{name} version {candidate.version} is already the {alias}; nothing to do")
            return
        promoted, reason = manual_gate(candidate, champ, reg.min_improvement)
        record = {
            "at": _now(),
            "by": _who(),
            "forced": force and not promoted,
            "gate": "passed" if promoted else "refused",
            "reason": reason,
            "previous": str(champ.version) if champ is not None else None,
        }
        if not promoted and not force:
            client.set_model_version_tag(name, candidate.version, MANUAL_TAG, json.dumps(record))
            _fail(f"refused: {reason} (--force promotes anyway)")
        kind = "promote" if promoted else "force"
        text = f"manual {kind}: {reason}"
        client.set_registered_model_alias(name, alias, candidate.version)
        record_alias_move(name, alias, candidate.version, text, previous=record["previous"], kind=kind)
        for key, value in {
            "forgeline.promoted": "true",
            "forgeline.decision": text,
            MANUAL_TAG: json.dumps(record),
        }.items():
            client.set_model_version_tag(name, candidate.version, key, value)
    was = f" (was version {champ.version})" if champ is not None else ""
    _print(f"{name} version {candidate.version} is now the {alias}{was}: {text}")


def manual_gate(candidate: Any, champ: Any, min_improvement: float) -> tuple[bool, str]:
    """The champion gate for a manual promotion. Returns (promote?, reason)."""
    from forgeline.tasks.registry.versions import BPB_TAG, FINGERPRINT_TAG, decide_promotion

    cand_bpb = _float(candidate.tags.get(BPB_TAG))
    if cand_bpb is None:
        return False, f"version {candidate.version} has no {BPB_TAG} tag; the gate cannot score it"
    if champ is None:
        decision = decide_promotion(cand_bpb, None, min_improvement)
        return decision.promoted, decision.reason
    cand_fp = candidate.tags.get(FINGERPRINT_TAG)
    champ_bpb = _float(champ.tags.get(BPB_TAG))
    if cand_fp and champ.tags.get(FINGERPRINT_TAG) == cand_fp and champ_bpb is not None:
        decision = decide_promotion(cand_bpb, champ_bpb, min_improvement)
        return decision.promoted, decision.reason
    champ_bpb, why_not = _rescore_on(candidate, f"models:/{champ.name}/{champ.version}")
    if champ_bpb is None:
        return False, f"champion version {champ.version} was scored on other data and cannot be re-scored: {why_not}"
    decision = decide_promotion(cand_bpb, champ_bpb, min_improvement)
    return decision.promoted, decision.reason + " (champion re-scored on the candidate's test split)"


def _rescore_on(candidate: Any, champion_uri: str) -> tuple[float | None, str]:
    """The champion's bits per byte on the candidate's test split, or ``(None, why not)``.

    Re-scoring needs the candidate's resolved config (for the scoring settings) and its cleaned data in
    the local cache (``data.cache_dir``); a version trained elsewhere has neither.
    """
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG

    fingerprint = candidate.tags.get(FINGERPRINT_TAG)
    if not fingerprint:
        return None, f"version {candidate.version} has no {FINGERPRINT_TAG} tag"
    try:
        cfg = _version_config(candidate)
    except (ValueError, OSError) as exc:
        return None, str(exc)
    dataset_dir = _cache_root(cfg) / "datasets" / fingerprint
    if not (dataset_dir / "test.jsonl").exists() and not (dataset_dir / "validation.jsonl").exists():
        return None, f"the candidate's cleaned data {fingerprint[:12]} is not in {_cache_root(cfg)}"
    from forgeline.flows.stages import rescore_model

    logger.info("re-scoring %s on %s", champion_uri, dataset_dir)
    return float(rescore_model(champion_uri, cfg, str(dataset_dir))), ""


def rollback(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    config: ConfigOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Move the champion alias back to the previous champion (from the alias history).

    Repeated rollbacks walk further back. The move is recorded in the alias history and as version tags.

    Example:

        forgeline rollback forgeline-demo-lm
    """
    from forgeline.tasks.registry.versions import (
        alias_history,
        champion_stack,
        champion_version,
        previous_champion,
        record_alias_move,
        registry_lock,
    )

    _quiet(verbose)
    cfg = _config(config, required=False) if config is not None else None
    _tracking(cfg)
    alias = _registry_cfg(cfg).champion_alias
    client = _client()
    _get_model(client, name)
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    with registry_lock(name):
        champ = champion_version(name, alias)
        if champ is None:
            _fail(f"{name} has no {alias}; nothing to roll back")
        current = str(champ.version)
        entries = alias_history(name)
        if any(e.get("alias") == alias for e in entries):
            stack = champion_stack(entries, alias, current)
        else:  # nothing recorded yet: the gate's own promotions, in version order
            promoted = [k for k, v in sorted(versions.items(), key=lambda kv: int(kv[0])) if _gate_promoted(v)]
            stack = [p for p in promoted if p != current] + [current]
        target = previous_champion(stack, exists=lambda v: v in versions)
        if target is None:
            _fail(f"{name}: no previous {alias} to roll back to (version {current} is the only one on record)")
        reason = f"rollback from version {current}"
        client.set_registered_model_alias(name, alias, target)
        record_alias_move(name, alias, target, reason, previous=current, kind="rollback")
        client.set_model_version_tag(name, current, "forgeline.rolled_back", json.dumps({"at": _now(), "by": _who()}))
        client.set_model_version_tag(
            name, target, "forgeline.restored", json.dumps({"at": _now(), "by": _who(), "from": current})
        )
    _print(f"{name}: {alias} is back on version {target} (was version {current})")


# ------------------------------------------------------------------------------- generate, serve
def generate(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text. Repeatable.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model URI or folder (default: models:/<registry.model_name>@champion)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to sample per prompt.")] = 100,
    temperature: Annotated[float, typer.Option(min=1e-6, help="Softmax temperature (> 0).")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample from the k most likely tokens.")] = 50,
    seed: Annotated[int | None, typer.Option(help="Random seed (same seed, same text) (default: random).")] = None,
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
    from forgeline.tasks.model.modeling import load_pretrained_model

    _quiet(verbose)
    uri = model or _champion_uri(config)
    if uri.startswith("models:/") or model is None:
        cfg = _config(config, required=False) if config is not None else None
        _tracking(cfg)
        _check_model_uri(uri)
    elif uri.startswith((".", "/", "~")) and not Path(uri).expanduser().exists():
        _fail(f"{uri}: no such model folder")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
        logger.debug("seed %d", seed)
    try:
        lm, tokenizer = load_pretrained_model(uri)
    except Exception as exc:  # noqa: BLE001 - one line for any load failure
        _fail(f"cannot load {uri}: {_cli()._one_line(exc)}")
    if tokenizer is None:
        _fail(f"{uri} has no tokenizer stored with it")
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


def serve(
    model: Annotated[
        str | None, typer.Argument(help="Model URI (default: models:/<registry.model_name>@champion).")
    ] = None,
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="Port to listen on.")] = 5001,
    host: Annotated[
        str, typer.Option("--host", "-h", help="Bind address (keep 127.0.0.1: the endpoint has no auth).")
    ] = "127.0.0.1",
    workers: Annotated[int, typer.Option(min=1, help="Server worker processes.")] = 1,
    config: ConfigOpt = None,
) -> None:
    """Serve a model with MLflow's scoring protocol (GET /ping, POST /invocations), by default the champion.

    Runs `mlflow models serve --env-manager local` in this environment (nothing is downloaded).
    Stop it with Ctrl-C or SIGTERM.

    Examples:

        forgeline serve --port 5001

        curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{"inputs": ["def "]}'
    """
    _quiet(False)
    uri = model or _champion_uri(config)
    cfg = _config(config, required=False) if config is not None else None
    tracking_uri = _tracking(cfg)
    if uri.startswith("models:/"):
        _check_model_uri(uri)
    elif not Path(uri).exists() and ":/" not in uri:
        _fail(f"{uri}: no such model folder (give a models:/NAME@ALIAS or models:/NAME/VERSION URI)")
    if _port_busy(host, port):
        _fail(f"port {port} on {host} is already in use; pick another with --port")
    if host not in ("127.0.0.1", "localhost", "::1"):
        _cli().console.print(f"[yellow]warning:[/] {host}:{port} serves the model without authentication")
    cmd = serve_command(uri, host=host, port=port, workers=workers)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    _cli().console.print(
        f'serving {uri} on http://{host}:{port}  (GET /ping, POST /invocations {{"inputs": [...]}})',
        highlight=False,
        soft_wrap=True,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def serve_command(uri: str, *, host: str, port: int, workers: int = 1) -> list[str]:
    """The ``mlflow models serve`` command line for a model (in this interpreter's environment)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "--model-uri",
        uri,
        "--env-manager",
        "local",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


# ------------------------------------------------------------------------------------------ reproduce
def reproduce(
    model: Annotated[str, typer.Argument(help="Registered version: models:/NAME/VERSION or models:/NAME@ALIAS.")],
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", "-d", help="The local data the version was trained on, if not its config's. Repeatable."
        ),
    ] = None,
    tolerance: Annotated[
        float, typer.Option(min=0, help="Largest difference in a metric still called the same.")
    ] = 0.01,
    verbose: VerboseOpt = False,
) -> None:
    """Re-run a registered version's exact resolved config on its data; compare the new metrics with the old.

    Refuses when the data now cleans to a different fingerprint. The new run trains from scratch and
    registers a new version (tagged forgeline.reproduces); the champion gate treats it like any other.

    Example:

        forgeline reproduce models:/forgeline-demo-lm/3
    """
    from forgeline.tasks.data.cleaning import DataError, clean_dataset
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG

    _quiet(verbose, progress=True)
    _cli()._prefect_env()
    if not model.startswith("models:/"):
        _fail(f"{model}: reproduce needs a registered model URI (models:/NAME/VERSION or models:/NAME@ALIAS)", 2)
    _tracking()
    version = _check_model_uri(model)
    expected = version.tags.get(FINGERPRINT_TAG)
    if not expected:
        _fail(f"{version.name} version {version.version} has no {FINGERPRINT_TAG} tag; cannot check its data")
    data_paths = _cli()._check_data(data)
    try:
        data_cfg = _version_data_config(version)
        cleaned = clean_dataset(data_cfg, data_override=data_paths, base_dir=Path.cwd())
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        _fail(str(exc), code=2 if isinstance(exc, DataError) else 1)
    if cleaned.fingerprint != expected:
        _fail(
            f"data changed: {version.name} version {version.version} was trained on data {expected[:12]}, "
            f"the data now cleans to {cleaned.fingerprint[:12]}; refusing to reproduce "
            "(point --data at the original data)"
        )
    try:
        cfg = _version_config(version)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    old = _version_metrics(version)
    from forgeline.flows.pipeline import pipeline_flow

    try:
        result = pipeline_flow(cfg.for_flow_run(), data=data_paths, fresh=True)
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except Exception as exc:  # noqa: BLE001 - one line and a non-zero exit
        _fail(_cli()._one_line(exc))
    client = _client()
    original = f"models:/{version.name}/{version.version}"
    with contextlib.suppress(Exception):
        client.set_tag(result.run_id, REPRODUCES_TAG, original)
    if result.version:
        with contextlib.suppress(Exception):
            client.set_model_version_tag(result.model_name, result.version, REPRODUCES_TAG, original)
    table, same = reproduce_table(old, result.metrics, version.version, result.version, tolerance)
    _print(table)
    verdict = "reproduced: every metric within" if same else "differs: some metric differs by more than"
    _print(f"{verdict} {tolerance:g} of version {version.version} (new version {result.version})")


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
        table.add_row(key, _num(a, 6), _num(b, 6), diff)
    return table, same


def _version_metrics(version: Any) -> dict[str, float]:
    """The headline metrics of the pipeline run that produced a version (tags as fallback)."""
    client = _client()
    metrics: dict[str, float] = {}
    train_run = version.tags.get("train_run_id") or version.run_id
    with contextlib.suppress(Exception):
        parent = client.get_run(train_run).data.tags.get("mlflow.parentRunId")
        if parent:
            found = client.get_run(parent).data.metrics
            for key in ("test/loss", "test/perplexity", "test/bits_per_byte", "val/loss"):
                if key in found:
                    metrics[key] = float(found[key])
    for tag, key in (("test_loss", "test/loss"), ("test_perplexity", "test/perplexity")):
        value = _float(version.tags.get(tag))
        if key not in metrics and value is not None:
            metrics[key] = value
    bpb = _float(version.tags.get("test_bits_per_byte"))
    if "test/bits_per_byte" not in metrics and bpb is not None:
        metrics["test/bits_per_byte"] = bpb
    return metrics


# ------------------------------------------------------------------------------------------ helpers
def _champion_uri(config: Path | None) -> str:
    cfg = _config(config, required=True)
    return f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}"


def _get_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        _fail(f"no registered model named {name!r}")


def _get_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    _get_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        _fail(f"{name} has no version {version}")


def _check_model_uri(uri: str) -> Any:
    """The model version a ``models:/`` URI names; one error line when it names none."""
    from mlflow.exceptions import MlflowException

    body = uri.removeprefix("models:/")
    client = _client()
    if "@" in body:
        name, alias = body.split("@", 1)
        _get_model(client, name)
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException:
            _fail(f"{name} has no alias {alias!r} (see `forgeline models {name}`)")
    name, _, version = body.rstrip("/").partition("/")
    if not version.isdigit():
        _fail(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS", code=2)
    return _get_version(client, name, version)


def _version_config_text(version: Any) -> tuple[str, str]:
    """``(train_run_id, text of its resolved_config.yaml)`` for a model version.

    Raises:
        ValueError: No train run or no ``resolved_config.yaml`` artifact.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = version.tags.get("train_run_id") or version.run_id
    if not run_id:
        raise ValueError(f"{version.name} version {version.version} names no train run")
    with tempfile.TemporaryDirectory(prefix="forgeline-config-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="resolved_config.yaml", dst_path=tmp
            )
        except (MlflowException, OSError) as exc:
            raise ValueError(f"train run {run_id} has no resolved_config.yaml artifact ({exc})") from None
        return run_id, Path(path).read_text(encoding="utf-8")


def _version_data_config(version: Any) -> Any:
    """Just the ``data`` section of a version's resolved config (enough to re-clean and fingerprint).

    Raises:
        ValueError: No config artifact, or a data section that no longer validates.
    """
    import yaml
    from forgeline.tasks.config import DataConfig
    from pydantic import ValidationError

    run_id, text = _version_config_text(version)
    tree = yaml.safe_load(text) or {}
    try:
        return DataConfig.model_validate(tree.get("data") or {})
    except ValidationError as exc:
        raise ValueError(f"resolved_config.yaml of run {run_id}: data section no longer loads ({exc})") from None


def _version_config(version: Any) -> Any:
    """The resolved config of the train run that produced a version.

    Raises:
        ValueError: No train run, no readable ``resolved_config.yaml`` artifact, or redacted values in it.
    """
    import yaml
    from forgeline.tasks.config import ConfigError, load_config

    run_id, text = _version_config_text(version)
    redacted = _redacted_keys(yaml.safe_load(text))
    if redacted:
        raise ValueError(
            f"resolved_config.yaml of run {run_id} has redacted values ({', '.join(redacted)}); "
            "it cannot be re-run exactly"
        )
    with tempfile.TemporaryDirectory(prefix="forgeline-config-") as tmp:
        path = Path(tmp) / "resolved_config.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path)
        except ConfigError as exc:
            raise ValueError(f"resolved_config.yaml of run {run_id} no longer loads: {exc}") from None


def _redacted_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose logged value is the redaction mark ``***``."""
    if isinstance(tree, dict):
        return [k for key, value in tree.items() for k in _redacted_keys(value, f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [k for i, value in enumerate(tree) for k in _redacted_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if tree == "***" else []


def _cache_root(cfg: Any) -> Path:
    root = Path(cfg.data.cache_dir)
    return root if root.is_absolute() else Path.cwd() / root


def _gate_promoted(version: Any) -> bool:
    tags = version.tags or {}
    return tags.get("forgeline.promoted") == "true" and MANUAL_TAG not in tags


def _port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _finite(value: Any) -> bool:
    return _float(value) is not None


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _duration(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    if not end:
        return "running"
    seconds = max(0, round((end - start) / 1000))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _who() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or "unknown"
    return f"{user}@{socket.gethostname()}"


# ------------------------------------------------------------------------------------------ register
def register(app: typer.Typer) -> None:
    """Add the everyday commands to the ``forgeline`` app (each finds a running stack first)."""
    for command in (compare, models, promote, rollback, generate, serve, reproduce):
        app.command()(_with_stack(command))


def _with_stack(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` preceded by :func:`forgeline.flows.stack.stack_env`, before it imports Prefect or MLflow."""

    @functools.wraps(command)  # typer reads the wrapped signature, options and help
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from forgeline.flows.stack import stack_env

        stack_env()  # after `forgeline up`, talk to that stack's servers; variables set by the user win
        command(*args, **kwargs)

    return wrapper
