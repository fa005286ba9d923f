"""The local stack behind ``forgeline up`` / ``down`` / ``status``: stores, exposure, state, processes.

``up`` starts, on 127.0.0.1, a Prefect server, an MLflow server and one Prefect worker per work pool, and
records them in ``$FORGELINE_HOME/stack.json`` so that ``down`` stops exactly those processes and every other
``forgeline`` command finds the stack (:func:`stack_env`). The rooms:

- :mod:`forgeline.flows.stack.stores`: which database or folder each server uses (:class:`Backends`).
- :mod:`forgeline.flows.stack.exposure`: loopback only, own ``Host`` and ``Origin`` only (:class:`HostOriginGuard`).
- :mod:`forgeline.flows.stack.state`: ``stack.json`` and finding a running stack.
- :mod:`forgeline.flows.stack.processes`: starting, stopping and restarting the processes.

The commands themselves live in :mod:`forgeline.flows.cli.stack`. The names below are the stack's public API.
"""

from forgeline.flows.stack.exposure import HOST, HostOriginGuard, loopback_hosts, loopback_origins, serve_prefect
from forgeline.flows.stack.processes import (
    DEFAULT_MLFLOW_PORT,
    DEFAULT_POOLS,
    DEFAULT_PREFECT_PORT,
    base_env,
    describe,
    restart_missing_workers,
    start_stack,
    stop_stack,
)
from forgeline.flows.stack.state import (
    STATE_FILE,
    Proc,
    StackState,
    forgeline_home,
    http_ok,
    read_state,
    servers_alive,
    stack_env,
    state_path,
    write_state,
)
from forgeline.flows.stack.stores import (
    MLFLOW_ARTIFACTS_ENV,
    MLFLOW_BACKEND_ENV,
    PREFECT_DATABASE_ENV,
    STORE_ENVS,
    TUNE_STORAGE_ENV,
    Backends,
    check_database_reachable,
    prefect_database_url,
    resolve_backends,
    sync_database_url,
)

__all__ = [
    "DEFAULT_MLFLOW_PORT",
    "DEFAULT_POOLS",
    "DEFAULT_PREFECT_PORT",
    "HOST",
    "MLFLOW_ARTIFACTS_ENV",
    "MLFLOW_BACKEND_ENV",
    "PREFECT_DATABASE_ENV",
    "STATE_FILE",
    "STORE_ENVS",
    "TUNE_STORAGE_ENV",
    "Backends",
    "HostOriginGuard",
    "Proc",
    "StackState",
    "base_env",
    "check_database_reachable",
    "describe",
    "forgeline_home",
    "http_ok",
    "loopback_hosts",
    "loopback_origins",
    "prefect_database_url",
    "read_state",
    "resolve_backends",
    "restart_missing_workers",
    "serve_prefect",
    "servers_alive",
    "stack_env",
    "start_stack",
    "state_path",
    "stop_stack",
    "sync_database_url",
    "write_state",
]
