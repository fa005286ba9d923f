"""The stack's stores: which database or folder each server uses, and checking they answer.

Stores (:class:`Backends`): SQLite under ``FORGELINE_HOME`` unless an option or environment variable
names a database (PostgreSQL for all three: the Prefect server, MLflow's backend store and the Optuna
storage the workers' tune runs use). Passwords in those URLs travel only in the environment of the one
process that needs them; ``stack.json``, logs, process command lines and ``forgeline status`` show them
masked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from forgeline.tasks.config import mask_url_secrets

# Where `forgeline up` reads its stores from when no option names them (each tool's own variable second).
PREFECT_DATABASE_ENV = "FORGELINE_PREFECT_DATABASE_URL"
MLFLOW_BACKEND_ENV = "FORGELINE_MLFLOW_BACKEND_STORE_URI"
MLFLOW_ARTIFACTS_ENV = "FORGELINE_MLFLOW_ARTIFACTS_DESTINATION"
TUNE_STORAGE_ENV = (
    "FORGELINE_TUNE_STORAGE"  # read by forgeline.tasks.tune.storage.resolve_storage_url when tune.storage is null
)
PREFECT_OWN_DATABASE_ENVS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
MLFLOW_OWN_BACKEND_ENV = "MLFLOW_BACKEND_STORE_URI"
MLFLOW_OWN_ARTIFACTS_ENV = "MLFLOW_ARTIFACTS_DESTINATION"
# Never handed to a process that does not need them (they may hold passwords).
STORE_ENVS = (
    PREFECT_DATABASE_ENV,
    MLFLOW_BACKEND_ENV,
    MLFLOW_ARTIFACTS_ENV,
    TUNE_STORAGE_ENV,
    *PREFECT_OWN_DATABASE_ENVS,
    MLFLOW_OWN_BACKEND_ENV,
    MLFLOW_OWN_ARTIFACTS_ENV,
)


def _split_scheme(url: str) -> tuple[str, str]:
    """``("postgresql", "user:pw@host/db")`` for ``postgresql+asyncpg://user:pw@host/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{mask_url_secrets(url)!r} is not a URL (expected SCHEME://...)")
    return scheme.split("+", 1)[0].lower(), rest


def prefect_database_url(url: str) -> str:
    """The Prefect server's SQLAlchemy URL: PostgreSQL through asyncpg, SQLite through aiosqlite.

    Raises:
        ValueError: a scheme Prefect's server cannot use (it supports PostgreSQL and SQLite only).
    """
    base, rest = _split_scheme(url)
    if base in ("postgresql", "postgres"):
        return f"postgresql+asyncpg://{rest}"
    if base == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    raise ValueError(f"Prefect database {mask_url_secrets(url)!r}: the Prefect server supports postgresql and sqlite")


def sync_database_url(url: str) -> str:
    """A URL for a synchronous SQLAlchemy client (MLflow, Optuna).

    PostgreSQL without a driver, or with asyncpg, gets ``postgresql+psycopg2://``: SQLAlchemy 2.1's default
    PostgreSQL driver is psycopg 3, which Forgeline does not install (``psycopg2-binary`` is in the
    ``postgres`` extra). Any other URL, and any other explicit driver, is returned as given.
    """
    base, rest = _split_scheme(url)
    scheme = url.partition("://")[0].lower()
    if base in ("postgresql", "postgres") and (scheme in ("postgresql", "postgres") or scheme.endswith("+asyncpg")):
        return f"postgresql+psycopg2://{rest}"
    return url


@dataclass(frozen=True)
class Backends:
    """The stores of one stack, as the processes receive them (passwords included: never log this)."""

    prefect_database_url: str
    mlflow_backend_store_uri: str
    mlflow_artifacts_destination: str
    tune_storage: str | None = None

    def described(self) -> dict[str, str]:
        """What ``stack.json`` and ``forgeline status`` show: every URL with its password masked."""
        return {
            "prefect database": mask_url_secrets(self.prefect_database_url),
            "mlflow backend": mask_url_secrets(self.mlflow_backend_store_uri),
            "mlflow artifacts": mask_url_secrets(self.mlflow_artifacts_destination),
            "optuna storage": mask_url_secrets(self.tune_storage)
            if self.tune_storage
            else "per config (tune.storage; default sqlite mlruns/optuna.db)",
        }


def resolve_backends(
    home: Path,
    *,
    prefect_database: str | None = None,
    mlflow_backend_store: str | None = None,
    mlflow_artifacts: str | None = None,
    tune_storage: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Backends:
    """Each store from its argument, else ``FORGELINE_*``, else the tool's own variable, else SQLite in ``home``.

    Args:
        home: ``FORGELINE_HOME`` (the SQLite files and local artifacts live under it).
        prefect_database: Prefect server database URL (``postgresql://...`` gets the asyncpg driver).
        mlflow_backend_store: MLflow backend store URI (``postgresql://...``, ``sqlite:///...``).
        mlflow_artifacts: MLflow ``--artifacts-destination`` (a folder, or ``s3://...`` and friends).
        tune_storage: Optuna storage handed to the workers as ``$FORGELINE_TUNE_STORAGE``.
        environ: The environment to read (default ``os.environ``).

    Raises:
        ValueError: a URL a server cannot use.
    """
    env = os.environ if environ is None else environ

    def pick(value: str | None, *names: str) -> str | None:
        return value or next((env[n] for n in names if env.get(n)), None)

    prefect = pick(prefect_database, PREFECT_DATABASE_ENV, *PREFECT_OWN_DATABASE_ENVS)
    mlflow = pick(mlflow_backend_store, MLFLOW_BACKEND_ENV, MLFLOW_OWN_BACKEND_ENV)
    tune = pick(tune_storage, TUNE_STORAGE_ENV)
    return Backends(
        prefect_database_url=prefect_database_url(prefect or f"sqlite:///{home / 'prefect' / 'prefect.db'}"),
        mlflow_backend_store_uri=sync_database_url(mlflow or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"),
        mlflow_artifacts_destination=pick(mlflow_artifacts, MLFLOW_ARTIFACTS_ENV, MLFLOW_OWN_ARTIFACTS_ENV)
        or str(home / "mlflow" / "artifacts"),
        tune_storage=sync_database_url(tune) if tune else None,
    )


def check_database_reachable(url: str, what: str, timeout: float = 5.0) -> None:
    """Fail fast, before any server starts, when a network database does not accept connections.

    Raises:
        RuntimeError: the host:port of a PostgreSQL (or other networked) URL refuses or times out.
    """
    import socket

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not SQLAlchemy's syntax: the server itself says what is wrong
        return
    if parsed.get_backend_name() == "sqlite" or not parsed.host:
        return  # a file, or a Unix socket the driver finds itself
    port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(parsed.get_backend_name(), 0)
    try:
        with socket.create_connection((parsed.host, port), timeout=timeout):
            return
    except OSError as exc:
        raise RuntimeError(
            f"{what} {mask_url_secrets(url)}: cannot connect to {parsed.host}:{port} ({exc.strerror or exc})"
        ) from None
