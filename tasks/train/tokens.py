"""The tokenizer a training run uses and the token streams it trains on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks.config import TokenizerConfig

logger = logging.getLogger(__name__)


def prepare_tokenizer(
    tok_cfg: TokenizerConfig,
    dataset_dir: str | Path,
    run_dir: Path,
    init_from: str | None = None,
    *,
    fetch: Callable[[str, Path], Path] | None = None,
) -> Any:
    """Build the tokenizer on the training split once per run dir; later calls load the saved one.

    When fine-tuning (``init_from`` set) and no explicit pretrained tokenizer is configured, the model's own
    tokenizer is used: its ids are what the pretrained weights were trained on. ``fetch`` downloads
    ``init_from`` when it is a registry URI.
    """
    from forgeline.tasks.data.cleaning import iter_split
    from forgeline.tasks.data.tokenization import build_tokenizer, load_tokenizer

    saved = run_dir / "tokenizer"
    if (saved / "tokenizer_config.json").exists():
        return load_tokenizer(saved)
    tokenizer = None
    if init_from and not (tok_cfg.kind == "pretrained" and tok_cfg.source):
        from forgeline.tasks.model.modeling import load_pretrained_model

        _, tokenizer = load_pretrained_model(init_from, fetch=fetch)
        if tokenizer is not None:
            logger.info("fine-tuning %s: using its tokenizer (%d tokens)", init_from, len(tokenizer))
    if tokenizer is None:
        tokenizer = build_tokenizer(tok_cfg, iter_split(dataset_dir, "train"))
    saved.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(saved)
    return tokenizer


def load_token_splits(tokenizer: Any, dataset_dir: str | Path, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the train and validation splits as 1-D int64 token streams.

    Raises:
        ValueError: a split holds fewer tokens than one context window.
    """
    from forgeline.tasks.data.cleaning import read_split_text
    from forgeline.tasks.data.tokenization import encode_text

    out = []
    for split in ("train", "validation"):
        ids = encode_text(tokenizer, read_split_text(dataset_dir, split)).long()
        if len(ids) < block_size + 2:
            raise ValueError(
                f"{dataset_dir}: the {split} split has {len(ids)} tokens, fewer than one context window "
                f"({block_size + 2}); add data or lower model.block_size"
            )
        out.append(ids)
    return out[0], out[1]
