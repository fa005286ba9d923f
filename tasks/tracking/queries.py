"""Read-mostly MLflow calls for the command line and the flows' hand-offs: runs, registry, artifacts.

The ``forgeline`` commands (compare, models, promote, rollback, reproduce, generate, serve) and the seam
between the flows reach MLflow only through this module and the rest of the tracking package. A lookup
that finds nothing returns ``None`` (or an empty list) instead of raising MLflow's own exception, so the
caller can say in one line what is missing.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from forgeline.tasks.tracking.runs import PARENT_TAG, RUN_NAME_TAG, client, find_runs

logger = logging.getLogger(__name__)

PIPELINE_RUN_NAME = "pipeline"
FLOW_RUN_TAG = "prefect.flow_run_id"


# ------------------------------------------------------------------------------------------- start-up
def import_mlflow() -> None:
    """Import MLflow (about a second), so a caller can do it early, off the critical path."""
    import mlflow  # noqa: F401


def import_sqlite_store() -> None:
    """Import MLflow's SQLAlchemy tracking and registry stores (about 0.8 s), used by ``sqlite:`` URIs."""
    import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


# ----------------------------------------------------------------------------------------- experiments
def experiment_id(name: str) -> str | None:
    """The id of the experiment called ``name``, or ``None`` when the store has none by that name."""
    exp = client().get_experiment_by_name(name)
    return None if exp is None else str(exp.experiment_id)


def experiment_names(limit: int = 50) -> list[str]:
    """Names of (up to ``limit``) experiments in the store, sorted."""
    return sorted(e.name for e in client().search_experiments(max_results=limit))


def pipeline_runs(experiment: str, max_results: int = 1000) -> list[Any]:
    """Top-level ``pipeline`` runs of an experiment (MLflow ``Run`` objects; nested runs left out)."""
    runs = client().search_runs(
        [experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{PIPELINE_RUN_NAME}'", max_results=max_results
    )
    return [r for r in runs if PARENT_TAG not in r.data.tags]


def pipeline_run_of_flow_run(experiment_name: str, flow_run_id: str) -> Any | None:
    """The ``pipeline`` run that Prefect flow run ``flow_run_id`` recorded, or ``None``."""
    exp = experiment_id(experiment_name)
    if exp is None:
        return None
    runs = client().search_runs(
        [exp],
        filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and tags.`{RUN_NAME_TAG}` = '{PIPELINE_RUN_NAME}'",
    )
    return runs[0] if runs else None


def get_run(run_id: str) -> Any | None:
    """The MLflow run ``run_id``, or ``None`` when it cannot be read."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_run(run_id)
    except MlflowException:
        return None


def set_run_tag(run_id: str, key: str, value: str) -> None:
    """Set one tag on a run."""
    client().set_tag(run_id, key, value)


# -------------------------------------------------------------------------------------------- artifacts
def load_text_artifact(run_id: str, artifact: str) -> str | None:
    """Text of ``artifact`` on run ``run_id``; ``None`` when the run has no such artifact."""
    import mlflow

    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")
    except Exception:  # noqa: BLE001 - MLflow raises several kinds for "not there"; all mean the same here
        return None


def stage_artifact_text(parent_run_id: str, flow_run_id: str, stage: str, artifact: str) -> str | None:
    """Text of ``artifact`` on the ``stage`` run that Prefect flow run ``flow_run_id`` created, or ``None``.

    Looks in the parent run's experiment; a retried flow run may have left several ``stage`` runs, and the
    first that holds the artifact wins.
    """
    experiment = client().get_run(parent_run_id).info.experiment_id
    for run_id, _tags in find_runs(experiment, {FLOW_RUN_TAG: flow_run_id, RUN_NAME_TAG: stage}):
        text = load_text_artifact(run_id, artifact)
        if text is not None:
            return text
    return None


def download_text_artifact(run_id: str, artifact: str) -> str:
    """Text of ``artifact`` on run ``run_id``, downloaded through the artifact repository.

    Raises:
        ValueError: The run has no such artifact (one line).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="forgeline-artifact-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise ValueError(f"train run {run_id} has no {artifact} artifact ({exc})") from None
        return Path(path).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- registry
def registered_models(limit: int = 200) -> list[Any]:
    """Every registered model (up to ``limit``)."""
    return list(client().search_registered_models(max_results=limit))


def registered_model(name: str) -> Any | None:
    """The registered model ``name``, or ``None`` when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_registered_model(name)
    except MlflowException:
        return None


def model_versions(name: str) -> list[Any]:
    """Every version of registered model ``name``."""
    return list(client().search_model_versions(f"name = '{name}'"))


def model_version(name: str, version: str) -> Any | None:
    """Version ``version`` of ``name``, or ``None`` when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version(name, str(version))
    except MlflowException:
        return None


def version_by_alias(name: str, alias: str) -> Any | None:
    """The version of ``name`` that ``alias`` points at, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` of ``name`` at ``version``."""
    client().set_registered_model_alias(name, alias, str(version))


def set_version_tag(name: str, version: str, key: str, value: str) -> None:
    """Set one tag on a model version."""
    client().set_model_version_tag(name, str(version), key, value)


def tag_quietly(run_id: str | None, name: str, version: str | None, key: str, value: str) -> None:
    """Tag a run and a model version when given; a failure is only logged (the tags are a courtesy)."""
    with contextlib.suppress(Exception):
        if run_id:
            set_run_tag(run_id, key, value)
    with contextlib.suppress(Exception):
        if version:
            set_version_tag(name, version, key, value)


def parent_run_metrics(run_id: str) -> dict[str, float]:
    """Metrics of the parent (pipeline) run of ``run_id``; empty when there is none or it cannot be read."""
    with contextlib.suppress(Exception):
        parent = client().get_run(run_id).data.tags.get(PARENT_TAG)
        if parent:
            return {k: float(v) for k, v in client().get_run(parent).data.metrics.items()}
    return {}
