"""Model building, safe loading (safetensors only, no custom code), parameter counts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from forgeline.tasks.config import ModelConfig, TokenizerConfig
from forgeline.tasks.data.tokenization import build_tokenizer
from forgeline.tasks.model.modeling import build_model, count_parameters, find_model_dir, load_pretrained_model
from forgeline.tasks.tracking.models import download_model

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=32)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig(kind="char"), ["hello world\nabc xyz"])


def test_build_model_sizes(tok) -> None:
    model = build_model(TINY, tok)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.n_positions) == (2, 2, 16, 32)
    assert c.vocab_size == len(tok)
    assert c.eos_token_id == c.bos_token_id == tok.eos_token_id
    V, E, T, L = len(tok), 16, 32, 2
    per_block = 2 * 2 * E + (E * 3 * E + 3 * E) + (E * E + E) + (E * 4 * E + 4 * E) + (4 * E * E + E)
    expected = V * E + T * E + L * per_block + 2 * E  # lm_head tied to wte
    assert count_parameters(model) == expected
    logits = model(input_ids=torch.zeros(1, 5, dtype=torch.long)).logits
    assert logits.shape == (1, 5, V)


def _zeroed_by_dropout(model: torch.nn.Module, x: torch.Tensor) -> float:
    """The fraction of activations the model's dropout layers zeroed in one training-mode forward pass."""
    zeros, total = [], []

    def count(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        live = inputs[0] != 0  # what was already zero (masked attention, say) is not dropout's doing
        zeros.append(int((live & (output == 0)).sum()))
        total.append(int(live.sum()))

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    model.train()
    with torch.no_grad():
        model(input_ids=x)
    for hook in hooks:
        hook.remove()
    assert total, "no dropout layer ran"
    return sum(zeros) / sum(total)


def test_dropout_rate_drops_activations_in_training_only(tok) -> None:
    torch.manual_seed(0)
    x = torch.randint(len(tok), (8, 32))
    model = build_model(TINY.model_copy(update={"dropout": 0.2}), tok)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)  # a new mask each pass
        model.eval()
        torch.testing.assert_close(model(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)

    no_dropout = build_model(TINY.model_copy(update={"dropout": 0.0}), tok)
    no_dropout.train()
    with torch.no_grad():
        assert torch.equal(no_dropout(input_ids=x).logits, no_dropout(input_ids=x).logits)
    # The configured rate is the share of activations zeroed (8 x 32 x 16 per layer: about 1 % noise).
    assert _zeroed_by_dropout(no_dropout, x) < 0.01
    assert _zeroed_by_dropout(model, x) == pytest.approx(0.2, abs=0.03)
    assert _zeroed_by_dropout(build_model(TINY.model_copy(update={"dropout": 0.5}), tok), x) == pytest.approx(
        0.5, abs=0.03
    )


def test_saved_model_reloads_with_equal_weights(tok, tmp_path: Path) -> None:
    model = build_model(TINY, tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, loaded_tok = load_pretrained_model(str(tmp_path))
    assert loaded_tok is not None and loaded_tok.get_vocab() == tok.get_vocab()
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(ref) == set(got)
    for key, value in ref.items():
        assert torch.equal(value, got[key]), key


def test_build_model_init_from_dir(tok, tmp_path: Path) -> None:
    model = build_model(TINY, tok)
    model.save_pretrained(tmp_path)
    again = build_model(TINY.model_copy(update={"init_from": str(tmp_path), "n_layer": 7}), tok)
    assert again.config.n_layer == 2  # the checkpoint decides the sizes
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    with pytest.raises(ValueError, match="block_size"):
        build_model(TINY.model_copy(update={"init_from": str(tmp_path), "block_size": 64}), tok)


def test_model_dir_without_tokenizer_gives_none(tok, tmp_path: Path) -> None:
    build_model(TINY, tok).save_pretrained(tmp_path)
    _, loaded_tok = load_pretrained_model(str(tmp_path))
    assert loaded_tok is None


class _Evil:
    """Unpickling this creates the sentinel file (stands in for arbitrary code execution)."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_pickle_weights_are_refused_and_never_unpickled(tok, tmp_path: Path) -> None:
    # Control: the payload really does run code when unpickled.
    control = tmp_path / "control-sentinel"
    pickle.loads(pickle.dumps(_Evil(control))).close()
    assert control.exists()

    model_dir = tmp_path / "evil"
    build_model(TINY, tok).config.save_pretrained(model_dir)
    sentinel = tmp_path / "sentinel"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(sentinel)))
    with pytest.raises(ValueError, match="no safetensors weights; refusing to unpickle pytorch_model.bin"):
        load_pretrained_model(str(model_dir))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        build_model(TINY.model_copy(update={"init_from": str(model_dir)}), tok)
    assert not sentinel.exists()


def test_auto_map_is_refused(tok, tmp_path: Path) -> None:
    build_model(TINY, tok).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="auto_map"):
        load_pretrained_model(str(tmp_path))


def test_dir_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained_model(str(tmp_path))


def test_models_uri_downloads_then_loads_safely(tok, tmp_path: Path, monkeypatch) -> None:
    """A ``models:/`` URI goes through mlflow's download, then the same local checks."""
    import mlflow

    root = tmp_path / "artifacts"
    model = build_model(TINY, tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "components" / "tokenizer")
    (root / "MLmodel").write_text("flavors: {}\n")
    seen: list[str] = []

    def fake_download(artifact_uri: str, dst_path: str | None = None, **_: object) -> str:
        seen.append(artifact_uri)
        return str(root)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)
    with pytest.raises(ValueError, match="fetch"):  # stage logic never reaches MLflow by itself
        load_pretrained_model("models:/forgeline-lm@champion")
    loaded, loaded_tok = load_pretrained_model("models:/forgeline-lm@champion", fetch=download_model)
    assert seen == ["models:/forgeline-lm@champion"]
    assert find_model_dir(root) == root / "model"
    assert loaded_tok is not None and loaded_tok.get_vocab() == tok.get_vocab()
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)


def test_gelu_new_runs_as_the_fused_op_with_the_same_outputs(tok) -> None:
    from transformers import GPT2LMHeadModel

    model = build_model(TINY, tok)
    assert model.config.activation_function == "gelu_pytorch_tanh"  # one fused op, GPT-2's function
    reference_config = model.config.__class__.from_dict({**model.config.to_dict(), "activation_function": "gelu_new"})
    reference = GPT2LMHeadModel(reference_config)
    reference.load_state_dict(model.state_dict())
    x = torch.randint(len(tok), (2, 16))
    torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    exact = build_model(TINY.model_copy(update={"activation": "gelu"}), tok)
    assert exact.config.activation_function == "gelu"


def test_no_bias_model_keeps_biases_at_zero_through_training_and_saving(tok, tmp_path: Path) -> None:
    from forgeline.tasks.config import TrainConfig
    from forgeline.tasks.train.schedule import make_optimizer

    cfg = TINY.model_copy(update={"bias": False})
    model = build_model(cfg, tok)
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert biases and all(not p.requires_grad and not p.any() for p in biases.values())
    with_bias = build_model(TINY, tok)
    assert count_parameters(model) == count_parameters(with_bias) - sum(p.numel() for p in biases.values())

    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    assert opt.defaults["fused"] is True  # one kernel for every tensor, on CPU as on CUDA
    assert all(p.requires_grad for group in opt.param_groups for p in group["params"])
    x = torch.randint(len(tok), (2, 16))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not p.any() for p in biases.values())  # never trained: no bias, as nanoGPT's bias=False
    model.save_pretrained(tmp_path)
    loaded, _ = load_pretrained_model(str(tmp_path))  # a plain GPT-2 any transformers install loads
    assert all(not p.any() for n, p in loaded.named_parameters() if n.endswith(".bias"))
