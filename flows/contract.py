"""The contract between the flows: names both sides of a hand-off must agree on, and the outcome record.

A leaf: it imports nothing from ``forgeline.flows``, so every flow (and the seam that dispatches them, and
the deployment code that configures their pools) can import it without an import circle. What crosses from
one flow to another is here: the deployment names the seam runs, the environment a GPU pool hands its flow
runs, the MLflow artifacts a deployed flow leaves for its caller, and the event that starts a retrain.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.tracking import queries, records

logger = logging.getLogger(__name__)

# Deployments, as ``flow name/deployment name`` (flows/deploy.py creates them).
PIPELINE_DEPLOYMENT = "pipeline/pipeline"
TRAIN_DEPLOYMENT = "train/train"
TUNE_DEPLOYMENT = "tune/tune"

# Set by a work pool's job template (flows/deploy.py), read in the flow run (check_cuda).
REQUIRE_CUDA_ENV = "FORGELINE_REQUIRE_CUDA"
POOL_ENV = "FORGELINE_WORK_POOL"

# Artifacts a deployed flow run leaves on its MLflow run for the pipeline to read back.
TUNE_ARTIFACT = "tune_result.json"  # written by forgeline.tasks.tracking.tune_tracking on the tune run
OUTCOME_ARTIFACT = "forgeline/train_outcome.json"

# Emitted by `forgeline ingest` and the watch flow; the retrain deployment's trigger expects it.
EVENT = "forgeline.dataset.updated"


def resource_id(config: PipelineConfig) -> str:
    """The event resource of this config's dataset (triggers match it exactly)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in config.name)
    return f"forgeline.dataset.{safe}"


def set_flow_env_defaults() -> None:
    """What a process that runs our flows wants from Prefect and the tokenizers; call before Prefect is imported.

    Our log lines in the flow runs' logs, no analytics, no tokenizer fork warnings. ``setdefault``: a user's
    own setting wins.
    """
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "forgeline")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def check_cuda(config: PipelineConfig) -> None:
    """Fail fast in a flow run on a GPU pool that finds no CUDA, unless ``deploy.allow_cpu_fallback``.

    Args:
        config: Supplies ``deploy.allow_cpu_fallback``.

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


class Outcome(Protocol):
    """What :func:`record_outcome` needs of the train flow's hand-off (``forgeline.flows.stages.TrainOutcome``)."""

    train_run_id: str

    def model_dump_json(self) -> str:
        """The outcome as JSON."""
        ...


def record_outcome(outcome: Outcome) -> None:
    """Write ``outcome`` to its train run, where :func:`read_outcome_json` finds it (called by the train flow)."""
    records.log_text(outcome.train_run_id, outcome.model_dump_json(), OUTCOME_ARTIFACT)


def read_outcome_json(parent_run_id: str, flow_run_id: str) -> str | None:
    """The JSON that :func:`record_outcome` wrote in train flow run ``flow_run_id``; ``None`` if it wrote none."""
    return queries.stage_artifact_text(parent_run_id, flow_run_id, "train", OUTCOME_ARTIFACT)


def read_tune_result_json(parent_run_id: str, flow_run_id: str) -> str | None:
    """The ``tune_result.json`` of tune flow run ``flow_run_id``; ``None`` if it left none."""
    return queries.stage_artifact_text(parent_run_id, flow_run_id, "tune", TUNE_ARTIFACT)
