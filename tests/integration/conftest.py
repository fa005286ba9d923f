"""Integration fixtures: throw-away project folders, the pipeline in-process or the CLI as a subprocess, MLflow clients.

Each project is a temporary folder holding a copy of ``configs/smoke.yaml``; the CLI runs there, so its
MLflow store (``mlruns/mlflow.db``), checkpoints and cleaned-data cache all live inside it. One Prefect
test server is shared by the whole session (the in-process flows and every CLI subprocess), which saves
each subprocess the ~10 s start of its own temporary server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.yaml"
CLI_TIMEOUT = 240  # seconds; a smoke run takes ~20-40 s on 2 cores

# Env vars of the caller that would point a run somewhere other than its project folder.
_SCRUB = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "PREFECT_API_URL",
    "PREFECT_PROFILE",
    "FORGELINE_FAULT_AT_STEP",
    "FORGELINE_FAULT_KIND",
    "FORGELINE_HOME",
)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def describe(self) -> str:
        return (
            f"exit {self.returncode} after {self.seconds:.1f}s\n--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-6000:]}"
        )


@dataclass
class Project:
    """A temporary project folder with ``smoke.yaml`` and the env a CLI run there gets."""

    root: Path
    env: dict[str, str]
    runs: list[CliResult] = field(default_factory=list)

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlruns' / 'mlflow.db'}"

    def cli(self, *args: str, extra_env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT) -> CliResult:
        """Run ``python -m flows <args>`` in the project folder."""
        env = {**self.env, **(extra_env or {})}
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "forgeline", *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        result = CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
        self.runs.append(result)
        return result

    def run_pipeline(self, *extra: str, extra_env: dict[str, str] | None = None) -> CliResult:
        return self.cli("run", "--config", "smoke.yaml", *extra, extra_env=extra_env)

    def run_in_process(self, *overrides: str, data: list[str] | None = None, fresh: bool = False) -> Any:
        """``forgeline run --config smoke.yaml --set ...`` in this process, through the Python API.

        The same pipeline against the same stores (the project's SQLite MLflow store, the session's Prefect
        test server) without a new interpreter's ~10 s of imports. Use it where the run sets up what a test
        is about; keep :meth:`run_pipeline` for the command line's own output, exit codes, signals and env.

        Returns:
            The run summary (``forgeline.run``'s ``PipelineResult``); a failing run raises.
        """
        import forgeline

        with contextlib.chdir(self.root):  # the stores and caches live under the working directory
            return forgeline.run("smoke.yaml", overrides=list(overrides), data=data, fresh=fresh)

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def has_store(self) -> bool:
        return (self.root / "mlruns" / "mlflow.db").exists()


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def prefect_server(prefect_home: Path) -> Iterator[str]:
    """One Prefect test server for the session; yields its API URL (also the in-process API)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    with (
        temporary_settings(
            updates={PREFECT_HOME: prefect_home, PREFECT_RESULTS_LOCAL_STORAGE_PATH: prefect_home / "storage"}
        ),
        prefect_test_harness(server_startup_timeout=60),
    ):
        yield str(PREFECT_API_URL.value())


def _base_env(prefect_home: Path, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    pythonpath = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=api_url,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(prefect_home / "storage"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MPLBACKEND="Agg",
        COLUMNS="200",  # rich wraps the summary table to this width
    )
    return env


def _new_project(root: Path, prefect_home: Path, api_url: str) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SMOKE_CONFIG, root / "smoke.yaml")
    return Project(root=root, env=_base_env(prefect_home, api_url))


@contextlib.contextmanager
def _inside(project: Project) -> Iterator[Project]:
    """cwd = the project; this process's MLflow (fluent API, ``models:/`` URIs) points at its store."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    mp = pytest.MonkeyPatch()
    prev_tracking = tracking_utils._tracking_uri
    prev_registry = registry_utils._registry_uri
    try:
        mp.chdir(project.root)
        mp.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
        mp.setenv("MLFLOW_REGISTRY_URI", project.tracking_uri)
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MPLBACKEND", "Agg")  # in-process runs draw their charts as CLI runs do
        mlflow.set_tracking_uri(project.tracking_uri)
        mlflow.set_registry_uri(project.tracking_uri)
        yield project
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        registry_utils._registry_uri = prev_registry
        mp.undo()


@pytest.fixture(scope="module")
def module_project(
    tmp_path_factory: pytest.TempPathFactory, prefect_home: Path, prefect_server: str
) -> Iterator[Project]:
    """A project folder shared by one test module (for expensive CLI runs done once)."""
    root = Path(tempfile.mkdtemp(prefix="project-", dir=tmp_path_factory.getbasetemp()))
    with _inside(_new_project(root, prefect_home, prefect_server)) as project:
        yield project


@pytest.fixture
def project(tmp_path: Path, prefect_home: Path, prefect_server: str) -> Iterator[Project]:
    """A fresh project folder for one test."""
    with _inside(_new_project(tmp_path / "project", prefect_home, prefect_server)) as proj:
        yield proj


def runs_by_name(client: Any, experiment_id: str) -> dict[str, list[Any]]:
    """Every run of the experiment, grouped by run name, oldest first."""
    runs = client.search_runs([experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    grouped: dict[str, list[Any]] = {}
    for run in runs:
        grouped.setdefault(run.info.run_name, []).append(run)
    return grouped
