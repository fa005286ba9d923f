"""Shared end-to-end helpers: a throw-away project copy with its own FORGELINE_HOME and ports.

Each test module gets its own copy (module-scoped ``project`` fixture); whatever a test started through
``forgeline up`` is stopped when the module ends, even if the test failed before ``forgeline down``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Project:
    """A copy of the project with its own FORGELINE_HOME and ports; runs ``forgeline`` in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / ".forgeline"
        self.prefect_port = free_port()
        self.mlflow_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
        env.update(
            {
                "FORGELINE_HOME": str(self.home),
                "PREFECT_HOME": str(root / ".prefect-client"),
                "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            }
        )
        self.env = env

    def forgeline(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "forgeline", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"forgeline {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("project")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("flows", "tasks", "configs"):
        shutil.copytree(ROOT / name, root / name, ignore=ignore)
    proj = Project(root)
    try:
        yield proj
    finally:
        from forgeline.flows.stack import stop_stack

        stop_stack(proj.home, grace=5.0)  # no-op when the test already ran `forgeline down`


def stack_family(home: Path) -> list[psutil.Process]:
    from forgeline.flows.stack import read_state

    state = read_state(home)
    assert state is not None
    family = []
    for proc in state.procs:
        parent = psutil.Process(proc.pid)
        family += [parent, *parent.children(recursive=True)]
    return family


@contextlib.contextmanager
def prefect_client(api: str) -> Iterator[Any]:
    """A sync Prefect client for this stack's API (settings are read once; override them explicitly)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        yield client
