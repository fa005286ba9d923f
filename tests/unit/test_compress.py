"""The compress stage's pure parts: the loss, the student's init, pruning, the gate, resume of the loop."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgeline.tasks.compress.distill import DistillSettings, distill, distillation_loss
from forgeline.tasks.compress.measure import relative_drop, time_generation, tradeoff_table
from forgeline.tasks.compress.student import (
    CompressError,
    build_student,
    check_vocabularies,
    neuron_importance,
    prune_mlp,
    resolve_student,
    spaced_layers,
)
from forgeline.tasks.config import CompressConfig, TrainConfig, load_config
from forgeline.tasks.registry.compressed import decide_student, register_student


def tiny_teacher(n_layer: int = 4, vocab: int = 20, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2, n_inner=32)
    return GPT2LMHeadModel(config).eval()


# ------------------------------------------------------------------------------------------------ loss
def test_distillation_loss_matches_a_hand_computation() -> None:
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # (B=1, T=2, V=3)
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    y = torch.tensor([[0, 2]])
    temp, a_kd, a_ce = 2.0, 0.5, 0.5

    def softmax(row: list[float]) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s[0].tolist(), t[0].tolist(), strict=True):
        p, q = softmax(trow), softmax(srow)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    kl /= 2  # mean over the two tokens
    ce = 0.0
    for row, target in zip(s[0].tolist(), [0, 2], strict=True):
        ce += -(row[target] - math.log(sum(math.exp(v) for v in row)))
    ce /= 2
    loss, kd, ce_t = distillation_loss(s, t, y, temperature=temp, alpha_kd=a_kd, alpha_ce=a_ce)
    assert kd.item() == pytest.approx(kl, rel=1e-5)
    assert ce_t.item() == pytest.approx(ce, rel=1e-5)
    assert loss.item() == pytest.approx(a_kd * temp**2 * kl + a_ce * ce, rel=1e-5)


def test_distillation_loss_is_pure_ce_when_student_equals_teacher() -> None:
    logits = torch.randn(2, 3, 5)
    y = torch.randint(5, (2, 3))
    loss, kd, ce = distillation_loss(logits, logits.clone(), y, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5)
    assert kd.item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * ce.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------- student init
def test_spaced_layers_gives_distilgpt2s_choice() -> None:
    assert spaced_layers(12, 6) == [0, 2, 4, 7, 9, 11]
    assert spaced_layers(4, 2) == [0, 3]
    assert spaced_layers(5, 1) == [0]


def test_student_copies_the_chosen_teacher_layers_and_embeddings() -> None:
    teacher = tiny_teacher()
    spec = resolve_student(CompressConfig(layers_from_teacher=[0, 2]), teacher.config)
    student = build_student(teacher, spec, seed=1)
    t, s = teacher.state_dict(), student.state_dict()
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name]), name
    for i, src in enumerate([0, 2]):
        for key in ("attn.c_attn.weight", "attn.c_proj.bias", "mlp.c_fc.weight", "mlp.c_proj.weight", "ln_1.weight"):
            assert torch.equal(s[f"transformer.h.{i}.{key}"], t[f"transformer.h.{src}.{key}"])
    assert student.config.n_layer == 2
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()  # still tied


def test_default_distill_student_has_half_the_layers() -> None:
    spec = resolve_student(CompressConfig(), tiny_teacher().config)
    assert (spec.n_layer, spec.layers, spec.from_teacher) == (2, [0, 3], True)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"layers_from_teacher": [0, 4]}, "layer 4 is out of range"),
        ({"n_layer": 6}, "larger than the teacher"),
        ({"n_embd": 32, "n_head": 2}, "larger than the teacher"),
        ({"method": "prune", "n_inner": 32}, "not smaller than the teacher"),
    ],
)
def test_bad_students_are_refused_in_one_line(settings: dict, message: str) -> None:
    with pytest.raises(CompressError, match=message) as info:
        resolve_student(CompressConfig(**settings), tiny_teacher().config)
    assert "\n" not in str(info.value)


def test_other_vocabulary_is_refused() -> None:
    teacher, other = tiny_teacher(vocab=20), tiny_teacher(n_layer=1, vocab=24)
    with pytest.raises(CompressError, match="vocabulary"):
        check_vocabularies(teacher, object(), other, None)


def test_config_checks_layers_and_alphas() -> None:
    with pytest.raises(ValueError, match="distinct"):
        CompressConfig(layers_from_teacher=[1, 1])
    with pytest.raises(ValueError, match="differs from len"):
        CompressConfig(layers_from_teacher=[0, 1], n_layer=3)
    with pytest.raises(ValueError, match="nothing to train"):
        CompressConfig(alpha_kd=0, alpha_ce=0)


def test_compress_section_leaves_the_config_hash_alone() -> None:
    base = load_config(None)
    assert load_config(None, ["compress.enabled=true", "compress.n_layer=1"]).config_hash() == base.config_hash()


# --------------------------------------------------------------------------------------------- pruning
def test_pruning_keeps_the_largest_neurons_and_their_function() -> None:
    teacher = tiny_teacher(n_layer=1)
    mlp = teacher.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.weight.mul_(0.01)
        for j in (3, 7, 20):  # make three neurons clearly the largest (Conv1D: column j in, row j out)
            mlp.c_fc.weight[:, j] *= 500
            mlp.c_proj.weight[j, :] *= 5
    block = {k.removeprefix("transformer.h.0."): v for k, v in teacher.state_dict().items() if ".h.0." in k}
    assert set(torch.topk(neuron_importance(block), 3).indices.tolist()) == {3, 7, 20}
    pruned = prune_mlp(block, 3)
    assert pruned["mlp.c_fc.weight"].shape == (16, 3)
    assert pruned["mlp.c_fc.bias"].shape == (3,)
    assert pruned["mlp.c_proj.weight"].shape == (3, 16)
    assert torch.equal(pruned["mlp.c_fc.weight"], block["mlp.c_fc.weight"][:, [3, 7, 20]])
    # The pruned MLP computes the full MLP with every other neuron switched off.
    x = torch.randn(2, 5, 16)
    act = teacher.transformer.h[0].mlp.act
    mask = torch.zeros(32)
    mask[[3, 7, 20]] = 1
    with torch.no_grad():
        full = (act(mlp.c_fc(x)) * mask) @ mlp.c_proj.weight + mlp.c_proj.bias
        small = act(x @ pruned["mlp.c_fc.weight"] + pruned["mlp.c_fc.bias"]) @ pruned["mlp.c_proj.weight"]
        small = small + pruned["mlp.c_proj.bias"]
    assert torch.allclose(full, small, atol=1e-5)


def test_pruned_student_runs_and_keeps_the_output_shape() -> None:
    teacher = tiny_teacher()
    spec = resolve_student(CompressConfig(method="prune", n_inner=8), teacher.config)
    assert (spec.n_layer, spec.n_inner) == (4, 8)
    student = build_student(teacher, spec, seed=0)
    x = torch.randint(20, (2, 10))
    assert student(input_ids=x).logits.shape == teacher(input_ids=x).logits.shape == (2, 10, 20)
    assert student.transformer.h[0].mlp.c_fc.weight.shape == (16, 8)


# ------------------------------------------------------------------------------------------------ gate
def test_student_gate_is_relative_to_the_teacher() -> None:
    assert decide_student(2.0, 2.1, 0.1).promoted  # 5% worse, 10% allowed
    refused = decide_student(2.0, 2.5, 0.1)
    assert not refused.promoted and "exceeds compress.max_quality_drop" in refused.reason
    assert refused.delta == pytest.approx(0.25)
    assert not decide_student(2.0, float("nan"), 0.1).promoted
    assert relative_drop(2.0, 2.5) == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------- the loop
def _settings(max_steps: int) -> DistillSettings:
    train = TrainConfig(
        max_steps=max_steps, batch_size=4, warmup_steps=0, eval_interval=2, eval_batches=2, log_interval=1,
        checkpoint_interval=2, learning_rate=1e-2, min_lr=1e-3, device="cpu",
    )  # fmt: skip
    return DistillSettings(train=train, block_size=8, temperature=2.0, alpha_kd=0.5, alpha_ce=0.5, seed=3, run_hash="h")


def test_distillation_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tiny_teacher()
    spec = resolve_student(CompressConfig(layers_from_teacher=[1]), teacher.config)
    data = torch.randint(20, (400,))
    device = torch.device("cpu")

    straight = build_student(teacher, spec, seed=0)
    full = distill(straight, teacher, data, data, _settings(6), tmp_path / "a", device=device)

    crashed = build_student(teacher, spec, seed=0)
    monkeypatch.setenv("FORGELINE_FAULT_AT_STEP", "4")
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "raise")
    with pytest.raises(RuntimeError, match="injected"):
        distill(crashed, teacher, data, data, _settings(6), tmp_path / "b", device=device)
    monkeypatch.delenv("FORGELINE_FAULT_KIND")
    again = build_student(teacher, spec, seed=0)  # a fresh process: weights come from the checkpoint
    state = distill(again, teacher, data, data, _settings(6), tmp_path / "b", device=device)
    assert state.resumed_from == 4 and state.step == 6 == full.step
    for key, value in straight.state_dict().items():
        assert torch.allclose(value, again.state_dict()[key], atol=1e-6), key
    assert {"kd_loss", "ce_loss", "train/loss"} <= set(state.history[-1])


def test_nonfinite_distillation_steps_are_skipped_then_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.tasks.errors import NonFiniteLossError

    teacher = tiny_teacher()
    student = build_student(teacher, resolve_student(CompressConfig(layers_from_teacher=[0]), teacher.config), seed=0)
    data = torch.randint(20, (400,))
    monkeypatch.setenv("FORGELINE_FAULT_AT_STEP", "2")
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "nan")
    state = distill(student, teacher, data, data, _settings(4), tmp_path / "one", device=torch.device("cpu"))
    assert state.nonfinite == 1 and state.step == 4
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "nan_from")
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        distill(student, teacher, data, data, _settings(8), tmp_path / "many", device=torch.device("cpu"))


def test_distillation_moves_the_student_towards_the_teacher(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    with torch.no_grad():  # a random teacher is nearly uniform: sharpen it so there is something to learn
        teacher.transformer.wte.weight.mul_(30)
        for block in teacher.transformer.h:
            block.mlp.c_proj.weight.mul_(10)
    spec = resolve_student(CompressConfig(n_layer=1, init="scratch"), teacher.config)
    student = build_student(teacher, spec, seed=0)
    data = torch.randint(20, (400,))
    x = data[:64].view(8, 8)

    def kd() -> float:
        with torch.no_grad():
            t, s = teacher(input_ids=x).logits, student(input_ids=x).logits
            return distillation_loss(s, t, x, temperature=2.0, alpha_kd=1.0, alpha_ce=0.0)[1].item()

    before = kd()
    settings = _settings(30)
    settings.alpha_ce = 0.0
    distill(student, teacher, data, data, settings, tmp_path, device=torch.device("cpu"))
    assert kd() < 0.75 * before


# ---------------------------------------------------------------------------------------- measurements
def test_generation_timing_and_table() -> None:
    teacher = tiny_teacher()
    small = build_student(teacher, resolve_student(CompressConfig(), teacher.config), seed=0)
    timings = time_generation([teacher, small], torch.tensor([1, 2, 3]), new_tokens=5, requests=4)
    assert len(timings) == 2
    for rate, p50, p95 in timings:
        assert rate > 0 and 0 < p50 <= p95
    from forgeline.tasks.compress.measure import ModelMeasure

    m = ModelMeasure(
        parameters=10, non_embedding_parameters=6, n_layer=2, n_inner=8, bytes_on_disk=100, tokens_per_sec=50.0,
        latency_p50_ms=2.0, latency_p95_ms=3.0, bits_per_byte=2.0,
    )  # fmt: skip
    table = tradeoff_table(m, m.model_copy(update={"parameters": 5}))
    assert table["quantity"][0] == "parameters" and table["student/teacher"][0] == 0.5


class MemoryRegistry:
    """Just enough of ``RegistryStore`` for the student gate, in memory."""

    def __init__(self) -> None:
        self.versions: list[SimpleNamespace] = []
        self.aliases: dict[str, str] = {}
        self.moves: list[tuple[str, str]] = []

    def lock(self, model_name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def find_lineage_version(self, model_name: str, lineage: str) -> SimpleNamespace | None:
        return next((v for v in self.versions if v.tags["forgeline.lineage"] == lineage), None)

    def logged_model_status(self, model_uri: str) -> str | None:
        return None

    def create_version(self, model_name: str, model_uri: str, tags: dict[str, str]) -> SimpleNamespace:
        self.versions.append(SimpleNamespace(version=str(len(self.versions) + 1), tags=dict(tags)))
        return self.versions[-1]

    def wait_ready(self, model_name: str, version: str) -> SimpleNamespace:
        return self.versions[int(version) - 1]

    def champion(self, model_name: str, alias: str) -> SimpleNamespace | None:
        number = self.aliases.get(alias)
        return self.versions[int(number) - 1] if number else None

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.aliases[alias] = version

    def set_version_tags(self, model_name: str, version: str, tags: dict[str, str]) -> None:
        self.versions[int(version) - 1].tags.update(tags)

    def record_alias_move(self, model_name: str, alias: str, version: str, reason: str, **_: object) -> None:
        self.moves.append((alias, version))


def test_register_student_gates_against_the_teacher_and_registers_once() -> None:
    store = MemoryRegistry()

    def register(lineage: str, student_bpb: float) -> object:
        return register_student(
            store, "m-small", "models:/m-1", lineage, teacher_name="m", teacher_version="3", teacher_metric=2.0,
            student_metric=student_bpb, max_quality_drop=0.1, champion_alias="champion", tags={},
        )  # fmt: skip

    good = register("a", 2.1)
    assert good.promoted and store.aliases == {"champion": "1"} and store.moves == [("champion", "1")]
    assert (
        store.versions[0].tags["forgeline.teacher"] == "m"
        and store.versions[0].tags["forgeline.teacher_version"] == "3"
    )
    bad = register("b", 3.0)
    assert not bad.promoted and bad.version == "2" and store.aliases == {"champion": "1"}
    assert "exceeds compress.max_quality_drop" in store.versions[1].tags["forgeline.decision"]
    again = register("a", 2.1)  # the same compression re-run: no second version
    assert again.already_registered and len(store.versions) == 2


def test_student_line_names_version_gate_metric_size_and_speed() -> None:
    from forgeline.flows.compress import CompressOutcome, student_line
    from forgeline.tasks.registry.versions import RegisterResult

    table = {
        "quantity": ["parameters", "tokens_per_sec", "bits_per_byte"],
        "teacher": [810112, 150.3, 2.7435],
        "student": [413568, 244.4, 2.817],
        "student/teacher": [0.5105, 1.626, 1.0268],
    }
    reg = RegisterResult(
        model_name="shakespeare-char-small", version="1", model_uri="m", promoted=True, reason="within 0.1"
    )
    outcome = CompressOutcome(teacher_uri="models:/shakespeare-char/1", run_id="r", registered=reg, table=table)
    assert student_line(outcome) == (
        "shakespeare-char-small version 1, champion (within 0.1): bits_per_byte 2.8170 (teacher 2.7435), "
        "parameters 0.51x, tokens_per_sec 1.63x"
    )
    refused = outcome.model_copy(update={"registered": reg.model_copy(update={"promoted": False, "reason": "too far"})})
    assert student_line(refused).startswith("shakespeare-char-small version 1, no alias (too far): ")
