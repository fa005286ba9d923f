"""The ``tune`` flow: an Optuna search recorded in MLflow, its own flow like ``train``.

Run by the pipeline between clean and train when ``tune.n_trials > 0``; the final training then uses
the best trial's parameters merged into the config (never written back to ``configs/``). Browse the
study while it runs with ``optuna-dashboard <storage-url>`` (the URL is the ``optuna.storage_url``
tag of the ``tune`` run; by default ``sqlite:////ABS/PATH/mlruns/optuna.db``).

Deployed with ``tune.parallelism > 1``, the pipeline's seam starts that many ``tune`` flow runs in worker mode
(``worker=i``) on the GPU pool: each joins the one study (created beforehand by the pipeline, in storage every
worker reaches) and runs trials until the study holds ``n_trials`` finished ones, so the trials spread over
as many GPU workers as are free. :func:`tune_with_workers` is the pipeline's side: it owns the MLflow ``tune``
run, records trials while the workers run, and reads the best trial from the study at the end.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from prefect import flow

from forgeline.flows.contract import check_cuda
from forgeline.flows.stages import run_tags, training_dir
from forgeline.tasks import progress
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.tracking import store, tune_tracking
from forgeline.tasks.tracking.models import download_model
from forgeline.tasks.tune.space import apply_params
from forgeline.tasks.tune.study import TuneResult, build_spec, open_study, state_counts, study_metric, summarize
from forgeline.tasks.tune.workers import run_study, run_worker

logger = logging.getLogger(__name__)


@flow(name="tune", flow_run_name="tune {config.name}", log_prints=False)
def tune_flow(
    config: PipelineConfig,
    dataset_dir: str,
    fingerprint: str,
    parent_run_id: str | None = None,
    worker: int | None = None,
) -> TuneResult:
    """Search ``tune.search_space`` (create or resume the study) and return the best parameters.

    Args:
        config: The resolved pipeline config with ``tune.n_trials > 0``.
        dataset_dir: Folder of the cleaned dataset.
        fingerprint: The cleaned data's fingerprint (part of the study name).
        parent_run_id: The pipeline's MLflow run, when called from the pipeline.
        worker: Worker mode (set by :func:`tune_with_workers`' launcher): join the existing study as worker
            number ``worker`` and run trials until it holds ``n_trials`` finished ones; the caller records
            the study in MLflow.

    Returns:
        Best params and value, study name, storage URL, trial counts (in worker mode ``trials_this_run`` is
        how many trials this worker ran).

    Raises:
        TuneError: no trial completed (the ``tune`` run ends FAILED); not raised in worker mode.
    """
    check_cuda(config)
    base_dir = Path.cwd()
    trials_root = training_dir(config, fingerprint, base_dir).parent
    spec = build_spec(config, dataset_dir, fingerprint, trials_root=trials_root, base_dir=base_dir)
    if worker is not None:
        ran = run_worker(spec, index=worker, fetch_model=download_model)
        result = summarize(spec, open_study(spec)).model_copy(update={"trials_this_run": ran})
        logger.info("tune worker %d ran %d trial(s) of study %s", worker, ran, spec.study_name)
        return result
    store.setup_tracking(config.tracking, base_dir)
    experiment_id = store.ensure_experiment(config.name, config.tracking, base_dir)
    tags = run_tags(config, base_dir)
    with tune_tracking.study_run(experiment_id, spec, parent_run_id=parent_run_id, tags=tags) as recorder:
        try:
            result = run_study(
                spec, on_progress=lambda study: _sweep(recorder, study, config), fetch_model=download_model
            )
        finally:
            progress.reporter().search_done()
        recorder.finish(open_study(spec), result)
        result.require_best()
    logger.info(
        "tuning done: best %s %.4f (trial %s) with %s; %s",
        study_metric(config)[0],
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
    best = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    progress.reporter().search_update(state_counts(study), config.tune.n_trials, best(values, default=None))


def tuned_config(
    config: PipelineConfig, dataset_dir: str, fingerprint: str, parent_run_id: str | None = None
) -> PipelineConfig:
    """``config`` itself when tuning is off; else the tune flow's best parameters merged into it."""
    if config.tune.n_trials == 0:
        return config
    result = tune_flow(config, dataset_dir, fingerprint, parent_run_id=parent_run_id)
    return apply_params(config, result.best_params)


# A launcher starts the workers with the config they must use (its storage pinned to the study's), calls the
# given function every few seconds while they run, and returns once all ended (raising if one failed).
Launcher = Callable[[PipelineConfig, Callable[[], None]], None]


def tune_with_workers(
    config: PipelineConfig,
    dataset_dir: str,
    fingerprint: str,
    launch: Launcher,
    parent_run_id: str | None = None,
    poll: float = 2.0,
) -> TuneResult:
    """One study shared by ``tune.parallelism`` workers that ``launch`` starts (``tune_flow(..., worker=i)``).

    Creates (or resumes) the study first, so workers only join it; pins ``tune.storage`` to the resolved URL
    so every worker opens the same study; records finished trials under one MLflow ``tune`` run while they
    run; reads the best trial from the study once they are done.

    Args:
        config: The resolved pipeline config with ``tune.n_trials > 0``.
        dataset_dir: Folder of the cleaned dataset (workers must see the same path).
        fingerprint: The cleaned data's fingerprint.
        launch: Starts the workers and waits for them (see ``Launcher``).
        parent_run_id: The pipeline's MLflow run.
        poll: Seconds between two recordings of finished trials (the launcher decides how often it calls).

    Returns:
        The study's best parameters and value, counts and steps.

    Raises:
        TuneError: no trial completed.
    """
    base_dir = Path.cwd()
    store.setup_tracking(config.tracking, base_dir)
    experiment_id = store.ensure_experiment(config.name, config.tracking, base_dir)
    tags = run_tags(config, base_dir)
    trials_root = training_dir(config, fingerprint, base_dir).parent
    spec = build_spec(config, dataset_dir, fingerprint, trials_root=trials_root, base_dir=base_dir)
    study = open_study(spec, create=True)
    before = state_counts(study)
    trials_before = len(study.get_trials(deepcopy=False))
    if trials_before:
        logger.info("resuming study %s: %d of %d trials done", spec.study_name, before["done"], config.tune.n_trials)
    # A URL from $FORGELINE_TUNE_STORAGE may hold a password: keep it out of the workers' flow-run parameters
    # (their worker passes them the same variable).
    from_env = not config.tune.storage and bool(os.environ.get("FORGELINE_TUNE_STORAGE"))
    pinned = config.tune.storage if from_env else spec.storage_url
    worker_config = config.model_copy(update={"tune": config.tune.model_copy(update={"storage": pinned})})
    with tune_tracking.study_run(experiment_id, spec, parent_run_id=parent_run_id, tags=tags) as recorder:
        last = 0.0

        def record() -> None:
            nonlocal last
            if time.monotonic() - last < poll:
                return
            last = time.monotonic()
            try:
                _sweep(recorder, study, config)
            except Exception as exc:  # noqa: BLE001 - recording must never stop the search
                logger.warning("recording finished trials failed (retried at the next look): %s", exc)

        try:
            launch(worker_config, record)
        finally:
            progress.reporter().search_done()
        study = open_study(spec)
        result = summarize(spec, study, trials_before=trials_before, resumed=trials_before > 0)
        recorder.finish(study, result)
        result.require_best()
    logger.info(
        "tuning done: best %s %.4f (trial %s) with %s; %d trial(s) by %d workers",
        study_metric(config)[0],
        result.best_value,
        result.best_trial,
        result.best_params,
        result.trials_this_run,
        config.tune.parallelism,
    )
    return result
