"""Scoring (nats, tokens, bytes), bits per byte, generations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from forgeline.tasks.config import EvalConfig, ModelConfig, TokenizerConfig
from forgeline.tasks.data.tokenization import build_tokenizer, encode_text
from forgeline.tasks.evaluate.evaluation import EvalResult, bits_per_byte, evaluate_model, generate_samples, score_text
from forgeline.tasks.model.modeling import build_model

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 8
UNICODE_TEXT = "café naïve 日本語 — ok\n" * 5


class ZeroLM(torch.nn.Module):
    """Logits all zero: a uniform distribution over ``vocab`` tokens. Records the windows it sees."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(vocab_size=vocab)
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor, use_cache: bool | None = None) -> SimpleNamespace:
        self.shapes.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + 0 * self.dummy)


@pytest.fixture(scope="module")
def char_tok():
    return build_tokenizer(TokenizerConfig(kind="char"), [TEXT, UNICODE_TEXT])


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=280), [TEXT, UNICODE_TEXT])


@pytest.fixture(scope="module")
def tiny_model(char_tok):
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16), char_tok)


def test_bits_per_byte_known_values() -> None:
    assert bits_per_byte(8 * math.log(2) * 100, 100) == pytest.approx(8.0)
    assert bits_per_byte(math.log(2), 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_uniform_model_loss_is_ln_vocab(char_tok) -> None:
    V = len(char_tok)
    model = ZeroLM(V)
    total, n_tok, n_bytes = score_text(model, char_tok, TEXT, block_size=10, max_tokens=10_000, batch_size=4)
    assert n_tok == len(TEXT) - 1
    assert total / n_tok == pytest.approx(math.log(V), rel=1e-6)  # float32 logits
    # ASCII text, one byte per char token: bits per byte == log2(V)
    assert n_bytes == n_tok
    assert bits_per_byte(total, n_bytes) == pytest.approx(math.log2(V), rel=1e-6)  # float32 logits


def test_windows_are_consecutive_and_non_overlapping(char_tok) -> None:
    model = ZeroLM(len(char_tok))
    text = TEXT[:26]  # 26 tokens -> 25 predicted = 2 full windows of 10 + 5
    _, n_tok, _ = score_text(model, char_tok, text, block_size=10, max_tokens=1000, batch_size=16)
    assert n_tok == 25
    assert model.shapes == [(2, 10), (1, 5)]
    model.shapes.clear()
    _, n_tok, _ = score_text(model, char_tok, text, block_size=10, max_tokens=1000, batch_size=1)
    assert model.shapes == [(1, 10), (1, 10), (1, 5)]


def test_max_tokens_caps_predictions(char_tok) -> None:
    _, n_tok, n_bytes = score_text(ZeroLM(len(char_tok)), char_tok, TEXT, block_size=8, max_tokens=20)
    assert n_tok == 20 and n_bytes == 20


def test_real_model_matches_manual_cross_entropy(char_tok, tiny_model) -> None:
    text = TEXT[:17]  # exactly one window of 16 predicted tokens
    total, n_tok, _ = score_text(tiny_model, char_tok, text, block_size=16, max_tokens=1000)
    ids = encode_text(char_tok, text)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids[:-1].unsqueeze(0)).logits[0]
    expected = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
    assert n_tok == 16
    assert total == pytest.approx(expected, rel=1e-5)
    assert tiny_model.training  # mode restored


def test_bytes_exact_for_char_with_multibyte_text(char_tok) -> None:
    _, n_tok, n_bytes = score_text(ZeroLM(len(char_tok)), char_tok, UNICODE_TEXT, block_size=7, max_tokens=10**6)
    assert n_tok == len(UNICODE_TEXT) - 1
    assert n_bytes == len(UNICODE_TEXT[1:].encode("utf-8"))


def test_bytes_exact_for_bpe(bpe_tok) -> None:
    ids = encode_text(bpe_tok, UNICODE_TEXT)
    first = bpe_tok.decode(ids[:1].tolist())
    _, n_tok, n_bytes = score_text(ZeroLM(len(bpe_tok)), bpe_tok, UNICODE_TEXT, block_size=7, max_tokens=10**6)
    assert n_tok == len(ids) - 1
    assert n_bytes == len(UNICODE_TEXT.encode("utf-8")) - len(first.encode("utf-8"))


def test_too_short_text_scores_nothing(char_tok) -> None:
    assert score_text(ZeroLM(len(char_tok)), char_tok, "t", block_size=4, max_tokens=10) == (0.0, 0, 0)
    with pytest.raises(ValueError, match="too short"):
        evaluate_model(ZeroLM(len(char_tok)), char_tok, "t", EvalConfig(), block_size=4, seed=0)


def test_generation_is_deterministic_per_seed(char_tok, tiny_model) -> None:
    kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=None, device="cpu")
    prompts = ["the ", "\n", ""]
    a = generate_samples(tiny_model, char_tok, prompts, seed=1, **kwargs)
    b = generate_samples(tiny_model, char_tok, prompts, seed=1, **kwargs)
    c = generate_samples(tiny_model, char_tok, prompts, seed=2, **kwargs)
    assert a == b
    assert a != c
    assert [s["prompt"] for s in a] == prompts
    assert all(isinstance(s["text"], str) for s in a)
    # context longer than block_size (16) is cropped rather than failing
    assert len(encode_text(char_tok, a[0]["text"])) <= 40


def test_generation_top_k_1_is_greedy(char_tok, tiny_model) -> None:
    greedy = [
        generate_samples(
            tiny_model, char_tok, ["the "], max_new_tokens=20, temperature=0.7, top_k=1, seed=s, device="cpu"
        )
        for s in (0, 1)
    ]
    assert greedy[0] == greedy[1]


def test_evaluate_model_fields(char_tok, tiny_model) -> None:
    cfg = EvalConfig(prompts=["the", "\n"], max_new_tokens=10, max_tokens=100)
    result = evaluate_model(tiny_model, char_tok, TEXT, cfg, block_size=16, seed=3)
    assert isinstance(result, EvalResult)
    assert result.tokens == 100 and result.bytes == 100
    assert result.loss > 0 and math.isfinite(result.loss)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / math.log(2) / result.bytes)
    assert len(result.samples) == 2 and result.samples[0]["prompt"] == "the"
    again = evaluate_model(tiny_model, char_tok, TEXT, cfg, block_size=16, seed=3)
    assert again == result
    assert EvalResult.model_validate_json(result.model_dump_json()) == result


def test_default_scoring_batch_keeps_the_logits_near_the_budget(char_tok) -> None:
    """A char model scores 256 windows a pass; a 50k vocabulary at 1024 tokens scores one (16 took 3.3 GB)."""
    from forgeline.tasks.evaluate.evaluation import LOGIT_BUDGET

    small = ZeroLM(len(char_tok))
    score_text(small, char_tok, TEXT * 200, block_size=8, max_tokens=10**6)
    assert max(s[0] for s in small.shapes) == 256
    big = ZeroLM(50257)
    score_text(big, char_tok, TEXT * 20, block_size=64, max_tokens=10**6)
    assert max(s[0] for s in big.shapes) == LOGIT_BUDGET // (64 * 50257) == 20


def test_scoring_refuses_a_window_of_no_tokens(char_tok) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        score_text(ZeroLM(len(char_tok)), char_tok, TEXT, block_size=0, max_tokens=10)
