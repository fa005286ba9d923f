"""Config files the loader must refuse in one line naming the file and line: bytes that are not UTF-8, keys
given twice, alias bombs, a seed past what the seeding calls take, and errors blamed on the right origin
(the file's key at its real line, or the ``--set`` that caused it)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from forgeline.tasks.config import MAX_SEED, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
SMOKE_HASH = "26bcce88fd58a368"  # configs/smoke.yaml on main before the seed bound


def _refusal(tmp_path: Path, content: bytes | str, *overrides: str) -> str:
    path = tmp_path / "bad.yaml"
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"name: caf\xe9\n", "bad.yaml:1: not valid UTF-8 (byte 0xe9 at offset 9)"),
        (
            b"seed: 1\ntrain:\n  max_steps: 3\n\x89PNG\r\n\x1a\n\x00\x00",
            "bad.yaml:4: not valid UTF-8 (byte 0x89 at offset 30)",
        ),
        (b"name: x\x00y\n", "bad.yaml:1: invalid YAML (control character 0x00 at offset 7)"),
    ],
    ids=["latin-1", "binary", "nul"],
)
def test_bytes_that_are_not_utf8_text_are_one_line_with_the_line_and_offset(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    """It was a 48-line traceback ending in UnicodeDecodeError."""
    assert _refusal(tmp_path, content) == f"{tmp_path}/{expected}; save it as UTF-8".removesuffix(
        "; save it as UTF-8" if "invalid YAML" in expected else ""
    )


def test_a_utf8_bom_is_fine(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: bom\n")
    assert load_config(path).name == "bom"


def test_an_unreadable_file_or_a_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match=r"adir: is a directory, not a config file$"):
        load_config(tmp_path / "adir")
    locked = tmp_path / "locked.yaml"
    locked.write_text("seed: 1\n", encoding="utf-8")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads anything
            return
        with pytest.raises(ConfigError, match=r"locked\.yaml: cannot read \(Permission denied\)$"):
            load_config(locked)
    finally:
        locked.chmod(0o644)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nseed: 1\nseed: 2\n", "bad.yaml:3: key 'seed' appears twice (first at line 2)"),
        (
            "train:\n  max_steps: 3\nseed: 1\ntrain:\n  batch_size: 4\n",
            "bad.yaml:4: key 'train' appears twice (first at line 1)",
        ),
        (
            "train:\n  max_steps: 3\n  batch_size: 2\n  max_steps: 5\n",
            "bad.yaml:4: key 'max_steps' appears twice (first at line 2)",
        ),
        (
            "eval: {max_examples: 2, max_examples: 3}\n",
            "bad.yaml:1: key 'max_examples' appears twice (first at line 1)",
        ),
    ],
    ids=["top-level", "section", "nested", "flow-style"],
)
def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path: Path, text: str, expected: str) -> None:
    """YAML keeps the last one: the first ``train:`` section was lost without a word."""
    assert _refusal(tmp_path, text).endswith(expected)


def test_merge_keys_may_still_override_what_they_merge(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "x-base: &base {batch_size: 2, max_steps: 3}\ntrain:\n  <<: *base\n  max_steps: 5\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="unknown key 'x-base'"):  # merged fine; only the helper key is unknown
        load_config(path)


BOMB = "\n".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x]",
        *(f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)


@pytest.mark.parametrize(
    "text",
    [
        BOMB + "\n",
        "deploy:\n  cpu_pool:\n    job_variables:\n" + "".join(f"      {line}\n" for line in BOMB.splitlines()),
    ],
    ids=["top-level", "in-a-free-section"],
)
def test_an_alias_bomb_is_refused_at_once(tmp_path: Path, text: str) -> None:
    """A billion values once expanded: ``validate`` hung in dump_config/redact (a free section validates)."""
    start = time.perf_counter()
    message = _refusal(tmp_path, text)
    assert time.perf_counter() - start < 2
    assert "aliases expand to more than 100,000 values" in message and message.startswith(f"{tmp_path}/bad.yaml:")


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    assert "refers to its own anchor" in _refusal(tmp_path, "deploy:\n  cpu_pool:\n    job_variables: &a {x: *a}\n")


def test_ordinary_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "aliases.yaml"
    path.write_text(
        "deploy:\n  cpu_pool:\n    job_variables: &j {env: {A: b}}\n  gpu_pool:\n    job_variables: *j\n",
        encoding="utf-8",
    )
    assert load_config(path).deploy.gpu_pool.job_variables == {"env": {"A": "b"}}


def test_a_seed_past_what_seeding_takes_is_refused_and_old_hashes_stay() -> None:
    """2**64 validated, then failed mid-run: 'Overflow when unpacking long long' (torch.manual_seed)."""
    with pytest.raises(ConfigError, match=r"^--set seed=18446744073709551616: Input should be less than or equal to"):
        load_config(SMOKE, ["seed=18446744073709551616"])
    with pytest.raises(ConfigError, match=r"^--set seed=-1: Input should be greater than or equal to 0$"):
        load_config(SMOKE, ["seed=-1"])
    assert load_config(SMOKE, [f"seed={MAX_SEED}"]).seed == MAX_SEED
    assert load_config(SMOKE).config_hash() == SMOKE_HASH  # a bound, not a new value: hashes stay


def test_the_largest_seed_seeds_every_sampler_the_tuner_builds() -> None:
    """The tuner seeds Optuna (numpy: below 2**32) with ``seed + 1000 * worker + trials``."""
    optuna = pytest.importorskip("optuna")
    optuna.samplers.TPESampler(seed=MAX_SEED + 1000 * 64 + 100_000)


def test_an_unknown_key_is_found_at_its_own_path_not_a_namesake(tmp_path: Path) -> None:
    """``eval.max_steps`` was reported at the line of ``train.max_steps``."""
    text = "train:\n  max_steps: 3\n  batch_size: 2\neval:\n  max_examples: 2\n  max_steps: 4\n"
    assert _refusal(tmp_path, text).endswith(
        "bad.yaml:6: unknown key 'eval.max_steps' (did you mean 'eval.max_tokens'?)"
    )


def test_a_bad_value_in_a_list_item_or_a_missing_key_gets_its_section_line(tmp_path: Path) -> None:
    text = "name: x\ndata:\n  sources:\n    - kind: files\n      paths: [a.txt]\n    - kind: files\n      pathz: [a]\n"
    assert "bad.yaml:6: data.sources.1.paths: Field required" in _refusal(tmp_path, text)
    compact = "data:\n  sources:\n  - kind: files\n    paths: [a.txt]\n  - kind: files\n    paths: []\nseed: 1\n"
    assert "bad.yaml:6: data.sources.1.paths: List should have at least 1 item" in _refusal(tmp_path, compact)


def test_an_error_caused_by_a_set_names_the_set_not_the_file() -> None:
    """It read ``smoke.yaml:26: train: ...`` for ``--set train.nproc_per_node=0``."""
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["train.nproc_per_node=0"])
    assert str(info.value) == "--set train.nproc_per_node=0: train.nproc_per_node must be >= 1 or 'auto', not 0"


def test_a_file_error_beside_an_unrelated_set_still_names_the_file(tmp_path: Path) -> None:
    message = _refusal(tmp_path, "train:\n  max_steps: 3\n  batch_size: 0\n", "train.max_steps=4")
    assert message.endswith("bad.yaml:3: train.batch_size: Input should be greater than or equal to 1")


@pytest.mark.parametrize(
    ("param", "expected"),
    [
        (
            "{type: categorical, choices: [10, ten]}",
            "train.max_steps: choice 'ten' does not fit: Input should be a valid integer",
        ),
        (
            "{type: int, low: 0, high: 10}",
            "train.max_steps: low 0 does not fit: Input should be greater than or equal to 1",
        ),
        ("{type: float, low: 1, high: 10}", "train.max_steps: a value between low and high 5.5 does not fit"),
    ],
    ids=["choice", "int-bound", "float-for-an-int"],
)
def test_a_search_space_value_its_key_cannot_take_is_refused_at_load(tmp_path: Path, param: str, expected: str) -> None:
    """``choices: [ten]`` for ``train.max_steps`` validated, then failed at trial time after cleaning."""
    lr = "{type: float, low: 0.001, high: 0.01}"
    text = f"tune:\n  n_trials: 2\n  search_space:\n    train.learning_rate: {lr}\n    train.max_steps: {param}\n"
    assert f"bad.yaml:5: tune.search_space: {expected}" in _refusal(tmp_path, text)


def test_search_space_values_that_fit_still_load_and_a_set_names_itself() -> None:
    space = "tune.search_space.train.nproc_per_node={type: categorical, choices: [auto, 2]}"
    assert load_config(SMOKE, [space]).tune.search_space["train.nproc_per_node"].choices == ["auto", 2]
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["tune.search_space.train.max_steps={type: categorical, choices: [ten]}"])
    assert str(info.value).startswith(
        "--set tune.search_space.train.max_steps={type: categorical, choices: [ten]}: "
        "train.max_steps: choice 'ten' does not fit: Input should be a valid integer"
    )
