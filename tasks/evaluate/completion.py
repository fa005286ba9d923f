"""The evaluate stage for ``task.kind: completion``: decode every test prompt, score against the references.

The model folder is a ``save_pretrained`` causal LM with its tokenizer. Test pairs are encoded as training
encodes them (a prompt too long for ``model.block_size`` is dropped or cut from the left as
``data.prompt_overflow`` says, counted); each kept prompt is decoded (greedy unless ``eval.do_sample``, seeded;
``eval.max_new_tokens``; stop at end-of-text or also a newline, ``eval.stop_at``) in length-sorted batches with
the KV cache (:mod:`forgeline.tasks.evaluate.decoding`), and scored with
:func:`~forgeline.tasks.evaluate.generation_metrics.score_generations`. The perplexity of the references given
the prompts and the decoding speed complete the figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.evaluate.decoding import generate_completions, reference_loss
from forgeline.tasks.evaluate.generation_metrics import examples_table, score_generations, worst_and_best

logger = logging.getLogger(__name__)

SHOWN = 20
"""Worst and best examples kept for the model card."""
COMPLETION_COLUMNS = ["prompt", "reference", "prediction", "bleu", "rougeL", "exact"]
"""The examples table's columns."""


class CompletionEvalResult(BaseModel):
    """Scores of one completion model on the test split."""

    metrics: dict[str, float]
    """``test/bleu``, ``test/rouge1``, ``test/rouge2``, ``test/rougeL``, ``test/exact_match``, ``test/chrf``,
    ``test/loss``, ``test/perplexity``, ``test/prompts_per_second``."""
    bleu_signature: str
    examples: list[dict[str, Any]]
    """One row per scored pair: prompt, reference, prediction, bleu, rougeL, exact."""
    worst: list[dict[str, Any]]
    best: list[dict[str, Any]]
    scored: int
    prompts_too_long: int = 0
    """Test pairs left out: the prompt does not fit (``data.prompt_overflow: drop``) or the completion is too long."""

    @property
    def samples(self) -> list[dict[str, str]]:
        """The worst and best examples by ROUGE-L as the model card's samples (prompt, then what followed)."""
        return [
            {
                "prompt": f"{row['prompt']}\n",
                "text": f"{row['prediction']}\n\n[{kind}; reference: {row['reference']}; ROUGE-L {row['rougeL']:.3f}]",
            }
            for kind, rows in (("worst", self.worst), ("best", self.best))
            for row in rows
        ]


def evaluate_completion(
    model_dir: str | Path,
    dataset_dir: str | Path,
    cfg: PipelineConfig,
    *,
    fetch: Callable[[str, Path], Path] | None = None,
) -> CompletionEvalResult:
    """Decode and score the test split (the validation split when there is none).

    Args:
        model_dir: A ``save_pretrained`` causal LM and its tokenizer, or a registry URI (``fetch`` downloads it).
        dataset_dir: The cleaned dataset (``prompt``, ``completion`` columns).
        cfg: The pipeline config: ``eval`` (decoding, ``max_examples``), ``model.block_size``,
            ``data.prompt_overflow``, ``train.batch_size``/``device``, ``seed``.
        fetch: Downloads a registry URI (the tracking package's ``download_model``).

    Returns:
        The metrics, the BLEU signature and the examples table (with the worst and best 20 by ROUGE-L).

    Raises:
        DataError: The split lacks the columns or no test pair fits the model's context.
    """
    return _evaluate_split(model_dir, dataset_dir, cfg, _held_out_split(dataset_dir), fetch=fetch)


def score_validation(model_dir: str | Path, dataset_dir: str | Path, cfg: PipelineConfig) -> dict[str, float]:
    """Decode and score the validation split as :func:`evaluate_completion` does the test split.

    The search's final value for a generation ``tune.metric``: the trial's (best-kept) model decodes the
    first ``eval.max_examples`` validation pairs with the evaluation's decoding settings.

    Returns:
        ``val/bleu``, ``val/rouge1``, ``val/rouge2``, ``val/rougeL``, ``val/exact_match``, ``val/chrf``,
        ``val/loss``, ``val/perplexity``, ``val/prompts_per_second``.

    Raises:
        DataError: The validation split lacks the columns or none of its pairs fits the model's context.
    """
    result = _evaluate_split(model_dir, dataset_dir, cfg, "validation")
    return {f"val/{name.split('/', 1)[1]}": value for name, value in result.metrics.items()}


def _evaluate_split(
    model_dir: str | Path,
    dataset_dir: str | Path,
    cfg: PipelineConfig,
    split: str,
    *,
    fetch: Callable[[str, Path], Path] | None = None,
) -> CompletionEvalResult:
    import torch

    from forgeline.tasks.evaluate.classification import eval_device
    from forgeline.tasks.model.modeling import load_pretrained_model
    from forgeline.tasks.train.complete import load_pairs
    from forgeline.tasks.train.completion import encode_pairs

    prompts, references = load_pairs(dataset_dir, split)
    if cfg.eval.max_examples is not None:
        prompts, references = prompts[: cfg.eval.max_examples], references[: cfg.eval.max_examples]
    model, tokenizer = load_pretrained_model(str(model_dir), fetch=fetch)
    if tokenizer is None:
        raise DataError(f"{model_dir}: no tokenizer beside the model")
    model.to(eval_device(cfg.train.device))
    fits = encode_pairs(
        tokenizer, prompts, references, block_size=cfg.model.block_size, overflow=cfg.data.prompt_overflow
    )
    if not len(fits):
        raise DataError(
            f"{split} split: none of its {len(prompts)} pairs fits model.block_size {cfg.model.block_size} "
            f"({fits.prompt_too_long} prompts too long); raise model.block_size or set data.prompt_overflow: "
            "truncate_left"
        )
    if fits.dropped:
        logger.warning("%s split: %d of %d pairs left out of the evaluation", split, fits.dropped, len(prompts))
    prompts = [prompts[i] for i in fits.kept]
    references = [references[i] for i in fits.kept]
    batch = max(cfg.train.batch_size, 8)
    ev = cfg.eval
    with torch.inference_mode():
        predictions, rate = generate_completions(
            model,
            tokenizer,
            prompts,
            max_new_tokens=ev.max_new_tokens,
            stop_at=ev.stop_at,
            do_sample=ev.do_sample,
            temperature=ev.temperature,
            top_k=ev.top_k,
            seed=cfg.seed,
            batch_size=batch,
        )
        ref = reference_loss(model, tokenizer, prompts, references, block_size=cfg.model.block_size, batch_size=batch)
    scores = score_generations(predictions, references)
    rows = examples_table(prompts, scores)
    worst, best = worst_and_best(rows, SHOWN)
    metrics = scores.metrics | {
        "test/loss": ref.loss,
        "test/perplexity": ref.perplexity if math.isfinite(ref.perplexity) else 1e30,
        "test/prompts_per_second": rate,
    }
    logger.info(
        "eval (%s split): BLEU %.2f, ROUGE-L %.4f, exact match %.4f, perplexity %.2f over %d pairs (%.1f prompts/s)",
        split,
        metrics["test/bleu"],
        metrics["test/rougeL"],
        metrics["test/exact_match"],
        ref.perplexity,
        len(rows),
        rate,
    )
    return CompletionEvalResult(
        metrics=metrics,
        bleu_signature=scores.bleu_signature,
        examples=rows,
        worst=worst,
        best=best,
        scored=len(rows),
        prompts_too_long=fits.dropped,
    )


def examples_markdown(result: CompletionEvalResult) -> str:
    """The worst and best examples by ROUGE-L as a markdown page (for the model card and the artifact)."""
    parts = [f"# Completions: worst and best {SHOWN} by ROUGE-L\n", f"BLEU signature: `{result.bleu_signature}`\n"]
    for title, rows in (("Worst", result.worst), ("Best", result.best)):
        parts += [f"## {title}\n", "| prompt | reference | prediction | ROUGE-L |", "|---|---|---|---|"]
        parts += [
            f"| `{_cell(r['prompt'])}` | {_cell(r['reference'])} | {_cell(r['prediction'])} | {r['rougeL']:.3f} |"
            for r in rows
        ]
        parts.append("")
    return "\n".join(parts)


def _cell(text: str, limit: int = 120) -> str:
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _held_out_split(dataset_dir: str | Path) -> str:
    from forgeline.tasks.data.cleaning import load_split

    if (Path(dataset_dir) / "test").is_dir() and len(load_split(dataset_dir, "test")):
        return "test"
    logger.warning("no test split (data.fractions.test = 0): evaluating on the validation split")
    return "validation"
