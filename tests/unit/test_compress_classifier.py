"""Compressing a sequence classifier: the student's init, the loss on class logits, the cached teacher, the gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from forgeline.tasks.compress.classify import distill_classifier, teacher_logits, time_requests
from forgeline.tasks.compress.distill import DistillSettings, distillation_loss
from forgeline.tasks.compress.measure import relative_drop
from forgeline.tasks.compress.student import build_student, is_classifier, resolve_student
from forgeline.tasks.config import CompressConfig, TrainConfig
from forgeline.tasks.registry.compressed import decide_student
from forgeline.tasks.train.classify_data import LabeledSplit

LABELS = ["a", "b", "c"]
PAD = 0


def tiny_classifier(n_layer: int = 4, seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=20,
        n_positions=16,
        n_embd=16,
        n_layer=n_layer,
        n_head=2,
        n_inner=32,
        num_labels=3,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        pad_token_id=PAD,
    )
    return GPT2ForSequenceClassification(config).eval()


def toy_split(n: int = 24, seed: int = 0) -> LabeledSplit:
    gen = torch.Generator().manual_seed(seed)
    ids = [
        torch.randint(1, 20, (int(torch.randint(2, 9, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)
    ]
    return LabeledSplit(ids=ids, labels=torch.tensor([len(x) % 3 for x in ids]))


def settings(steps: int, tmp: str = "h") -> DistillSettings:
    train = TrainConfig(
        max_steps=steps, batch_size=4, learning_rate=1e-2, warmup_steps=0, eval_interval=steps, log_interval=1,
        checkpoint_interval=steps, device="cpu", dtype="float32",
    )  # fmt: skip
    return DistillSettings(
        train=train, block_size=16, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5, seed=3, run_hash=tmp
    )


def test_the_classifier_student_copies_embeddings_chosen_blocks_final_norm_and_score() -> None:
    teacher = tiny_classifier()
    spec = resolve_student(CompressConfig(layers_from_teacher=[0, 3]), teacher.config)
    student = build_student(teacher, spec, seed=1)

    assert is_classifier(student) and student.config.n_layer == 2
    assert student.config.id2label == teacher.config.id2label and student.config.pad_token_id == PAD
    t, s = teacher.state_dict(), student.state_dict()
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "score.weight"):
        assert torch.equal(s[name], t[name]), name
    for i, src in enumerate([0, 3]):
        for key in ("attn.c_attn.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "ln_1.weight"):
            assert torch.equal(s[f"transformer.h.{i}.{key}"], t[f"transformer.h.{src}.{key}"])
    x = torch.tensor([[3, 4, 5, PAD]])
    assert student(input_ids=x, attention_mask=(x != PAD).long()).logits.shape == (1, 3)


def test_the_loss_on_class_logits_is_the_token_loss_with_one_position() -> None:
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    flat = distillation_loss(s, t, y, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5)
    as_tokens = distillation_loss(s[:, None], t[:, None], y[:, None], temperature=2.0, alpha_kd=0.5, alpha_ce=0.5)
    for a, b in zip(flat, as_tokens, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert distillation_loss(t, t, y, temperature=2.0, alpha_kd=1.0, alpha_ce=0.0)[1].item() == pytest.approx(
        0, abs=1e-6
    )


def test_cached_teacher_logits_equal_per_batch_ones_and_train_the_same_student(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher, split = tiny_classifier(), toy_split()
    cached = teacher_logits(teacher, split, PAD, torch.device("cpu"), batch_size=4)
    alone = torch.cat([teacher(input_ids=torch.tensor([row])).logits for row in split.ids]).detach()
    assert cached.shape == (24, 3) and torch.allclose(cached, alone, atol=1e-5)  # padding does not leak in

    spec = resolve_student(CompressConfig(n_layer=2), teacher.config)
    students = []
    for cache in (True, False):
        student = build_student(teacher, spec, seed=1)
        state = distill_classifier(
            student, teacher, split, toy_split(9, seed=1), settings(4), tmp_path / f"ck-{cache}",
            pad_id=PAD, device=torch.device("cpu"), cache=cache,
        )  # fmt: skip
        assert state.step == 4 and "val/f1_macro" in state.history[-1]
        students.append(student.state_dict())
    for name, value in students[0].items():
        assert torch.allclose(value, students[1][name], atol=1e-4), name


def test_classifier_distillation_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    import shutil

    from forgeline.tasks.train.checkpoints import checkpoint_path

    torch.set_num_threads(1)
    teacher, split, val = tiny_classifier(), toy_split(), toy_split(9, seed=1)
    spec = resolve_student(CompressConfig(n_layer=2), teacher.config)
    run = settings(6)
    run.train = run.train.model_copy(update={"checkpoint_interval": 3})
    straight = build_student(teacher, spec, seed=1)
    distill_classifier(straight, teacher, split, val, run, tmp_path / "a", pad_id=PAD, device=torch.device("cpu"))

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    checkpoint_path(tmp_path / "b", 6).unlink()  # as if killed between step 3's checkpoint and the end
    resumed = build_student(teacher, spec, seed=2)  # other initial weights: the checkpoint replaces them
    state = distill_classifier(
        resumed, teacher, split, val, run, tmp_path / "b", pad_id=PAD, device=torch.device("cpu")
    )
    assert state.resumed_from == 3 and state.step == 6
    for name, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-5), name


def test_the_student_gate_follows_a_higher_is_better_metric() -> None:
    kw = {"higher_is_better": True, "metric": "f1_macro"}
    within = decide_student(0.80, 0.75, 0.1, **kw)  # 6.25% lower F1, 10% allowed
    assert within.promoted and within.delta == pytest.approx(0.0625)
    refused = decide_student(0.80, 0.60, 0.1, **kw)  # 25% lower
    assert not refused.promoted and "25.0%" in refused.reason and "f1_macro" in refused.reason
    better = decide_student(0.80, 0.88, 0.0, **kw)
    assert better.promoted and better.delta == pytest.approx(-0.1)
    # The same numbers read as bits per byte (lower is better) go the other way.
    assert not decide_student(0.80, 0.88, 0.0).promoted and decide_student(0.80, 0.60, 0.0).promoted
    assert not decide_student(0.0, 0.5, 0.1, **kw).promoted  # a teacher with F1 0 is no reference
    assert relative_drop(0.8, 0.6, higher_is_better=True) == pytest.approx(0.25)
    assert relative_drop(2.0, 2.5) == pytest.approx(0.25)


def test_requests_are_timed_one_record_at_a_time() -> None:
    class Tok:
        eos_token_id, pad_token_id = 1, 0

        def __call__(self, text: str, truncation: bool, max_length: int) -> dict[str, list[int]]:
            return {"input_ids": [2 + (ord(c) % 10) for c in text][:max_length]}

    models = [tiny_classifier(), tiny_classifier(n_layer=1)]
    out = time_requests(
        models, Tok(), ["hello", "", "a longer text than the context allows"], block_size=16, requests=5
    )
    assert len(out) == 2
    for rate, p50, p95 in out:
        assert rate > 0 and 0 < p50 <= p95
