"""GPU readiness on a CPU machine (issue 20, point 2): what a CPU can show of the code paths a GPU takes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from forgeline.tasks.config import EvalConfig, ModelConfig, TokenizerConfig, TrainConfig
from forgeline.tasks.data.tokenization import build_tokenizer
from forgeline.tasks.evaluate.candidate import evaluate_candidate, score_model
from forgeline.tasks.model.modeling import build_model
from forgeline.tasks.train.batches import resolve_device

ROOT = Path(__file__).resolve().parents[2]
TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 20


@pytest.fixture
def saved(tmp_path: Path) -> tuple[str, str]:
    """A tiny saved GPT-2 with its tokenizer, and a cleaned dataset folder holding a test split."""
    tok = build_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), tok)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    features = datasets.Features({"text": datasets.Value("string")})
    splits = {s: datasets.Dataset.from_dict({"text": [TEXT]}, features=features) for s in ("train", "validation")}
    splits["test"] = datasets.Dataset.from_dict({"text": [TEXT]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dataset"))
    return str(model_dir), str(tmp_path / "dataset")


def test_a_cuda_config_scores_on_the_cpu_where_there_is_no_cuda(
    saved: tuple[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The pipeline flow runs evaluate and re-scoring on the cpu pool; train.device: cuda must not fail there.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model_dir, dataset_dir = saved
    cfg = TrainConfig(device="cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device(cfg)  # training itself still refuses to fall back (RELIABILITY.md A8)
    eval_cfg = EvalConfig(max_new_tokens=3, max_tokens=200)
    with caplog.at_level(logging.INFO, logger="forgeline.tasks.train.batches"):
        result = evaluate_candidate(model_dir, dataset_dir, eval_cfg, cfg, block_size=16, seed=1)
        bpb = score_model(model_dir, dataset_dir, eval_cfg, cfg, block_size=16)
    assert result.tokens == 200 and result.metrics["test/bits_per_byte"] == pytest.approx(bpb)
    notes = [r.message for r in caplog.records if "scoring on the CPU" in r.message]
    assert len(notes) == 2  # one line per scoring call


def _bench(*args: str, data: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = ["bash", str(ROOT / "bench" / "gpu.sh"), *args]
    if data is not None:
        cmd += ["--data", str(data)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def test_b_gpu_benchmark_refuses_to_run_without_cuda(tmp_path: Path) -> None:
    corpus = tmp_path / "input.txt"
    corpus.write_text(TEXT)
    proc = _bench("--out", str(tmp_path / "out.json"), data=corpus)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert "no CUDA device" in lines[-1] and "--smoke" in lines[-1]
    assert not (tmp_path / "out.json").exists()


def test_b_gpu_benchmark_fails_clearly_without_its_corpus(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "input.txt"
    proc = _bench("--smoke", "--out", str(tmp_path / "out.json"), data=missing)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"Tiny Shakespeare not found at {missing}" in proc.stderr
    assert not (tmp_path / "out.json").exists()


def test_b_gpu_benchmark_budget_fits_its_timeout() -> None:
    # The script's phases are sized for its own timeout, which fits one device command (at most 600 s).
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_step

    script = (ROOT / "bench" / "gpu.sh").read_text()
    timeout = int(script.split("timeout ")[1].split()[0])
    assert gpu_step.PLANNED_SECONDS <= timeout <= 600


def _make_install(venv: Path, spec: str | None) -> list[str]:
    """``make install`` against a fake venv whose python only records its arguments; the pip calls it made."""
    log = venv / "calls.log"
    log.unlink(missing_ok=True)
    args = ["make", "-s", "-C", str(ROOT), "install", f"VENV={venv}"]
    if spec is not None:
        args.append(f"TORCH_SPEC={spec}")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines() if log.exists() else []


def test_c_another_torch_spec_reinstalls_torch_on_an_existing_venv(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {venv}/calls.log\n')
    python.chmod(0o755)
    (venv / ".installed").touch()  # a venv built before the stamp knew the spec (with the default one)
    assert _make_install(venv, None) == []  # nothing to do: no reinstall for an up-to-date venv
    cuda = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    calls = _make_install(venv, cuda)
    # The +cpu build must go first: pip would take an installed 2.13.0+cpu for the CUDA index's 2.13.0.
    assert calls.index("-m pip uninstall -y -q torch") < calls.index(f"-m pip install -q {cuda}")
    assert (venv / ".torch-spec").read_text().strip() == cuda
    assert _make_install(venv, cuda) == []  # same spec again: nothing to do
    back = _make_install(venv, None)
    assert "-m pip uninstall -y -q torch" in back and "-m pip install -q torch==2.13.0" in back


def test_b_gpu_benchmark_keeps_each_measured_phase(tmp_path: Path) -> None:
    # The JSON is rewritten after each phase: a run cut short (here: the pipeline fails) keeps what was measured.
    corpus = tmp_path / "input.txt"
    corpus.write_text(TEXT * 5)
    out = tmp_path / "out.json"
    env = {**os.environ, "FORGELINE_FAULT_AT_STEP": "1", "FORGELINE_FAULT_KIND": "nan_from"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke", "--data", str(corpus), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode != 0 and "NonFiniteLossError" in proc.stderr
    payload = json.loads(out.read_text())
    assert payload["table"]["nanoGPT's model by hand"]["ms_per_step"] > 0 and "pipeline" not in payload
