"""The one seam between local and deployed mode for the GPU stages.

Local mode calls ``train_flow`` in-process (a subflow of the pipeline). Deployed mode runs the ``train``
deployment on the GPU work pool with ``run_deployment`` (waiting for it; Prefect links it as a subflow)
and reads the outcome back through MLflow: the train flow writes its ``TrainOutcome`` as an artifact of
its ``train`` run, found by the ``prefect.flow_run_id`` tag. Only ids and URIs cross the seam, so no
Prefect result storage is needed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from flows.deploy import POOL_ENV, REQUIRE_CUDA_ENV
from tasks import tracking
from tasks.config import PipelineConfig
from tasks.stages import TrainOutcome

logger = logging.getLogger(__name__)

TRAIN_DEPLOYMENT = "train/train"
TUNE_DEPLOYMENT = "tune/tune"
TUNE_ARTIFACT = "tune_result.json"  # written by tasks/tune_tracking.py on the tune run
OUTCOME_ARTIFACT = "forgeline/train_outcome.json"


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
        from flows.train import train_flow

        return train_flow(config, dataset_dir, fingerprint, parent_run_id=parent_run_id, fresh=fresh)
    parameters = {
        "config": config.model_dump(mode="json"),
        "dataset_dir": dataset_dir,
        "fingerprint": fingerprint,
        "parent_run_id": parent_run_id,
        "fresh": fresh,
    }
    child = _run_deployment(TRAIN_DEPLOYMENT, parameters, config)
    return read_outcome(parent_run_id, str(child.id))


def run_tune(
    config: PipelineConfig, dataset_dir: str, fingerprint: str, parent_run_id: str, deployed: bool
) -> PipelineConfig:
    """``config`` itself when tuning is off; else the best trial's parameters merged into it.

    Local mode runs ``tune_flow`` in-process; deployed mode runs the ``tune`` deployment on the GPU pool
    and reads the study's result from the ``tune_result.json`` artifact of its MLflow ``tune`` run.

    Raises:
        DeployedRunError: the deployed tune run did not complete, or left no result.
    """
    from flows.tune import tuned_config

    if config.tune.n_trials == 0 or not deployed:
        return tuned_config(config, dataset_dir, fingerprint, parent_run_id=parent_run_id)
    from tasks import tuning

    parameters = {
        "config": config.model_dump(mode="json"),
        "dataset_dir": dataset_dir,
        "fingerprint": fingerprint,
        "parent_run_id": parent_run_id,
    }
    child = _run_deployment(TUNE_DEPLOYMENT, parameters, config)
    text = _load_artifact(parent_run_id, str(child.id), "tune", TUNE_ARTIFACT)
    result = tuning.TuneResult.model_validate(json.loads(text))
    logger.info("deployed tuning done: best %s with %s", result.best_value, result.best_params)
    return tuning.apply_params(config, result.best_params)


def _run_deployment(name: str, parameters: dict[str, Any], config: PipelineConfig) -> Any:
    """Run deployment ``name`` as a subflow, wait, and return its flow run if it completed."""
    from prefect.deployments import run_deployment

    logger.info("submitting %s to work pool %s", name, config.deploy.gpu_pool.name)
    child = run_deployment(name, parameters=parameters, timeout=config.deploy.train_timeout, poll_interval=2)
    state = child.state
    if state is None or not state.is_completed():
        status = state.name if state is not None else "unknown"
        message = (state.message or "").strip().splitlines()[0] if state is not None and state.message else ""
        raise DeployedRunError(
            f"{name.split('/')[0]} flow run {child.name} ({child.id}) on pool {child.work_pool_name} ended {status}"
            + (f": {message}" if message else "")
        )
    return child


def _load_artifact(parent_run_id: str, flow_run_id: str, stage: str, artifact: str) -> str:
    """Text of ``artifact`` on the MLflow ``stage`` run that Prefect flow run ``flow_run_id`` created."""
    import mlflow

    experiment_id = tracking.client().get_run(parent_run_id).info.experiment_id
    runs = tracking.find_runs(experiment_id, {"prefect.flow_run_id": flow_run_id, tracking.RUN_NAME_TAG: stage})
    for run_id, _tags in runs:
        try:
            return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")
        except Exception:  # noqa: BLE001 - a failed attempt of the same flow run has none; try the next
            continue
    raise DeployedRunError(f"{stage} flow run {flow_run_id} completed but left no {artifact} in MLflow")


def read_outcome(parent_run_id: str, flow_run_id: str) -> TrainOutcome:
    """The ``TrainOutcome`` the train flow run ``flow_run_id`` recorded in MLflow."""
    return TrainOutcome.model_validate(
        json.loads(_load_artifact(parent_run_id, flow_run_id, "train", OUTCOME_ARTIFACT))
    )


def record_outcome(outcome: TrainOutcome) -> None:
    """Write ``outcome`` to its train run, where :func:`read_outcome` finds it (called by the train flow)."""
    tracking.log_text(outcome.train_run_id, outcome.model_dump_json(), OUTCOME_ARTIFACT)


def check_cuda(config: PipelineConfig) -> None:
    """Fail fast in a flow run on a GPU pool that finds no CUDA, unless ``deploy.allow_cpu_fallback``.

    Raises:
        RuntimeError: one line naming the pool and the way out.
    """
    if os.environ.get(REQUIRE_CUDA_ENV) != "1":
        return
    import torch

    if torch.cuda.is_available():
        return
    pool = os.environ.get(POOL_ENV, "gpu")
    if config.deploy.allow_cpu_fallback:
        logger.warning("work pool %s: no CUDA device here; training on CPU (deploy.allow_cpu_fallback)", pool)
        return
    raise RuntimeError(
        f"work pool {pool!r} needs CUDA but this worker has none (torch.cuda.is_available() is False); "
        "start its worker on a GPU machine, or set deploy.allow_cpu_fallback: true to train on CPU"
    )
