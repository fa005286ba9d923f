"""Host locks (filelock): exclusive across holders, a deadline, and which failures a stage retries."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from forgeline.tasks.config import ConfigError
from forgeline.tasks.errors import NonFiniteLossError, StageInterrupted, is_transient
from forgeline.tasks.locks import LockTimeout, holder_path, host_lock, lock_holder, owned_lock


def test_a_held_lock_times_out_for_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "a.lock"
    with host_lock(path, timeout=5), pytest.raises(LockTimeout, match="a.lock"), host_lock(path, timeout=0.2):
        pass
    with host_lock(path, timeout=0.2):  # free again once released
        pass


def test_a_waiting_holder_gets_the_lock_when_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "b.lock"
    order: list[str] = []
    release = threading.Event()

    def first() -> None:
        with host_lock(path):
            order.append("first")
            release.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    while not order:
        pass
    release.set()
    with host_lock(path, timeout=5):
        order.append("second")
    thread.join()
    assert order == ["first", "second"]


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OSError("store went away"), True),
        (RuntimeError("tracking server is not reachable"), True),
        (ConfigError("bad key"), False),
        (ValueError("split too small"), False),
        (NonFiniteLossError("nan"), False),
        (StageInterrupted("stop"), False),
    ],
)
def test_only_transient_failures_are_worth_a_retry(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_a_waiter_is_told_which_process_holds_an_owned_lock(tmp_path: Path) -> None:
    path = tmp_path / "lineage.lock"
    told: list[str] = []
    with owned_lock(path):
        assert f"pid {os.getpid()} on {socket.gethostname()}" in lock_holder(path)
        with (
            pytest.raises(LockTimeout, match=rf"held by pid {os.getpid()} on "),
            owned_lock(path, timeout=0.3, on_wait=told.append),
        ):
            pass
    assert len(told) == 1 and told[0].startswith(f"pid {os.getpid()} on {socket.gethostname()} since ")
    assert not holder_path(path).exists()  # released: nobody named any more
    assert lock_holder(path) == "another process"
    with owned_lock(path, timeout=0.3, on_wait=told.append):  # free again, and nobody waited
        pass
    assert len(told) == 1
