"""Deployed mode end to end: real servers and workers on loopback, in a throw-away project folder.

``forgeline up`` -> ``deploy`` -> ``run --deployed`` (once without CUDA fallback: the GPU-pool run must
fail fast; once with it and a search of ``tune.parallelism: 2``: two ``tune`` flow runs share one study,
everything completes) -> checks through the Prefect and MLflow clients -> ``forgeline models`` finds the
stack's MLflow server by itself -> ``ingest`` new data -> the ``retrain`` deployment's trigger retrains once,
fine-tuning the champion -> the same data again retrains nothing -> the gpu worker stopped: a deployed run's
``train`` stays Late, is cancelled after ``deploy.gpu_start_timeout`` and the pipeline fails saying why (A8)
-> ``down`` -> no process left. About 6 minutes on 2 cores.
"""

from __future__ import annotations

import time

import optuna
import psutil
import pytest

from tests.e2e.conftest import Project, prefect_client, stack_family

pytestmark = pytest.mark.e2e


FALLBACK = ["--set", "deploy.allow_cpu_fallback=true"]
# Two trials of 10 steps, searched by two `tune` flow runs at once (the gpu pool allows two runs here).
TUNE = [
    *("--set", "tune.n_trials=2", "--set", "tune.parallelism=2"),
    *("--set", "tune.max_steps=10", "--set", "tune.eval_interval=5"),
    *("--set", "tune.search_space.train.learning_rate={type: float, low: 1.0e-3, high: 1.0e-2, log: true}"),
]


def test_up_deploy_run_deployed_down(project: Project) -> None:
    project.env["PREFECT_WORKER_HEARTBEAT_SECONDS"] = "2"  # a stopped worker counts as gone after 6 s (A8)
    up = project.forgeline("up", "--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port))
    assert f"http://127.0.0.1:{project.prefect_port}" in up.stdout
    assert f"http://127.0.0.1:{project.mlflow_port}" in up.stdout
    status = project.forgeline("status")
    assert status.stdout.count(" up ") == 4, status.stdout

    pools = ["--set", "deploy.gpu_pool.concurrency_limit=2", "--set", "deploy.watch_interval=3600"]
    for _ in range(2):  # idempotent
        deployed = project.forgeline("deploy", "--config", "configs/smoke.yaml", *FALLBACK, *pools)
    assert "deployment train/train on pool gpu" in deployed.stdout
    assert "deployment watch/watch on pool cpu" in deployed.stdout

    # No CUDA here and no fallback: the GPU-pool train run fails fast with the reason.
    refused = project.forgeline("run", "--config", "configs/smoke.yaml", "--deployed", check=False)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "train" in refused.stdout and "Failed" in refused.stdout

    ran = project.forgeline("run", "--config", "configs/smoke.yaml", "--deployed", *FALLBACK, *TUNE)
    assert "completed: forgeline-smoke-lm version 1" in ran.stdout, ran.stdout
    assert "promoted to champion: true" in ran.stdout

    api = f"http://127.0.0.1:{project.prefect_port}/api"
    _check_prefect(project, api)
    _check_mlflow(project)
    _check_shared_study(project, api)
    # A read-only command finds the stack through FORGELINE_HOME (no MLFLOW_TRACKING_URI in its env).
    models = project.forgeline("models", "forgeline-smoke-lm").stdout
    assert "champion" in models and "alias history" in models, models
    ui = project.forgeline("ui").stdout  # shows the stack's UIs instead of serving mlruns/ on another port
    assert f"MLflow UI on http://127.0.0.1:{project.mlflow_port}" in ui, ui
    assert f"Prefect UI on http://127.0.0.1:{project.prefect_port}" in ui, ui
    _retrain_on_new_data(project, api)

    family = stack_family(project.home)
    _no_gpu_worker(project, api)
    down = project.forgeline("down")
    assert "worker-gpu" in down.stdout
    gone, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.pid for p in alive]
    assert not (project.home / "stack.json").exists()
    assert project.forgeline("status", check=False).returncode == 1


def _check_prefect(project: Project, api: str) -> None:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    with prefect_client(api) as client:
        assert str(client.api_url).rstrip("/") == api
        from forgeline.flows.deploy import CRASH_AUTOMATION

        assert len(client.read_automations_by_name(CRASH_AUTOMATION)) == 1  # deployed twice, one automation
        retrain = client.read_deployment_by_name("retrain/retrain")
        assert [(str(x.schedule.cron), x.active) for x in retrain.schedules] == [("0 3 * * 1", False)]
        assert retrain.work_pool_name == "cpu"
        watch = client.read_deployment_by_name("watch/watch")
        assert not watch.schedules and watch.work_pool_name == "cpu"  # one long-lived run instead (issue 14.5)
        watchers = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["watch"])))
        assert sorted(r.state_name for r in watchers) == ["Cancelled", "Running"]  # deployed twice: replaced
        pools = {p.name: p for p in client.read_work_pools()}
        assert pools["gpu"].concurrency_limit == 2 and pools["gpu"].type == "process"
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])),
            flow_run_filter=FlowRunFilter(),
        )
        by_state = {r.state.name: r for r in runs if r.state}
        assert set(by_state) == {"Failed", "Completed"}, [r.state for r in runs]
        train = by_state["Completed"]
        assert train.work_pool_name == "gpu"
        assert train.parent_task_run_id is not None  # linked to the pipeline as a subflow
        assert "allow_cpu_fallback" in (by_state["Failed"].state.message or "")
        pipeline = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["pipeline"]))
        )
        assert sorted(r.state.name for r in pipeline) == ["Completed", "Failed"]
        assert all(r.work_pool_name == "cpu" for r in pipeline)


def _check_mlflow(project: Project) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{project.mlflow_port}")
    experiment = client.get_experiment_by_name("forgeline-smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")
    names = {r.data.tags.get("mlflow.runName") for r in runs}
    assert {"pipeline", "clean", "train", "evaluate", "register"} <= names
    champion = client.get_model_version_by_alias("forgeline-smoke-lm", "champion")
    assert champion.version == "1"
    assert not (project.root / "mlruns" / "mlflow.db").exists()  # everything went through the server


NEW_TEXT = "\n\n".join(
    f"Paragraph {i}: the module returns a list of values for each file in the data directory." for i in range(80)
)


def _check_shared_study(project: Project, api: str) -> None:
    """tune.parallelism 2 deployed: two `tune` flow runs on the gpu pool, subflows of the pipeline, one study."""
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(api) as client:
        tunes = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["tune"])))
        picked = [  # when the worker took each run (Pending): its process starts then
            min(s.timestamp for s in client.read_flow_run_states(r.id) if s.type.value == "PENDING") for r in tunes
        ]
    assert sorted(r.parameters["worker"] for r in tunes) == [0, 1]
    assert all(r.state.is_completed() and r.work_pool_name == "gpu" for r in tunes), [r.state for r in tunes]
    assert all(r.parent_task_run_id is not None for r in tunes)
    assert len({r.parameters["config"]["tune"]["storage"] for r in tunes}) == 1  # pinned to one storage
    # The pool allows two runs here, so the worker took the second before the first ended (each spends
    # >10 s starting up alone). Their Running times can still be apart: two processes importing torch on
    # two cores, and a first worker that finishes the study's two trials before the second starts any.
    assert max(picked) < min(r.end_time for r in tunes), (picked, [(r.start_time, r.end_time) for r in tunes])

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{project.mlflow_port}")
    experiment = client.get_experiment_by_name("forgeline-smoke")
    (study_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'tune'")
    assert study_run.info.status == "FINISHED"
    storage = study_run.data.tags["optuna.storage_url"]
    assert storage == f"sqlite:///{project.root / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name=study_run.data.tags["forgeline.optuna_study"], storage=storage)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert 2 <= len(finished) == len(trials) <= 3  # a simultaneous last pick by both workers may add one
    recorded = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'"
    )
    assert sorted(int(r.data.params["trial_number"]) for r in recorded) == [t.number for t in trials]
    assert study_run.data.metrics["best_value"] == study.best_value


def _no_gpu_worker(project: Project, api: str) -> None:
    """A8: with the gpu worker stopped, `train` stays Late, is cancelled, and the pipeline fails saying why."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    from forgeline.flows.stack import read_state
    from forgeline.flows.stack.processes import _terminate

    state = read_state(project.home)
    assert state is not None
    assert _terminate(state.proc("worker-gpu"), grace=5) in ("stopped", "killed")
    late = project.forgeline(
        "run", "--config", "configs/smoke.yaml", "--deployed", "--fresh", *FALLBACK,
        "--set", "deploy.gpu_start_timeout=25", check=False,
    )  # fmt: skip
    output = late.stdout + late.stderr
    assert late.returncode == 1, output
    assert "stayed Late for 25 s with no live worker on pool 'gpu'" in output, output
    assert "prefect worker start --pool gpu" in output
    with prefect_client(api) as client:
        (train, *_) = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )
        assert train.state.name == "Cancelled", train.state
        assert "Late" in [s.name for s in client.read_flow_run_states(train.id)]
        (pipeline, *_) = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["pipeline"])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )
        assert pipeline.state.name == "Failed" and "no live worker" in pipeline.state.message


def _retrain_runs(api: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(api) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])))


def _wait_retrains(api: str, count: int, timeout: float = 240) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _retrain_runs(api)
        if len(runs) >= count and all(r.state and r.state.is_final() for r in runs):
            return runs
        time.sleep(2)
    raise AssertionError(f"expected {count} finished retrain runs, got {[r.state for r in _retrain_runs(api)]}")


def _retrain_on_new_data(project: Project, api: str) -> None:
    from mlflow import MlflowClient

    new = project.root / "new_data.txt"
    new.write_text(NEW_TEXT)
    ingest = ["ingest", "--config", "configs/smoke.yaml", str(new)]
    out = project.forgeline(*ingest).stdout
    assert "emitted forgeline.dataset.updated" in out, out
    assert not new.exists()  # moved into the incoming folder under its content hash
    incoming = list((project.root / "data" / "incoming").iterdir())
    assert len(incoming) == 1 and incoming[0].read_text() == NEW_TEXT
    fingerprint = out.split("incoming fingerprint ")[1].split()[0]

    (retrain,) = _wait_retrains(api, 1)
    assert retrain.state.is_completed(), retrain.state
    assert retrain.parameters["fingerprint"] == fingerprint  # from the event payload
    assert retrain.work_pool_name == "cpu"

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{project.mlflow_port}")
    experiment = client.get_experiment_by_name("forgeline-smoke")
    retrained = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`forgeline.retrain_fingerprint` = '{fingerprint}'"
    )
    assert len(retrained) == 1 and retrained[0].data.tags["model_version"] == "2"
    assert retrained[0].data.params["model.init_from"] == "models:/forgeline-smoke-lm@champion"
    assert "data/incoming" in retrained[0].data.params["data.sources"]

    # The same data again: nothing new, no event, no retrain.
    new.write_text(NEW_TEXT)
    assert "nothing new" in project.forgeline(*ingest).stdout
    # Even a forced event for the same fingerprint retrains nothing (the flow run skips).
    new.write_text(NEW_TEXT)
    project.forgeline(*ingest, "--force")
    runs = _wait_retrains(api, 2)
    assert len(runs) == 2 and all(r.state.is_completed() for r in runs)
    versions = client.search_model_versions("name = 'forgeline-smoke-lm'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    time.sleep(3)
    assert len(_retrain_runs(api)) == 2
