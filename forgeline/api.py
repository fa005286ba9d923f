"""The Python API: load a config and run the pipeline (or compress a model) in-process, as the CLI does."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgeline.tasks.config import ConfigError, PipelineConfig
from forgeline.tasks.config import load_config as _load_config

if TYPE_CHECKING:
    from forgeline.flows.compress import CompressOutcome
    from forgeline.flows.pipeline import PipelineResult

__all__ = ["ConfigError", "compress", "load_config", "run"]

Overrides = Mapping[str, Any] | Sequence[str] | None


def _override_lines(overrides: Overrides) -> list[str]:
    """``{"train.max_steps": 20}`` -> ``["train.max_steps=20"]``; strings pass through as ``--set`` values."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        # JSON is YAML: a value keeps its type (numbers, lists, null) when the loader parses it back.
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return list(overrides)


def load_config(path: str | Path | None = None, overrides: Overrides = None) -> PipelineConfig:
    """Load and validate a pipeline config, as ``forgeline validate`` does.

    Args:
        path: A YAML file; None gives the built-in defaults.
        overrides: Dotted keys and values (``{"train.max_steps": 20}``) or ``--set`` strings
            (``["train.max_steps=20"]``), applied after the file.

    Returns:
        The validated config tree.

    Raises:
        ConfigError: A missing file, bad YAML, an unknown key or a bad value, in one line naming it.
    """
    return _load_config(path, _override_lines(overrides))


def run(
    config: str | Path | PipelineConfig = "configs/default.yaml",
    overrides: Overrides = None,
    *,
    data: Sequence[str] | None = None,
    fresh: bool = False,
) -> PipelineResult:
    """Run the pipeline in this process: clean, (tune), train, evaluate, register.

    The stores live under the working directory (``mlruns/``) unless the config's ``tracking``
    section or ``MLFLOW_TRACKING_URI`` say otherwise; Prefect runs against ``PREFECT_API_URL`` or a
    temporary local server, exactly as ``forgeline run`` does.

    Args:
        config: A YAML path or an already loaded config.
        overrides: Applied to a YAML path (see :func:`load_config`); not allowed with a loaded config.
        data: Files, globs or folders replacing ``data.sources`` (``forgeline run --data``).
        fresh: Train anew even if this config and data already produced a model.

    Returns:
        The run summary: experiment and run ids, the model version, the champion decision, metrics.

    Raises:
        ConfigError: A bad config or override.
        forgeline.tasks.data.cleaning.DataError: Bad input data (file and line named).
    """
    cfg = _resolve(config, overrides)
    from forgeline.flows.contract import set_flow_env_defaults

    set_flow_env_defaults()  # before the pipeline's imports bring Prefect in
    from forgeline.flows.pipeline import pipeline_flow

    return pipeline_flow(cfg.for_flow_run(), data=list(data) if data else None, fresh=fresh)


def compress(
    config: str | Path | PipelineConfig = "configs/default.yaml",
    overrides: Overrides = None,
    *,
    teacher: str | None = None,
) -> CompressOutcome:
    """Distil (or prune) a registered teacher into a smaller student in this process, as ``forgeline compress``.

    The config's ``compress`` section describes the student; it is registered as ``<model>-small`` (or
    ``compress.model_name``) with its trade-off table, and becomes that model's champion only if its task
    metric (bits per byte; a classifier's test macro F1) is within ``compress.max_quality_drop`` of the teacher's.

    Args:
        config: A YAML path or an already loaded config.
        overrides: Applied to a YAML path (see :func:`load_config`); not allowed with a loaded config.
        teacher: ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; None: the config's champion.

    Returns:
        The teacher's pinned URI, the compress run id, the registered student (``registered.version``,
        ``registered.promoted``, ``registered.reason``) and the trade-off ``table`` (columns ``quantity``,
        ``teacher``, ``student``, ``student/teacher``).

    Raises:
        ConfigError: A bad config or override.
        forgeline.tasks.compress.student.CompressError: A teacher that does not exist or a student that is not
            smaller, or does not fit the teacher (one line naming it).
    """
    cfg = _resolve(config, overrides)
    from forgeline.flows.contract import set_flow_env_defaults

    set_flow_env_defaults()
    from forgeline.flows.compress import compress_flow

    return compress_flow(cfg.for_flow_run(), teacher_uri=teacher)


def _resolve(config: str | Path | PipelineConfig, overrides: Overrides) -> PipelineConfig:
    if isinstance(config, PipelineConfig):
        if overrides:
            raise ConfigError("overrides: apply them with forgeline.load_config(path, overrides) first")
        return config
    return load_config(config, overrides)
