"""Generation metrics against hand-worked examples and against sacreBLEU's and rouge-score's own results."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from forgeline.tasks.evaluate.generation_metrics import (
    exact_match,
    examples_table,
    function_name,
    most_common,
    reference_points,
    score_generations,
    worst_and_best,
)

SENTENCE = "Serialize obj to a JSON formatted string and return it."

PREDICTIONS = [
    "Return the cosine of x measured in radians.",
    "Serialize an object to a JSON string.",
    "the cat ran away",
    "Open a file",
    "",
]
REFERENCES = [
    "Return the cosine of x (measured in radians).",
    "Serialize obj to a JSON formatted str.",
    "the cat sat",
    "  Open a file\n",
    "Return a new empty list.",
]


def test_identical_strings_score_full_marks() -> None:
    scores = score_generations([SENTENCE, SENTENCE], [SENTENCE, SENTENCE])
    assert scores.bleu == pytest.approx(100.0)
    assert scores.chrf == pytest.approx(100.0)
    assert (scores.rouge1, scores.rouge2, scores.rougeL) == (1.0, 1.0, 1.0)
    assert scores.exact_match == 1.0
    assert [row.exact for row in scores.per_example] == [1.0, 1.0]
    assert all(row.bleu == pytest.approx(100.0) for row in scores.per_example)


def test_hand_worked_rouge() -> None:
    # Unigrams: "the", "cat" shared; P = 2/4, R = 2/3, F = 2PR / (P + R) = 4/7.
    # Bigrams: "the cat" shared; P = 1/3, R = 1/2, F = 2/5. Longest common subsequence "the cat": F = 4/7.
    scores = score_generations(["the cat ran away"], ["the cat sat"])
    assert scores.rouge1 == pytest.approx(4 / 7)
    assert scores.rouge2 == pytest.approx(2 / 5)
    assert scores.rougeL == pytest.approx(4 / 7)
    assert scores.exact_match == 0.0


def test_rouge_stems_and_averages_over_examples() -> None:
    # Porter stemming: "running dogs" and "run dog" are the same two tokens.
    scores = score_generations(["run dog", "the cat ran away"], ["running dogs", "the cat sat"])
    assert scores.per_example[0].rougeL == 1.0
    assert scores.rouge1 == pytest.approx((1.0 + 4 / 7) / 2)


def test_exact_match_strips_whitespace_only() -> None:
    assert exact_match(" a b \n", "a b")
    assert not exact_match("a  b", "a b")
    assert not exact_match("A", "a")
    scores = score_generations([" a ", "b", "c"], ["a", "B", "c"])
    assert scores.exact_match == pytest.approx(2 / 3)
    assert [row.exact for row in scores.per_example] == [1.0, 0.0, 1.0]


def test_matches_sacrebleu_called_directly() -> None:
    scores = score_generations(PREDICTIONS, REFERENCES)
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert scores.chrf == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    assert scores.bleu_signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    bleu = sacrebleu.metrics.BLEU(effective_order=True)
    for pred, ref, row in zip(PREDICTIONS, REFERENCES, scores.per_example, strict=True):
        assert row.bleu == pytest.approx(bleu.sentence_score(pred, [ref]).score)
    assert 0.0 < scores.bleu < 100.0


def test_matches_rouge_score_called_directly() -> None:
    scores = score_generations(PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert getattr(scores, key) == pytest.approx(sum(d[key].fmeasure for d in direct) / len(direct))
    assert [row.rougeL for row in scores.per_example] == pytest.approx([d["rougeL"].fmeasure for d in direct])


def test_metrics_names_and_values() -> None:
    scores = score_generations(PREDICTIONS, REFERENCES)
    assert scores.metrics == {
        "test/bleu": scores.bleu,
        "test/rouge1": scores.rouge1,
        "test/rouge2": scores.rouge2,
        "test/rougeL": scores.rougeL,
        "test/exact_match": 0.2,
        "test/chrf": scores.chrf,
    }
    assert scores.examples == 5


def test_refuses_mismatched_or_empty_lists() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score_generations(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score_generations([], [])


def test_examples_table_and_worst_best() -> None:
    prompts = [f"m.f{i}(x)" for i in range(len(PREDICTIONS))]
    rows = examples_table(prompts, score_generations(PREDICTIONS, REFERENCES))
    assert [r["prompt"] for r in rows] == prompts
    assert rows[3]["prediction"] == "Open a file" and rows[3]["exact"] == 1.0
    assert set(rows[0]) == {"prompt", "reference", "prediction", "bleu", "rougeL", "exact"}
    worst, best = worst_and_best(rows, n=2)
    assert worst[0]["prompt"] == "m.f4(x)"  # empty prediction: ROUGE-L 0
    # Both score ROUGE-L 1 (rouge-score drops punctuation); ties keep table order.
    assert [r["prompt"] for r in best] == ["m.f0(x)", "m.f3(x)"]
    assert len(worst) == len(best) == 2
    with pytest.raises(ValueError, match="prompts but"):
        examples_table(prompts[:2], score_generations(PREDICTIONS, REFERENCES))


def test_reference_points() -> None:
    assert function_name("json.dumps(obj, *, skipkeys=False)") == "dumps"
    assert function_name("os.path.join(a, *p)") == "join"
    assert most_common(["b", "a", "b", "a", "c"]) == "a"  # tie broken alphabetically
    prompts = ["json.dumps(obj)", "m.copy(x)", "m.clear()"]
    refs = ["Serialize obj.", "Return a shallow copy.", "Return a shallow copy."]
    points = reference_points(prompts, refs)
    assert [r.prediction for r in points["copy_name"].per_example] == ["dumps", "copy", "clear"]
    assert points["most_common"].exact_match == pytest.approx(2 / 3)
    from_train = reference_points(prompts, refs, train_completions=["Serialize obj."])
    assert from_train["most_common"].exact_match == pytest.approx(1 / 3)
