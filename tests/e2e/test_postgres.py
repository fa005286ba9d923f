"""Every store on PostgreSQL: one throw-away PostgreSQL server holds the Prefect, MLflow and Optuna databases.

The stores are chosen by environment alone (``FORGELINE_PREFECT_DATABASE_URL``,
``FORGELINE_MLFLOW_BACKEND_STORE_URI``, ``FORGELINE_TUNE_STORAGE``, each with a password), then
``forgeline up`` -> ``deploy`` -> ``run --deployed`` (smoke config, a two-trial search) -> checks through
the Prefect and MLflow clients and straight in the three databases -> ``down`` -> no process left, neither
of the stack nor of PostgreSQL. The password must show nowhere: command output, ``stack.json``, logs,
process command lines, MLflow params and tags, Prefect flow run parameters.

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user (``runuser``), in a
folder it owns, on a free port of 127.0.0.1. About 2 to 3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import pytest

from tests.e2e.conftest import Project, free_port, prefect_client, stack_family

pytestmark = pytest.mark.e2e

USER = "forgeline"
PASSWORD = "pg-Secret:h1@x"  # ':' and '@' inside the password: masking must not stop at the first one
DATABASES = ("prefect", "mlflow", "optuna")
PG_TIMEOUT = 60


def _pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise AssertionError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql (apt-get install postgresql)"
        )
    return found[-1].parent


class Postgres:
    """A PostgreSQL server in its own folder, listening on 127.0.0.1 only."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.data = root / "data"
        self.sockets = root / "sockets"
        self.port = port
        self.bindir = _pg_bindir()
        # PostgreSQL refuses root; as root, run its programs as the `postgres` user.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *cmd: str) -> None:
        proc = subprocess.run(
            [*self.as_user, *cmd], capture_output=True, text=True, timeout=PG_TIMEOUT, cwd=self.root, check=False
        )
        if proc.returncode != 0:
            log = self.root / "postgres.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{tail}")

    def start(self) -> None:
        self.sockets.mkdir()
        if self.as_user:
            for path in (self.root, self.sockets):
                shutil.chown(path, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--auth-local=trust",  # the fixture's own set-up, over the Unix socket in our folder
            "--auth-host=scram-sha-256",  # everything over TCP needs the password
            "--no-sync",
        )
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off -c full_page_writes=off"
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(PG_TIMEOUT),
            "start",
        )
        import psycopg2

        con = psycopg2.connect(host=str(self.sockets), port=self.port, user="postgres", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute(f"CREATE ROLE {USER} LOGIN PASSWORD %s", (PASSWORD,))
            for name in DATABASES:
                cur.execute(f"CREATE DATABASE {name} OWNER {USER}")
        con.close()

    def postmaster(self) -> psutil.Process | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            return psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            return None

    def stop(self) -> list[psutil.Process]:
        """Stop the server; returns its processes that are still alive afterwards (none, hopefully)."""
        main = self.postmaster()
        family = [main, *main.children(recursive=True)] if main else []
        if main:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        _, alive = psutil.wait_procs(family, timeout=15)
        return alive

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/{database}"

    def rows(self, database: str, sql: str) -> list[tuple[Any, ...]]:
        import psycopg2

        con = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname=database, connect_timeout=10
        )
        try:
            with con.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            con.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="forgeline-pg-"))
    server = Postgres(root, free_port())
    try:
        server.start()
        yield server
    finally:
        alive = server.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not alive, f"PostgreSQL processes left: {[p.pid for p in alive]}"


SEARCH = [
    "--set",
    "tune.n_trials=2",
    "--set",
    "tune.parallelism=2",  # two tune flow runs on the gpu pool share the study in PostgreSQL
    "--set",
    "tune.max_steps=10",
    "--set",
    "tune.eval_interval=5",
    "--set",
    "tune.search_space.train.learning_rate={type: float, low: 1.0e-3, high: 1.0e-2, log: true}",
]
FALLBACK = ["--set", "deploy.allow_cpu_fallback=true"]


def test_up_deploy_run_on_postgresql(project: Project, postgres: Postgres) -> None:
    # Environment alone, plain postgresql:// URLs: `up` adds asyncpg for Prefect, psycopg2 for MLflow and Optuna.
    project.env |= {
        "FORGELINE_PREFECT_DATABASE_URL": postgres.url("prefect"),
        "FORGELINE_MLFLOW_BACKEND_STORE_URI": postgres.url("mlflow"),
        "FORGELINE_TUNE_STORAGE": postgres.url("optuna"),
    }
    outputs = []
    ports = ["--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port), "--pool", "cpu"]
    up = project.forgeline("up", *ports, "--pool", "gpu")
    outputs.append(up)
    masked = f"{USER}:***@127.0.0.1:{postgres.port}"
    assert f"prefect database:  postgresql+asyncpg://{masked}/prefect" in up.stdout, up.stdout
    assert f"mlflow backend:    postgresql+psycopg2://{masked}/mlflow" in up.stdout, up.stdout
    assert f"optuna storage:    postgresql+psycopg2://{masked}/optuna" in up.stdout, up.stdout
    status = project.forgeline("status")
    outputs.append(status)
    assert status.stdout.count(" up ") == 4, status.stdout
    assert f"postgresql+psycopg2://{masked}/mlflow" in status.stdout

    outputs.append(project.forgeline("deploy", "--config", "configs/smoke.yaml", *FALLBACK))
    ran = project.forgeline("run", "--config", "configs/smoke.yaml", "--deployed", *FALLBACK, *SEARCH)
    outputs.append(ran)
    assert "completed: forgeline-smoke-lm version 1" in ran.stdout, ran.stdout + ran.stderr
    assert "promoted to champion: true" in ran.stdout

    api = f"http://127.0.0.1:{project.prefect_port}/api"
    parameters = _check_prefect(api, postgres)
    params_and_tags = _check_mlflow(project, postgres)
    _check_optuna(postgres)
    # Nothing fell back to a SQLite file.
    for path in (
        project.root / "mlruns" / "mlflow.db",
        project.root / "mlruns" / "optuna.db",
        project.home / "mlflow" / "mlflow.db",
        project.home / "prefect" / "prefect.db",
    ):
        assert not path.exists(), path

    family = stack_family(project.home)
    cmdlines = [" ".join(p.cmdline()) for p in family if p.is_running()]
    stack_json = (project.home / "stack.json").read_text()
    outputs.append(project.forgeline("down"))
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert not (project.home / "stack.json").exists()

    # The password shows nowhere (quoted or not).
    logs = {str(p): p.read_text(errors="replace") for p in (project.home / "logs").glob("*.log")}
    assert logs
    haystacks = {
        "output": "\n".join(o.stdout + o.stderr for o in outputs),
        "stack.json": stack_json,
        "process command lines": "\n".join(cmdlines),
        "MLflow params and tags": params_and_tags,
        "Prefect flow run parameters": parameters,
        **logs,
    }
    for where, text in haystacks.items():
        for secret in (PASSWORD, quote(PASSWORD, safe="")):
            assert secret not in text, f"password in {where}"


def _check_prefect(api: str, postgres: Postgres) -> str:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(api) as client:
        by_deployment = {}
        for name, count in (("pipeline", 1), ("tune", 2), ("train", 1)):
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
            assert [r.state.name for r in runs if r.state] == ["Completed"] * count, (name, [r.state for r in runs])
            by_deployment[name] = runs
        assert by_deployment["pipeline"][0].work_pool_name == "cpu"
        assert {r.work_pool_name for r in by_deployment["tune"] + by_deployment["train"]} == {"gpu"}
        every = [r for runs in by_deployment.values() for r in runs]
        parameters = json.dumps([r.parameters for r in every], default=str)
    # The Prefect server's own database is PostgreSQL: the flow runs are rows there.
    ids = {str(r.id) for r in every}
    rows = postgres.rows("prefect", "SELECT id::text, state_type FROM flow_run")
    assert ids <= {row[0] for row in rows}, rows
    return parameters


def _check_mlflow(project: Project, postgres: Postgres) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{project.mlflow_port}")
    experiment = client.get_experiment_by_name("forgeline-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")
    names = sorted(r.data.tags.get("mlflow.runName", "") for r in runs)
    assert {"pipeline", "clean", "tune", "train", "evaluate", "register"} <= set(names), names
    assert sum(n.startswith("trial-") for n in names) == 2, names
    champion = client.get_model_version_by_alias("forgeline-smoke-lm", "champion")
    assert champion.version == "1"
    (tune,) = [r for r in runs if r.data.tags.get("mlflow.runName") == "tune"]
    assert tune.data.tags["optuna.storage_url"].startswith(f"postgresql+psycopg2://{USER}:***@127.0.0.1:")
    # ... and those runs and the model are rows of the MLflow database on PostgreSQL.
    stored = {row[0] for row in postgres.rows("mlflow", "SELECT run_uuid FROM runs")}
    assert {r.info.run_id for r in runs} <= stored
    assert postgres.rows("mlflow", "SELECT name FROM registered_models") == [("forgeline-smoke-lm",)]
    return json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs])


def _check_optuna(postgres: Postgres) -> None:
    studies = postgres.rows("optuna", "SELECT study_name FROM studies")
    assert len(studies) == 1 and studies[0][0].startswith("forgeline-smoke"), studies
    states = postgres.rows("optuna", "SELECT state FROM trials ORDER BY number")
    assert [s[0] for s in states] in (["COMPLETE", "COMPLETE"], ["COMPLETE", "PRUNED"]), states


def test_unreachable_database_fails_fast_and_masked(project: Project) -> None:
    dead = free_port()  # nothing listens there
    env = dict(project.env)
    project.env = env | {"FORGELINE_MLFLOW_BACKEND_STORE_URI": f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{dead}/x"}
    try:
        t0 = time.monotonic()
        up = project.forgeline("up", "--prefect-port", str(free_port()), "--mlflow-port", str(free_port()), check=False)
    finally:
        project.env = env
    assert up.returncode == 1, up.stdout + up.stderr
    assert time.monotonic() - t0 < 60
    expected = f"MLflow backend store postgresql+psycopg2://{USER}:***@127.0.0.1:{dead}/x: cannot connect"
    assert expected in up.stderr, up.stderr
    assert PASSWORD not in up.stdout + up.stderr
    assert not (project.home / "stack.json").exists()
