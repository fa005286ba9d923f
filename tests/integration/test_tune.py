"""The tune stage end to end on the smoke config: MLflow hierarchy, pruning, crash-resume, parallel workers.

Each test runs in its own temporary project folder (a copy of ``configs/smoke.yaml`` plus a small
``tune:`` block), with MLflow on SQLite inside it. Trials train 20 steps with an evaluation every 5;
heartbeats are 1 s with a 2 s grace period, so a killed trial is detected in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

from forgeline.tasks.config import PipelineConfig, load_config
from forgeline.tasks.tune import study as studies
from forgeline.tasks.tune import workers

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
TUNE_BLOCK: dict[str, Any] = {
    "n_trials": 4,
    "max_steps": 20,
    "eval_interval": 5,
    "startup_trials": 1,
    "pruner": "median",
    "heartbeat_interval": 1,
    "grace_period": 2,
    "search_space": {"train.learning_rate": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True}},
}


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tune_prefect(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Prefect API for in-process flows: the session's if one is already up, else a test server."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    if PREFECT_API_URL.value():
        yield
        return
    home = tmp_path_factory.mktemp("tune-prefect-home")
    with (
        temporary_settings(updates={PREFECT_HOME: home, PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "storage"}),
        prefect_test_harness(server_startup_timeout=60),
    ):
        yield


@pytest.fixture
def tune_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """cwd = a fresh project holding ``smoke.yaml`` with the tune block; MLflow points inside it."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path / "project"
    root.mkdir()
    tree = yaml.safe_load((REPO_ROOT / "configs" / "smoke.yaml").read_text())
    tree["tune"] = TUNE_BLOCK
    (root / "smoke.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    previous = tracking_utils._tracking_uri
    monkeypatch.chdir(root)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "FORGELINE_TUNE_FAULTS", "FORGELINE_FAULT_AT_STEP"):
        monkeypatch.setenv(var, "")  # recorded, so whatever the run sets is undone afterwards
        monkeypatch.delenv(var)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    try:
        yield root
    finally:
        mlflow.set_tracking_uri(previous)


def _config(*overrides: str) -> PipelineConfig:
    return load_config("smoke.yaml", list(overrides))


def _spec(cfg: PipelineConfig) -> studies.StudySpec:
    from forgeline.tasks.data.cleaning import clean_dataset

    cleaned = clean_dataset(cfg.data, base_dir=Path.cwd())
    root = Path.cwd() / "mlruns" / "checkpoints" / cfg.name
    return studies.build_spec(cfg, cleaned.dataset_dir, cleaned.fingerprint, trials_root=root)


def _worker(spec_file: Path, *, faults: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FORGELINE_TUNE_FAULTS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    if faults:
        env["FORGELINE_TUNE_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-m", "forgeline.tasks.tune.workers", "worker", "--spec", str(spec_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------------------------------- tests
def test_pipeline_tunes_then_trains_with_best_params(
    tune_prefect: None, tune_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 finished trials (one pruned by a diverging loss), one NaN trial failed; all recorded under the study."""
    import mlflow

    from forgeline.flows.pipeline import pipeline_flow

    monkeypatch.setenv("FORGELINE_TUNE_FAULTS", "1:diverge,2:nan")
    result = pipeline_flow(_config())
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    runs = client.search_runs([result.experiment_id], max_results=1000)
    by_name: dict[str, list[Any]] = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    pipeline_run = client.get_run(result.run_id)
    assert pipeline_run.info.status == "FINISHED"
    (study_run,) = by_name["tune"]
    assert study_run.data.tags["mlflow.parentRunId"] == result.run_id
    assert study_run.info.status == "FINISHED"
    storage_url = study_run.data.tags["optuna.storage_url"]
    assert storage_url == f"sqlite:///{tune_project / 'mlruns' / 'optuna.db'}"
    assert study_run.data.tags["optuna.dashboard"] == f"optuna-dashboard {storage_url}"

    trials = [r for name, rs in by_name.items() if name.startswith("trial-") for r in rs]
    assert len(trials) >= 5
    assert all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id for r in trials)
    states = {int(r.data.params["trial_number"]): r.data.tags["optuna.trial_state"] for r in trials}
    assert states[0] == "complete"
    assert states[1] == "pruned"
    assert states[2] == "failed"
    assert sum(s in ("complete", "pruned") for s in states.values()) == 4
    trial0 = next(r for r in trials if r.data.params["trial_number"] == "0")
    history = client.get_metric_history(trial0.info.run_id, "val/loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [5, 10, 15, 20]
    assert "train.learning_rate" in trial0.data.params
    failed = next(r for r in trials if r.data.params["trial_number"] == "2")
    assert failed.info.status == "FAILED"

    metrics = study_run.data.metrics
    assert metrics["trials/done"] == 4
    assert metrics["trials/failed"] == 1
    assert metrics["trials/running"] == 0
    best_lr = float(study_run.data.params["best.train.learning_rate"])
    assert metrics["best_value"] == min(
        float(r.data.metrics["best_val_loss"]) for r in trials if r.data.tags["optuna.trial_state"] == "complete"
    )
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id)}
    assert {"optimization_history.png", "intermediate_values.png", "tune_result.json"} <= artifacts
    if metrics["trials/complete"] >= 2:
        assert "param_importances.png" in artifacts

    (train_run,) = by_name["train"]
    assert train_run.data.tags["mlflow.parentRunId"] == result.run_id
    resolved = yaml.safe_load(
        Path(
            mlflow.artifacts.download_artifacts(run_id=train_run.info.run_id, artifact_path="resolved_config.yaml")
        ).read_text()
    )
    assert resolved["train"]["learning_rate"] == pytest.approx(best_lr)
    assert resolved["train"]["max_steps"] == 40  # the final run trains the full budget, not tune.max_steps
    assert yaml.safe_load(Path("smoke.yaml").read_text())["train"]["learning_rate"] == 3.0e-3  # never written back
    trial_dirs = sorted(p.name for p in (tune_project / "mlruns" / "checkpoints" / "forgeline-smoke").glob("tune-*/*"))
    assert trial_dirs[:3] == ["trial-0000", "trial-0001", "trial-0002"]


@pytest.mark.slow  # a study run twice: a worker killed mid-trial, then resumed
def test_resume_after_kill_keeps_done_trials_and_retries_the_stale_one(
    tune_project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = _spec(_config())
    studies.open_study(spec, create=True)
    spec_file = tune_project / "spec.json"
    spec_file.write_text(spec.model_dump_json())

    killed = _worker(spec_file, faults="2:sigkill")
    assert killed.returncode == -9, killed.stderr[-3000:]
    study = studies.open_study(spec)
    before = {t.number: t for t in study.get_trials()}
    assert before[2].state == TrialState.RUNNING
    assert all(before[n].state in studies.DONE_STATES for n in (0, 1))

    time.sleep(2.5)  # past the 2 s grace period: trial 2's heartbeat is stale
    with caplog.at_level(logging.INFO, logger="forgeline.tasks.tune.workers"):
        result = workers.run_study(_spec(_config()))
    assert f"resuming study {spec.study_name}: 2 of 4 trials done" in caplog.text

    after = {t.number: t for t in studies.open_study(spec).get_trials()}
    for n in (0, 1):  # kept as they were, not re-run
        assert after[n].state == before[n].state
        assert after[n].datetime_complete == before[n].datetime_complete
    assert after[2].state == TrialState.FAIL
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == 2]
    assert len(retries) == 1
    assert retries[0].params == before[2].params
    assert retries[0].state in studies.DONE_STATES
    assert not [t for t in after.values() if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert result.counts["done"] == 4
    assert result.best_value is not None


@pytest.mark.slow  # two worker processes share one study
def test_two_parallel_workers_finish_the_study_without_losing_trials(tune_project: Path) -> None:
    spec = _spec(_config("tune.parallelism=2", "tune.n_trials=4"))
    result = workers.run_study(spec)
    trials = studies.open_study(spec).get_trials()
    counts = studies.state_counts(studies.open_study(spec))
    assert counts["running"] == counts["waiting"] == counts["failed"] == 0
    assert 4 <= counts["done"] <= 5  # a simultaneous last pick by both workers may add one
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.datetime_complete is not None for t in trials)
    seen = {t.user_attrs["worker"] for t in trials}
    assert len(seen) == 2, seen
    assert result.best_value is not None and result.counts == counts
    assert not list((tune_project / "mlruns").rglob("worker-spec-*.json"))
    shutil.rmtree(tune_project / "mlruns" / "checkpoints", ignore_errors=True)
