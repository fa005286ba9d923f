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

from flows.deploy import POOL_ENV, REQUIRE_CUDA_ENV
from tasks import tracking
from tasks.config import PipelineConfig
from tasks.stages import TrainOutcome

logger = logging.getLogger(__name__)

TRAIN_DEPLOYMENT = "train/train"
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
    from prefect.deployments import run_deployment

    parameters = {
        "config": config.model_dump(mode="json"),
        "dataset_dir": dataset_dir,
        "fingerprint": fingerprint,
        "parent_run_id": parent_run_id,
        "fresh": fresh,
    }
    logger.info("submitting %s to work pool %s", TRAIN_DEPLOYMENT, config.deploy.gpu_pool.name)
    child = run_deployment(
        TRAIN_DEPLOYMENT,
        parameters=parameters,
        timeout=config.deploy.train_timeout,
        poll_interval=2,
    )
    state = child.state
    if state is None or not state.is_completed():
        name = state.name if state is not None else "unknown"
        message = (state.message or "").strip().splitlines()[0] if state is not None and state.message else ""
        raise DeployedRunError(
            f"train flow run {child.name} ({child.id}) on pool {child.work_pool_name} ended {name}"
            + (f": {message}" if message else "")
        )
    return read_outcome(parent_run_id, str(child.id))


def read_outcome(parent_run_id: str, flow_run_id: str) -> TrainOutcome:
    """The ``TrainOutcome`` the train flow run ``flow_run_id`` recorded in MLflow."""
    import mlflow

    experiment_id = tracking.client().get_run(parent_run_id).info.experiment_id
    runs = tracking.find_runs(experiment_id, {"prefect.flow_run_id": flow_run_id, tracking.RUN_NAME_TAG: "train"})
    for run_id, _tags in runs:
        try:
            text = mlflow.artifacts.load_text(f"runs:/{run_id}/{OUTCOME_ARTIFACT}")
        except Exception:  # noqa: BLE001 - a failed attempt of the same flow run has none; try the next
            continue
        return TrainOutcome.model_validate(json.loads(text))
    raise DeployedRunError(f"train flow run {flow_run_id} completed but left no {OUTCOME_ARTIFACT} in MLflow")


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
