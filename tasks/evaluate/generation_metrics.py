"""Scores of generated completions against reference text: BLEU, chrF, ROUGE and exact match.

Scales follow the libraries: BLEU and chrF are sacreBLEU's 0-100; ROUGE F-measures (``rouge-score`` with
Porter stemming, averaged over examples) and exact match are fractions in 0-1. Corpus BLEU uses sacreBLEU's
defaults (13a tokenization, exponential smoothing) and is reported with its signature string; per-example
BLEU is sentence BLEU with effective order, sacreBLEU's advice for single sentences.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class ExampleScore(BaseModel):
    """One prediction beside its reference, with its own scores (a row of the examples table)."""

    reference: str
    prediction: str
    bleu: float
    """Sentence BLEU (0-100, effective order)."""
    rougeL: float  # noqa: N815 - the metric's own name
    """ROUGE-L F-measure (0-1)."""
    exact: float
    """1.0 when prediction and reference match after stripping whitespace at both ends, else 0.0."""


class GenerationScores(BaseModel):
    """Corpus-level scores of a list of predictions, plus each example's own."""

    bleu: float
    bleu_signature: str
    """sacreBLEU's signature of the corpus BLEU settings, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|...``."""
    chrf: float
    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815 - the metric's own name
    exact_match: float
    examples: int
    per_example: list[ExampleScore]

    @property
    def metrics(self) -> dict[str, float]:
        """The headline scores under their MLflow names (every task's result has ``metrics``)."""
        return {
            "test/bleu": self.bleu,
            "test/rouge1": self.rouge1,
            "test/rouge2": self.rouge2,
            "test/rougeL": self.rougeL,
            "test/exact_match": self.exact_match,
            "test/chrf": self.chrf,
        }


def exact_match(prediction: str, reference: str) -> bool:
    """Whether a prediction equals its reference once whitespace at both ends is stripped.

    Args:
        prediction: Generated text.
        reference: Reference text.

    Returns:
        True on a match.
    """
    return prediction.strip() == reference.strip()


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> GenerationScores:
    """Score predictions against references (one reference each).

    Args:
        predictions: Generated texts.
        references: Reference texts, aligned with ``predictions``.

    Returns:
        Corpus BLEU (with its signature), chrF, mean ROUGE-1/2/L F-measures, exact match rate and per-example scores.

    Raises:
        ValueError: If the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    # Imported here: rouge-score pulls in nltk, scikit-learn, pandas and scipy (1.3 s), which a language model's
    # or a classifier's run never needs (BENCHMARKS.md section 2).
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    preds, refs = list(predictions), list(references)
    bleu = BLEU()
    corpus_bleu = bleu.corpus_score(preds, [refs])
    chrf = CHRF().corpus_score(preds, [refs])
    sentence_bleu = BLEU(effective_order=True)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    rows: list[ExampleScore] = []
    for pred, ref in zip(preds, refs, strict=True):
        rouge = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for key in ROUGE_TYPES:
            sums[key] += rouge[key].fmeasure
        rows.append(
            ExampleScore(
                reference=ref,
                prediction=pred,
                bleu=sentence_bleu.sentence_score(pred, [ref]).score,
                rougeL=rouge["rougeL"].fmeasure,
                exact=float(exact_match(pred, ref)),
            )
        )
    n = len(rows)
    scores = GenerationScores(
        bleu=corpus_bleu.score,
        bleu_signature=str(bleu.get_signature()),
        chrf=chrf.score,
        rouge1=sums["rouge1"] / n,
        rouge2=sums["rouge2"] / n,
        rougeL=sums["rougeL"] / n,
        exact_match=sum(r.exact for r in rows) / n,
        examples=n,
        per_example=rows,
    )
    log.info(
        "scored %d generations: BLEU %.2f, ROUGE-L %.4f, exact match %.4f",
        n,
        scores.bleu,
        scores.rougeL,
        scores.exact_match,
    )
    return scores


def examples_table(prompts: Sequence[str], scores: GenerationScores) -> list[dict[str, str | float]]:
    """The examples table: prompt, reference, prediction and per-example scores, one row per test pair.

    Args:
        prompts: The prompts, aligned with the scored predictions.
        scores: What :func:`score_generations` returned.

    Returns:
        Rows with keys ``prompt``, ``reference``, ``prediction``, ``bleu``, ``rougeL``, ``exact``.

    Raises:
        ValueError: If the prompts do not match the scored examples in number.
    """
    if len(prompts) != len(scores.per_example):
        raise ValueError(f"{len(prompts)} prompts but {len(scores.per_example)} scored examples")
    return [{"prompt": p, **row.model_dump()} for p, row in zip(prompts, scores.per_example, strict=True)]


def worst_and_best(
    rows: Sequence[dict[str, str | float]], n: int = 20, *, key: str = "rougeL"
) -> tuple[list[dict[str, str | float]], list[dict[str, str | float]]]:
    """The ``n`` lowest- and ``n`` highest-scoring rows of an examples table (for the model card).

    Ties keep table order (a stable sort), so the choice is deterministic.

    Args:
        rows: Rows of :func:`examples_table`.
        n: How many of each.
        key: The per-example score to rank by.

    Returns:
        ``(worst first, best first)``.
    """
    ranked = sorted(range(len(rows)), key=lambda i: float(rows[i][key]))
    worst = [rows[i] for i in ranked[:n]]
    best = [rows[i] for i in sorted(range(len(rows)), key=lambda i: -float(rows[i][key]))[:n]]
    return worst, best


# ------------------------------------------------------------------------------- reference points
def function_name(prompt: str) -> str:
    """The called name in a signature prompt: ``json.dumps(obj, *, ...)`` -> ``dumps``.

    Args:
        prompt: A prompt such as the built-in ``python-docstrings`` corpus makes.

    Returns:
        The last dotted component before the first ``(`` (the whole stripped prompt when it has none).
    """
    head = prompt.split("(", 1)[0].strip()
    return head.rsplit(".", 1)[-1]


def most_common(texts: Sequence[str]) -> str:
    """The most frequent text; ties go to the alphabetically first, so the answer is deterministic.

    Args:
        texts: Candidate texts (not empty).

    Returns:
        The most common one.

    Raises:
        ValueError: If ``texts`` is empty.
    """
    if not texts:
        raise ValueError("no texts to count")
    counts = Counter(texts)
    return min(counts, key=lambda t: (-counts[t], t))


def reference_points(
    prompts: Sequence[str], references: Sequence[str], *, train_completions: Sequence[str] | None = None
) -> dict[str, GenerationScores]:
    """Two trivial predictors scored on the same pairs, to put a model's figures in context.

    ``copy_name`` answers every prompt with its function name; ``most_common`` answers every prompt with the most
    common completion of ``train_completions`` (of the references themselves when none are given, which favours it).

    Args:
        prompts: Test prompts.
        references: Their reference completions.
        train_completions: Completions the constant answer is chosen from.

    Returns:
        ``{"copy_name": scores, "most_common": scores}``.
    """
    constant = most_common(list(train_completions) if train_completions else list(references))
    return {
        "copy_name": score_generations([function_name(p) for p in prompts], references),
        "most_common": score_generations([constant] * len(references), references),
    }
