"""The tuning module without training: search space, config merge, study naming, sampler/pruner, failures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from forgeline.tasks.config import ConfigError, PipelineConfig, TuneConfig
from forgeline.tasks.tune import space, storage, workers
from forgeline.tasks.tune import study as studies

ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT = "ab" * 32

SPACE: dict[str, Any] = {
    "train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "model.n_layer": {"type": "int", "low": 1, "high": 4, "step": 1},
    "train.batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.2},
    "model.n_head": {"type": "categorical", "choices": [2, 4]},
}


def make_cfg(**tune: Any) -> PipelineConfig:
    tree: dict[str, Any] = {"name": "unit", "tune": {"n_trials": 4, "search_space": SPACE, **tune}}
    return PipelineConfig.model_validate(tree)


# ------------------------------------------------------------------------------- search space
def test_fixed_trial_suggestions_follow_the_space() -> None:
    cfg = make_cfg()
    fixed = {
        "train.learning_rate": 3e-3,
        "model.n_layer": 2,
        "train.batch_size": 16,
        "model.dropout": 0.1,
        "model.n_head": 4,
    }
    params = space.suggest_params(FixedTrial(fixed), cfg.tune)
    assert params == fixed
    assert isinstance(params["model.n_layer"], int)


def test_suggestions_stay_inside_ranges() -> None:
    cfg = make_cfg()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = space.suggest_params(study.ask(), cfg.tune)
        assert 1e-4 <= params["train.learning_rate"] <= 1e-2
        assert params["model.n_layer"] in {1, 2, 3, 4}
        assert params["train.batch_size"] in {8, 16, 24, 32}
        assert params["model.n_head"] in {2, 4}


def test_out_of_range_fixed_value_is_flagged() -> None:
    with pytest.warns(UserWarning, match="out of the range"):
        space.suggest_params(
            FixedTrial({"train.learning_rate": 0.5}),
            {"train.learning_rate": make_cfg().tune.search_space["train.learning_rate"]},
        )


def test_tuning_enabled_needs_a_search_space() -> None:
    with pytest.raises(ValueError, match="search_space"):
        TuneConfig(n_trials=3)
    assert TuneConfig(n_trials=0).search_space == {}


# ------------------------------------------------------------------------------- config merge
def test_apply_params_returns_a_new_validated_config() -> None:
    cfg = make_cfg()
    merged = space.apply_params(cfg, {"train.learning_rate": 3e-3, "model.n_layer": 2, "model.n_head": 2})
    assert merged.train.learning_rate == 3e-3
    assert merged.model.n_layer == 2
    assert cfg.train.learning_rate == 1e-3  # the original is untouched
    # min_lr keeps its ratio to the learning rate (1e-4 / 1e-3)
    assert math.isclose(merged.train.min_lr, 3e-4)
    assert merged.config_hash() != cfg.config_hash()


def test_apply_params_rejects_an_invalid_combination() -> None:
    cfg = make_cfg()
    with pytest.raises(ConfigError, match="divisible"):
        space.apply_params(cfg, {"model.n_head": 3})
    with pytest.raises(ConfigError):
        space.apply_params(cfg, {"train.batch_size": 0})


def test_trial_config_uses_tune_max_steps_with_a_scaled_schedule() -> None:
    cfg = make_cfg(max_steps=100, eval_interval=10)
    cfg = space.apply_params(cfg, {"train.max_steps": 1000, "train.warmup_steps": 100, "train.lr_decay_steps": 800})
    trial = space.trial_config(cfg, {"train.learning_rate": 2e-3})
    assert trial.train.max_steps == 100
    assert trial.train.warmup_steps == 10
    assert trial.train.lr_decay_steps == 80
    assert trial.train.eval_interval == 10
    assert trial.train.learning_rate == 2e-3
    assert cfg.train.max_steps == 1000


# ----------------------------------------------------------------------------------- study name
def test_study_name_is_stable_and_ignores_run_settings() -> None:
    base = space.study_name(make_cfg(), FINGERPRINT)
    assert base == space.study_name(make_cfg(), FINGERPRINT)
    assert base.startswith("unit-" + FINGERPRINT[:12])
    same = make_cfg(n_trials=20, parallelism=3, timeout=60.0, storage="sqlite:///x.db", heartbeat_interval=1)
    assert space.study_name(same, FINGERPRINT) == base
    reordered = make_cfg(search_space=dict(reversed(SPACE.items())))
    assert space.study_name(reordered, FINGERPRINT) == base


def test_study_name_changes_with_space_data_and_trial_config() -> None:
    base = space.study_name(make_cfg(), FINGERPRINT)
    narrower = {**SPACE, "model.dropout": {"type": "float", "low": 0.0, "high": 0.1}}
    assert space.study_name(make_cfg(search_space=narrower), FINGERPRINT) != base
    assert space.study_name(make_cfg(), "cd" * 32) != base
    assert space.study_name(make_cfg(max_steps=50), FINGERPRINT) != base
    assert space.study_name(make_cfg(pruner="hyperband"), FINGERPRINT) != base


def test_relative_sqlite_storage_resolves_against_base_dir(tmp_path: Path) -> None:
    assert storage.resolve_storage_url(TuneConfig(), tmp_path) == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    rel = TuneConfig(storage="sqlite:///studies/o.db")
    assert storage.resolve_storage_url(rel, tmp_path) == f"sqlite:///{tmp_path}/studies/o.db"
    pg = TuneConfig(storage="postgresql+psycopg2://u@h/db")
    assert storage.resolve_storage_url(pg, tmp_path) == "postgresql+psycopg2://u@h/db"


# ---------------------------------------------------------------------------- sampler, pruner
@pytest.mark.parametrize(
    ("name", "cls"),
    [("tpe", optuna.samplers.TPESampler), ("random", optuna.samplers.RandomSampler)],
)
def test_sampler_selection(name: str, cls: type) -> None:
    assert isinstance(studies.make_sampler(make_cfg(sampler=name).tune, seed=1), cls)


def test_tpe_is_seeded_from_the_config_seed() -> None:
    def first_points(seed: int) -> list[float]:
        study = optuna.create_study(sampler=studies.make_sampler(make_cfg().tune, seed=seed))
        return [space.suggest_params(study.ask(), make_cfg().tune)["train.learning_rate"] for _ in range(3)]

    assert first_points(7) == first_points(7)
    assert first_points(7) != first_points(8)


def test_cmaes_sampler_needs_its_package() -> None:
    tune = make_cfg(sampler="cmaes").tune
    try:
        import cmaes  # noqa: F401
    except ImportError:
        with pytest.raises(studies.TuneError, match="pip install cmaes"):
            studies.make_sampler(tune, seed=1)
    else:
        assert isinstance(studies.make_sampler(tune, seed=1), optuna.samplers.CmaEsSampler)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("median", optuna.pruners.MedianPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_pruner_selection(name: str, cls: type) -> None:
    assert isinstance(studies.make_pruner(make_cfg(pruner=name).tune, max_steps=100, eval_interval=10), cls)


def test_median_pruner_stops_a_bad_trial_after_the_startup_trials() -> None:
    pruner = studies.make_pruner(make_cfg(startup_trials=1).tune, max_steps=40, eval_interval=10)
    study = optuna.create_study(pruner=pruner)
    good = study.ask()
    for step in (10, 20, 30, 40):
        good.report(1.0, step)
    study.tell(good, 1.0)
    bad = study.ask()
    bad.report(5.0, 10)
    assert bad.should_prune()


# ------------------------------------------------------------------------- failures and the loop
def _spec(tmp_path: Path, **tune: Any) -> studies.StudySpec:
    cfg = make_cfg(heartbeat_interval=1, **tune)
    return studies.build_spec(
        cfg, str(tmp_path / "data"), FINGERPRINT, trials_root=tmp_path / "ckpt", base_dir=tmp_path
    )


def test_nan_and_raising_trials_fail_are_counted_and_never_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_objective(spec: studies.StudySpec, fetch_model: Any = None) -> Any:
        def objective(trial: optuna.Trial) -> float:
            params = space.suggest_params(trial, spec.config.tune)
            if trial.number == 1:
                return math.nan
            if trial.number == 2:
                raise RuntimeError("boom")
            if trial.number == 3:
                return -1.0 * math.inf
            return 10.0 + params["train.learning_rate"]

        return objective

    monkeypatch.setattr(workers, "make_objective", fake_objective)
    spec = _spec(tmp_path, n_trials=3)
    seen: list[dict[str, int]] = []
    result = workers.run_study(spec, on_progress=lambda s: seen.append(studies.state_counts(s)))
    study = studies.open_study(spec)
    states = {t.number: t.state for t in study.trials}
    assert states[1] == TrialState.FAIL
    assert states[2] == TrialState.FAIL
    assert result.counts["done"] == 3
    assert result.counts["failed"] >= 2
    assert result.best_value is not None and math.isfinite(result.best_value)
    assert result.best_trial not in (1, 2, 3)  # NaN, raised, -inf
    assert seen, "the progress hook ran"
    assert (tmp_path / "mlruns" / "optuna.db").exists()


def test_no_completed_trial_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "make_objective", lambda spec, fetch_model=None: lambda trial: math.nan)
    spec = _spec(tmp_path, n_trials=2)
    result = workers.run_study(spec)
    assert result.best_value is None
    assert result.counts["failed"] == 2  # the worker gives up after n_trials failed attempts
    with pytest.raises(studies.TuneError, match="no completed trial"):
        result.require_best()


def test_rerun_continues_the_study_instead_of_starting_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(workers, "make_objective", lambda spec, fetch_model=None: lambda trial: float(trial.number))
    first = workers.run_study(_spec(tmp_path, n_trials=2))
    assert first.counts["done"] == 2 and not first.resumed
    with caplog.at_level("INFO", logger="forgeline.tasks.tune.workers"):
        second = workers.run_study(_spec(tmp_path, n_trials=5))
    assert f"resuming study {second.study_name}: 2 of 5 trials done" in caplog.text
    assert second.resumed and second.trials_this_run == 3 and second.counts["done"] == 5
    third = workers.run_study(_spec(tmp_path, n_trials=5))
    assert third.trials_this_run == 0


def test_storage_password_is_hidden_for_display() -> None:
    assert storage.display_url("postgresql+psycopg2://bob:s3cret@db:5432/optuna") == (
        "postgresql+psycopg2://bob:***@db:5432/optuna"
    )
    assert storage.display_url("sqlite:////tmp/x/optuna.db") == "sqlite:////tmp/x/optuna.db"
