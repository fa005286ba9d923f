"""The ``tune`` flow: an Optuna search recorded in MLflow, its own flow like ``train``.

Run by the pipeline between clean and train when ``tune.n_trials > 0``; the final training then uses
the best trial's parameters merged into the config (never written back to ``configs/``). Browse the
study while it runs with ``optuna-dashboard <storage-url>`` (the URL is the ``optuna.storage_url``
tag of the ``tune`` run; by default ``sqlite:////ABS/PATH/mlruns/optuna.db``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import optuna
from prefect import flow

from tasks import progress, tracking, tune_tracking, tuning
from tasks.config import PipelineConfig
from tasks.stages import training_dir
from tasks.tuning import TuneResult

logger = logging.getLogger(__name__)


@flow(name="tune", flow_run_name="tune {config.name}", log_prints=False)
def tune_flow(
    config: PipelineConfig,
    dataset_dir: str,
    fingerprint: str,
    parent_run_id: str | None = None,
) -> TuneResult:
    """Search ``tune.search_space`` (create or resume the study) and return the best parameters.

    Args:
        config: The resolved pipeline config with ``tune.n_trials > 0``.
        dataset_dir: Folder of the cleaned dataset.
        fingerprint: The cleaned data's fingerprint (part of the study name).
        parent_run_id: The pipeline's MLflow run, when called from the pipeline.

    Returns:
        Best params and value, study name, storage URL, trial counts.

    Raises:
        TuneError: no trial completed (the ``tune`` run ends FAILED).
    """
    from flows.seam import check_cuda

    check_cuda(config)
    base_dir = Path.cwd()
    tracking.setup_tracking(config.tracking, base_dir)
    experiment_id = tracking.ensure_experiment(config.name, config.tracking, base_dir)
    tags = {**tracking.git_tags(base_dir), **tracking.prefect_tags(), "config_hash": config.config_hash()}
    trials_root = training_dir(config, fingerprint, base_dir).parent
    spec = tuning.build_spec(config, dataset_dir, fingerprint, trials_root=trials_root, base_dir=base_dir)
    with tune_tracking.study_run(experiment_id, spec, parent_run_id=parent_run_id, tags=tags) as recorder:
        try:
            result = tuning.run_study(spec, on_progress=lambda study: _sweep(recorder, study, config))
        finally:
            progress.reporter().search_done()
        recorder.finish(tuning.open_study(spec), result)
        result.require_best()
    logger.info(
        "tuning done: best val/loss %.4f (trial %s) with %s; %s",
        result.best_value,
        result.best_trial,
        result.best_params,
        ", ".join(f"{v} {k}" for k, v in result.counts.items() if v and k != "done"),
    )
    return result


def _sweep(recorder: tune_tracking.StudyRecorder, study: optuna.Study, config: PipelineConfig) -> None:
    """Record finished trials in MLflow, then show the trial counts and the best value so far."""
    recorder.sweep(study)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    values = [t.value for t in complete if t.value is not None and math.isfinite(t.value)]
    progress.reporter().search_update(tuning.state_counts(study), config.tune.n_trials, min(values, default=None))


def tuned_config(
    config: PipelineConfig, dataset_dir: str, fingerprint: str, parent_run_id: str | None = None
) -> PipelineConfig:
    """``config`` itself when tuning is off; else the tune flow's best parameters merged into it."""
    if config.tune.n_trials == 0:
        return config
    result = tune_flow(config, dataset_dir, fingerprint, parent_run_id=parent_run_id)
    return tuning.apply_params(config, result.best_params)
