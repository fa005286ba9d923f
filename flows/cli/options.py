"""Options shared by the commands, defined once, and the helpers that turn them into a config.

``--config`` and ``--set`` mean the same in every command that takes them; so do ``--data``, ``--verbose``,
``--home`` and ``--output``. Each is an ``Annotated`` type a command declares its parameter with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from forgeline.flows.cli.console import EXIT_BAD_INPUT, Output, fail

if TYPE_CHECKING:
    from forgeline.tasks.config import PipelineConfig

DEFAULT_CONFIG = Path("configs/default.yaml")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"Pipeline config (YAML): its settings, experiment name, registry and tracking store "
        f"(default: {DEFAULT_CONFIG}).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: dotted.key=value (value read as YAML). Repeatable."),
]
DataOpt = Annotated[
    list[str] | None,
    typer.Option("--data", "-d", help="Use these local files, globs or directories as the data. Repeatable."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", envvar="FORGELINE_HOME", help="Stack state, logs and stores (default: ./.forgeline)."),
]

OutputOpt = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table: for reading, fitted to the terminal (one block per row where a table does not fit); "
        "csv or json: every column in full, on standard output, for scripts.",
    ),
]


def config_path(config: Path | None) -> Path:
    """The ``--config`` given, else :data:`DEFAULT_CONFIG`."""
    return config if config is not None else DEFAULT_CONFIG


def load(config: Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """The config of ``--config`` (default :data:`DEFAULT_CONFIG`) with the ``--set`` overrides; exit 2 if invalid."""
    from forgeline.tasks.config import ConfigError, load_config

    try:
        return load_config(config_path(config), overrides or [])
    except ConfigError as exc:
        fail(str(exc), code=EXIT_BAD_INPUT)


def load_if_given(config: Path | None) -> PipelineConfig | None:
    """The config of ``--config`` when one was given, else ``None`` (the command's defaults apply)."""
    return load(config) if config is not None else None


def find_config(config: Path | None, *, required: bool) -> PipelineConfig | None:
    """The config given with ``--config``, else :data:`DEFAULT_CONFIG` if present here, else ``None``.

    Args:
        config: The ``--config`` option.
        required: Exit 2 instead of returning ``None`` when neither exists.
    """
    if config is None and not DEFAULT_CONFIG.exists():
        if required:
            fail(f"no --config given and {DEFAULT_CONFIG} does not exist here; pass --config PATH", EXIT_BAD_INPUT)
        return None
    return load(config)


def check_data(data: list[str] | None) -> list[str] | None:
    """The ``--data`` paths when each names existing data, ``None`` when none were given; exit 2 otherwise."""
    if not data:
        return None
    from forgeline.tasks.data.cleaning import DataError, resolve_data_override

    try:
        resolve_data_override(data)
    except DataError as exc:
        fail(str(exc), code=EXIT_BAD_INPUT)
    return data
