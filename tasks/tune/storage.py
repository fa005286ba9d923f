"""Durable study storage: RDB (SQLite under ``mlruns/`` by default, any SQLAlchemy URL via ``tune.storage``).

SQLite serializes writers: the storage is put in WAL mode with a 60 s busy timeout, which is enough for a
handful of local workers (each trial writes a few rows per evaluation). For many workers or several machines
use a server database (``tune.storage: postgresql+psycopg2://user:pass@host/db``); Optuna's journal storage is
faster than SQLite but does not support heartbeats, so crashed trials would not be detected and retried.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from forgeline.tasks.config import TuneConfig

STORAGE_FILE = "optuna.db"
SQLITE_TIMEOUT_S = 60


def default_storage_url(base_dir: Path | None = None) -> str:
    """SQLite file next to MLflow's store: ``sqlite:////ABS/mlruns/optuna.db``."""
    base = (base_dir or Path.cwd()).resolve()
    return f"sqlite:///{base / 'mlruns' / STORAGE_FILE}"


def resolve_storage_url(tune: TuneConfig, base_dir: Path | None = None) -> str:
    """``tune.storage``, else ``$FORGELINE_TUNE_STORAGE``, else the default (relative SQLite paths resolved)."""
    url = tune.storage or os.environ.get("FORGELINE_TUNE_STORAGE") or default_storage_url(base_dir)
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        url = prefix + str((base_dir or Path.cwd()).resolve() / url.removeprefix(prefix))
    return url


def display_url(url: str) -> str:
    """The storage URL with any password replaced by ``***`` (for logs, tags and params)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a parseable URL: show nothing secret-looking
        return url.split("@")[-1] if "@" in url else url


def make_storage(url: str, tune: TuneConfig) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats and bounded retries of crashed trials.

    For SQLite: the folder is created, the file put in WAL mode (readers never block the writer) and
    every connection waits up to 60 s for a lock instead of failing with "database is locked".
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as con:
            con.execute("PRAGMA journal_mode=WAL")
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    with quiet_experimental():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=tune.heartbeat_interval,
            grace_period=tune.grace_period or 2 * tune.heartbeat_interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=tune.max_retries, inherit_intermediate_values=True
            ),
        )


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna's experimental-feature warnings silenced (heartbeats and samplers we chose knowingly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield
