"""Prompt/completion training examples: the label mask, eos, overflow rules and per-batch padding."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgeline.tasks.config import TokenizerConfig
from forgeline.tasks.data.tokenization import build_tokenizer
from forgeline.tasks.train.completion import (
    IGNORE_INDEX,
    collate_pairs,
    completion_loss,
    encode_pairs,
    encode_prompt,
    pack_batches,
    pair_batches,
)

PROMPTS = ["f(x)", "json.dumps(obj)", "g()"]
COMPLETIONS = ["Do x.", "Serialize.", "Go."]


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - a transformers tokenizer
    return build_tokenizer(TokenizerConfig(kind="char"), [*PROMPTS, *COMPLETIONS, "\n"])


def chars(tokenizer, ids: list[int]) -> str:  # noqa: ANN001
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def test_example_is_prompt_separator_completion_eos(tokenizer) -> None:  # noqa: ANN001
    encoded = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=64)
    eos = tokenizer.eos_token_id
    assert len(encoded) == 3 and encoded.kept == [0, 1, 2] and encoded.dropped == 0
    ids = encoded.input_ids[0]
    assert chars(tokenizer, ids[:-1]) == "f(x)\nDo x."
    assert ids[-1] == eos
    assert encode_prompt(tokenizer, "f(x)") == ids[:5]


def test_labels_cover_exactly_the_completion_and_eos(tokenizer) -> None:  # noqa: ANN001
    encoded = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=64)
    ids, labels = encoded.input_ids[0], encoded.labels[0]
    # "f(x)" + "\n" (5 tokens) ignored; "Do x." (5 tokens) + eos learned.
    assert labels[:5] == [IGNORE_INDEX] * 5
    assert labels[5:] == ids[5:]
    assert chars(tokenizer, labels[5:-1]) == "Do x."
    everything = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=64, loss_on="all")
    assert everything.labels[0] == ids


def test_drop_and_truncate_left_counts(tokenizer) -> None:  # noqa: ANN001
    # Block of 12: "json.dumps(obj)" (15) + "\n" + "Serialize." (10) + eos cannot fit in any form: the completion
    # would need 12 tokens with no prompt left. "f(x)\nDo x." + eos is 11: fits. "g()\nGo." + eos is 8: fits.
    dropped = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=12)
    assert dropped.kept == [0, 2] and dropped.completion_too_long == 1 and dropped.prompt_too_long == 0
    # Block of 9: "f(x)" must shrink to 2 tokens; "g()" fits as is.
    dropped = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=9)
    assert dropped.kept == [2] and dropped.prompt_too_long == 1 and dropped.completion_too_long == 1
    cut = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=9, overflow="truncate_left")
    assert cut.kept == [0, 2] and cut.truncated_prompts == 1 and cut.completion_too_long == 1
    assert chars(tokenizer, cut.input_ids[0][:-1]) == "x)\nDo x."  # cut from the left, completion whole
    assert len(cut.input_ids[0]) == 9
    assert cut.labels[0][:3] == [IGNORE_INDEX] * 3


def test_completion_is_never_cut(tokenizer) -> None:  # noqa: ANN001
    long = "Do x. " * 20
    for overflow in ("drop", "truncate_left"):
        encoded = encode_pairs(tokenizer, ["f(x)"], [long], block_size=32, overflow=overflow)
        assert len(encoded) == 0 and encoded.completion_too_long == 1


def test_empty_completion_is_dropped_and_counted(tokenizer) -> None:  # noqa: ANN001
    encoded = encode_pairs(tokenizer, ["f(x)", "g()", "f(x)"], ["", "  ", "Do x."], block_size=64)
    assert encoded.kept == [2] and encoded.empty_completions == 2 and encoded.dropped == 2


def test_refuses_bad_input(tokenizer) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        encode_pairs(tokenizer, ["a", "b"], ["c"], block_size=8)


def test_collate_pads_right_with_ignored_labels(tokenizer) -> None:  # noqa: ANN001
    encoded = encode_pairs(tokenizer, PROMPTS, COMPLETIONS, block_size=64)
    pad = tokenizer.pad_token_id
    batch = collate_pairs([encoded.example(0), encoded.example(2)], pad)
    n0, n2 = len(encoded.input_ids[0]), len(encoded.input_ids[2])
    assert batch["input_ids"].shape == (2, n0)
    assert batch["attention_mask"][1].tolist() == [1] * n2 + [0] * (n0 - n2)
    assert batch["input_ids"][1, n2:].tolist() == [pad] * (n0 - n2)
    assert batch["labels"][1, n2:].tolist() == [IGNORE_INDEX] * (n0 - n2)
    # eos is also the pad token here: the real eos keeps its label, padding does not.
    assert batch["labels"][1, n2 - 1].item() == tokenizer.eos_token_id


def test_batches_and_loss_count_completion_tokens(tokenizer) -> None:  # noqa: ANN001
    encoded = encode_pairs(tokenizer, PROMPTS * 3, COMPLETIONS * 3, block_size=64)
    ordered = pair_batches(encoded, 4, tokenizer.pad_token_id)
    assert [len(b["input_ids"]) for b in ordered] == [4, 4, 1]
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=eos, eos_token_id=eos
    )
    model = GPT2LMHeadModel(config).eval()
    batch = ordered[-1]  # the 9th pair: "g()" -> "Go."
    loss, targets = completion_loss(model, batch)
    assert targets == len("Go.") + 1  # the completion and eos
    ctx = len(encode_prompt(tokenizer, "g()"))
    logits = model(input_ids=batch["input_ids"]).logits[0, ctx - 1 : -1]  # positions predicting "Go." + eos
    expected = torch.nn.functional.cross_entropy(logits, batch["input_ids"][0, ctx:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_shuffled_batches_group_by_length(tokenizer) -> None:  # noqa: ANN001
    prompts = ["f(" + "x" * (i % 17) + ")" for i in range(200)]
    encoded = encode_pairs(tokenizer, prompts, ["Do x."] * 200, block_size=64)
    pad = tokenizer.pad_token_id

    def rows(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
        return sorted(
            tuple(r[m.bool()].tolist())
            for b in batches
            for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
        )

    def padding(batches: list[dict[str, torch.Tensor]]) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    grouped = pair_batches(encoded, 8, pad, seed=1)
    plain = pair_batches(encoded, 8, pad, seed=1, group_by_length=False)
    assert rows(grouped) == rows(plain) == sorted(tuple(ids) for ids in encoded.input_ids)  # each example once
    assert padding(grouped) < padding(plain) / 4
    assert [b["input_ids"].tolist() for b in grouped] == [
        b["input_ids"].tolist() for b in pair_batches(encoded, 8, pad, seed=1)
    ]
    assert [b["input_ids"].tolist() for b in grouped] != [
        b["input_ids"].tolist() for b in pair_batches(encoded, 8, pad, seed=2)
    ]


def test_packed_examples_stay_whole_and_apart(tokenizer) -> None:  # noqa: ANN001
    encoded = encode_pairs(tokenizer, PROMPTS * 2, COMPLETIONS * 2, block_size=32, loss_on="all")
    assert [len(ids) for ids in encoded.input_ids] == [11, 27, 8, 11, 27, 8]
    batches = pack_batches(encoded, 32, 2, tokenizer.pad_token_id)
    rows = [row for b in batches for row in b["position_ids"].tolist()]
    # Whole examples in order, a new row when the next does not fit (11 + 27 > 32); the rest of a row is padding.
    assert [[n for n in _runs(row)] for row in rows] == [[11, 21], [27, 5], [8, 11, 13], [27, 5], [8, 24]]
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    labels = batches[1]["labels"][0].tolist()  # the third row: g() -> Go., then f(x) -> Do x.
    assert labels[0] == labels[8] == IGNORE_INDEX  # no example learns its first token from the one before
    assert labels[1:8] == encoded.input_ids[2][1:]
    assert labels[19:] == [IGNORE_INDEX] * 13  # the padding tail
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2, bos_token_id=eos, eos_token_id=eos
    )
    model = GPT2LMHeadModel(config).eval()
    packed = sum(loss * n for loss, n in (completion_loss(model, b) for b in batches))
    padded = sum(loss * n for loss, n in (completion_loss(model, b) for b in pair_batches(encoded, 2, eos)))
    # The same loss as each example alone: position ids restart and attention stays within an example.
    assert packed.item() == pytest.approx(padded.item(), rel=1e-5)


def _runs(positions: list[int]) -> list[int]:
    """Lengths of the runs 0, 1, 2, ... in a row of position ids."""
    runs: list[int] = []
    for p in positions:
        if p == 0:
            runs.append(0)
        runs[-1] += 1
    return runs
