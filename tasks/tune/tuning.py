"""Hyperparameter search with Optuna: durable, resumable, prunable, parallel; free of Prefect and MLflow.

The search space is data (``tune.search_space``: dotted config key -> range). Each trial trains the
pipeline config with the trial's values merged in (re-validated like any config) and reports its
validation loss at every evaluation, so the pruner can stop it early. The objective returns the best
validation loss; a trial that raises or returns NaN is FAILED, counted, and never chosen.

Durability: the study lives in RDB storage (SQLite under ``mlruns/`` by default, any SQLAlchemy URL
via ``tune.storage``) under a stable name derived from the experiment, the data fingerprint, the
search space and the trial config, so re-running the same config continues the study up to
``tune.n_trials`` finished (complete or pruned) trials instead of starting over. Running trials send
heartbeats; one left RUNNING by a crash is failed once its heartbeat is older than the grace period
and retried with the same parameters (``tune.max_retries`` times), resuming from its checkpoint.

Parallelism: ``tune.parallelism > 1`` starts that many worker processes (``python -m forgeline.tasks.tune.tuning
worker --spec FILE --index I``) that share the storage. SQLite serializes writers: the storage is put
in WAL mode with a 60 s busy timeout, which is enough for a handful of local workers (each trial
writes a few rows per evaluation). For many workers or several machines use a server database
(``tune.storage: postgresql+psycopg2://user:pass@host/db``); Optuna's journal storage is faster than
SQLite but does not support heartbeats, so crashed trials would not be detected and retried.

Tracking attaches from outside: ``run_study(spec, on_progress=...)`` calls ``on_progress(study)``
after each trial (or every few seconds while workers run), and the caller records what it finds in
the storage. Nothing here imports MLflow or Prefect.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from forgeline.tasks.config import (
    CategoricalParam,
    ConfigError,
    FloatParam,
    IntParam,
    PipelineConfig,
    TuneConfig,
    _set_dotted,
)
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ValidationError

logger = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"
SQLITE_TIMEOUT_S = 60
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
# Test-only fault injection, ``N:KIND[,N:KIND]`` by trial number: ``sigkill`` or ``raise`` at the trial's first
# evaluation, ``diverge`` (its validation losses reported x10, so the pruner stops it), ``nan`` (it returns NaN).
FAULTS_ENV = "FORGELINE_TUNE_FAULTS"


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


# ------------------------------------------------------------------------------- search space
def suggest_params(trial: optuna.Trial | optuna.trial.FixedTrial, space: TuneConfig | dict[str, Any]) -> dict[str, Any]:
    """Ask the trial for a value of every key in the search space.

    Args:
        trial: An Optuna trial (a ``FixedTrial`` in tests).
        space: ``tune`` config, or its ``search_space`` mapping of dotted key -> param.

    Returns:
        Dotted config key -> suggested value.
    """
    params = space.search_space if isinstance(space, TuneConfig) else space
    out: dict[str, Any] = {}
    for key, param in params.items():
        if isinstance(param, FloatParam):
            out[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
        elif isinstance(param, IntParam):
            step = 1 if param.log else param.step
            out[key] = trial.suggest_int(key, param.low, param.high, step=step, log=param.log)
        elif isinstance(param, CategoricalParam):
            out[key] = trial.suggest_categorical(key, param.choices)
        else:  # pragma: no cover - the config's discriminated union admits nothing else
            raise TypeError(f"unsupported search parameter {key!r}: {param!r}")
    return out


def apply_params(cfg: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """A new config with dotted-key values set, validated like a loaded config (``cfg`` is unchanged).

    When ``train.learning_rate`` is set but ``train.min_lr`` is not, ``min_lr`` keeps its ratio to the
    learning rate (nanoGPT's lr/10 convention stays intact and ``min_lr <= learning_rate`` holds).

    Raises:
        ConfigError: the merged config is invalid (one line naming the key).
    """
    if not params:
        return cfg
    tree = cfg.model_dump(mode="json")
    params = dict(params)
    if "train.learning_rate" in params and "train.min_lr" not in params:
        ratio = cfg.train.min_lr / cfg.train.learning_rate
        params["train.min_lr"] = float(params["train.learning_rate"]) * ratio
    for key, value in params.items():
        _set_dotted(tree, key, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"tuned parameters {params}: {where}: {msg}") from None


def trial_config(cfg: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The config one trial trains: ``params`` merged in, then ``tune.max_steps``/``tune.eval_interval``.

    A shorter trial budget scales the schedule with it (warm-up and decay steps keep their share of
    the run), so a trial sees the same learning-rate shape as the final training, only compressed.
    """
    merged = apply_params(cfg, params)
    tune, train = merged.tune, merged.train
    updates: dict[str, Any] = {}
    if tune.max_steps is not None and tune.max_steps != train.max_steps:
        ratio = tune.max_steps / train.max_steps
        updates["train.max_steps"] = tune.max_steps
        updates["train.warmup_steps"] = round(train.warmup_steps * ratio)
        if train.lr_decay_steps is not None:
            updates["train.lr_decay_steps"] = max(1, round(train.lr_decay_steps * ratio))
    if tune.eval_interval is not None:
        updates["train.eval_interval"] = tune.eval_interval
    return apply_params(merged, updates)


def space_hash(cfg: PipelineConfig) -> str:
    """Hash of what makes trials comparable: search space, sampler, pruner and the trial config."""
    tune = cfg.tune
    payload = {
        "search_space": {k: v.model_dump(mode="json") for k, v in sorted(tune.search_space.items())},
        "sampler": tune.sampler,
        "pruner": tune.pruner,
        "startup_trials": tune.startup_trials,
        "trial_config": trial_config(cfg, {}).config_hash(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def study_name(cfg: PipelineConfig, fingerprint: str) -> str:
    """Stable study name: experiment, data fingerprint and :func:`space_hash`.

    ``n_trials``, ``timeout``, ``parallelism``, storage and heartbeat settings are not part of it, so
    raising ``n_trials`` continues the same study.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.name)
    return f"{safe}-{fingerprint[:12]}-{space_hash(cfg)}"


# ------------------------------------------------------------------------------------ storage
def default_storage_url(base_dir: Path | None = None) -> str:
    """SQLite file next to MLflow's store: ``sqlite:////ABS/mlruns/optuna.db``."""
    base = (base_dir or Path.cwd()).resolve()
    return f"sqlite:///{base / 'mlruns' / STORAGE_FILE}"


def resolve_storage_url(tune: TuneConfig, base_dir: Path | None = None) -> str:
    """``tune.storage``, else ``$FORGELINE_TUNE_STORAGE``, else the default (relative SQLite paths resolved)."""
    url = tune.storage or os.environ.get("FORGELINE_TUNE_STORAGE") or default_storage_url(base_dir)
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        url = prefix + str((base_dir or Path.cwd()).resolve() / url.removeprefix(prefix))
    return url


def display_url(url: str) -> str:
    """The storage URL with any password replaced by ``***`` (for logs, tags and params)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a parseable URL: show nothing secret-looking
        return url.split("@")[-1] if "@" in url else url


def make_storage(url: str, tune: TuneConfig) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats and bounded retries of crashed trials.

    For SQLite: the folder is created, the file put in WAL mode (readers never block the writer) and
    every connection waits up to 60 s for a lock instead of failing with "database is locked".
    """
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///") and ":memory:" not in url:
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)) as con:
            con.execute("PRAGMA journal_mode=WAL")
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    with _quiet_experimental():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=tune.heartbeat_interval,
            grace_period=tune.grace_period or 2 * tune.heartbeat_interval,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=tune.max_retries, inherit_intermediate_values=True
            ),
        )


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---------------------------------------------------------------------------- sampler, pruner
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
        with _quiet_experimental():
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=max(1, tune.startup_trials))
    startup = max(1, min(10, tune.n_trials // 2))
    with _quiet_experimental():
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


# ------------------------------------------------------------------------------------- study
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
            direction="minimize",
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
    with _quiet_experimental():
        optuna.storages.fail_stale_trials(study)


# ----------------------------------------------------------------------------------- objective
def make_objective(spec: StudySpec) -> Callable[[optuna.Trial], float]:
    """The objective: train the trial's config, report val loss per evaluation, return the best.

    A trial retried after a crash trains in its original trial's folder and resumes from its last
    checkpoint. Finished trials keep ``done.json`` and the tokenizer, not checkpoints or weights.
    """
    from forgeline.tasks.train.training import TrainCallbacks, train_from_config

    base = spec.config
    trials_dir = Path(spec.trials_dir)

    def objective(trial: optuna.Trial) -> float:
        params = suggest_params(trial, base.tune)
        cfg = trial_config(base, params)
        origin = _retried_from(trial)
        run_dir = trials_dir / f"trial-{(origin if origin is not None else trial.number):04d}"
        if origin is None and run_dir.exists():
            shutil.rmtree(run_dir)  # a leftover of an earlier study of the same name: never reuse it
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("config_hash", cfg.config_hash())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if origin is not None:
            logger.info("trial %d retries crashed trial %d with the same parameters", trial.number, origin)
        fault = _fault_for(trial.number)

        def on_eval(step: int, val_loss: float) -> None:
            if fault in ("sigkill", "raise"):
                _apply_fault(fault)
            if not math.isfinite(val_loss):
                raise ValueError(f"validation loss is {val_loss} at step {step}")
            if fault == "diverge":
                val_loss *= 10.0
            trial.report(val_loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val/loss {val_loss:.4f} at step {step}")

        logger.info("trial %d: %s", trial.number, _fmt_params(params))
        try:
            result = train_from_config(
                cfg, dataset_dir=spec.dataset_dir, run_dir=run_dir, callbacks=TrainCallbacks(on_eval=on_eval)
            )
        except Exception:  # TrialPruned included: the trial is over, its checkpoints are not needed
            _drop_weights(run_dir)
            raise
        _drop_weights(run_dir)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("train_seconds", round(result.seconds, 3))
        value = result.best_val_loss
        if fault == "nan" or value is None:
            return math.nan  # Optuna fails a NaN value: counted, never chosen
        return float(value)

    return objective


def _retried_from(trial: optuna.Trial) -> int | None:
    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    origin = attrs.get("failed_trial")
    return int(origin) if origin is not None else None


def _fault_for(number: int) -> str | None:
    for item in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        at, _, kind = item.partition(":")
        if int(at) == number:
            return kind.strip() or "sigkill"
    return None


def _apply_fault(kind: str) -> None:
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault ({FAULTS_ENV}: {kind})")


def _drop_weights(run_dir: Path) -> None:
    for sub in ("checkpoints", "model"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)


def _fmt_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ------------------------------------------------------------------------------------- workers
def run_worker(
    spec: StudySpec,
    *,
    index: int = 0,
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> int:
    """Run trials until the study holds ``n_trials`` finished ones, the deadline passes, or too many fail.

    Safe to run in several processes at once: before each trial the worker fails stale trials (which
    queues their retries) and, when the running trials of other workers would reach ``n_trials``,
    waits for them instead of starting one more; if one of them fails, it picks up the slack.

    Returns:
        How many trials this worker ran.
    """
    tune = spec.config.tune
    study = open_study(spec, seed_offset=index)
    objective = make_objective(spec)
    poll = min(2.0, float(tune.heartbeat_interval))
    ran = failures = 0
    waiting_logged = False
    last: list[FrozenTrial] = []
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [lambda _s, t: last.append(t)]
    if on_trial_end is not None:
        callbacks.append(on_trial_end)
    while True:
        fail_stale_trials(study)
        counts = state_counts(study)
        if counts["done"] >= tune.n_trials:
            break
        if spec.deadline is not None and time.time() >= spec.deadline:
            logger.info("tune.timeout reached: no new trials (%d of %d done)", counts["done"], tune.n_trials)
            break
        if failures >= max(tune.n_trials, 1):
            logger.error("worker %d: %d of its trials failed; giving up", index, failures)
            break
        if counts["done"] + counts["running"] >= tune.n_trials and counts["waiting"] == 0:
            if not waiting_logged:
                logger.info(
                    "waiting for %d running trial(s) to finish (a crashed one is failed after %ss without heartbeat)",
                    counts["running"],
                    tune.grace_period or 2 * tune.heartbeat_interval,
                )
                waiting_logged = True
            time.sleep(poll)
            continue
        waiting_logged = False
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks)
        ran += 1
        if last and last[-1].state == TrialState.FAIL:
            failures += 1
    return ran


def run_study(spec: StudySpec, on_progress: Callable[[optuna.Study], None] | None = None) -> TuneResult:
    """Create or resume the study and run it to ``n_trials`` finished trials.

    Args:
        spec: From :func:`build_spec`.
        on_progress: Called with the study after each trial (in-process) or every few seconds while
            worker processes run, and once at the end; this is where tracking attaches.

    Returns:
        Best parameters and value (``None`` when no trial completed: see ``TuneResult.require_best``).
    """
    tune = spec.config.tune
    study = open_study(spec, create=True)
    before = state_counts(study)
    n_before = sum(before[s] for s in STATE_NAMES.values())
    resumed = n_before > 0
    if resumed:
        logger.info("resuming study %s: %d of %d trials done", spec.study_name, before["done"], tune.n_trials)
    else:
        logger.info(
            "new study %s: %d trials, sampler %s, pruner %s, %d worker(s), storage %s",
            spec.study_name,
            tune.n_trials,
            tune.sampler,
            tune.pruner,
            tune.parallelism,
            display_url(spec.storage_url),
        )
    Path(spec.trials_dir).mkdir(parents=True, exist_ok=True)
    progress = _safe(on_progress)
    if tune.parallelism == 1:
        run_worker(spec, on_trial_end=lambda s, _t: progress(s))
    else:
        _run_worker_processes(spec, progress)
    study = open_study(spec)
    progress(study)
    return summarize(spec, study, trials_before=n_before, resumed=resumed)


def summarize(spec: StudySpec, study: optuna.Study, *, trials_before: int = 0, resumed: bool = False) -> TuneResult:
    """The study's counts, best trial and spent steps as a ``TuneResult``."""
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    best = min(complete, key=lambda t: t.value) if complete else None  # type: ignore[arg-type, return-value]
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


def _safe(fn: Callable[[optuna.Study], None] | None) -> Callable[[optuna.Study], None]:
    def call(study: optuna.Study) -> None:
        if fn is None:
            return
        try:
            fn(study)
        except Exception as exc:  # noqa: BLE001 - recording must never stop the search
            logger.warning("tuning progress hook failed (retried at the next trial): %s", exc)

    return call


def _run_worker_processes(spec: StudySpec, progress: Callable[[optuna.Study], None]) -> None:
    tune = spec.config.tune
    spec_file = Path(spec.trials_dir) / f"worker-spec-{os.getpid()}.json"
    spec_file.write_text(spec.model_dump_json())
    env = {**os.environ, "FORGELINE_TUNE_THREADS": str(max(1, (os.cpu_count() or 1) // tune.parallelism))}
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "forgeline.tasks.tune.tuning",
                "worker",
                "--spec",
                str(spec_file),
                "--index",
                str(i),
            ],
            env=env,
        )
        for i in range(tune.parallelism)
    ]
    logger.info("started %d tuning workers: pids %s", len(procs), ", ".join(str(p.pid) for p in procs))
    study = open_study(spec)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2.0)
            progress(study)
    except BaseException:
        _stop_workers(procs)
        raise
    finally:
        spec_file.unlink(missing_ok=True)
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        logger.warning("%d tuning worker(s) exited with an error (codes %s)", len(bad), bad)


def _stop_workers(procs: list[subprocess.Popen[bytes]], grace: float = 30.0) -> None:
    # SIGTERM lets a worker checkpoint its trial (left RUNNING, so it is retried); then escalate.
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        if p.poll() is None:
            p.kill()
            p.wait()


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m forgeline.tasks.tune.tuning worker --spec FILE --index I``."""
    parser = argparse.ArgumentParser(prog="python -m forgeline.tasks.tune.tuning", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="join a study and run trials until it holds n_trials finished ones")
    worker.add_argument("--spec", required=True, help="StudySpec JSON written by run_study")
    worker.add_argument("--index", type=int, default=0, help="worker number (seeds the sampler)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker-{args.index} %(name)s: %(message)s")
    for name in ("transformers", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    threads = os.environ.get("FORGELINE_TUNE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    spec = StudySpec.model_validate_json(Path(args.spec).read_text())
    ran = run_worker(spec, index=args.index)
    logger.info("worker %d done: ran %d trial(s)", args.index, ran)
    return 0


if __name__ == "__main__":
    from forgeline.tasks.tune.tuning import main as _main  # the importable module, not __main__ (one set of classes)

    sys.exit(_main())
