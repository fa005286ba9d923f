"""Work pools and deployments, in Python (the one source of truth; ``forgeline deploy`` calls it).

Pools come from the config's ``deploy:`` section: ``cpu`` runs the ``pipeline``, ``retrain`` and ``watch``;
``gpu`` runs ``train`` and ``tune`` under a concurrency limit sized to its GPUs, with the pool's job variables
(for example ``env: {CUDA_VISIBLE_DEVICES: "0"}``) as the defaults of every job on it. Deployments load the
flows from this project folder (``flow.from_source(<dir>, entrypoint=...)``), so a worker runs them with the
project as working directory: workers must see the same folder (one machine, or a shared filesystem).

:func:`deployment_specs` describes every deployment in the shape of a ``prefect.yaml`` entry; :func:`deploy_all`
creates them from it and :func:`prefect_yaml` writes the same list as the ``prefect.yaml`` at the project root
(``forgeline deploy --write-prefect-yaml``), for ``prefect deploy --all``. ``watch`` has no schedule:
:func:`start_watcher` starts its one long-lived flow run, and its trigger restarts a crashed one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import typing
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from forgeline.flows.contract import EVENT, POOL_ENV, REQUIRE_CUDA_ENV, resource_id
from forgeline.tasks.config import PipelineConfig, WorkPoolConfig

logger = logging.getLogger(__name__)

# deployment name -> (entrypoint, which pool: "cpu" or "gpu")
DEPLOYMENTS: dict[str, tuple[str, str]] = {
    "pipeline": ("flows/pipeline.py:pipeline_flow", "cpu"),
    "train": ("flows/train.py:train_flow", "gpu"),
    "tune": ("flows/tune.py:tune_flow", "gpu"),
    "retrain": ("flows/retrain.py:retrain_flow", "cpu"),
    "watch": ("flows/watch.py:watch_flow", "cpu"),
}
PREFECT_YAML = "prefect.yaml"
WATCH = "watch"
WATCH_RESTART_DELAY = 60  # seconds between a crashed watcher and its replacement: a crash loop stays slow


def project_dir() -> Path:
    """The folder holding ``flows/``: the working directory if it is a Forgeline project, else this package's."""
    cwd = Path.cwd().resolve()
    if (cwd / "flows" / "pipeline.py").is_file():
        return cwd
    return Path(__file__).resolve().parents[1]


def base_job_template(pool: WorkPoolConfig, heartbeat_seconds: int | None = None) -> dict[str, Any]:
    """The worker type's default job template with the pool's job variables as defaults.

    ``env`` always carries ``FORGELINE_WORK_POOL`` and, on a pool with ``require_cuda``,
    ``FORGELINE_REQUIRE_CUDA=1`` (what :func:`forgeline.flows.contract.check_cuda` reads in the flow run); with
    ``heartbeat_seconds``, ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, so flow runs beat as often as the crash
    automation expects whatever their worker's environment says.
    """
    template = copy.deepcopy(_default_template(pool.type))
    props = template.setdefault("variables", {}).setdefault("properties", {})
    values = dict(pool.job_variables)
    env = {str(k): str(v) for k, v in (values.pop("env", None) or {}).items()}
    env[POOL_ENV] = pool.name
    if pool.require_cuda:
        env[REQUIRE_CUDA_ENV] = "1"
    if heartbeat_seconds is not None:
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(heartbeat_seconds)
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


def ensure_pool(pool: WorkPoolConfig, heartbeat_seconds: int | None = None) -> str:
    """Create or update one work pool to match ``pool`` (idempotent). Returns a one-line summary."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    template = base_job_template(pool, heartbeat_seconds)
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


def config_parameter(config: PipelineConfig) -> dict[str, Any]:
    """``config`` as a deployment parameter: only what differs from the defaults.

    A default that changes in code then reaches deployed runs, and ``prefect.yaml`` only changes when the
    deployed config does. Lists and union members stay whole (with their tags), and every section that is
    written keeps its required fields, so the value passes the flow's parameter schema, which the Prefect
    server checks for every run it creates (an event trigger's run included).
    """
    masked = config.for_flow_run()  # job-variable secrets stay out of the server's stored parameters
    full = masked.model_dump(mode="json")
    short = _differences(full, PipelineConfig().model_dump(mode="json"), PipelineConfig)
    if PipelineConfig.model_validate(short) != masked:  # never deploy something that means another config
        return full
    return short


def _differences(value: dict[str, Any], default: dict[str, Any], model: type[BaseModel] | None) -> dict[str, Any]:
    changed: dict[str, Any] = {}
    for key, item in value.items():
        base = default.get(key)
        section = _section_model(model, key)
        if isinstance(item, dict) and isinstance(base, dict) and item and base and section is not None:
            nested = _differences(item, base, section)
            if nested:
                changed[key] = nested
        elif key not in default or item != base:
            changed[key] = item
    if not changed or model is None:
        return changed
    required = {name: value[name] for name, field in model.model_fields.items() if field.is_required()}
    return required | changed


def _section_model(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The pydantic model of field ``key`` of ``model`` (``Optional`` unwrapped), if it is one."""
    field = model.model_fields.get(key) if model is not None else None
    if field is None:
        return None
    options = [field.annotation, *typing.get_args(field.annotation)]
    models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
    return models[0] if len(models) == 1 else None


def deployment_specs(config: PipelineConfig) -> list[dict[str, Any]]:
    """Every deployment as a ``prefect.yaml`` entry: the one description both deploy paths use.

    Args:
        config: Supplies pool names, schedules and the ``config`` default of the cpu-pool deployments.

    Returns:
        Mappings with ``name``, ``entrypoint``, ``description``, ``tags``, ``work_pool``, ``parameters`` and,
        where they apply, ``schedules``, ``triggers`` and ``concurrency_limit``.
    """
    pools = {"cpu": config.deploy.cpu_pool.name, "gpu": config.deploy.gpu_pool.name}
    cfg = config_parameter(config)
    specs: list[dict[str, Any]] = []
    for name, (entrypoint, which) in DEPLOYMENTS.items():
        spec: dict[str, Any] = {
            "name": name,
            "entrypoint": entrypoint,
            "description": f"Forgeline {name} ({entrypoint}) on the {pools[which]} pool",
            "tags": ["forgeline", which],
            "work_pool": {"name": pools[which]},
            "parameters": {},
        }
        if name in ("pipeline", "retrain"):
            spec["parameters"] = {"config": cfg, "deployed": True}
        elif name == "watch":
            spec["parameters"] = {"config": cfg}
        if name == "retrain":
            spec |= _retrain_options(config)
        if name == "watch":
            spec |= _watch_options(config)
        specs.append(spec)
    return specs


def _retrain_options(config: PipelineConfig) -> dict[str, Any]:
    """Trigger on ``forgeline.dataset.updated`` for this dataset, optional cron schedule, one run at a time."""
    trigger = {
        "type": "event",
        "name": f"retrain {config.name} on new data",
        "enabled": True,
        "expect": [EVENT],
        "match": {"prefect.resource.id": resource_id(config)},
        "parameters": {"fingerprint": "{{ event.payload.fingerprint }}"},
    }
    options: dict[str, Any] = {"triggers": [trigger], "concurrency_limit": 1}
    if config.deploy.retrain_cron:
        options["schedules"] = [{"cron": config.deploy.retrain_cron, "active": config.deploy.retrain_schedule_active}]
    return options


def _watch_options(config: PipelineConfig) -> dict[str, Any]:
    """No schedule (one long-lived run, :func:`start_watcher`); a second run is cancelled; a crashed one restarts.

    The trigger runs the deployment again ``WATCH_RESTART_DELAY`` seconds after a watch flow run crashed (its
    worker or machine died, or the heartbeat automation gave up on it); a cancelled run is not restarted.
    """
    options: dict[str, Any] = {"concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"}}
    if config.deploy.watch_interval:
        restart = {
            "type": "event",
            "name": f"restart the {config.name} watch after a crash",
            "enabled": True,
            "expect": ["prefect.flow-run.Crashed"],
            "match": {"prefect.resource.id": "prefect.flow-run.*"},
            "match_related": {"prefect.resource.role": "deployment", "prefect.resource.name": WATCH},
            "schedule_after": WATCH_RESTART_DELAY,
        }
        options["triggers"] = [restart]
    return options


def deploy_all(config: PipelineConfig, source: Path | None = None) -> list[str]:
    """Ensure both pools, the crash automation and the deployments of :func:`deployment_specs`; start the watcher.

    Args:
        config: Supplies the ``deploy:`` section and the cpu-pool deployments' default ``config`` parameter.
        source: Project folder the workers load the flows from (default :func:`project_dir`).

    Returns:
        One summary line per pool, automation and deployment, and one for the watcher (:func:`start_watcher`).
    """
    from prefect import flow as prefect_flow

    beat = config.deploy.heartbeat_seconds
    lines = [
        ensure_pool(config.deploy.cpu_pool, beat),
        ensure_pool(config.deploy.gpu_pool, beat),
        ensure_crash_automation(beat * config.deploy.missed_heartbeats),
    ]
    root = (source or project_dir()).resolve()
    for spec in deployment_specs(config):
        loaded = prefect_flow.from_source(str(root), entrypoint=spec["entrypoint"])
        pool = spec["work_pool"]["name"]
        with contextlib.redirect_stdout(io.StringIO()):  # Prefect prints a table per deployment
            deployment_id = loaded.deploy(
                name=spec["name"],
                work_pool_name=pool,
                parameters=spec["parameters"],
                description=spec["description"],
                tags=spec["tags"],
                print_next_steps=False,
                ignore_warnings=True,
                **_deploy_options(spec),
            )
        lines.append(f"deployment {loaded.name}/{spec['name']} on pool {pool} (id {deployment_id}) from {root}")
    lines.append(start_watcher(config))
    return lines


def start_watcher(config: PipelineConfig, timeout: float = 60.0) -> str:
    """Replace the ``watch`` deployment's flow run: cancel the active ones, then start one with the deployed config.

    Runs that no worker cancels within ``timeout`` seconds (their worker is gone) are marked Cancelled; a
    watcher that still lives sees that at its next look and ends. With ``deploy.watch_interval: null`` none
    is started. Returns a one-line summary.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter as Runs
    from prefect.client.schemas.filters import FlowRunFilterDeploymentId, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled, Cancelling

    live = {StateType.PENDING, StateType.RUNNING, StateType.CANCELLING}
    active = [StateType.SCHEDULED, StateType.PAUSED, *live]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"{WATCH}/{WATCH}")
        flt = Runs(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active)),
        )
        old = client.read_flow_runs(flow_run_filter=flt)
        for run in old:
            if run.state_type != StateType.CANCELLING:
                state = Cancelling if run.state_type in live else Cancelled
                client.set_flow_run_state(run.id, state(message="replaced by forgeline deploy"), force=True)
        deadline = time.monotonic() + timeout
        while (left := client.read_flow_runs(flow_run_filter=flt)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for run in left:
            client.set_flow_run_state(run.id, Cancelled(message=f"no worker cancelled it in {timeout:g} s"), force=True)
    replaced = f"; {len(old)} earlier watcher run(s) cancelled" if old else ""
    if not config.deploy.watch_interval:
        return f"watch: off (deploy.watch_interval is null){replaced}"
    key = f"watch-{config.name}-{uuid.uuid4().hex}"  # a client retry of a served request returns that run
    name = f"watch {config.name}"
    run = run_deployment(f"{WATCH}/{WATCH}", timeout=0, as_subflow=False, flow_run_name=name, idempotency_key=key)
    every = config.deploy.watch_interval
    return f"watcher flow run {run.name} ({run.id}): looks at {config.deploy.drop_dir} every {every:g} s{replaced}"


def _deploy_options(spec: dict[str, Any]) -> dict[str, Any]:
    """The Prefect objects ``flow.deploy`` takes for a spec's schedules, triggers and concurrency limit."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    options: dict[str, Any] = {}
    schedules = [Cron(item["cron"], active=item["active"]) for item in spec.get("schedules", [])]
    if schedules:
        options["schedules"] = schedules
    if spec.get("triggers"):
        options["triggers"] = [
            DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"}) for t in spec["triggers"]
        ]
    limit = spec.get("concurrency_limit")
    if limit is not None:
        options["concurrency_limit"] = limit if isinstance(limit, int) else ConcurrencyLimitConfig(**limit)
    return options


def prefect_yaml(config: PipelineConfig, origin: str = "configs/default.yaml") -> str:
    """The ``prefect.yaml`` text describing :func:`deployment_specs` (``prefect deploy --all`` reads it).

    Args:
        config: The config to describe.
        origin: Where ``config`` came from, named in the header (the committed file: the default config).
    """
    header = (
        f"# Generated from flows/deploy.py and {origin} by\n"
        f"#   forgeline deploy --config {origin} --write-prefect-yaml\n"
        "# Edit the code or the config and regenerate, never this file (tests/unit/test_deploy.py compares).\n"
        "# `forgeline deploy` creates the same deployments plus the work pools and the crash automation,\n"
        "# and starts the one long-lived watch run (without it: prefect deployment run watch/watch).\n"
        "# Without it: create the pools (prefect work-pool create cpu --type process; the same for gpu),\n"
        "# then run `prefect deploy --all` here; with no pull steps listed, Prefect makes workers run the\n"
        "# flows in the folder you deploy from, as `forgeline deploy` does.\n"
    )
    body = {"name": "forgeline", "deployments": deployment_specs(config)}
    return header + yaml.dump(body, Dumper=_PlainDumper, sort_keys=False, width=120)


class _PlainDumper(yaml.SafeDumper):
    """Writes a value shared by several deployments out in full each time, not as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_prefect_yaml(config: PipelineConfig, origin: str, root: Path | None = None) -> Path:
    """Write :func:`prefect_yaml` to ``prefect.yaml`` in the project folder. Returns its path."""
    path = (root or project_dir()) / PREFECT_YAML
    path.write_text(prefect_yaml(config, origin), encoding="utf-8")
    return path


CRASH_AUTOMATION = "forgeline: crash flow runs without heartbeats"
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY that `forgeline up` gives its workers


def ensure_crash_automation(silence: float = 3 * HEARTBEAT_SECONDS) -> str:
    """(Re)create the automation that marks a flow run CRASHED when its heartbeats stop.

    A worker killed mid-run leaves its flow run RUNNING; flow runs send ``prefect.flow-run.heartbeat``
    every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds, and this automation crashes a run that sent one
    and then nothing (no heartbeat, no terminal state) for ``silence`` seconds. The MLflow runs it owned end
    KILLED at the next pipeline start on that host (``forgeline.tasks.tracking.runs.reap_orphan_runs``).
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
