"""The training loop's speed levers (issue 20) and train.keep_best, shown on the CPU with a tiny model."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from forgeline.tasks.config import PipelineConfig, TrainConfig, load_config
from forgeline.tasks.train import batches, loop
from forgeline.tasks.train.kinds import train_task_model
from forgeline.tasks.train.loop import TrainCallbacks

TEXT = "".join(f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i * 3 % 11}.\n" for i in range(400))
BASE = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=16",
    "model.block_size=16",
    "train.batch_size=4",
    "train.max_steps=20",
    "train.warmup_steps=2",
    "train.log_interval=10",
    "train.eval_interval=20",
    "train.eval_batches=2",
    "train.checkpoint_interval=20",
    "train.device=cpu",
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("data") / "dataset"
    features = datasets.Features({"text": datasets.Value("string")})
    n = len(TEXT)
    parts = {"train": TEXT[: int(n * 0.9)], "validation": TEXT[int(n * 0.9) :], "test": ""}
    splits = {k: datasets.Dataset.from_dict({"text": [v] if v else []}, features=features) for k, v in parts.items()}
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return str(out)


def _train(cfg: PipelineConfig, dataset_dir: str, run_dir: Path, callbacks: TrainCallbacks | None = None):  # noqa: ANN202
    return train_task_model(cfg, dataset_dir, run_dir, callbacks)


class _StepClock:
    """Counts the loop's steps by the batches it cuts (one per step here: no gradient accumulation)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step = 0
        real = loop.sample_batch

        def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.step += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "sample_batch", counting)


def test_no_host_sync_inside_a_step(dataset_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Losses and norms are read from the device at log, eval and checkpoint steps only (here 10 and 20).
    cfg = load_config(None, BASE)
    clock = _StepClock(monkeypatch)
    syncs: list[int] = []

    def watch(name: str) -> None:
        real = getattr(torch.Tensor, name)

        def reading(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if 0 < clock.step <= 20:
                syncs.append(clock.step)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        watch(name)
    result = _train(cfg, dataset_dir, tmp_path / "run", TrainCallbacks())
    assert result.steps == 20 and result.final_train_loss is not None
    assert syncs and set(syncs) <= {10, 20}, sorted(set(syncs))


def test_metrics_of_every_step_arrive_in_order_at_the_log_steps(
    dataset_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, BASE)
    clock = _StepClock(monkeypatch)
    seen: list[tuple[int, int, dict[str, float]]] = []
    _train(cfg, dataset_dir, tmp_path / "run", TrainCallbacks(on_metrics=lambda s, m: seen.append((clock.step, s, m))))
    assert [s for _, s, _ in seen] == list(range(1, 21))  # every step's metrics, as before
    assert {at for at, s, _ in seen if s <= 10} == {10} and {at for at, s, _ in seen if s > 10} == {20}
    assert all({"train/loss", "lr", "grad_norm"} <= set(m) for _, _, m in seen)
    assert "tokens_per_sec" in seen[9][2] and "val/loss" in seen[19][2]


def test_validation_batches_are_the_same_windows_drawn_in_one_go() -> None:
    data = torch.randint(0, 50, (4000,))
    cfg = TrainConfig(eval_batches=5, batch_size=3)
    gen = torch.Generator().manual_seed(9)
    one_by_one = [batches.sample_batch(data, 3, 8, gen) for _ in range(5)]
    for (x, y), (x1, y1) in zip(batches.fixed_batches(data, cfg, 8, 9), one_by_one, strict=True):
        assert torch.equal(x, x1) and torch.equal(y, y1)


def test_compile_mode_compiles_forward_and_loss_as_one_function(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[tuple[object, str | None]] = []
    marks: list[int] = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: compiled.append((fn, mode)) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    class Tiny(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, use_cache: bool) -> object:
            return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids, 5).float()})()

    x = torch.tensor([[1, 2, 3]])
    for mode, expected in (("default", None), ("max-autotune", "max-autotune"), ("reduce-overhead", "reduce-overhead")):
        fn = batches.make_loss_fn(Tiny(), TrainConfig(compile=True, compile_mode=mode))
        assert compiled[-1][1] == expected
        # The compiled function is the whole loss: forward and cross-entropy together.
        assert torch.allclose(compiled[-1][0](x, x), batches.lm_loss(Tiny(), x, x))
        fn(x, x)
    assert len(marks) == 1  # CUDA graphs: each call marks a new step
    assert batches.make_loss_fn(Tiny(), TrainConfig(compile=False))(x, x) is not None and len(compiled) == 3


def test_compile_mode_keeps_the_config_hash() -> None:
    base = load_config(None, ["train.compile=true"]).config_hash()
    assert load_config(None, ["train.compile=true", "train.compile_mode=reduce-overhead"]).config_hash() == base


@pytest.mark.parametrize("keep_best", [True, None])
def test_keep_best_saves_the_best_evaluations_weights(
    dataset_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_best: bool | None
) -> None:
    scripted = iter([3.0, 2.0, 2.5])  # validation losses at steps 10, 20, 30: the best is step 20
    monkeypatch.setattr(loop, "estimate_loss", lambda *args: next(scripted))
    extra = ["train.max_steps=30", "train.eval_interval=10", "train.checkpoint_interval=10", "train.keep_checkpoints=3"]
    if keep_best is not None:
        extra.append(f"train.keep_best={str(keep_best).lower()}")
    cfg = load_config(None, BASE + extra)
    result = _train(cfg, dataset_dir, tmp_path / "run")
    assert result.best_val_loss == 2.0 and result.best_step == 20 and result.kept_best is bool(keep_best)
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    ckpt = tmp_path / "run" / "checkpoints" / f"ckpt-000000{20 if keep_best else 30}.pt"
    wanted = torch.load(ckpt, weights_only=True)
    for name, tensor in saved.items():
        assert torch.equal(tensor, wanted["model"][name]), name
    assert result.final_val_loss == 2.5  # the last evaluation is still reported as the last


@pytest.mark.parametrize("bias", [True, False])
def test_the_lean_gpt2_forward_is_the_models_own(bias: bool) -> None:
    # The training forward skips transformers' per-call plumbing (two host syncs each) but computes the same.
    from forgeline.tasks.config import ModelConfig, TokenizerConfig
    from forgeline.tasks.data.tokenization import build_tokenizer
    from forgeline.tasks.model.modeling import build_model

    tok = build_tokenizer(TokenizerConfig(kind="char"), [TEXT])
    model = build_model(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, dropout=0.1, bias=bias), tok)
    assert batches._plain_gpt2(model)
    x = torch.randint(0, len(tok), (3, 16))
    for train in (True, False):
        model.train(train)
        torch.manual_seed(5)  # the same dropout draws, in the same order
        ours = batches._gpt2_logits(model, x)
        torch.manual_seed(5)
        theirs = model(input_ids=x, use_cache=False).logits
        assert torch.equal(ours, theirs)
