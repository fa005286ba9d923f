"""MLflow recording of an Optuna study, attached from outside the objective.

The study is a ``tune`` run nested under the pipeline run; every finished trial becomes a child run
of it (``trial-<n>``) with the trial number and its parameters as params, what it reported to the pruner at
each evaluation (``val/loss``, or ``val/f1_macro`` for a classifier) under that name and sign, its value (a
completion search's generation metric, e.g. ``val/rougeL`` on the validation split, under its own name, with
the other validation generation scores), and its final state as the ``optuna.trial_state`` tag
(``complete``, ``pruned``, ``failed``). Trials are read from the study storage, so trials run by
worker processes, and trials failed later by the heartbeat check, are recorded too; each trial is
recorded once per experiment (a resumed study's earlier trials stay under the study run that first
saw them). The study run gets the best value and parameters, counts per state, PNG plots, and the
storage URL, so the study can be browsed live with::

    optuna-dashboard sqlite:////ABS/PATH/mlruns/optuna.db

It writes through the other modules of this package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from forgeline.tasks.tracking.records import log_dict, log_figure, log_metrics, log_params, set_tags
from forgeline.tasks.tracking.runs import find_runs, record_run, stage_run
from forgeline.tasks.tune.storage import display_url
from forgeline.tasks.tune.study import (
    FINISHED_STATES,
    STATE_NAMES,
    StudySpec,
    TuneResult,
    pruning_metric,
    reported_value,
    study_metric,
    trial_steps,
)

logger = logging.getLogger(__name__)

STUDY_TAG = "forgeline.optuna_study"
TRIAL_NUMBER_TAG = "forgeline.trial_number"
TRIAL_STATE_TAG = "optuna.trial_state"
STORAGE_TAG = "optuna.storage_url"
DASHBOARD_TAG = "optuna.dashboard"


class StudyRecorder:
    """Records the finished trials of one study as child runs of ``study_run_id`` (each trial once)."""

    def __init__(self, experiment_id: str, study_run_id: str, spec: StudySpec) -> None:
        self.experiment_id = experiment_id
        self.study_run_id = study_run_id
        self.spec = spec
        self.recorded: set[int] = {
            int(tags[TRIAL_NUMBER_TAG])
            for _, tags in find_runs(experiment_id, {STUDY_TAG: spec.study_name})
            if TRIAL_NUMBER_TAG in tags
        }
        self.recorded_now = 0

    def sweep(self, study: optuna.Study) -> int:
        """Record every finished trial not yet in MLflow. Returns how many were recorded."""
        new = 0
        for trial in study.get_trials(deepcopy=False, states=FINISHED_STATES):
            if trial.number in self.recorded:
                continue
            self.record_trial(trial)
            self.recorded.add(trial.number)
            new += 1
        self.recorded_now += new
        return new

    def record_trial(self, trial: FrozenTrial) -> str:
        """One finished trial as a child run of the study run."""
        state = STATE_NAMES[trial.state]
        tags: dict[str, Any] = {
            STUDY_TAG: self.spec.study_name,
            TRIAL_NUMBER_TAG: trial.number,
            TRIAL_STATE_TAG: state,
            "data_fingerprint": self.spec.fingerprint,
        }
        retried = trial.system_attrs.get("failed_trial")
        if retried is not None:
            tags["optuna.retry_of"] = retried
        if "config_hash" in trial.user_attrs:
            tags["config_hash"] = trial.user_attrs["config_hash"]
        params = {"trial_number": trial.number, **trial.params}
        cfg = self.spec.config
        reported = pruning_metric(cfg)[0]  # what the trial reported: val/loss, val/f1_macro...
        metrics = [
            (reported, reported_value(cfg, v), int(step)) for step, v in sorted(trial.intermediate_values.items())
        ]
        steps = trial_steps(trial)
        metrics.append(("steps", steps, steps))
        name = study_metric(cfg)[0]  # what the trial's value is: the same, or a validation generation metric
        if trial.value is not None and math.isfinite(trial.value):
            final = name if name != reported else f"best_{name.replace('/', '_')}"
            metrics.append((final, trial.value, steps))
        for key, value in (trial.user_attrs.get("val_metrics") or {}).items():
            if key != name and key != reported:
                metrics.append((key, float(value), steps))
        if trial.duration is not None:
            metrics.append(("trial_seconds", trial.duration.total_seconds(), steps))
        return record_run(
            self.experiment_id,
            f"trial-{trial.number}",
            parent_run_id=self.study_run_id,
            tags=tags,
            params=params,
            metrics=metrics,
            status="FAILED" if trial.state == TrialState.FAIL else "FINISHED",
            start_time_ms=_ms(trial.datetime_start),
            end_time_ms=_ms(trial.datetime_complete),
        )

    def finish(self, study: optuna.Study, result: TuneResult) -> None:
        """Best value and parameters, counts per state, and the plots, on the study run."""
        self.sweep(study)
        run_id = self.study_run_id
        metrics = {f"trials/{k}": v for k, v in result.counts.items()}
        metrics |= {"trials/this_run": result.trials_this_run, "steps_spent": result.steps_spent}
        if result.best_value is not None:
            metrics["best_value"] = result.best_value
        log_metrics(run_id, metrics)
        if result.best_params:
            log_params(run_id, {f"best.{k}": v for k, v in result.best_params.items()})
        set_tags(run_id, {"best_trial": result.best_trial if result.best_trial is not None else "none"})
        summary = result.model_dump(mode="json") | {"storage_url": display_url(result.storage_url)}
        log_dict(run_id, summary, "tune_result.json")
        log_study_plots(run_id, study)


@contextlib.contextmanager
def study_run(
    experiment_id: str,
    spec: StudySpec,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[StudyRecorder]:
    """A ``tune`` MLflow run for the study (nested under ``parent_run_id``); yields its recorder.

    The run ends FINISHED, or FAILED with the error as a tag (e.g. no trial completed).
    """
    tune = spec.config.tune
    url = display_url(spec.storage_url)  # a password in a PostgreSQL URL never reaches MLflow
    study_tags = {**(tags or {}), STUDY_TAG: spec.study_name, STORAGE_TAG: url}
    study_tags[DASHBOARD_TAG] = dashboard_command(url)
    study_tags["data_fingerprint"] = spec.fingerprint
    with stage_run(experiment_id, "tune", parent_run_id=parent_run_id, tags=study_tags) as run_id:
        log_params(
            run_id,
            {
                "study_name": spec.study_name,
                "storage_url": url,
                "n_trials": tune.n_trials,
                "metric": study_metric(spec.config)[0],
                "pruned_on": pruning_metric(spec.config)[0],
                "parallelism": tune.parallelism,
                "sampler": tune.sampler,
                "pruner": tune.pruner,
                "timeout": tune.timeout,
                "trial_max_steps": tune.max_steps,
                "trial_eval_interval": tune.eval_interval,
                "startup_trials": tune.startup_trials,
                "max_retries": tune.max_retries,
                "search_space": json.dumps({k: v.model_dump(mode="json") for k, v in tune.search_space.items()}),
            },
        )
        if parent_run_id:
            set_tags(parent_run_id, {STUDY_TAG: spec.study_name, DASHBOARD_TAG: study_tags[DASHBOARD_TAG]})
        yield StudyRecorder(experiment_id, run_id, spec)


def dashboard_command(storage_url: str) -> str:
    """The shell command that opens this study storage in optuna-dashboard."""
    return f"optuna-dashboard {storage_url}"


def log_study_plots(run_id: str, study: optuna.Study) -> list[str]:
    """Optimization history, intermediate values and parameter importances as PNG artifacts.

    Importances need at least two completed trials (and a parameter that varies); otherwise they are
    skipped with a log line. A plot that fails never fails the stage.

    Returns:
        The artifact names logged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots: list[tuple[str, Any]] = [
        ("optimization_history.png", ovm.plot_optimization_history),
        ("intermediate_values.png", ovm.plot_intermediate_values),
    ]
    if len(complete) >= 2 and any(t.params for t in complete):
        plots.append(("param_importances.png", ovm.plot_param_importances))
    else:
        logger.info("parameter importances skipped: %d completed trial(s), at least 2 needed", len(complete))
    logged: list[str] = []
    for name, plot in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            fig = _figure_of(axes)
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            log_figure(run_id, fig, name)
            plt.close(fig)
            logged.append(name)
        except Exception as exc:  # noqa: BLE001 - a plot is a courtesy, never a failure
            logger.warning("study plot %s skipped: %s", name, exc)
    return logged


def _figure_of(axes: Any) -> Any:
    if hasattr(axes, "figure"):
        return axes.figure
    return axes.flat[0].figure  # an array of axes (one per parameter)


def _ms(moment: Any) -> int | None:
    return int(moment.timestamp() * 1000) if moment is not None else None
