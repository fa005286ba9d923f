"""The one seam between local and deployed mode for the GPU stages.

Local mode calls ``train_flow`` in-process (a subflow of the pipeline). Deployed mode runs the ``train``
deployment on the GPU work pool with ``run_deployment`` (Prefect links it as a subflow), waits for it, and
reads the outcome back through MLflow: the train flow writes its ``TrainOutcome`` as an artifact of its
``train`` run, found by the ``prefect.flow_run_id`` tag. Only ids and URIs cross the seam, so no Prefect
result storage is needed. Tuning goes the same way; with ``tune.parallelism > 1`` it becomes that many
``tune`` flow runs sharing one study (:func:`forgeline.flows.tune.tune_with_workers`).

While it waits, the seam watches the pool: a child run still Scheduled (or Late) while the pool has no live
worker for ``deploy.gpu_start_timeout`` seconds is cancelled and the pipeline fails with one line saying so
(reliability row A8), instead of waiting forever. A run that waits behind the pool's concurrency limit, with
its workers alive, is not affected.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from forgeline.flows.contract import (
    OUTCOME_ARTIFACT,
    TRAIN_DEPLOYMENT,
    TUNE_ARTIFACT,
    TUNE_DEPLOYMENT,
    read_outcome_json,
    read_tune_result_json,
)
from forgeline.flows.stages import TrainOutcome
from forgeline.flows.train import train_flow
from forgeline.tasks.config import PipelineConfig

logger = logging.getLogger(__name__)


class DeployedRunError(RuntimeError):
    """A deployed flow run did not complete, or left no outcome in MLflow; the message is one line."""


def run_train(
    config: PipelineConfig,
    dataset_dir: str,
    fingerprint: str,
    parent_run_id: str,
    fresh: bool,
    deployed: bool,
) -> TrainOutcome:
    """Train in-process (local mode) or as a flow run of the ``train`` deployment (deployed mode).

    Args:
        config: The resolved (possibly tuned) pipeline config.
        dataset_dir: Folder of the cleaned dataset (workers must see the same path).
        fingerprint: The cleaned data's fingerprint.
        parent_run_id: The pipeline's MLflow run.
        fresh: Discard checkpoints and train anew.
        deployed: Run on the GPU pool through the ``train`` deployment.

    Returns:
        The train stage's hand-off (run id, model URI, lineage, training result).

    Raises:
        DeployedRunError: the deployed train run failed, crashed, timed out, or left no outcome.
    """
    if not deployed:
        return train_flow(config, dataset_dir, fingerprint, parent_run_id=parent_run_id, fresh=fresh)
    parameters = {
        "config": config.model_dump(mode="json"),
        "dataset_dir": dataset_dir,
        "fingerprint": fingerprint,
        "parent_run_id": parent_run_id,
        "fresh": fresh,
    }
    (child,) = wait_for_runs([submit(TRAIN_DEPLOYMENT, parameters)], config, "train")
    return read_outcome(parent_run_id, str(child.id))


def run_tune(
    config: PipelineConfig, dataset_dir: str, fingerprint: str, parent_run_id: str, deployed: bool
) -> PipelineConfig:
    """``config`` itself when tuning is off; else the best trial's parameters merged into it.

    Local mode runs ``tune_flow`` in-process. Deployed mode runs the ``tune`` deployment on the GPU pool and
    reads the study's result from the ``tune_result.json`` artifact of its MLflow ``tune`` run; with
    ``tune.parallelism`` N > 1 it starts N ``tune`` flow runs as workers of one study instead and reads the
    best trial from the study itself.

    Raises:
        DeployedRunError: a deployed tune run did not complete, or left no result.
    """
    if config.tune.n_trials == 0:
        return config  # no search: not even its imports (Optuna) on the way
    # Imported only when tuning: Optuna and the search add about a second to every start-up otherwise.
    from forgeline.flows.tune import tune_with_workers, tuned_config
    from forgeline.tasks.tune.space import apply_params
    from forgeline.tasks.tune.study import TuneResult

    if not deployed:
        return tuned_config(config, dataset_dir, fingerprint, parent_run_id=parent_run_id)
    parameters = {
        "config": config.model_dump(mode="json"),
        "dataset_dir": dataset_dir,
        "fingerprint": fingerprint,
        "parent_run_id": parent_run_id,
    }
    if config.tune.parallelism > 1:

        def launch(worker_config: PipelineConfig, on_poll: Callable[[], None]) -> None:
            shared = parameters | {"config": worker_config.model_dump(mode="json")}
            runs = [submit(TUNE_DEPLOYMENT, shared | {"worker": i}) for i in range(config.tune.parallelism)]
            ids = ", ".join(str(run.id) for run in runs)
            logger.info("%d tune worker flow runs on pool %s: %s", len(runs), config.deploy.gpu_pool.name, ids)
            wait_for_runs(runs, config, "tune", on_poll=on_poll)

        result = tune_with_workers(config, dataset_dir, fingerprint, launch, parent_run_id=parent_run_id)
        return apply_params(config, result.best_params)
    (child,) = wait_for_runs([submit(TUNE_DEPLOYMENT, parameters)], config, "tune")
    text = read_tune_result_json(parent_run_id, str(child.id))
    if text is None:
        raise DeployedRunError(f"tune flow run {child.id} completed but left no {TUNE_ARTIFACT} in MLflow")
    result = TuneResult.model_validate(json.loads(text))
    logger.info("deployed tuning done: best %s with %s", result.best_value, result.best_params)
    return apply_params(config, result.best_params)


def submit(name: str, parameters: dict[str, Any]) -> Any:
    """Create a flow run of deployment ``name`` (linked to the calling flow run as a subflow) without waiting."""
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=0)
    logger.info("submitted %s as flow run %s (%s)", name, run.name, run.id)
    return run


def wait_for_runs(
    runs: list[Any],
    config: PipelineConfig,
    stage: str,
    *,
    poll: float = 2.0,
    on_poll: Callable[[], None] | None = None,
) -> list[Any]:
    """Wait until every flow run in ``runs`` ended; return them if all completed.

    Args:
        runs: Flow runs from :func:`submit`.
        config: Supplies ``deploy.gpu_start_timeout``, ``deploy.train_timeout`` and the GPU pool's name.
        stage: What the runs are (``train``, ``tune``), for the messages.
        poll: Seconds between two looks.
        on_poll: Called at every look (the parallel search records finished trials there).

    Raises:
        DeployedRunError: a run did not complete; runs stayed Scheduled/Late with no live worker on their pool
            for ``deploy.gpu_start_timeout`` seconds (they are cancelled); or ``deploy.train_timeout`` passed.
    """
    from prefect import get_client

    deploy = config.deploy
    started = time.monotonic()
    no_worker_since: float | None = None
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(run.id) for run in runs]
            waiting = [run for run in current if run.state is None or not run.state.is_final()]
            if not waiting:
                break
            if on_poll is not None:
                on_poll()
            now = time.monotonic()
            unstarted = [run for run in waiting if run.state is None or run.state.is_scheduled()]
            pools = {run.work_pool_name or deploy.gpu_pool.name for run in unstarted}
            dead = sorted(pool for pool in pools if not pool_has_live_worker(client, pool))
            if not dead:
                no_worker_since = None
            else:
                no_worker_since = no_worker_since if no_worker_since is not None else now
                if now - no_worker_since >= deploy.gpu_start_timeout:
                    stuck = [run for run in unstarted if (run.work_pool_name or deploy.gpu_pool.name) in dead]
                    for run in stuck:
                        cancel(client, run.id, f"no live worker on pool {run.work_pool_name!r}")
                    first = stuck[0]
                    state = first.state.name if first.state else "Scheduled"
                    raise DeployedRunError(
                        f"{stage} flow run {first.name} ({first.id}) stayed {state} for "
                        f"{deploy.gpu_start_timeout:.0f} s with no live worker on pool {first.work_pool_name!r}; "
                        f"cancelled {len(stuck)} run(s). Start a worker for the pool (forgeline up, or: prefect "
                        f"worker start --pool {first.work_pool_name}) or raise deploy.gpu_start_timeout"
                    )
            if deploy.train_timeout is not None and now - started >= deploy.train_timeout:
                run = waiting[0]
                raise DeployedRunError(
                    f"{stage} flow run {run.name} ({run.id}) on pool {run.work_pool_name} still "
                    f"{run.state.name if run.state else 'unknown'} after deploy.train_timeout "
                    f"({deploy.train_timeout:.0f} s)"
                )
            time.sleep(poll)
    failed = [run for run in current if not run.state.is_completed()]
    if failed:
        run = failed[0]
        message = (run.state.message or "").strip().splitlines()
        raise DeployedRunError(
            f"{stage} flow run {run.name} ({run.id}) on pool {run.work_pool_name} ended {run.state.name}"
            + (f": {message[0]}" if message else "")
            + (f" ({len(failed)} of {len(current)} runs did not complete)" if len(current) > 1 else "")
        )
    return current


def pool_has_live_worker(client: Any, pool: str) -> bool:
    """Whether any worker of ``pool`` sent a heartbeat within three of its heartbeat intervals.

    Computed from the workers' own heartbeats rather than their ONLINE/OFFLINE status, which the server
    updates only every so often: a killed worker counts as gone within three intervals.
    """
    from prefect.exceptions import ObjectNotFound

    try:
        workers = client.read_workers_for_work_pool(pool)
    except ObjectNotFound:
        return False
    now = datetime.now(UTC)
    for worker in workers:
        if worker.last_heartbeat_time is None:
            continue
        interval = worker.heartbeat_interval_seconds or 30
        if (now - worker.last_heartbeat_time).total_seconds() <= 3 * interval:
            return True
    return False


def cancel(client: Any, flow_run_id: Any, reason: str) -> None:
    """Move a flow run that never started to Cancelled (no infrastructure to stop)."""
    from prefect.states import Cancelled

    try:
        client.set_flow_run_state(flow_run_id, Cancelled(message=reason), force=True)
    except Exception as exc:  # noqa: BLE001 - the error that follows says what matters
        logger.warning("could not cancel flow run %s: %s", flow_run_id, exc)


def read_outcome(parent_run_id: str, flow_run_id: str) -> TrainOutcome:
    """The ``TrainOutcome`` the train flow run ``flow_run_id`` recorded in MLflow.

    Raises:
        DeployedRunError: the run left no outcome.
    """
    text = read_outcome_json(parent_run_id, flow_run_id)
    if text is None:
        raise DeployedRunError(f"train flow run {flow_run_id} completed but left no {OUTCOME_ARTIFACT} in MLflow")
    return TrainOutcome.model_validate(json.loads(text))
