"""The search space: what a trial suggests, the config it trains, and the study's stable name.

The space is data (``tune.search_space``: dotted config key -> range). Each trial trains the pipeline config
with its values merged in, re-validated like any loaded config. Tuning works on the whole config tree because
the space reaches into several sections (``model.*``, ``train.*``); the trial's slices go to training.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from pydantic import ValidationError

from forgeline.tasks.config import (
    CategoricalParam,
    ConfigError,
    FloatParam,
    IntParam,
    PipelineConfig,
    TuneConfig,
    _set_dotted,
)


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
    if cfg.kind == "classification":  # the study's direction follows the metric: another metric, another study
        payload["metric"] = cfg.tune_metric()[0]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def study_name(cfg: PipelineConfig, fingerprint: str) -> str:
    """Stable study name: experiment, data fingerprint and :func:`space_hash`.

    ``n_trials``, ``timeout``, ``parallelism``, storage and heartbeat settings are not part of it, so
    raising ``n_trials`` continues the same study.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cfg.name)
    return f"{safe}-{fingerprint[:12]}-{space_hash(cfg)}"
