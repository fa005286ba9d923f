"""The tracking store: which one (URI), opening it safely, and the experiment runs go into.

Runs are created and ended explicitly through ``MlflowClient`` (not the fluent active-run stack); this
module points MLflow at the store once per process, and every other tracking module asks :func:`client`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from forgeline.tasks.config import TrackingConfig
from forgeline.tasks.locks import LockTimeout, host_lock
from forgeline.tasks.tracking.tags import PROJECT_TAG


class TrackingError(RuntimeError):
    """Tracking is misconfigured or unreachable; the message is one line."""


def resolve_tracking_uri(cfg: TrackingConfig, base_dir: Path | None = None) -> str:
    """Config, then ``$MLFLOW_TRACKING_URI``, then SQLite under ``mlruns/``.

    Raises:
        TrackingError: for the deprecated plain-folder store.
    """
    base = (base_dir or Path.cwd()).resolve()
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{base / 'mlruns' / 'mlflow.db'}"
    if uri.startswith("file:") or (
        not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks"))
    ):
        raise TrackingError(
            f"tracking URI {uri!r}: plain-folder stores are not supported; use sqlite:///PATH/mlflow.db or http://HOST:PORT"
        )
    return uri


def artifact_location(cfg: TrackingConfig, uri: str, base_dir: Path | None = None) -> str | None:
    """Artifact root for new experiments on a database store (a server chooses its own)."""
    if uri.startswith(("http:", "https:")):
        return None
    root = Path(cfg.artifact_root)
    if not root.is_absolute():
        root = (base_dir or Path.cwd()).resolve() / root
    return root.as_uri()


def setup_tracking(cfg: TrackingConfig, base_dir: Path | None = None) -> str:
    """Point MLflow at the configured store and check it answers. Returns the tracking URI."""
    import mlflow

    uri = resolve_tracking_uri(cfg, base_dir)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # child processes (trials, workers) follow the same store
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if uri.startswith(("http:", "https:")):
        check_server(uri)
    elif uri.startswith("sqlite:///"):
        _open_sqlite_store(uri)
    return uri


def tracking_uri() -> str:
    """The tracking URI this process records to."""
    import mlflow

    return mlflow.get_tracking_uri()


def _open_sqlite_store(uri: str, timeout: float = 300.0) -> None:
    # MLflow creates and migrates a new SQLite database without a lock, so two processes starting on a
    # fresh mlruns/ race through the migrations and one crashes ("duplicate column name", "Online
    # migration expected to match one row"; RELIABILITY.md B2). The first open of the store in each
    # process happens under a host-wide file lock; later opens hit MLflow's per-process store cache.
    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///"))
    lock_path = db.parent / "locks" / "store-init.lock"
    try:
        with host_lock(lock_path, timeout):
            c = MlflowClient(tracking_uri=uri, registry_uri=uri)
            c.search_experiments(max_results=1)
            c.search_registered_models(max_results=1)
    except LockTimeout:
        raise TrackingError(f"store {db}: another process held {lock_path} for over {timeout:.0f}s") from None


def check_server(uri: str, timeout: float = 5) -> None:
    """Ask a tracking server's ``/health`` endpoint once.

    Raises:
        TrackingError: it did not answer within ``timeout`` seconds.
    """
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except OSError as exc:
        raise TrackingError(f"tracking server {uri} is not reachable ({exc})") from None


def client() -> Any:
    """An ``MlflowClient`` for the current tracking URI."""
    from mlflow import MlflowClient

    return MlflowClient()


def ensure_experiment(name: str, cfg: TrackingConfig, base_dir: Path | None = None) -> str:
    """Get or create the experiment called ``name``; safe when two processes race to create it."""
    from mlflow.exceptions import MlflowException

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location(cfg, tracking_uri(), base_dir)
    try:
        return c.create_experiment(name, artifact_location=location, tags={PROJECT_TAG: "forgeline"})
    except MlflowException:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
