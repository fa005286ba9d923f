"""The Python API's config loader: the same tree, overrides and one-line errors as the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

import forgeline
from forgeline.tasks.config import load_config as load_config_cli

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def test_mapping_overrides_keep_their_types() -> None:
    cfg = forgeline.load_config(
        SMOKE, overrides={"train.max_steps": 7, "train.learning_rate": 0.002, "data.split": "tail"}
    )
    assert cfg.train.max_steps == 7
    assert cfg.train.learning_rate == pytest.approx(0.002)
    assert cfg.data.split == "tail"


def test_same_tree_as_the_command_line() -> None:
    api = forgeline.load_config(SMOKE, overrides={"model.n_layer": 1, "eval.prompts": ["a", "b"]})
    cli = load_config_cli(SMOKE, ["model.n_layer=1", "eval.prompts=[a, b]"])
    assert api == cli
    assert api.config_hash() == cli.config_hash()


def test_set_strings_are_accepted_too() -> None:
    assert forgeline.load_config(SMOKE, overrides=["train.max_steps=9"]).train.max_steps == 9


def test_unknown_key_is_one_line_with_a_suggestion() -> None:
    with pytest.raises(forgeline.ConfigError) as info:
        forgeline.load_config(SMOKE, overrides={"train.learnig_rate": 1})
    assert str(info.value) == "--set train.learnig_rate: unknown key (did you mean 'train.learning_rate'?)"


def test_bad_value_and_missing_file_name_the_culprit(tmp_path: Path) -> None:
    with pytest.raises(forgeline.ConfigError, match="train.max_steps"):
        forgeline.load_config(SMOKE, overrides={"train.max_steps": -3})
    with pytest.raises(forgeline.ConfigError, match="config file not found"):
        forgeline.load_config(tmp_path / "nope.yaml")


def test_run_refuses_overrides_on_a_loaded_config() -> None:
    cfg = forgeline.load_config(SMOKE)
    with pytest.raises(forgeline.ConfigError, match="overrides"):
        forgeline.run(cfg, overrides={"train.max_steps": 1})


def test_compress_is_exported_and_refuses_overrides_on_a_loaded_config() -> None:
    import inspect

    assert "compress" in forgeline.__all__ and forgeline.compress is forgeline.api.compress
    assert list(inspect.signature(forgeline.compress).parameters) == ["config", "overrides", "teacher"]
    cfg = forgeline.load_config(SMOKE)
    with pytest.raises(forgeline.ConfigError, match="overrides"):
        forgeline.compress(cfg, overrides={"compress.max_steps": 1})
    with pytest.raises(forgeline.ConfigError, match="compress.max_step"):
        forgeline.compress(SMOKE, overrides={"compress.max_step": 1})
