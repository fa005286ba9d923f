"""What every command prints through and how it ends: the two consoles, one-line errors, exit codes, logging.

A leaf of the command line: it imports nothing from ``forgeline``. Results go to standard output
(:data:`out`); errors, warnings and log lines to standard error (:data:`err`). Every failure ends as one
``error:`` line and a non-zero exit (docs/troubleshooting.md lists the codes).
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum
from typing import Any, NoReturn

import typer
from rich.console import Console

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2  # a config, data or argument the user can fix
EXIT_INTERRUPTED = 130  # Ctrl-C; SIGTERM during a stage ends 143 (128 + the signal)

err = Console(stderr=True)
out = Console()

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
"""Log lines where standard error is no terminal (a file, a pipe, CI): one event, one line, never wrapped."""


class Output(StrEnum):
    """How a listing command prints its result (``--output``)."""

    TABLE = "table"  # for people: fits the terminal's width
    CSV = "csv"  # for scripts: every column, nothing cut
    JSON = "json"


# Exceptions whose message already says what went wrong; others get their type name in front.
_SELF_EXPLAINING = {"ConfigError", "DataError", "TrackingError", "CheckpointError", "NonFiniteLossError", "ValueError"}


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print ``error: message`` on standard error and end the command with exit status ``code``.

    Raises:
        typer.Exit: always.
    """
    from rich.markup import escape

    # the message is the user's text (``choices: [ten]``), never markup: unescaped, rich ate the brackets
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def show(renderable: Any) -> None:
    """Print a result (text or a rich table) on standard output, as it is (no highlighting, no wrapping)."""
    out.print(renderable, highlight=False, soft_wrap=True)


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, with its type name unless the message explains itself."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if type(exc).__name__ in _SELF_EXPLAINING and first else f"{type(exc).__name__}: {first}"


_ENGINE_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _drop_engine_failures(record: logging.LogRecord) -> bool:
    """Prefect's engine logs every failed task and flow run, traceback included; the command says it in one line.

    Only the terminal copy is dropped: the records still reach the Prefect API (the run's logs in the UI),
    and ``--verbose`` shows them here too.
    """
    return not (record.levelno >= logging.ERROR and record.name.startswith(_ENGINE_LOGGERS))


def log_handler() -> logging.Handler:
    """Rich's columns on a terminal; elsewhere plain :data:`LOG_FORMAT` lines.

    Rich wraps each message to the console's width (80 columns when standard error is a file or a pipe), which
    splits one event over several lines of a log file or a CI log.
    """
    if err.is_terminal:
        from rich.logging import RichHandler

        return RichHandler(console=err, show_path=False, rich_tracebacks=False, markup=False)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    return handler


def configure_logging(verbose: bool) -> None:
    """Our log lines at INFO (DEBUG with ``verbose``) on standard error; libraries only when they fail."""
    level = logging.DEBUG if verbose else logging.INFO
    handler = log_handler()
    if not verbose:
        handler.addFilter(_drop_engine_failures)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    logging.getLogger("forgeline").setLevel(level)
    # Library chatter (hub model cards, weight-loading bars) says nothing useful about a local run.
    for name in ("mlflow.transformers", "mlflow.models.model", "mlflow.store.db.utils", "transformers", "optuna"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def quiet_logging(verbose: bool, *, progress: bool = False) -> None:
    """Logging for a registry command: our INFO lines only with ``progress`` (or ``verbose``); no download bars."""
    configure_logging(verbose)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not (verbose or progress):
        logging.getLogger("forgeline").setLevel(logging.WARNING)
    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def prefect_env() -> None:
    """Prefect's settings for a command that runs flows; call before Prefect is imported (it reads them once)."""
    from forgeline.flows.contract import set_flow_env_defaults

    set_flow_env_defaults()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the command prints its own summary
