"""The evaluate stage on saved models: which text is held out, scoring the candidate, re-scoring another model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from forgeline.tasks.config import EvalConfig, TrainConfig
from forgeline.tasks.data.cleaning import read_split_text
from forgeline.tasks.evaluate.evaluation import EvalResult, bits_per_byte, evaluate_model, score_text
from forgeline.tasks.train.batches import scoring_device

logger = logging.getLogger(__name__)


def held_out_text(dataset_dir: str) -> str:
    """The held-out text: the test split, or validation when the config keeps no test split."""
    text = read_split_text(dataset_dir, "test")
    if not text:
        logger.warning("no test split (data.fractions.test = 0): evaluating on the validation split")
        text = read_split_text(dataset_dir, "validation")
    return text


def evaluate_candidate(
    model_dir: str,
    dataset_dir: str,
    eval_cfg: EvalConfig,
    train_cfg: TrainConfig,
    *,
    block_size: int,
    seed: int,
) -> EvalResult:
    """Score the trained model saved in ``model_dir`` on the held-out split and generate the samples.

    Args:
        model_dir: The training run's ``model`` folder.
        dataset_dir: The cleaned dataset.
        eval_cfg: Token cap, prompts, sampling.
        train_cfg: Supplies the device (CUDA only where this process has one).
        block_size: Scoring window and generation context.
        seed: Sampling seed.
    """
    from forgeline.tasks.model.modeling import load_pretrained_model  # transformers: only when scoring

    device = scoring_device(train_cfg)
    model, tokenizer = load_pretrained_model(model_dir)
    return evaluate_model(
        model.to(device),
        tokenizer,
        held_out_text(dataset_dir),
        eval_cfg,
        block_size=block_size,
        seed=seed,
        device=device,
    )


def score_model(
    source: str,
    dataset_dir: str,
    eval_cfg: EvalConfig,
    train_cfg: TrainConfig,
    *,
    block_size: int,
    fetch: Callable[[str, Path], Path] | None = None,
) -> float:
    """Bits per byte of any saved or registered model on this run's held-out split (same code as the candidate).

    Args:
        source: A model folder or a registry URI (then ``fetch`` downloads it).
        dataset_dir: The cleaned dataset.
        eval_cfg: Supplies the token cap.
        train_cfg: Supplies the device (CUDA only where this process has one).
        block_size: Scoring window when the model does not state its own context.
        fetch: Downloads a registry URI (the tracking package's ``download_model``).
    """
    from forgeline.tasks.model.modeling import load_pretrained_model

    device = scoring_device(train_cfg)
    model, tokenizer = load_pretrained_model(source, fetch=fetch)
    block = getattr(model.config, "n_positions", block_size)
    nats, _, n_bytes = score_text(
        model.to(device),
        tokenizer,
        held_out_text(dataset_dir),
        block_size=block,
        max_tokens=eval_cfg.max_tokens,
        device=device,
    )
    return bits_per_byte(nats, n_bytes)
