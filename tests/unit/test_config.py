"""The config loader: every shipped config loads; every invalid fixture fails with its intended line."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgeline.tasks.config import (
    ConfigError,
    PipelineConfig,
    dump_config,
    flatten,
    load_config,
    parse_override,
    redact,
)

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests" / "fixtures" / "invalid_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.registry.model_name


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_config_fails_with_intended_message(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_invalid_fixture_folder_is_not_empty() -> None:
    assert len(INVALID) >= 10


def test_nanogpt_recipe_keys() -> None:
    cfg = load_config(ROOT / "configs" / "shakespeare_char.yaml")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (4, 4, 128, 64)
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps) == (12, 2000, 100)
    assert (cfg.train.learning_rate, cfg.train.min_lr, cfg.train.beta2, cfg.train.weight_decay) == (
        1e-3,
        1e-4,
        0.99,
        0.1,
    )
    assert cfg.data.split == "tail" and cfg.data.fractions.train == 0.9 and cfg.data.fractions.validation == 0.1
    gpu = load_config(ROOT / "configs" / "shakespeare_char_gpu.yaml")
    assert (gpu.model.n_layer, gpu.model.n_head, gpu.model.n_embd, gpu.model.block_size) == (6, 6, 384, 256)
    assert (gpu.train.batch_size, gpu.train.max_steps, gpu.model.dropout) == (64, 5000, 0.2)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "train.learnig_rate=1",
            "--set train.learnig_rate: unknown key (did you mean 'train.learning_rate'?)",
        ),
        ("train.batch_size=0", "--set train.batch_size=0: Input should be greater than or equal to 1"),
        ("train.max_steps=ten", "--set train.max_steps=ten: Input should be a valid integer"),
        ("train.learning_rate=-1", "--set train.learning_rate=-1: Input should be greater than 0"),
        ("modle.n_layer=2", "unknown key (did you mean 'model.n_layer'?)"),
        ("novalue", "expected dotted.key=value"),
    ],
)
def test_bad_override_names_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(ROOT / "configs" / "smoke.yaml", [override])
    assert expected in str(info.value)


def test_overrides_are_yaml_scalars_and_apply_in_order() -> None:
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            "train.max_steps=5",
            "train.learning_rate=2e-3",
            "model.dropout=0.1",
            "train.compile=true",
            "train.max_steps=7",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.train.learning_rate == pytest.approx(2e-3)
    assert cfg.train.compile is True
    assert cfg.model.dropout == pytest.approx(0.1)


def test_parse_override_reads_yaml() -> None:
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_config_hash_ignores_tracking_and_registry() -> None:
    base = load_config(ROOT / "configs" / "smoke.yaml")
    other = load_config(
        ROOT / "configs" / "smoke.yaml", ["registry.model_name=other", "tracking.metric_flush_interval=3"]
    )
    changed = load_config(ROOT / "configs" / "smoke.yaml", ["model.n_embd=64"])
    assert base.config_hash() == other.config_hash()
    assert base.config_hash() != changed.config_hash()


def test_flatten_and_redact_secrets() -> None:
    tree = {"a": {"api_token": "s3cr3t", "n": 1, "db_password": "pw"}, "name": "x"}
    flat = flatten(redact(tree))
    assert flat == {"a.api_token": "***", "a.n": 1, "a.db_password": "***", "name": "x"}
    assert "s3cr3t" not in dump_config(load_config(ROOT / "configs" / "smoke.yaml"))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config("nope.yaml")


# E4: secret-named keys can only appear in the free-form sections (pool job variables); wherever they
# sit, the logged forms of the config (params, resolved_config.yaml, the model card) carry "***".
E4_SECRETS = {
    "deploy.gpu_pool.job_variables.env.HF_TOKEN": "hf_unitQ7w2Zk9",
    "deploy.cpu_pool.job_variables.db_password": "pw-unitXy81",
    "deploy.cpu_pool.job_variables.client_secret": "sec-unitMn55",
    "deploy.gpu_pool.job_variables.api_key": "key-unitPz37",
}


def test_secrets_in_job_variables_are_redacted_in_every_logged_form() -> None:
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"{k}={v}" for k, v in E4_SECRETS.items()])
    assert (
        cfg.deploy.gpu_pool.job_variables["env"]["HF_TOKEN"] == E4_SECRETS["deploy.gpu_pool.job_variables.env.HF_TOKEN"]
    )
    flat = flatten(redact(cfg.model_dump(mode="json")))
    assert {k: flat[k] for k in E4_SECRETS} == dict.fromkeys(E4_SECRETS, "***")
    text = dump_config(cfg) + repr(flat)
    assert [v for v in E4_SECRETS.values() if v in text] == []


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("HF_TOKEN", True),
        ("deploy.gpu_pool.job_variables.env.HF_TOKEN", True),
        ("access_token", True),
        ("password", True),
        ("db_password", True),
        ("client_secret", True),
        ("api_key", True),
        ("key", True),
        ("tokenizer.kind", False),
        ("eval.max_new_tokens", False),
        ("tokenizer.vocab_size", False),
        ("model.n_embd", False),
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    from forgeline.tasks.config import is_secret_key

    assert is_secret_key(key) is secret


def test_flow_run_parameter_masks_deploy_secrets_only() -> None:
    cfg = PipelineConfig.model_validate(
        {
            "deploy": {
                "gpu_pool": {
                    "name": "gpu",
                    "job_variables": {"env": {"HF_TOKEN": "hf_x1", "CUDA_VISIBLE_DEVICES": "0"}},
                }
            }
        }
    )
    masked = cfg.for_flow_run()
    assert masked.deploy.gpu_pool.job_variables["env"] == {"HF_TOKEN": "***", "CUDA_VISIBLE_DEVICES": "0"}
    assert masked.config_hash() == cfg.config_hash()  # what is trained does not change
    assert masked.model_dump(exclude={"deploy"}) == cfg.model_dump(exclude={"deploy"})


def test_later_model_keys_change_the_hash_only_when_set() -> None:
    from forgeline.tasks.config import load_config

    base = load_config(None, [])
    assert load_config(None, ["model.bias=true", "model.activation=gelu_new"]).config_hash() == base.config_hash()
    assert load_config(None, ["model.bias=false"]).config_hash() != base.config_hash()
    assert load_config(None, ["model.activation=gelu"]).config_hash() != base.config_hash()


# ------------------------------------------------------------------------------ task kinds (issues 16, 17)
def test_task_kind_defaults_to_lm_and_keeps_every_shipped_config_hash() -> None:
    from forgeline.tasks.config import PipelineConfig

    cfg = PipelineConfig()
    assert cfg.kind == "lm"
    assert cfg.gate_metric() == ("test/bits_per_byte", False)
    assert cfg.tune_metric() == ("val/loss", False)
    assert cfg.patience() is None and cfg.keep_best() is False
    # The hashes the shipped configs had before task.kind existed (their checkpoints must still resume).
    assert load_config("configs/default.yaml").config_hash() == "d4c532613ff874cc"
    assert load_config("configs/shakespeare_char.yaml").config_hash() == "2af8c3669d82eb9d"


def test_classification_defaults_follow_the_task() -> None:
    cfg = load_config(None, ["task.kind=classification", "data.label_column=tag"])
    assert cfg.gate_metric() == ("test/f1_macro", True)
    assert cfg.tune_metric() == ("val/f1_macro", True)
    assert cfg.patience() == 3 and cfg.keep_best() is True
    assert cfg.config_hash() != PipelineConfig().config_hash()
    off = load_config(None, ["task.kind=classification", "data.label_column=tag", "train.patience=0"])
    assert off.patience() is None


def test_registry_metric_direction_comes_from_its_name_unless_set() -> None:
    cfg = load_config(None, ["registry.metric=test/accuracy"])
    assert cfg.gate_metric() == ("test/accuracy", True)
    cfg = load_config(None, ["registry.metric=test/loss"])
    assert cfg.gate_metric() == ("test/loss", False)
    cfg = load_config(None, ["registry.metric=test/custom", "registry.higher_is_better=true"])
    assert cfg.gate_metric() == ("test/custom", True)


def test_early_stopping_patience_is_the_old_name_of_train_patience(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  early_stopping_patience: 4\n")
    cfg = load_config(path)
    assert cfg.train.patience == 4 and cfg.patience() == 4
    assert cfg.config_hash() != PipelineConfig().config_hash()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.kind=classification"], "data.label_column: task.kind 'classification' needs"),
        (["data.label_column=tag"], "data.label_column: only for task.kind 'classification', not 'lm'"),
        (["train.class_weights=balanced"], "train.class_weights: only for task.kind 'classification'"),
        (["train.epochs=3"], "train.epochs: task.kind 'lm' trains on random windows"),
        (["train.loss_on=all"], "train.loss_on: only for task.kind 'completion'"),
        (["task.kind=completion"], "data.prompt_column: task.kind 'completion' needs"),
        (["data.prompt_column=q"], "data.prompt_column: only for task.kind 'completion', not 'lm'"),
    ],
)
def test_a_key_the_task_cannot_use_is_one_line_naming_it(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text and "\n" not in text and "Value error" not in text


def test_completion_on_the_builtin_docstrings_needs_no_columns() -> None:
    cfg = load_config(None, ["task.kind=completion", "data.sources=[{kind: builtin, name: python-docstrings}]"])
    assert cfg.gate_metric() == ("test/rougeL", True)
    with pytest.raises(ConfigError, match="python-docstrings' corpus is for task.kind 'completion'"):
        load_config(None, ["data.sources=[{kind: builtin, name: python-docstrings}]"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.cpu_shards=0", "--set train.cpu_shards=0: Input should be greater than or equal to 1, or 'auto'"),
        ("train.nproc_per_node=x", "--set train.nproc_per_node=x: Input should be a valid integer, unable to parse"),
    ],
)
def test_a_value_that_fits_no_branch_of_a_union_names_the_key_and_every_branch(override: str, message: str) -> None:
    """It read 'train.cpu_shards.constrained-int: ... (and 1 more)': an internal tag, and 'auto' left unsaid."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert text.startswith(message) and text.endswith("or 'auto'") and "more)" not in text and "constrained" not in text


def test_an_unknown_key_in_an_hf_source_is_named_like_in_any_other_source() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'data\.sources\.bogus'"):
        load_config(None, ["data.sources=[{kind: hf, name: some/corpus, bogus: 1}]"])
