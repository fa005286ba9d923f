"""Tokenizers: character-level, byte-level BPE, or a pretrained one, all as transformers fast tokenizers.

Every tokenizer built here is a transformers fast tokenizer (``TokenizersBackend`` in transformers 5, the
class formerly called ``PreTrainedTokenizerFast``) wrapping a ``tokenizers.Tokenizer``. It saves with
``save_pretrained(dir)`` (``tokenizer.json`` + ``tokenizer_config.json``) and reloads with
:func:`load_tokenizer` or plain ``AutoTokenizer.from_pretrained(dir)``; no custom class or code is needed.

Layouts:

* ``char``: ids ``0..n-1`` are the training characters in sorted (code point) order, exactly nanoGPT's
  ``stoi``; then ``<unk>`` (id ``n``) and ``<|endoftext|>`` (id ``n+1``, also the pad token). Every code
  point, newlines and spaces included, is one token; unknown characters map to ``<unk>``.
* ``bpe``: byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as id 0; decodes back to the exact text.
* ``pretrained``: whatever ``AutoTokenizer.from_pretrained(source)`` gives (never with remote code); a
  missing pad token is set to the eos token.

:func:`encode_text` is the fast path for long texts: for the char tokenizer it maps code points with numpy
(1 MB in well under a second), for others it calls the Rust tokenizer directly, skipping the wrapper.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

try:  # transformers 5 name
    from transformers import TokenizersBackend as _FastTokenizer
except ImportError:  # pragma: no cover - transformers 4
    from transformers import PreTrainedTokenizerFast as _FastTokenizer

from forgeline.tasks.config import TokenizerConfig

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# One token per code point, "\n" and " " included (Oniguruma has no "(?s)"; "[\s\S]" matches anything).
CHAR_SPLIT_PATTERN = r"[\s\S]"

_CHAR_TABLE_ATTR = "_forgeline_char_table"


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    """Build (train) the tokenizer the config asks for.

    Args:
        cfg: Tokenizer settings (``kind``, ``vocab_size`` for bpe, ``source`` for pretrained).
        train_texts: Training texts; read once (ignored for ``pretrained``).

    Returns:
        A transformers fast tokenizer with ``eos_token`` and ``pad_token`` set (and ``unk_token`` for char).

    Raises:
        ValueError: If ``cfg.kind`` is unknown.
    """
    if cfg.kind == "char":
        return _build_char(train_texts)
    if cfg.kind == "bpe":
        return _build_bpe(train_texts, cfg.vocab_size)
    if cfg.kind == "pretrained":
        assert cfg.source is not None  # enforced by TokenizerConfig
        return load_tokenizer(cfg.source)
    raise ValueError(f"unknown tokenizer kind {cfg.kind!r}")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` (or a hub id), never running remote code.

    Args:
        path: Local directory holding ``tokenizer.json``/``tokenizer_config.json``, or a hub id.

    Returns:
        The tokenizer; if it has an eos token but no pad token, the pad token is set to eos.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    log.debug("loaded tokenizer from %s (%d tokens)", path, len(tokenizer))
    return tokenizer


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Encode a (possibly long) text to a 1-D ``int64`` tensor of ids, without special tokens.

    For the char tokenizer built here the ids are aligned with the text's code points (``ids[i]`` is the
    id of ``text[i]``), which evaluation relies on to count bytes exactly.

    Args:
        tokenizer: Any tokenizer from this module (or any transformers tokenizer).
        text: The text.

    Returns:
        The token ids.
    """
    table = char_table(tokenizer)
    if table is not None:
        codepoints, ids, unk_id = table
        return torch.from_numpy(_char_ids(text, codepoints, ids, unk_id))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encoded = backend.encode(text, add_special_tokens=False).ids
    else:  # slow (python) tokenizer
        encoded = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(encoded, dtype=torch.long)


def is_char_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether this is a char tokenizer built by :func:`build_tokenizer` (one token per code point).

    Args:
        tokenizer: Any tokenizer.

    Returns:
        True for the char layout (checked on the backend's JSON, so it survives save and reload).
    """
    return char_table(tokenizer) is not None


def char_table(tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The code point lookup table of a char tokenizer, or None for other tokenizers (cached on the object).

    Args:
        tokenizer: Any tokenizer.

    Returns:
        ``(sorted code points, their ids, unk id)`` or None.
    """
    cached = tokenizer.__dict__.get(_CHAR_TABLE_ATTR, False)
    if cached is not False:
        return cached
    table = _detect_char_table(tokenizer)
    tokenizer.__dict__[_CHAR_TABLE_ATTR] = table
    return table


# ------------------------------------------------------------------------------------------- private
def _wrap(tok: Tokenizer, *, unk: bool) -> PreTrainedTokenizerBase:
    return _FastTokenizer(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN if unk else None,
        clean_up_tokenization_spaces=False,
    )


def _build_char(train_texts: Iterable[str]) -> PreTrainedTokenizerBase:
    charset: set[str] = set()
    for text in train_texts:
        charset.update(text)
    chars = sorted(charset)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab[UNK_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_SPLIT_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    wrapped = _wrap(tok, unk=True)
    log.info("built char tokenizer: %d characters + 2 special tokens", len(chars))
    return wrapped


def _build_bpe(train_texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer)
    wrapped = _wrap(tok, unk=False)
    log.info("trained byte-level BPE tokenizer: %d tokens (asked %d)", len(wrapped), vocab_size)
    return wrapped


def _detect_char_table(tokenizer: PreTrainedTokenizerBase) -> tuple[np.ndarray, np.ndarray, int] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # noqa: BLE001 - any failure just means "not ours"
        return None
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "WordLevel"
        or spec.get("normalizer") is not None
        or pre.get("type") != "Split"
        or (pre.get("pattern") or {}).get("Regex") != CHAR_SPLIT_PATTERN
    ):
        return None
    vocab: dict[str, int] = model.get("vocab") or {}
    unk = model.get("unk_token")
    if unk not in vocab:
        return None
    special = {t["content"] for t in spec.get("added_tokens") or []} | {unk}
    singles = sorted((c, i) for c, i in vocab.items() if c not in special)
    if any(len(c) != 1 for c, _ in singles):
        return None
    codepoints = np.array([ord(c) for c, _ in singles], dtype=np.int64)
    ids = np.array([i for _, i in singles], dtype=np.int64)
    return codepoints, ids, int(vocab[unk])


def _char_ids(text: str, codepoints: np.ndarray, ids: np.ndarray, unk_id: int) -> np.ndarray:
    cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32).astype(np.int64)
    if len(codepoints) == 0:
        return np.full(len(cps), unk_id, dtype=np.int64)
    pos = np.searchsorted(codepoints, cps)
    pos_c = np.minimum(pos, len(codepoints) - 1)
    found = codepoints[pos_c] == cps
    return np.where(found, ids[pos_c], unk_id).astype(np.int64)
