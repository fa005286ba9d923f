"""The ``train`` flow: its own flow so a deployment can pin it to the GPU work pool."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from forgeline.flows.contract import check_cuda, record_outcome
from forgeline.flows.stages import RunContext, TrainOutcome, run_tags, run_training
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.tracking import store


@flow(name="train", flow_run_name="train {config.name}", log_prints=False)
def train_flow(
    config: PipelineConfig,
    dataset_dir: str,
    fingerprint: str,
    parent_run_id: str | None = None,
    fresh: bool = False,
) -> TrainOutcome:
    """Train (or resume) the model for ``config`` on a cleaned dataset and log it to MLflow.

    Args:
        config: The resolved pipeline config.
        dataset_dir: Folder of the cleaned dataset (content-addressed by ``fingerprint``).
        fingerprint: The cleaned data's fingerprint.
        parent_run_id: The pipeline's MLflow run, when called from the pipeline.
        fresh: Discard checkpoints of this config and data and train from scratch.
    """
    check_cuda(config)
    base_dir = Path.cwd()
    store.setup_tracking(config.tracking, base_dir)
    experiment_id = store.ensure_experiment(config.name, config.tracking, base_dir)
    ctx = RunContext(
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        tags=run_tags(config, base_dir),
        base_dir=str(base_dir),
    )
    outcome = run_training(config, dataset_dir, fingerprint, ctx, fresh=fresh)
    record_outcome(outcome)  # read back through MLflow when this ran as a deployment (flows/contract.py)
    return outcome
