"""Exceptions shared by stages, free of any framework import."""

from __future__ import annotations


class StageInterrupted(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """The process was asked to stop (SIGTERM or Ctrl-C) and the stage saved what it could; runs end KILLED.

    Attributes:
        signum: The signal that asked (15 for SIGTERM, 2 for SIGINT); the CLI exits ``128 + signum``.
    """

    def __init__(self, message: str, signum: int = 15) -> None:
        super().__init__(message)
        self.signum = signum


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line meant for the user."""


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN or infinite for ``train.max_nonfinite_steps`` steps in a row."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An error's first line, cut to ``limit`` characters, for a one-line message (some raise with none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def is_transient(exc: BaseException) -> bool:
    """Whether a stage that raised ``exc`` may succeed when simply run again.

    Not transient: bad input the user must fix (``ValueError`` and its kin: ``DataError``, ``ConfigError``, a
    refused model, a split too small), a loss that stayed non-finite, and an interrupt. Anything else (a
    tracking store that did not answer, a full disk, a flaky network mount) is worth a retry.
    """
    return not isinstance(exc, ValueError | NonFiniteLossError | StageInterrupted | KeyboardInterrupt)
