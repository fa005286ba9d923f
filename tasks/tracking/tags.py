"""Tag names every Forgeline run carries, and the tags that say which code and process made a run."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

PROJECT_TAG = "forgeline.project"
OWNER_TAG = "forgeline.owner"  # host:pid of the process that owns a RUNNING run
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


def git_tags(base_dir: Path | None = None) -> dict[str, str]:
    """Git commit and dirty flag of the code that runs (empty outside a repository)."""
    cwd = str(base_dir or Path.cwd())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        "mlflow.source.git.commit": commit,
        "forgeline.git_commit": commit,
        "forgeline.git_dirty": str(bool(dirty)).lower(),
    }


def owner_tag() -> str:
    """``host:pid`` of this process: what :func:`forgeline.tasks.tracking.runs.reap_orphan_runs` checks."""
    return f"{socket.gethostname()}:{os.getpid()}"
