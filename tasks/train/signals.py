"""Stopping training cleanly: SIGTERM and Ctrl-C finish the step, checkpoint, and end the run KILLED."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def stop_on_signal() -> Iterator[threading.Event]:
    """An event set on SIGTERM or SIGINT (main thread only); the loop checkpoints and stops after the step."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    # Ctrl-C behaves like SIGTERM while training: finish the step, checkpoint, stop.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _stop(signum: int, _frame: object) -> None:
        event.signum = signum  # type: ignore[attr-defined] - which signal decides the exit code
        event.set()

    for sig in previous:
        signal.signal(sig, _stop)
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
