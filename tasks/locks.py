"""Host-wide file locks with a deadline (``filelock``), shared by the tracking store, the registry and ingest."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
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


def holder_path(path: str | Path) -> Path:
    """The file beside lock ``path`` that names its holder (the lock file itself is truncated by every try)."""
    path = Path(path)
    return path.with_name(path.name + ".holder")


def lock_holder(path: str | Path) -> str:
    """Who holds lock ``path``, as ``pid N on HOST since TIME``; ``another process`` if it does not say."""
    try:
        text = holder_path(path).read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "another process"


@contextlib.contextmanager
def owned_lock(
    path: str | Path,
    *,
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    poll: float = 0.2,
) -> Iterator[None]:
    """:func:`host_lock` that names its holder to whoever has to wait for it.

    The holder writes ``pid N on HOST since TIME`` beside the lock file (:func:`holder_path`). The lock
    itself is an OS lock: it is released when its process dies, however it dies, so it never goes stale.

    Args:
        path: The lock file.
        timeout: Seconds to wait; ``None`` waits as long as it takes.
        on_wait: Called once with the holder's description when the lock is not free at first.
        poll: Seconds between two attempts.

    Raises:
        LockTimeout: the lock was not free within ``timeout`` seconds; the message names the holder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        holder = _holder_soon(path)
        if on_wait is not None:
            on_wait(holder)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=poll)
        except filelock.Timeout:
            raise LockTimeout(f"{path} held by {lock_holder(path)} for over {timeout:.0f}s") from None
    me = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
    holder_file = holder_path(path)
    try:
        holder_file.write_text(me, encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            holder_file.unlink()
        lock.release()


def _holder_soon(path: Path, wait: float = 1.0) -> str:
    # The holder writes its name just after taking the lock; a waiter that comes in between waits a moment.
    deadline = time.monotonic() + wait
    holder = lock_holder(path)
    while holder == "another process" and time.monotonic() < deadline:
        time.sleep(0.05)
        holder = lock_holder(path)
    return holder
