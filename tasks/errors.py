"""Exceptions shared by stages, free of any framework import."""

from __future__ import annotations


class StageInterrupted(BaseException):  # noqa: N818 - an interrupt, like KeyboardInterrupt
    """The process was asked to stop (SIGTERM) and the stage saved what it could; runs end KILLED."""


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN or infinite for ``train.max_nonfinite_steps`` steps in a row."""
