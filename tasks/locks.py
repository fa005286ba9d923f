"""Host-wide file locks with a deadline (``flock``), shared by the tracking store and the registry."""

from __future__ import annotations

import fcntl
import time
from typing import IO


def acquire_within(fh: IO[str], timeout: float, poll: float = 0.05) -> bool:
    """Take an exclusive ``flock`` on ``fh``, polling until ``timeout`` seconds have passed.

    Returns:
        ``True`` once the lock is held; ``False`` if another process held it past the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)
