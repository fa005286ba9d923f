"""Host-wide file locks with a deadline (``filelock``), shared by the tracking store, the registry and ingest."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import filelock


class LockTimeout(TimeoutError):
    """Another process held the lock past the deadline; the message names the lock file."""


@contextlib.contextmanager
def host_lock(path: str | Path, timeout: float | None = None, poll: float = 0.05) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with its folder) for the ``with`` block.

    Each call opens its own lock, so two holders in one process exclude each other like two processes do
    (the lock is not re-entrant).

    Args:
        path: The lock file.
        timeout: Seconds to wait; ``None`` waits as long as it takes.
        poll: Seconds between two attempts.

    Raises:
        LockTimeout: the lock was not free within ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=poll)
    except filelock.Timeout:
        raise LockTimeout(f"{path} held by another process for over {timeout:.0f}s") from None
    try:
        yield
    finally:
        lock.release()
