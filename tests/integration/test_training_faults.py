"""Training under faults, injected for real in a subprocess (RELIABILITY.md A1, A2, A3, D1, D3).

Each case runs ``train_model`` directly (no Prefect, no MLflow) on a tiny generated corpus, so a
kill-and-resume cycle takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    from forgeline.tasks.config import load_config
    from forgeline.tasks.train.loop import train_model
    from forgeline.tasks.errors import StageInterrupted, NonFiniteLossError
    cfg = load_config(None, json.loads(sys.argv[3]))
    try:
        result = train_model(cfg.train, cfg.model, cfg.tokenizer, dataset_dir=sys.argv[1], run_dir=sys.argv[2],
                             seed=cfg.seed, config_hash=cfg.config_hash())
    except StageInterrupted as exc:
        print("INTERRUPTED", exc, flush=True)
        sys.exit(143)
    except NonFiniteLossError as exc:
        print("NONFINITE", exc, flush=True)
        sys.exit(3)
    print("RESULT", result.model_dump_json(exclude={"history"}), flush=True)
    """
)

OVERRIDES = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "model.dropout=0.1",  # dropout on: resume must restore the global RNG too
    "train.max_steps=30",
    "train.batch_size=8",
    "train.warmup_steps=5",
    "train.eval_interval=10",
    "train.eval_batches=2",
    "train.checkpoint_interval=10",
    "train.keep_checkpoints=3",
    "train.log_interval=5",
    "train.device=cpu",
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from forgeline.tasks.config import load_config
    from forgeline.tasks.data.cleaning import clean_dataset

    base = tmp_path_factory.mktemp("data")
    lines = [f"Line {i}: the quick brown fox {i % 7} jumps over the lazy dog number {i * 3 % 11}." for i in range(800)]
    (base / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config(None, ["data.record=line", "data.fractions.train=0.8", "data.fractions.validation=0.1",
                             "data.fractions.test=0.1"])  # fmt: skip
    cfg.data.sources = [{"kind": "files", "paths": ["corpus.txt"]}]  # type: ignore[list-item]
    return clean_dataset(cfg.data, base_dir=base).dataset_dir


def _train(
    dataset_dir: str, run_dir: Path, fault: dict[str, str] | None = None, extra: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FORGELINE_FAULT_AT_STEP", None)
    env.pop("FORGELINE_FAULT_KIND", None)
    env.update(fault or {})
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, dataset_dir, str(run_dir), json.dumps(OVERRIDES + (extra or []))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(dataset_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    proc = _train(dataset_dir, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_sigkill_then_resume_gives_bitwise_equal_weights(dataset_dir: str, reference: Path, tmp_path: Path) -> None:
    killed = _train(dataset_dir, tmp_path, {"FORGELINE_FAULT_AT_STEP": "20", "FORGELINE_FAULT_KIND": "sigkill"})
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "done.json").exists()
    resumed = _train(dataset_dir, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step 20" in resumed.stderr
    result = _result(resumed)
    assert result["resumed_from"] == 20 and result["steps"] == 30
    ref, got = _weights(reference), _weights(tmp_path)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), name


def test_sigterm_saves_a_checkpoint_and_stops(dataset_dir: str, tmp_path: Path) -> None:
    proc = _train(dataset_dir, tmp_path, {"FORGELINE_FAULT_AT_STEP": "13", "FORGELINE_FAULT_KIND": "sigterm"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "stopped by a signal after step 13" in proc.stdout
    assert (tmp_path / "checkpoints" / "ckpt-00000013.ok").exists()
    resumed = _train(dataset_dir, tmp_path)
    assert resumed.returncode == 0
    assert _result(resumed)["resumed_from"] == 13


def test_kill_while_writing_checkpoint_keeps_the_previous_one(
    dataset_dir: str, reference: Path, tmp_path: Path
) -> None:
    killed = _train(
        dataset_dir, tmp_path, {"FORGELINE_FAULT_AT_STEP": "20", "FORGELINE_FAULT_KIND": "sigkill_in_checkpoint"}
    )
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "ckpt-00000020.pt.tmp").exists()  # the partial write is there ...
    assert not (ckpts / "ckpt-00000020.ok").exists()  # ... but never marked complete
    resumed = _train(dataset_dir, tmp_path)
    assert resumed.returncode == 0
    assert _result(resumed)["resumed_from"] == 10
    assert not list(ckpts.glob("*.tmp"))
    for name, tensor in _weights(reference).items():
        assert torch.equal(tensor, _weights(tmp_path)[name]), name


def test_single_nan_step_is_skipped_and_counted(dataset_dir: str, tmp_path: Path) -> None:
    proc = _train(dataset_dir, tmp_path, {"FORGELINE_FAULT_AT_STEP": "7", "FORGELINE_FAULT_KIND": "nan"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "non-finite loss at step 7" in proc.stderr
    result = _result(proc)
    assert result["nonfinite_steps"] == 1 and result["steps"] == 30


def test_persistent_nan_fails_without_overwriting_the_good_checkpoint(dataset_dir: str, tmp_path: Path) -> None:
    proc = _train(
        dataset_dir,
        tmp_path,
        {"FORGELINE_FAULT_AT_STEP": "12", "FORGELINE_FAULT_KIND": "nan_from"},
        extra=["train.max_nonfinite_steps=3"],
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite for 3 steps in a row (last at step 14)" in proc.stdout
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ok"))
    assert ckpts == ["ckpt-00000010.ok"]
    state = torch.load(tmp_path / "checkpoints" / "ckpt-00000010.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_checkpoint_of_another_config_is_refused(dataset_dir: str, tmp_path: Path) -> None:
    killed = _train(dataset_dir, tmp_path, {"FORGELINE_FAULT_AT_STEP": "10", "FORGELINE_FAULT_KIND": "sigkill"})
    assert killed.returncode == -signal.SIGKILL
    wider = _train(dataset_dir, tmp_path, extra=["model.n_embd=64"])
    assert wider.returncode != 0
    assert "was written by config" in wider.stderr and "--fresh" in wider.stderr


def test_fine_tune_from_a_local_model_dir_keeps_its_tokenizer(
    dataset_dir: str, reference: Path, tmp_path: Path
) -> None:
    proc = _train(dataset_dir, tmp_path, extra=[f"model.init_from={reference / 'model'}", "train.max_steps=10"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "using its tokenizer" in proc.stderr
    tuned = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    base = json.loads((reference / "model" / "tokenizer.json").read_text())["model"]["vocab"]
    assert tuned == base

    # Starting from trained weights, the evaluation at step 10 beats a fresh model's at step 10.
    def val_at(run_dir: Path, step: int) -> float:
        return next(h["val/loss"] for h in _result_history(run_dir) if h["step"] == step and "val/loss" in h)

    assert val_at(tmp_path, 10) < val_at(reference, 10) - 0.05


def _result_history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "done.json").read_text())["history"]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(dataset_dir: str, tmp_path: Path) -> None:
    proc = _train(
        dataset_dir, tmp_path, {"FORGELINE_FAULT_AT_STEP": "20", "FORGELINE_FAULT_KIND": "enospc_in_checkpoint"}
    )
    assert proc.returncode != 0
    assert "could not write checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ok")) == ["ckpt-00000010.ok"]
    assert not list(ckpts.glob("*.tmp"))
    resumed = _train(dataset_dir, tmp_path)
    assert resumed.returncode == 0
    assert _result(resumed)["resumed_from"] == 10
