"""Deployed-mode logic on the session's Prefect test server, without workers or the stack.

- the seam's wait (reliability row A8): a GPU-pool run with no live worker is cancelled after
  ``deploy.gpu_start_timeout`` with one clear error; a pool whose worker sends heartbeats is waited on;
- one Optuna study shared by several ``tune`` flow runs in worker mode (``tune_with_workers``);
- ``prefect deploy --all`` on the committed ``prefect.yaml`` makes the same deployments as ``forgeline deploy``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from forgeline.tasks.config import PipelineConfig, load_config
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# -------------------------------------------------------------------------------------------- A8
def test_run_with_no_live_worker_is_cancelled_with_a_clear_error(project: Project) -> None:
    from prefect import get_client

    from forgeline.flows.deploy import deploy_all
    from forgeline.flows.seam import DeployedRunError, submit, wait_for_runs

    config = load_config(
        "smoke.yaml",
        ["deploy.gpu_pool.name=gpu-a8", "deploy.cpu_pool.name=cpu-a8", "deploy.gpu_start_timeout=2"],
    )
    deploy_all(config, source=ROOT)
    run = submit("train/train", {"config": config.model_dump(mode="json"), "dataset_dir": "x", "fingerprint": "y"})
    t0 = time.monotonic()
    with pytest.raises(DeployedRunError) as err:
        wait_for_runs([run], config, "train", poll=0.5)
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert "\n" not in message
    assert f"train flow run {run.name} ({run.id}) stayed Scheduled for 2 s with no live worker on pool 'gpu-a8'" in (
        message
    )
    assert "prefect worker start --pool gpu-a8" in message and "deploy.gpu_start_timeout" in message
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.name == "Cancelled"


@pytest.mark.slow  # 16 s; the no-live-worker case above stays in the default suite
def test_a_pool_with_a_live_worker_is_waited_on(project: Project) -> None:
    from prefect import get_client

    from forgeline.flows.deploy import deploy_all
    from forgeline.flows.seam import DeployedRunError, pool_has_live_worker, submit, wait_for_runs

    config = load_config(
        "smoke.yaml",
        [
            "deploy.gpu_pool.name=gpu-busy",
            "deploy.cpu_pool.name=cpu-busy",
            "deploy.gpu_start_timeout=2",
            "deploy.train_timeout=6",
        ],
    )
    deploy_all(config, source=ROOT)
    with get_client(sync_client=True) as client:
        assert not pool_has_live_worker(client, "gpu-busy")
    stop = threading.Event()

    def heartbeats() -> None:  # what a worker of the pool sends (it never picks up the run here)
        with get_client(sync_client=True) as client:
            while not stop.is_set():
                client.send_worker_heartbeat("gpu-busy", "test-worker", heartbeat_interval_seconds=1)
                time.sleep(0.5)

    beating = threading.Thread(target=heartbeats, daemon=True)
    beating.start()
    try:
        time.sleep(1.0)
        with get_client(sync_client=True) as client:
            assert pool_has_live_worker(client, "gpu-busy")
        run = submit("train/train", {"config": config.model_dump(mode="json"), "dataset_dir": "x", "fingerprint": "y"})
        with pytest.raises(DeployedRunError, match=r"still Scheduled after deploy\.train_timeout \(6 s\)"):
            wait_for_runs([run], config, "train", poll=0.5)
    finally:
        stop.set()
        beating.join()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run.id).state.name == "Scheduled"  # queued, not cancelled
        time.sleep(3.5)  # three heartbeat intervals of silence
        assert not pool_has_live_worker(client, "gpu-busy")


# ------------------------------------------------------------------------------- parallel search
def test_tune_workers_share_one_study(project: Project) -> None:
    import mlflow
    import optuna

    from forgeline.flows.tune import tune_flow, tune_with_workers
    from forgeline.tasks.data.cleaning import clean_dataset

    config = load_config(
        "smoke.yaml",
        [
            "tune.n_trials=4",
            "tune.parallelism=2",
            "tune.max_steps=10",
            "tune.eval_interval=5",
            "tune.startup_trials=4",
            "tune.search_space.train.learning_rate={type: float, low: 1.0e-3, high: 1.0e-2, log: true}",
        ],
    )
    cleaned = clean_dataset(config.data, base_dir=project.root)
    results: list[Any] = []
    errors: list[BaseException] = []
    polls: list[float] = []

    def launch(worker_config: PipelineConfig, on_poll: Callable[[], None]) -> None:
        assert worker_config.tune.storage == f"sqlite:///{project.root / 'mlruns' / 'optuna.db'}"

        def work(index: int) -> None:
            try:
                results.append(tune_flow(worker_config, cleaned.dataset_dir, cleaned.fingerprint, worker=index))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(worker_config.tune.parallelism)]
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            on_poll()
            polls.append(time.monotonic())
            time.sleep(0.5)

    parent = mlflow.MlflowClient().create_run(
        mlflow.MlflowClient().create_experiment("parent-of-tune"), run_name="pipeline"
    )
    result = tune_with_workers(
        config, cleaned.dataset_dir, cleaned.fingerprint, launch, parent_run_id=parent.info.run_id, poll=0.5
    )
    assert not errors, errors
    assert len(results) == 2 and polls
    study = optuna.load_study(study_name=result.study_name, storage=result.storage_url)
    trials = study.get_trials()
    assert 4 <= len(trials) <= 5  # a simultaneous last pick by both workers may add one
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    assert sum(r.trials_this_run for r in results) == len(trials)  # every trial ran in one of the workers
    assert result.trials_this_run == len(trials) and result.counts["done"] == len(trials)
    assert result.best_value == study.best_value and result.best_params == study.best_params

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(config.name)
    (study_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.runName` = 'tune'")
    assert study_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert study_run.info.status == "FINISHED"
    recorded = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'"
    )
    assert sorted(int(r.data.params["trial_number"]) for r in recorded) == [t.number for t in trials]
    assert study_run.data.metrics["best_value"] == study.best_value


# ---------------------------------------------------------------------------------- prefect.yaml
def _deployments(names: list[str]) -> dict[str, dict[str, Any]]:
    """What the server holds for each deployment, in a comparable form (automations included)."""
    from prefect import get_client

    out: dict[str, dict[str, Any]] = {}
    with get_client(sync_client=True) as client:
        for name in names:
            d = client.read_deployment_by_name(f"{name}/{name}")
            automations = client.read_resource_related_automations(f"prefect.deployment.{d.id}")
            out[name] = {
                "entrypoint": d.entrypoint,
                "pool": d.work_pool_name,
                "parameters": d.parameters,
                "description": d.description,
                "tags": sorted(d.tags),
                "pull_steps": d.pull_steps,
                "concurrency": (
                    d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
                    d.concurrency_options.collision_strategy.value if d.concurrency_options else None,
                ),
                "schedules": sorted(
                    (str(s.schedule.model_dump(mode="json", exclude={"timezone"})), s.active) for s in d.schedules
                ),
                "triggers": sorted(
                    (a.name, a.trigger.model_dump_json(exclude={"id"}), str(a.actions[0].parameters))
                    for a in automations
                ),
            }
    return out


@pytest.mark.slow  # about 20-30 s; the default suite stays near 12 min on 2 cores
def test_prefect_deploy_all_makes_the_same_deployments(project: Project, prefect_server: str) -> None:
    from forgeline.flows.deploy import DEPLOYMENTS, deploy_all

    names = list(DEPLOYMENTS)
    deploy_all(load_config(ROOT / "configs" / "default.yaml"), source=ROOT)
    ours = _deployments(names)
    assert ours["watch"]["concurrency"] == (1, "CANCEL_NEW") and not ours["watch"]["schedules"]
    assert len(ours["watch"]["triggers"]) == 1 and "prefect.flow-run.Crashed" in ours["watch"]["triggers"][0][1]
    assert ours["retrain"]["concurrency"][0] == 1
    assert len(ours["retrain"]["triggers"]) == 1 and "event.payload.fingerprint" in ours["retrain"]["triggers"][0][2]
    assert str(ROOT) in str(ours["pipeline"]["pull_steps"])  # workers run the flows in the project folder
    from prefect import get_client

    with get_client(sync_client=True) as client:  # start from nothing, so nothing of ours is left to compare
        for name in names:
            deployment = client.read_deployment_by_name(f"{name}/{name}")
            for automation in client.read_resource_related_automations(f"prefect.deployment.{deployment.id}"):
                client.delete_automation(automation.id)
            client.delete_deployment(deployment.id)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": prefect_server, "PYTHONPATH": str(ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_HOME"] = str(project.root / ".prefect")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    theirs = _deployments(names)
    assert theirs == ours
