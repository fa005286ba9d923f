"""The study: its spec and result, sampler and pruner, creating or resuming it, counting its trials.

Durability: the study lives in RDB storage under a stable name derived from the experiment, the data
fingerprint, the search space and the trial config (:func:`forgeline.tasks.tune.space.study_name`), so re-running
the same config continues the study up to ``tune.n_trials`` finished (complete or pruned) trials instead of
starting over. Running trials send heartbeats; one left RUNNING by a crash is failed once its heartbeat is older
than the grace period and retried with the same parameters (``tune.max_retries`` times).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel

from forgeline.tasks.config import PipelineConfig, TuneConfig
from forgeline.tasks.tune.space import study_name, trial_config
from forgeline.tasks.tune.storage import display_url, make_storage, quiet_experimental, resolve_storage_url

DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}


class TuneError(RuntimeError):
    """The search cannot produce parameters (no trial completed, bad storage...); one line for the user."""


class StudySpec(BaseModel):
    """Everything a worker needs to join a study (written as JSON for worker processes)."""

    config: PipelineConfig
    dataset_dir: str
    fingerprint: str
    study_name: str
    storage_url: str
    trials_dir: str
    deadline: float | None = None  # epoch seconds; no new trial starts after it
    init_source: str | None = None  # a local download of a registry ``model.init_from`` (worker processes)


class TuneResult(BaseModel):
    """The search's hand-off: small, serializable."""

    study_name: str
    storage_url: str
    best_params: dict[str, Any] = {}
    best_value: float | None = None
    best_trial: int | None = None
    n_trials: int
    counts: dict[str, int] = {}
    trials_this_run: int = 0
    resumed: bool = False
    steps_spent: int = 0

    def require_best(self) -> TuneResult:
        """Return self, or raise ``TuneError`` when no trial completed."""
        if self.best_value is None:
            raise TuneError(
                f"tuning study {self.study_name} has no completed trial "
                f"({self.counts.get('failed', 0)} failed, {self.counts.get('pruned', 0)} pruned); "
                "not training with default parameters. Inspect it with: optuna-dashboard "
                + display_url(self.storage_url)
            )
        return self


def make_sampler(tune: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    """``tpe`` (seeded, multivariate, constant liar for parallel workers), ``random`` or ``cmaes``.

    Raises:
        TuneError: ``cmaes`` without the ``cmaes`` package installed.
    """
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise TuneError("tune.sampler 'cmaes' needs the cmaes package: pip install cmaes") from None
        with quiet_experimental():
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=max(1, tune.startup_trials))
    startup = max(1, min(10, tune.n_trials // 2))
    with quiet_experimental():
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def make_pruner(tune: TuneConfig, max_steps: int, eval_interval: int) -> optuna.pruners.BasePruner:
    """The configured pruner, sized to the trial's steps (reports happen at every evaluation).

    ``median`` lets ``tune.startup_trials`` trials run in full and never prunes in the first quarter
    of a trial; ``hyperband`` and ``successive_halving`` use one evaluation as the smallest budget.
    """
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=tune.startup_trials,
            n_warmup_steps=max(eval_interval, max_steps // 4),
            interval_steps=1,
        )
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=eval_interval, max_resource=max(max_steps, eval_interval), reduction_factor=3
        )
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=eval_interval, reduction_factor=3)
    return optuna.pruners.NopPruner()


def build_spec(
    cfg: PipelineConfig,
    dataset_dir: str,
    fingerprint: str,
    *,
    trials_root: Path,
    base_dir: Path | None = None,
) -> StudySpec:
    """Name the study, resolve its storage and place its trial folders under ``trials_root``.

    Args:
        cfg: The pipeline config (``tune`` section included).
        dataset_dir: The cleaned dataset.
        fingerprint: Its fingerprint.
        trials_root: Folder that holds ``tune-<study>/trial-<n>`` (next to the training run dirs).
        base_dir: What relative storage paths resolve against.
    """
    name = study_name(cfg, fingerprint)
    deadline = time.time() + cfg.tune.timeout if cfg.tune.timeout else None
    return StudySpec(
        config=cfg,
        dataset_dir=str(dataset_dir),
        fingerprint=fingerprint,
        study_name=name,
        storage_url=resolve_storage_url(cfg.tune, base_dir),
        trials_dir=str(Path(trials_root) / f"tune-{name}"),
        deadline=deadline,
    )


def open_study(spec: StudySpec, *, seed_offset: int = 0, create: bool = False) -> optuna.Study:
    """Load (or create) the study with a sampler seeded from ``seed``.

    The seed also depends on ``seed_offset`` (the worker index) and the number of trials already in
    the study, so parallel workers and resumed runs do not re-propose the same first points, while a
    fresh single-worker study is reproducible.
    """
    tune = spec.config.tune
    storage = make_storage(spec.storage_url, tune)
    trial_cfg = trial_config(spec.config, {})
    pruner = make_pruner(tune, trial_cfg.train.max_steps, trial_cfg.train.eval_interval)
    if create:
        study = optuna.create_study(
            storage=storage,
            study_name=spec.study_name,
            direction="maximize" if study_metric(spec.config)[1] else "minimize",
            pruner=pruner,
            load_if_exists=True,
        )
        existing = len(study.get_trials(deepcopy=False))
    else:
        existing = len(optuna.load_study(study_name=spec.study_name, storage=storage).get_trials(deepcopy=False))
    seed = spec.config.seed + 1000 * seed_offset + existing
    return optuna.load_study(
        study_name=spec.study_name, storage=storage, sampler=make_sampler(tune, seed), pruner=pruner
    )


def study_metric(cfg: PipelineConfig) -> tuple[str, bool]:
    """The metric a study chooses by (a completed trial's value) and whether higher is better.

    Classification: ``cfg.tune_metric()`` (``val/f1_macro`` unless ``tune.metric`` names another metric the
    loop logs); completion: ``cfg.tune_metric()`` (``val/loss``, or a generation metric such as ``val/rougeL``
    scored on the validation split once the trial has trained); language models: ``val/loss``.
    """
    return cfg.tune_metric() if cfg.kind in ("classification", "completion") else ("val/loss", False)


def pruning_metric(cfg: PipelineConfig) -> tuple[str, bool]:
    """The metric each evaluation reports to the pruner and whether higher is better.

    The training loop's own figure: the study metric for a classifier, ``val/loss`` for the other tasks (a
    completion search that chooses by a generation metric still prunes on the validation loss, since
    decoding at every evaluation would cost more than the training it saves).
    """
    return cfg.tune_metric() if cfg.kind == "classification" else ("val/loss", False)


def report_sign(cfg: PipelineConfig) -> float:
    """``-1.0`` when the pruning metric runs against the study's direction, else ``1.0``.

    Optuna's pruners compare intermediate values in the study's direction. A completion study that
    maximizes ROUGE-L but prunes on the validation loss reports the loss negated, so that "higher is
    better" holds for what the pruner sees; :func:`reported_value` undoes it for the records.
    """
    return 1.0 if pruning_metric(cfg)[1] == study_metric(cfg)[1] else -1.0


def reported_value(cfg: PipelineConfig, value: float) -> float:
    """An intermediate value as the pruning metric reads (the sign of :func:`report_sign` undone)."""
    return value * report_sign(cfg)


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state (``complete``, ``pruned``, ``failed``, ``running``, ``waiting``) plus ``done``."""
    counts = dict.fromkeys(STATE_NAMES.values(), 0)
    for trial in study.get_trials(deepcopy=False):
        counts[STATE_NAMES[trial.state]] += 1
    counts["done"] = counts["complete"] + counts["pruned"]
    return counts


def trial_steps(trial: FrozenTrial) -> int:
    """Training steps a finished trial spent (its last reported step when it stopped early)."""
    if "steps" in trial.user_attrs:
        return int(trial.user_attrs["steps"])
    return max(trial.intermediate_values, default=0)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and queue a retry of) RUNNING trials whose heartbeat is older than the grace period."""
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)


def summarize(spec: StudySpec, study: optuna.Study, *, trials_before: int = 0, resumed: bool = False) -> TuneResult:
    """The study's counts, best trial and spent steps as a ``TuneResult``."""
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    best = pick(complete, key=lambda t: t.value) if complete else None  # type: ignore[arg-type, return-value]
    return TuneResult(
        study_name=spec.study_name,
        storage_url=spec.storage_url,
        best_params=dict(best.params) if best else {},
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        n_trials=spec.config.tune.n_trials,
        counts=counts,
        trials_this_run=len(trials) - trials_before,
        resumed=resumed,
        steps_spent=sum(trial_steps(t) for t in trials if t.state in FINISHED_STATES),
    )
