"""Finding things in the MLflow store for a command: the store itself, a model, a version and its config.

Each helper ends the command with one ``error:`` line when what it looks for is missing. The store is the one
the pipeline uses: the running stack's MLflow server after ``forgeline up`` (found through
``$FORGELINE_HOME``), ``$MLFLOW_TRACKING_URI`` when set (it wins), else SQLite under ``./mlruns`` (or the
``tracking`` section of ``--config`` when one is given). MLflow itself is reached only through
:mod:`forgeline.tasks.tracking`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgeline.flows.cli.console import EXIT_BAD_INPUT, fail
from forgeline.flows.cli.format import to_float
from forgeline.flows.cli.options import find_config

if TYPE_CHECKING:
    from forgeline.tasks.config import DataConfig, PipelineConfig, RegistryConfig

HEADLINE_METRICS = ("test/loss", "test/perplexity", "test/bits_per_byte", "val/loss")


def open_store(cfg: PipelineConfig | None = None, *, must_exist: bool = True) -> str:
    """Point MLflow at the store and return its URI; refuse to create an empty SQLite store for a read.

    Args:
        cfg: The config whose ``tracking`` section to use (default: the defaults).
        must_exist: Fail when the store is a SQLite file that does not exist yet.
    """
    from forgeline.tasks.config import TrackingConfig
    from forgeline.tasks.tracking.store import TrackingError, resolve_tracking_uri, setup_tracking

    tracking_cfg = cfg.tracking if cfg is not None else TrackingConfig()
    try:
        uri = resolve_tracking_uri(tracking_cfg)
        if must_exist and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            fail(
                f"no MLflow store at {uri.removeprefix('sqlite:///')}; run `forgeline run` here first "
                "(or set MLFLOW_TRACKING_URI)"
            )
        return setup_tracking(tracking_cfg)
    except TrackingError as exc:
        fail(str(exc))


def registry_settings(cfg: PipelineConfig | None) -> RegistryConfig:
    """The config's ``registry`` section, or its defaults without a config."""
    from forgeline.tasks.config import RegistryConfig

    return cfg.registry if cfg is not None else RegistryConfig()


def champion_uri(config: Path | None) -> str:
    """``models:/NAME@ALIAS`` of the champion that ``--config`` (or configs/default.yaml) names."""
    cfg = find_config(config, required=True)
    assert cfg is not None  # find_config(required=True) fails instead of returning None
    return f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}"


def require_model(name: str) -> Any:
    """The registered model ``name``; one error line when there is none."""
    from forgeline.tasks.tracking import queries

    model = queries.registered_model(name)
    if model is None:
        fail(f"no registered model named {name!r}")
    return model


def require_version(name: str, version: str) -> Any:
    """Version ``version`` of registered model ``name``; one error line when either is missing."""
    from forgeline.tasks.tracking import queries

    require_model(name)
    found = queries.model_version(name, version)
    if found is None:
        fail(f"{name} has no version {version}")
    return found


def resolve_model_uri(uri: str) -> Any:
    """The model version a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` URI names; one error line if none."""
    from forgeline.tasks.tracking import queries

    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        require_model(name)
        found = queries.version_by_alias(name, alias)
        if found is None:
            fail(f"{name} has no alias {alias!r} (see `forgeline models {name}`)")
        return found
    name, _, version = body.rstrip("/").partition("/")
    if not version.isdigit():
        fail(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS", code=EXIT_BAD_INPUT)
    return require_version(name, version)


def version_config_text(version: Any) -> tuple[str, str]:
    """``(train_run_id, text of its resolved_config.yaml)`` for a model version.

    Raises:
        ValueError: No train run or no ``resolved_config.yaml`` artifact.
    """
    from forgeline.tasks.tracking import queries

    run_id = version.tags.get("train_run_id") or version.run_id
    if not run_id:
        raise ValueError(f"{version.name} version {version.version} names no train run")
    return run_id, queries.download_text_artifact(run_id, "resolved_config.yaml")


def version_data_config(version: Any) -> DataConfig:
    """Just the ``data`` section of a version's resolved config (enough to re-clean and fingerprint).

    Raises:
        ValueError: No config artifact, or a data section that no longer validates.
    """
    import yaml
    from pydantic import ValidationError

    from forgeline.tasks.config import DataConfig

    run_id, text = version_config_text(version)
    tree = yaml.safe_load(text) or {}
    try:
        return DataConfig.model_validate(tree.get("data") or {})
    except ValidationError as exc:
        raise ValueError(f"resolved_config.yaml of run {run_id}: data section no longer loads ({exc})") from None


def version_config(version: Any) -> PipelineConfig:
    """The resolved config of the train run that produced a version.

    Raises:
        ValueError: No train run, no readable ``resolved_config.yaml`` artifact, or redacted values in it.
    """
    import yaml

    from forgeline.tasks.config import ConfigError, load_config

    run_id, text = version_config_text(version)
    redacted = redacted_keys(yaml.safe_load(text))
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


def redacted_keys(tree: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose logged value is the redaction mark ``***``."""
    if isinstance(tree, dict):
        return [k for key, value in tree.items() for k in redacted_keys(value, f"{prefix}{key}.")]
    if isinstance(tree, list):
        return [k for i, value in enumerate(tree) for k in redacted_keys(value, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if tree == "***" else []


def version_metrics(version: Any) -> dict[str, float]:
    """The test figures of the pipeline run that produced a version (its metric tags as fallback).

    A language model's loss, perplexity and bits per byte (and ``val/loss``); a classifier's ``test/...`` and
    ``baseline/...`` figures.
    """
    from forgeline.tasks.tracking import queries

    found = queries.parent_run_metrics(version.tags.get("train_run_id") or version.run_id)
    metrics = {k: v for k, v in found.items() if k in HEADLINE_METRICS or k.startswith(TAGGED_PREFIXES)}
    for tag, text in (version.tags or {}).items():
        prefix = next((p for p in TAGGED_PREFIXES if tag.startswith(p.replace("/", "_"))), None)
        value = to_float(text)
        if prefix is None or value is None:
            continue
        key = prefix + tag[len(prefix) :]
        metrics.setdefault(key, value)
    return metrics


TAGGED_PREFIXES = ("test/", "baseline/")
"""Metrics stored as version tags under these prefixes (``test/f1_macro`` as ``test_f1_macro``)."""


def cache_root(cfg: PipelineConfig) -> Path:
    """The config's ``data.cache_dir``, absolute (relative to the working directory)."""
    root = Path(cfg.data.cache_dir)
    return root if root.is_absolute() else Path.cwd() / root
