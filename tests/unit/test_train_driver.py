"""The training loops' shared scaffolding: done.json, resume, checkpoints, the epoch step loop."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
import torch

from forgeline.tasks.config import TrainConfig
from forgeline.tasks.errors import NonFiniteLossError
from forgeline.tasks.train.checkpoints import CheckpointError, load_latest_checkpoint
from forgeline.tasks.train.driver import (
    TrainCallbacks,
    TrainResult,
    finished_run,
    restore_checkpoint,
    run_summary,
    stopped_by_signal,
    write_done,
)
from forgeline.tasks.train.epochs import EpochRun, EpochTask, resume, run_steps
from forgeline.tasks.train.journal import JOURNAL_FILE, MetricJournal, read_journal
from forgeline.tasks.train.loop import DONE_FILE, finished_result
from forgeline.tasks.train.state import EvalState, write_checkpoint

CFG = TrainConfig(
    max_steps=12,
    batch_size=4,
    warmup_steps=0,
    eval_interval=2,
    log_interval=2,
    checkpoint_interval=4,
    max_nonfinite_steps=2,
    device="cpu",
)


def _run(tmp_path: Path, state: EvalState, *, evaluate, loss=None, patience=None, cb=None, keep_best=False):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    xs = torch.randn(64, 3)
    run = EpochRun(
        cfg=CFG,
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        device=torch.device("cpu"),
        run_dir=tmp_path,
        config_hash="abc",
        patience=patience,
        keep_best=keep_best,
        cb=cb or TrainCallbacks(),
        journal=MetricJournal(tmp_path / JOURNAL_FILE, state.step),
    )

    def fetch(k: int) -> tuple[torch.Tensor, int]:
        return xs[(k * 4) % 64 : (k * 4) % 64 + 4], 4

    return run, EpochTask(("val/score", True), fetch, loss or (lambda x: model(x).pow(2).mean()), evaluate)


def test_run_steps_stops_after_patience_and_keeps_the_best(tmp_path: Path) -> None:
    scores = iter([0.5, 0.9, 0.7, 0.8, 0.6, 0.6])  # best at the 2nd evaluation (step 4), then 3 worse ones
    evals: list[tuple[int, float]] = []
    state = EvalState()
    run, task = _run(
        tmp_path,
        state,
        evaluate=lambda: {"val/loss": 1.0, "val/score": next(scores)},
        patience=3,
        keep_best=True,
        cb=TrainCallbacks(on_eval=lambda step, value: evals.append((step, value))),
    )
    out = run_steps(run, state, task)

    assert out["stopped_early"] and state.step == 10
    assert evals == [(2, 0.5), (4, 0.9), (6, 0.7), (8, 0.8), (10, 0.6)]
    assert state.best_metrics["val/score"] == 0.9 and state.best_score == -0.9 and state.bad_evals == 3
    assert state.best_model is not None and set(state.best_model) == {"weight", "bias"}
    # The early stop wrote a checkpoint, and the journal covers every step of it.
    ckpt = load_latest_checkpoint(tmp_path / "checkpoints", "abc")
    assert ckpt is not None and ckpt["step"] == 10 and ckpt["best_metrics"]["val/score"] == 0.9
    assert [e[0] for e in read_journal(tmp_path / JOURNAL_FILE)] == list(range(1, 11))


def test_resume_restores_state_weights_and_a_stopped_run_stops_again(tmp_path: Path) -> None:
    state = EvalState()
    run, task = _run(tmp_path, state, evaluate=lambda: {"val/loss": 1.0, "val/score": 0.1}, patience=2)
    run_steps(run, state, task)
    assert state.step == 6  # no improvement after the first evaluation: 2 bad ones

    fresh = torch.nn.Linear(3, 1)
    again, resumed_from = resume(tmp_path, "abc", fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), run.device)
    assert resumed_from == 6 and again.step == 6 and again.bad_evals == 2 and again.history == state.history
    assert torch.equal(fresh.weight, run.model.weight)
    # Killed after its early-stop checkpoint: it stops again without another step.
    rerun, task = _run(tmp_path, again, evaluate=lambda: pytest.fail("no step expected"), patience=2)
    assert run_steps(rerun, again, task)["stopped_early"] and again.step == 6


def test_resume_without_a_checkpoint_starts_fresh(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    state, resumed_from = resume(tmp_path, "abc", model, torch.optim.SGD(model.parameters()), torch.device("cpu"))
    assert resumed_from is None and state == EvalState()


def test_non_finite_losses_are_skipped_then_fail(tmp_path: Path) -> None:
    state = EvalState()
    model_loss = {"n": 0}

    def loss(x: torch.Tensor) -> torch.Tensor:
        model_loss["n"] += 1
        value = run.model(x).pow(2).mean()
        return value * float("nan") if model_loss["n"] in (3, 5, 6) else value

    run, task = _run(tmp_path, state, evaluate=lambda: {"val/loss": 1.0, "val/score": 0.1}, loss=loss)
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row"):
        run_steps(run, state, task)
    assert state.nonfinite == 3 and state.step == 6
    # Step 3's gradients were dropped: no checkpoint past the last good one (step 4).
    assert load_latest_checkpoint(tmp_path / "checkpoints", "abc")["step"] == 4


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = EvalState(step=3, best_score=0.2, best_metrics={"val/loss": 0.2}, bad_evals=1, nonfinite=2, history=[])
    rng = torch.get_rng_state()
    write_checkpoint(model, optimizer, 3, {}, state.checkpoint_fields(), tmp_path, "h", CFG, torch.device("cpu"))
    torch.rand(5)  # move the generator on
    ckpt = load_latest_checkpoint(tmp_path / "checkpoints", "h")
    assert set(ckpt["rng"]) == {"torch"} and ckpt["scheduler"] == {"kind": "warmup_cosine", "step": 3}
    assert EvalState.from_checkpoint(ckpt) == state
    other = torch.nn.Linear(3, 1)
    restore_checkpoint(ckpt, other, torch.optim.SGD(other.parameters(), lr=0.1), torch.device("cpu"))
    assert torch.equal(other.weight, model.weight) and torch.equal(torch.get_rng_state(), rng)


def test_done_json_round_trip(tmp_path: Path) -> None:
    assert finished_run(tmp_path) is None
    write_done(tmp_path, TrainResult(run_dir="/old/place", model_dir="/old/place/model", steps=7))
    assert not (tmp_path / "done.tmp").exists()
    with pytest.raises(CheckpointError, match="model folder"):
        finished_run(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    result = finished_run(tmp_path)
    assert result is not None and result.already_done and result.steps == 7
    assert result.model_dir == str(tmp_path / "model")
    assert finished_result(tmp_path, tmp_path / DONE_FILE) == result  # still importable from loop


def test_stopped_by_signal_names_the_signal() -> None:
    stop = threading.Event()
    stop.signum = signal.SIGINT  # type: ignore[attr-defined]
    err = stopped_by_signal(stop, 12)
    assert str(err) == "stopped by a signal after step 12 (Ctrl-C); checkpoint saved"
    assert "(SIGTERM)" in str(stopped_by_signal(threading.Event(), 3))


def test_run_summary_keeps_the_loop_sizes_first() -> None:
    summary = run_summary({"parameters": 5, "total_steps": 9}, [0] * 11, torch.device("cpu"), 2, 1, 8)
    assert list(summary)[:3] == ["parameters", "total_steps", "vocab_size"]
    assert summary["vocab_size"] == 11 and summary["start_step"] == 2 and summary["global_batch"] == 8
