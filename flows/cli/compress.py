"""The ``compress`` command: distil the champion (or any registered version) into a smaller registered student."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from forgeline.flows.cli import console, lookup
from forgeline.flows.cli.console import EXIT_BAD_INPUT, EXIT_INTERRUPTED, fail, show
from forgeline.flows.cli.options import ConfigOpt, SetOpt, VerboseOpt, load


def compress(
    model_uri: Annotated[
        str | None,
        typer.Argument(help="Teacher: models:/NAME/VERSION or models:/NAME@ALIAS (default: the config's champion)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Distil (or prune) a registered teacher into a smaller student, registered with its trade-off.

    The student is described by the config's `compress` section and registered as `<model>-small` (or
    compress.model_name); it becomes that model's champion only if its task metric (bits per byte; a
    classifier's test macro F1; a completion model's test ROUGE-L) is within compress.max_quality_drop of the
    teacher's, relative.

    Examples:

      forgeline compress --config configs/shakespeare_char.yaml

      forgeline compress models:/forgeline-demo-lm/3 --set compress.layers_from_teacher='[0, 2]'

      forgeline compress --set compress.method=prune --set compress.n_inner=256
    """
    cfg = load(config, set_)
    console.prefect_env()
    console.configure_logging(verbose)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    lookup.open_store(cfg)
    from forgeline.flows.compress import compress_flow
    from forgeline.tasks.errors import StageInterrupted

    try:
        outcome = compress_flow(cfg.for_flow_run(), teacher_uri=model_uri)
    except KeyboardInterrupt:
        fail("interrupted; re-run the same command to resume from the last checkpoint", code=EXIT_INTERRUPTED)
    except StageInterrupted as exc:
        fail(f"{exc}; re-run the same command to resume", code=128 + exc.signum)
    except ValueError as exc:  # CompressError, DataError, ConfigError: input the user can fix, said in its message
        fail((str(exc).strip().splitlines() or [type(exc).__name__])[0], code=EXIT_BAD_INPUT)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line and a non-zero exit
        if verbose:
            console.err.print_exception()
        fail(console.one_line(exc))
    reg = outcome.registered
    show(markdown_table(outcome.table))
    verdict = "champion" if reg.promoted else "registered without alias"
    show(f"teacher {outcome.teacher_uri} -> {reg.model_name} version {reg.version}: {verdict} ({reg.reason})")


def markdown_table(table: dict[str, list]) -> str:
    """The trade-off table as aligned text."""
    from forgeline.tasks.compress.measure import tradeoff_markdown

    return tradeoff_markdown(table)
