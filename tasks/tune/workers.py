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

Parallelism: ``tune.parallelism > 1`` starts that many worker processes (``python -m forgeline.tasks.tune.workers
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
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from forgeline.tasks.tune.objective import make_objective
from forgeline.tasks.tune.storage import display_url
from forgeline.tasks.tune.study import (
    STATE_NAMES,
    StudySpec,
    TuneResult,
    fail_stale_trials,
    open_study,
    state_counts,
    summarize,
)

logger = logging.getLogger(__name__)


def run_worker(
    spec: StudySpec,
    *,
    index: int = 0,
    on_trial_end: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    fetch_model: Callable[[str, Path], Path] | None = None,
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
    objective = make_objective(spec, fetch_model)
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


def run_study(
    spec: StudySpec,
    on_progress: Callable[[optuna.Study], None] | None = None,
    fetch_model: Callable[[str, Path], Path] | None = None,
) -> TuneResult:
    """Create or resume the study and run it to ``n_trials`` finished trials.

    Args:
        spec: From :func:`build_spec`.
        on_progress: Called with the study after each trial (in-process) or every few seconds while
            worker processes run, and once at the end; this is where tracking attaches.
        fetch_model: Downloads ``model.init_from`` when it is a registry URI; worker processes get one
            download made here (``StudySpec.init_source``).

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
        run_worker(spec, on_trial_end=lambda s, _t: progress(s), fetch_model=fetch_model)
    else:
        _run_worker_processes(_with_init_source(spec, fetch_model), progress)
    study = open_study(spec)
    progress(study)
    return summarize(spec, study, trials_before=n_before, resumed=resumed)


def _safe(fn: Callable[[optuna.Study], None] | None) -> Callable[[optuna.Study], None]:
    def call(study: optuna.Study) -> None:
        if fn is None:
            return
        try:
            fn(study)
        except Exception as exc:  # noqa: BLE001 - recording must never stop the search
            logger.warning("tuning progress hook failed (retried at the next trial): %s", exc)

    return call


def _with_init_source(spec: StudySpec, fetch_model: Callable[[str, Path], Path] | None) -> StudySpec:
    # Worker processes cannot be handed a function: a registry model to fine-tune is downloaded once here
    # and the workers load it from the folder (the config, hence the study name, keeps the URI).
    init_from = spec.config.model.init_from
    if fetch_model is None or not init_from or not init_from.startswith("models:/"):
        return spec
    folder = Path(spec.trials_dir) / "init-model"
    if not folder.exists():
        fetch_model(init_from, folder)
    return spec.model_copy(update={"init_source": str(folder)})


def _run_worker_processes(spec: StudySpec, progress: Callable[[optuna.Study], None]) -> None:
    tune = spec.config.tune
    spec_file = Path(spec.trials_dir) / f"worker-spec-{os.getpid()}.json"
    spec_file.write_text(spec.model_dump_json())
    env = {**os.environ, "FORGELINE_TUNE_THREADS": str(max(1, (os.cpu_count() or 1) // tune.parallelism))}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "forgeline.tasks.tune.workers",
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


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: ``python -m forgeline.tasks.tune.workers worker --spec FILE --index I``."""
    parser = argparse.ArgumentParser(prog="python -m forgeline.tasks.tune.workers", description=__doc__.splitlines()[0])
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
    from forgeline.tasks.tune.workers import main as _main  # the importable module, not __main__ (one set of classes)

    sys.exit(_main())
