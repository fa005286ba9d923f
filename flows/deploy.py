"""Work pools and deployments, in Python (the one source of truth; ``forgeline deploy`` calls it).

Pools come from the config's ``deploy:`` section: ``cpu`` runs the ``pipeline``; ``gpu`` runs ``train``
and ``tune`` under a concurrency limit sized to its GPUs, with the pool's job variables (for example
``env: {CUDA_VISIBLE_DEVICES: "0"}``) as the defaults of every job on it. Deployments load the flows
from this project folder (``flow.from_source(<dir>, entrypoint=...)``), so a worker runs them with the
project as working directory: workers must see the same folder (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, WorkPoolConfig

logger = logging.getLogger(__name__)

REQUIRE_CUDA_ENV = "FORGELINE_REQUIRE_CUDA"
POOL_ENV = "FORGELINE_WORK_POOL"

# deployment name -> (entrypoint, which pool: "cpu" or "gpu")
DEPLOYMENTS: dict[str, tuple[str, str]] = {
    "pipeline": ("flows/pipeline.py:pipeline_flow", "cpu"),
    "train": ("flows/train.py:train_flow", "gpu"),
    "tune": ("flows/tune.py:tune_flow", "gpu"),
    "retrain": ("flows/retrain.py:retrain_flow", "cpu"),
}


def project_dir() -> Path:
    """The folder holding ``flows/``: the working directory if it is a Forgeline project, else this package's."""
    cwd = Path.cwd().resolve()
    if (cwd / "flows" / "pipeline.py").is_file():
        return cwd
    return Path(__file__).resolve().parents[1]


def base_job_template(pool: WorkPoolConfig) -> dict[str, Any]:
    """The worker type's default job template with the pool's job variables as defaults.

    ``env`` always carries ``FORGELINE_WORK_POOL`` and, on a pool with ``require_cuda``,
    ``FORGELINE_REQUIRE_CUDA=1`` (what :func:`flows.seam.check_cuda` reads in the flow run).
    """
    template = copy.deepcopy(_default_template(pool.type))
    props = template.setdefault("variables", {}).setdefault("properties", {})
    values = dict(pool.job_variables)
    env = {str(k): str(v) for k, v in (values.pop("env", None) or {}).items()}
    env[POOL_ENV] = pool.name
    if pool.require_cuda:
        env[REQUIRE_CUDA_ENV] = "1"
    values["env"] = env
    for key, value in values.items():
        if key not in props:
            raise ValueError(f"work pool {pool.name!r}: job variable {key!r} is not in the {pool.type} job template")
        props[key]["default"] = value
    return template


def _default_template(kind: str) -> dict[str, Any]:
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type(kind))
    if not template:
        raise ValueError(
            f"unknown work pool type {kind!r} (is its Prefect integration, e.g. prefect-docker, installed?)"
        )
    return template


def ensure_pool(pool: WorkPoolConfig) -> str:
    """Create or update one work pool to match ``pool`` (idempotent). Returns a one-line summary."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    template = base_job_template(pool)
    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool.name)
        except ObjectNotFound:
            existing = None
        if existing is None:
            client.create_work_pool(
                WorkPoolCreate(
                    name=pool.name, type=pool.type, base_job_template=template, concurrency_limit=pool.concurrency_limit
                )
            )
            verb = "created"
        else:
            if existing.type != pool.type:
                raise ValueError(
                    f"work pool {pool.name!r} exists with type {existing.type!r}, config says {pool.type!r}"
                )
            client.update_work_pool(
                pool.name, WorkPoolUpdate(base_job_template=template, concurrency_limit=pool.concurrency_limit)
            )
            if pool.concurrency_limit is None and existing.concurrency_limit is not None:
                client.update_work_pool(pool.name, WorkPoolUpdate(concurrency_limit=None))
            verb = "updated"
    limit = pool.concurrency_limit if pool.concurrency_limit is not None else "none"
    return f"work pool {pool.name} ({pool.type}, concurrency limit {limit}): {verb}"


def deploy_all(config: PipelineConfig, source: Path | None = None) -> list[str]:
    """Ensure both pools, the crash automation and the deployments. Returns summary lines.

    Args:
        config: Supplies the ``deploy:`` section and the pipeline deployment's default ``config`` parameter.
        source: Project folder the workers load the flows from (default :func:`project_dir`).
    """
    from prefect import flow as prefect_flow

    lines = [ensure_pool(config.deploy.cpu_pool), ensure_pool(config.deploy.gpu_pool), ensure_crash_automation()]
    root = (source or project_dir()).resolve()
    pools = {"cpu": config.deploy.cpu_pool.name, "gpu": config.deploy.gpu_pool.name}
    for name, (entrypoint, which) in DEPLOYMENTS.items():
        loaded = prefect_flow.from_source(str(root), entrypoint=entrypoint)
        parameters = {"config": config.model_dump(mode="json"), "deployed": True} if which == "cpu" else {}
        extra = _retrain_options(config) if name == "retrain" else {}
        with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints a table per deployment
            deployment_id = loaded.deploy(
                name=name,
                work_pool_name=pools[which],
                parameters=parameters,
                description=f"Forgeline {name} ({entrypoint}) on the {pools[which]} pool",
                tags=["forgeline", which],
                print_next_steps=False,
                ignore_warnings=True,
                **extra,
            )
        lines.append(f"deployment {loaded.name}/{name} on pool {pools[which]} (id {deployment_id}) from {root}")
    return lines


def _retrain_options(config: PipelineConfig) -> dict[str, Any]:
    """Trigger on ``forgeline.dataset.updated`` for this dataset, optional cron schedule, one run at a time."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    from flows.retrain import EVENT, resource_id

    trigger = DeploymentEventTrigger(
        name=f"retrain {config.name} on new data",
        expect={EVENT},
        match={"prefect.resource.id": resource_id(config)},
        parameters={"fingerprint": "{{ event.payload.fingerprint }}"},
    )
    options: dict[str, Any] = {"triggers": [trigger], "concurrency_limit": 1}
    if config.deploy.retrain_cron:
        options["schedules"] = [Cron(config.deploy.retrain_cron, active=config.deploy.retrain_schedule_active)]
    return options


CRASH_AUTOMATION = "forgeline: crash flow runs without heartbeats"
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY that `forgeline up` gives its workers


def ensure_crash_automation(silence: float = 3 * HEARTBEAT_SECONDS) -> str:
    """(Re)create the automation that marks a flow run CRASHED when its heartbeats stop.

    A worker killed mid-run leaves its flow run RUNNING; flow runs send ``prefect.flow-run.heartbeat``
    every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, and this automation crashes a run that sent one
    and then nothing (no heartbeat, no terminal state) for ``silence`` seconds. The MLflow runs it owned end
    KILLED at the next pipeline start on that host (``tasks.tracking.reap_orphan_runs``).
    """
    from datetime import timedelta

    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    terminal = ("Completed", "Failed", "Cancelled", "Crashed")
    automation = AutomationCore(
        name=CRASH_AUTOMATION,
        description="Flow runs whose heartbeats stop (a killed worker or machine) are marked crashed.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in terminal)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message="no heartbeat: the worker or machine died")],
    )
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(old.id)
        client.create_automation(automation)
    return f"automation {CRASH_AUTOMATION!r}: after {silence:.0f} s without a heartbeat"
