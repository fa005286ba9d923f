"""The ``forgeline`` command (also ``python -m forgeline`` and, from a clone, ``python -m flows``).

The entry module: the Typer app, the table of which command lives where, and :func:`main`. Every arrow
points down from here: the command modules import the leaves (:mod:`~forgeline.flows.cli.console`,
:mod:`~forgeline.flows.cli.options`, ...), never this module.

==========  ===========================================  ==========================================
group       module                                       commands
==========  ===========================================  ==========================================
runs        :mod:`forgeline.flows.cli.runs`              run, validate, ingest
history     :mod:`forgeline.flows.cli.history`           compare, reproduce
models      :mod:`forgeline.flows.cli.models`            models, promote, rollback
serving     :mod:`forgeline.flows.cli.serving`           generate, serve, ui
predict     :mod:`forgeline.flows.cli.predict`           predict
stack       :mod:`forgeline.flows.cli.stack`             up, down, status, deploy (and run --deployed)
compress    :mod:`forgeline.flows.cli.compress`          compress
==========  ===========================================  ==========================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from forgeline.flows.cli import compress, history, models, predict, runs, serving, stack, startup

app = typer.Typer(
    name="forgeline",
    help=(
        "Forgeline: clean data, tune, train, evaluate and register transformer language models, "
        "tracked in MLflow and orchestrated by Prefect.\n\n"
        "Quick start:  forgeline run --config configs/default.yaml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _with_stack(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` preceded by :func:`forgeline.flows.stack.stack_env`, before it imports Prefect or MLflow."""

    @functools.wraps(command)  # typer reads the wrapped signature, options and help
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from forgeline.flows.stack import stack_env

        stack_env()  # after `forgeline up`, talk to that stack's servers; variables set by the user win
        command(*args, **kwargs)

    return wrapper


# The command table, in the order `forgeline --help` lists it: (function, finds a running stack first).
# Commands without the flag find the stack themselves (run, ui, ingest) or are about the stack (up ... deploy).
COMMANDS: tuple[tuple[Callable[..., None], bool], ...] = (
    (runs.run, False),
    (runs.validate, False),
    (serving.ui, False),
    (history.compare, True),
    (models.models, True),
    (models.promote, True),
    (models.rollback, True),
    (serving.generate, True),
    (predict.predict, True),
    (serving.serve, True),
    (history.reproduce, True),
    (compress.compress, True),
    (stack.up, False),
    (stack.down, False),
    (stack.status, False),
    (stack.deploy, False),
    (runs.ingest, False),
)

for _command, _finds_stack in COMMANDS:
    app.command()(_with_stack(_command) if _finds_stack else _command)


def main() -> None:
    """Entry point of the ``forgeline`` console script."""
    startup.run_with_fast_exit(app)


if __name__ == "__main__":
    main()
