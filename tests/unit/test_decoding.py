"""Decoding completions with a tiny GPT-2: batched equals one by one, newline stops, seeded sampling, reference loss."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgeline.tasks.config import TokenizerConfig
from forgeline.tasks.data.tokenization import build_tokenizer
from forgeline.tasks.evaluate.decoding import generate_completions, newline_ids, reference_loss
from forgeline.tasks.train.completion import completion_loss, encode_pairs, pair_batches

PROMPTS = ["add(a, b)", "neg(x)", "cat(strings, sep='')", "id()"]
COMPLETIONS = ["Sum a and b.", "Minus x.\nNever seen", "Join.", "Same\nthing."]


def tiny_model(tokenizer, seed: int = 0) -> GPT2LMHeadModel:  # noqa: ANN001
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=48, n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos
    )
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # noqa: ANN201
    """Tiny matrices: one thread is many times faster than several contending for a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return build_tokenizer(TokenizerConfig(kind="char"), [*PROMPTS, *COMPLETIONS])


@pytest.fixture(scope="module")
def trained(tokenizer) -> GPT2LMHeadModel:  # noqa: ANN001
    """A tiny GPT-2 that has learned the four pairs by heart (loss on the completions only)."""
    model = tiny_model(tokenizer).train()
    encoded = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=64)
    batch = pair_batches(encoded, len(PROMPTS), tokenizer.pad_token_id)[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss, _ = completion_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    return model.eval()


def test_greedy_decodes_learned_completions(tokenizer, trained) -> None:  # noqa: ANN001
    texts, rate = generate_completions(trained, tokenizer, PROMPTS, max_new_tokens=30, stop_at="eos")
    assert texts == COMPLETIONS
    assert rate > 0


def test_newline_stops_and_cuts(tokenizer, trained, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    lengths: list[int] = []
    generate = trained.generate

    def spy(**kwargs):  # noqa: ANN003, ANN202
        out = generate(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(trained, "generate", spy)
    texts, _ = generate_completions(trained, tokenizer, PROMPTS[1:2], max_new_tokens=30, stop_at="newline")
    assert texts == ["Minus x."]
    assert lengths == [len("Minus x.\n")]  # stopped at the newline, not after 30 tokens or at eos
    assert newline_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("\n")]


def test_batched_equals_one_by_one(tokenizer, trained) -> None:  # noqa: ANN001
    untrained = tiny_model(tokenizer, seed=1).eval()
    for model in (trained, untrained):
        options = {"max_new_tokens": 12, "stop_at": "eos"}
        batched, _ = generate_completions(model, tokenizer, PROMPTS, batch_size=4, **options)
        single = [generate_completions(model, tokenizer, [p], batch_size=1, **options)[0][0] for p in PROMPTS]
        assert batched == single
    assert all(len(text) > 3 for text in batched)  # the untrained model says something (a real comparison)


def test_seeded_sampling_is_reproducible(tokenizer) -> None:  # noqa: ANN001
    model = tiny_model(tokenizer, seed=2).eval()
    options = {"max_new_tokens": 16, "do_sample": True, "temperature": 2.0, "top_k": None, "stop_at": "eos"}
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first, _ = generate_completions(model, tokenizer, PROMPTS, seed=7, **options)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left alone
    again, _ = generate_completions(model, tokenizer, PROMPTS, seed=7, **options)
    other, _ = generate_completions(model, tokenizer, PROMPTS, seed=8, **options)
    greedy, _ = generate_completions(model, tokenizer, PROMPTS, max_new_tokens=16, stop_at="eos")
    assert first == again
    assert other != first and greedy != first


def test_long_prompt_is_cut_to_fit_the_positions(tokenizer, trained, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    seen: list[list[int]] = []
    generate = trained.generate

    def spy(**kwargs):  # noqa: ANN003, ANN202
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    monkeypatch.setattr(trained, "generate", spy)
    texts, _ = generate_completions(trained, tokenizer, ["x" * 200 + "neg(x)"], max_new_tokens=20, stop_at="eos")
    # 64 positions: the last 44 prompt tokens (ending in the separator) and 20 new ones.
    assert tokenizer.decode(seen[0]) == "x" * 37 + "neg(x)\n"
    assert 0 < len(texts[0]) <= 20
    texts, _ = generate_completions(trained, tokenizer, ["neg(x)"], max_new_tokens=500, stop_at="eos")
    assert len(seen[1]) == 7 and len(texts[0]) <= 57  # the prompt kept whole, new tokens capped to the rest
    generate_completions(trained, tokenizer, ["x" * 200 + "neg(x)"], max_new_tokens=500, stop_at="eos")
    assert len(seen[2]) == 32  # half the positions stay for the prompt


def test_reference_loss(tokenizer, trained) -> None:  # noqa: ANN001
    learned = reference_loss(trained, tokenizer, PROMPTS, COMPLETIONS, block_size=64)
    fresh = reference_loss(tiny_model(tokenizer, seed=3).eval(), tokenizer, PROMPTS, COMPLETIONS, block_size=64)
    assert learned.pairs == 4 and learned.tokens == sum(len(c) + 1 for c in COMPLETIONS)
    assert learned.perplexity < 1.2 < fresh.perplexity
    assert fresh.perplexity == pytest.approx(torch.tensor(fresh.loss).exp().item(), rel=1e-6)
    with pytest.raises(ValueError, match="no reference completion fits"):
        reference_loss(trained, tokenizer, PROMPTS, COMPLETIONS, block_size=4)


def test_newline_ids_of_a_bpe_tokenizer() -> None:
    bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), ["one line.\nTwo lines.\n\nThree.\n"] * 20)
    ids = newline_ids(bpe)
    assert ids and all("\n" in bpe.decode([i]) for i in ids)
    assert not any("\n" in bpe.decode([i]) for i in set(range(len(bpe))) - set(ids))
    assert bpe.eos_token_id not in ids
