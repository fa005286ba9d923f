"""The distillation loops' shared driver: resume, one step, the NaN policy, validation, logs and checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from forgeline.tasks.compress.distill import (
    DistillSettings,
    DistillState,
    distil_step,
    run_distillation,
    skip_nonfinite,
    start_distillation,
)
from forgeline.tasks.config import TrainConfig
from forgeline.tasks.errors import NonFiniteLossError
from forgeline.tasks.train.checkpoints import complete_checkpoints, load_latest_checkpoint

CLASSES = 3


def settings(steps: int, *, accum: int = 1, eval_interval: int = 2, max_nonfinite: int = 3) -> DistillSettings:
    train = TrainConfig(
        max_steps=steps, batch_size=4, learning_rate=1e-2, warmup_steps=0, eval_interval=eval_interval,
        log_interval=1, checkpoint_interval=2, device="cpu", dtype="float32", grad_accum_steps=accum,
        max_nonfinite_steps=max_nonfinite,
    )  # fmt: skip
    return DistillSettings(train=train, block_size=8, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5, seed=1, run_hash="h")


class Toy:
    """A linear student and teacher over fixed records; ``forward`` records the micro-batch numbers it is asked for."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.student = torch.nn.Linear(4, CLASSES)
        self.teacher = torch.nn.Linear(4, CLASSES)
        self.x = torch.randn(8, 4)
        self.y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        self.indices: list[int] = []

    def forward(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.indices.append(index)
        rows = [(index * 4 + i) % 8 for i in range(4)]
        with torch.no_grad():
            t = self.teacher(self.x[rows])
        return self.student(self.x[rows]), t, self.y[rows]


def test_a_step_accumulates_micro_batches_steps_the_optimizer_and_reports_both_losses() -> None:
    toy, cfg = Toy(), settings(4, accum=2)
    optimizer = torch.optim.SGD(toy.student.parameters(), lr=0.1)
    before = toy.student.weight.detach().clone()
    state = DistillState(step=1)

    metrics = distil_step(toy.student, optimizer, state, cfg, toy.forward, device=torch.device("cpu"))

    assert metrics is not None and state.step == 2
    assert set(metrics) == {"train/loss", "kd_loss", "ce_loss", "lr", "grad_norm"}
    assert toy.indices == [2, 3]  # step 1's micro-batches, counted over the whole run
    assert metrics["train/loss"] == pytest.approx(0.5 * 4 * metrics["kd_loss"] + 0.5 * metrics["ce_loss"], rel=1e-5)
    assert not torch.equal(toy.student.weight, before)
    assert all(p.grad is None for p in toy.student.parameters())


def test_a_nan_step_is_skipped_and_too_many_in_a_row_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGELINE_FAULT_AT_STEP", "1")
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "nan_from")
    toy, cfg = Toy(), settings(5, max_nonfinite=2)
    optimizer = torch.optim.SGD(toy.student.parameters(), lr=0.1)
    before = toy.student.weight.detach().clone()
    state = DistillState()

    assert distil_step(toy.student, optimizer, state, cfg, toy.forward, device=torch.device("cpu")) is None
    skip_nonfinite(optimizer, state, cfg.train)
    assert (state.step, state.nonfinite, state.nonfinite_run) == (1, 1, 1)
    assert torch.equal(toy.student.weight, before)
    assert all(p.grad is None for p in toy.student.parameters())
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"):
        run_distillation(
            toy.student, optimizer, state, cfg, Path("unused"), toy.forward, None, device=torch.device("cpu")
        )


def test_the_loop_validates_logs_checkpoints_and_resumes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    toy, cfg = Toy(), settings(3)
    seen: list[int] = []
    validations: list[float] = [2.0, 1.5]
    optimizer, state = start_distillation(
        toy.student, toy.teacher, cfg, tmp_path, device=torch.device("cpu"), what="toy distillation"
    )
    assert state.resumed_from is None

    with caplog.at_level(logging.INFO, logger="forgeline.tasks.compress"):
        out = run_distillation(
            toy.student, optimizer, state, cfg, tmp_path, toy.forward, lambda: {"val/loss": validations.pop(0)},
            lambda step, _: seen.append(step), device=torch.device("cpu"), log_parts=False,
        )  # fmt: skip

    assert seen == [1, 2, 3] and out.step == 3
    assert (out.final_val, out.best_val) == (1.5, 1.5)  # validated at step 2 (interval) and 3 (last)
    assert [h["step"] for h in out.history] == [1, 2, 3] and "val/loss" in out.history[1]
    assert "distil step 3/3  loss " in caplog.text and "kd " not in caplog.text
    assert sorted(step for step, _ in complete_checkpoints(tmp_path)) == [2, 3]
    ckpt = load_latest_checkpoint(tmp_path, "h")
    assert ckpt is not None and ckpt["step"] == 3 and ckpt["best_val"] == 1.5

    again, gen = Toy(), torch.Generator()
    with caplog.at_level(logging.INFO, logger="forgeline.tasks.compress"):
        _, resumed = start_distillation(
            again.student, again.teacher, settings(5), tmp_path, device=torch.device("cpu"), what="toy", gen=gen
        )
    assert (resumed.step, resumed.resumed_from, len(resumed.history)) == (3, 3, 3)
    assert torch.equal(again.student.weight, toy.student.weight)
    assert torch.equal(gen.get_state(), ckpt["rng"]["batches"])
    assert "toy resumed from step 3" in caplog.text


def test_the_footprint_is_the_size_rows_every_measure_shares() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from forgeline.tasks.compress.complete import CompletionMeasure
    from forgeline.tasks.compress.measure import ModelMeasure, footprint, safetensors_bytes

    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2, n_inner=24))
    rows = footprint(model)

    assert rows == {
        "non_embedding_parameters": rows["non_embedding_parameters"],
        "n_layer": 2,
        "n_inner": 24,
        "bytes_on_disk": safetensors_bytes(model),
    }
    assert 0 < rows["non_embedding_parameters"] < sum(p.numel() for p in model.parameters())
    shared = ["parameters", *rows, "tokens_per_sec", "latency_p50_ms", "latency_p95_ms"]
    assert list(ModelMeasure.model_fields) == [*shared, "bits_per_byte"]  # the table's row order
    assert list(CompletionMeasure.model_fields) == [*shared, "rougeL", "bleu", "exact_match"]
