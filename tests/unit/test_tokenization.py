"""Tokenizers: round trips, id layout, save/load, the char fast path against the tokenizer itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from forgeline.tasks.config import TokenizerConfig
from forgeline.tasks.data.tokenization import (
    EOS_TOKEN,
    UNK_TOKEN,
    build_tokenizer,
    encode_text,
    is_char_tokenizer,
    load_tokenizer,
)

TRAIN = [
    "Hello, world! It's\nThe quick brown fox jumps over the lazy dog.\n\n",
    "  indented\tline with tab\r\nand unicode: café, naïve, 日本語, emoji 🎉\n",
    "def f(x):\n    return x * 2  # trailing spaces   \n",
]


@pytest.fixture(scope="module")
def char_tok():
    return build_tokenizer(TokenizerConfig(kind="char"), TRAIN)


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), TRAIN * 20)


def _roundtrip(tok, text: str) -> str:
    ids = tok.encode(text, add_special_tokens=False)
    return tok.decode(ids)


def test_char_ids_are_sorted_characters_then_specials(char_tok) -> None:
    chars = sorted(set("".join(TRAIN)))
    vocab = char_tok.get_vocab()
    assert [vocab[c] for c in chars] == list(range(len(chars)))
    assert vocab[UNK_TOKEN] == len(chars)
    assert vocab[EOS_TOKEN] == len(chars) + 1
    assert len(char_tok) == len(chars) + 2
    assert char_tok.eos_token == EOS_TOKEN and char_tok.pad_token == EOS_TOKEN
    assert char_tok.unk_token == UNK_TOKEN
    assert is_char_tokenizer(char_tok)


@pytest.mark.parametrize("text", [*TRAIN, "\n\n\n", "  a  b  ", " . , ' s n't", "日本🎉\n"])
def test_char_roundtrip_known_chars(char_tok, text: str) -> None:
    assert _roundtrip(char_tok, text) == text
    ids = encode_text(char_tok, text)
    assert ids.tolist() == char_tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)


def test_char_unknown_maps_to_unk(char_tok) -> None:
    text = "aZ\u00a7b"  # 'Z' and '§' never seen
    assert "Z" not in "".join(TRAIN)
    unk = char_tok.convert_tokens_to_ids(UNK_TOKEN)
    ids = encode_text(char_tok, text)
    assert ids.tolist() == [char_tok.get_vocab()["a"], unk, unk, char_tok.get_vocab()["b"]]
    assert char_tok.encode(text, add_special_tokens=False) == ids.tolist()
    assert char_tok.decode(ids.tolist(), skip_special_tokens=True) == "ab"


def test_char_save_load_roundtrip(char_tok, tmp_path: Path) -> None:
    char_tok.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == char_tok.get_vocab()
        assert loaded.eos_token == EOS_TOKEN and loaded.unk_token == UNK_TOKEN
        assert loaded.pad_token == EOS_TOKEN
        assert is_char_tokenizer(loaded)
        for text in TRAIN:
            assert encode_text(loaded, text).tolist() == encode_text(char_tok, text).tolist()
            assert _roundtrip(loaded, text) == text


def test_encode_text_char_path_equals_the_tokenizer_one_id_per_code_point(char_tok) -> None:
    text = ("".join(TRAIN) + "UNKNOWN§ 𝔘") * 500  # ~100 kB: unknown and astral code points throughout
    ids = encode_text(char_tok, text)
    assert ids.dtype == torch.int64 and ids.ndim == 1 and len(ids) == len(text)
    assert ids.tolist() == char_tok.encode(text, add_special_tokens=False)
    unk = char_tok.convert_tokens_to_ids(UNK_TOKEN)
    assert {int(ids[i]) for i, ch in enumerate(text) if ch in "§𝔘"} == {unk}
    assert unk not in {int(ids[i]) for i, ch in enumerate(text) if ch in "".join(TRAIN)}


@pytest.mark.parametrize("text", [*TRAIN, "unseen chars: ŽŸ ∑ 𝔘 \x00\x7f", "\n\n  \t ", "  leading and trailing  "])
def test_bpe_roundtrip_any_text(bpe_tok, text: str) -> None:
    assert _roundtrip(bpe_tok, text) == text
    assert encode_text(bpe_tok, text).tolist() == bpe_tok.encode(text, add_special_tokens=False)


def test_bpe_vocab_size_and_specials(bpe_tok) -> None:
    assert 256 < len(bpe_tok) <= 300
    assert bpe_tok.eos_token == EOS_TOKEN and bpe_tok.pad_token == EOS_TOKEN
    assert bpe_tok.eos_token_id == 0
    assert not is_char_tokenizer(bpe_tok)
    # merges happened: a frequent word is fewer tokens than bytes
    assert len(encode_text(bpe_tok, "quick brown fox")) < len("quick brown fox")


def test_bpe_save_load_roundtrip(bpe_tok, tmp_path: Path) -> None:
    bpe_tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.get_vocab() == bpe_tok.get_vocab()
    for text in TRAIN:
        assert encode_text(loaded, text).tolist() == encode_text(bpe_tok, text).tolist()
        assert _roundtrip(loaded, text) == text


def test_pretrained_kind_loads_local_dir(bpe_tok, tmp_path: Path) -> None:
    bpe_tok.save_pretrained(tmp_path)
    tok = build_tokenizer(TokenizerConfig(kind="pretrained", source=str(tmp_path)), [])
    assert tok.get_vocab() == bpe_tok.get_vocab()


def test_empty_text_encodes_to_empty(char_tok, bpe_tok) -> None:
    assert encode_text(char_tok, "").numel() == 0
    assert encode_text(bpe_tok, "").numel() == 0
