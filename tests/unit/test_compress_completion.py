"""Compressing a completion model (issue 18): distillation on completion tokens only, resumable, and the
student gate on ROUGE-L, higher is better (a fall of ROUGE-L is the drop)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgeline.tasks.compress.complete import CompletionMeasure, distill_pairs
from forgeline.tasks.compress.distill import DistillSettings
from forgeline.tasks.compress.measure import tradeoff_table
from forgeline.tasks.compress.stage import CompressResult
from forgeline.tasks.compress.student import StudentSpec
from forgeline.tasks.config import TrainConfig
from forgeline.tasks.registry.compressed import decide_student
from forgeline.tasks.train.completion import IGNORE_INDEX, EncodedPairs

VOCAB = 20


def _lm(n_layer: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=16,
            n_embd=16,
            n_layer=n_layer,
            n_head=2,
            eos_token_id=1,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def _pairs(n: int = 12) -> EncodedPairs:
    out = EncodedPairs()
    for i in range(n):
        prompt, target = [2 + i % 5, 3, 0], [5 + i % 7, 6, 1]  # prompt + separator 0, completion + eos 1
        out.input_ids.append(prompt + target)
        out.labels.append([IGNORE_INDEX] * len(prompt) + target)
        out.kept.append(i)
    return out


def _settings(steps: int) -> DistillSettings:
    train = TrainConfig(
        max_steps=steps,
        batch_size=4,
        learning_rate=0.01,
        min_lr=0.01,  # constant: a 2-step run then resumed to 4 follows the 4-step run
        warmup_steps=0,
        eval_interval=2,
        log_interval=1,
        checkpoint_interval=2,
        device="cpu",
    )
    return DistillSettings(
        train=train, block_size=16, temperature=2.0, alpha_kd=1.0, alpha_ce=0.0, seed=0, run_hash="h"
    )


def test_completion_distillation_trains_on_completion_tokens_and_resumes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher, pairs = _lm(2, 0), _pairs()
    student_a = _lm(1, 1)
    full = distill_pairs(
        student_a, teacher, pairs, pairs, _settings(4), tmp_path / "a", pad_id=0, device=torch.device("cpu")
    )
    assert full.step == 4 and full.final_val is not None and full.history[-1]["kd_loss"] >= 0
    # Stopped after 2 steps, then resumed: the same weights as the run that never stopped.
    student_b = _lm(1, 1)
    distill_pairs(student_b, teacher, pairs, pairs, _settings(2), tmp_path / "b", pad_id=0, device=torch.device("cpu"))
    resumed = distill_pairs(
        student_b, teacher, pairs, pairs, _settings(4), tmp_path / "b", pad_id=0, device=torch.device("cpu")
    )
    assert resumed.resumed_from == 2
    for a, b in zip(student_a.state_dict().values(), student_b.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_loss_counts_exactly_the_completion_tokens(tmp_path: Path) -> None:
    # With only the CE part, the first step's loss is the completion loss HF computes from the labels (shifted
    # inside the model, prompt positions ignored): the mask and the shift line up.
    from forgeline.tasks.train.completion import collate_pairs, completion_loss

    torch.set_num_threads(1)
    teacher, pairs = _lm(2, 0), _pairs()
    student = _lm(1, 1)
    batch = collate_pairs([pairs.example(i) for i in range(len(pairs))], pad_id=0)
    with torch.no_grad():
        expected, targets = completion_loss(student, batch)
    assert targets == 3 * len(pairs)
    settings = _settings(1)
    settings.alpha_kd, settings.alpha_ce = 0.0, 1.0
    settings.train = settings.train.model_copy(update={"batch_size": len(pairs)})
    state = distill_pairs(student, teacher, pairs, pairs, settings, tmp_path, pad_id=0, device=torch.device("cpu"))
    assert abs(state.history[0]["ce_loss"] - float(expected)) < 1e-5


def _measure(rouge: float) -> CompletionMeasure:
    return CompletionMeasure(
        parameters=100,
        non_embedding_parameters=50,
        n_layer=1,
        n_inner=64,
        bytes_on_disk=400,
        tokens_per_sec=10.0,
        latency_p50_ms=1.0,
        latency_p95_ms=2.0,
        rougeL=rouge,
        bleu=1.0,
        exact_match=0.0,
    )


def test_the_completion_gate_is_rouge_l_and_a_fall_is_a_drop() -> None:
    teacher, student = _measure(0.5), _measure(0.4)
    result = CompressResult(
        run_dir="r",
        model_dir="m",
        spec=StudentSpec(layers=[0], n_layer=1, n_embd=16, n_head=2, n_inner=64, from_teacher=True),
        steps=1,
        teacher=teacher,
        student=student,
        table=tradeoff_table(teacher, student),
        metric="rougeL",
        higher_is_better=True,
    )
    assert (result.teacher_metric, result.student_metric) == (0.5, 0.4)
    assert "rougeL" in result.table["quantity"] and "bits_per_byte" not in result.table["quantity"]
    passed = decide_student(0.5, 0.4, 0.25, higher_is_better=True, metric="rougeL")
    assert passed.promoted and abs(passed.delta - 0.2) < 1e-9 and "rougeL" in passed.reason
    failed = decide_student(0.5, 0.4, 0.1, higher_is_better=True, metric="rougeL")
    assert not failed.promoted
    # The lower-is-better reading would have called a fall of ROUGE-L an improvement.
    assert decide_student(0.5, 0.4, 0.1, higher_is_better=False).promoted
    assert decide_student(0.5, 0.6, 0.0, higher_is_better=True).promoted
