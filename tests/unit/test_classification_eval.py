"""Classification evaluation: metrics against hand-computed values, the tables, the PNG, the baseline."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from forgeline.tasks.config import EvalConfig
from forgeline.tasks.data.labels import LabelSet, write_label_set
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.evaluate.baseline import baseline_scores
from forgeline.tasks.evaluate.class_metrics import (
    confident_mistakes,
    confusion_counts,
    per_class_rows,
    row_normalized,
    score_predictions,
    shorten,
    write_confusion_png,
)
from forgeline.tasks.evaluate.classification import (
    MISTAKES_SHOWN,
    eval_device,
    evaluate_classifier,
    load_classifier,
    predict_logits,
    score_classifier,
)
from tests.classifier_support import make_labeled_rows, make_tiny_classifier

# Six records, three classes. Per class, from the confusion (rows true a/b/c, columns predicted a/b/c):
#   a: tp 2, predicted 2, true 3 -> P 1,   R 2/3, F1 0.8
#   b: tp 1, predicted 2, true 2 -> P 1/2, R 1/2, F1 1/2
#   c: tp 1, predicted 2, true 1 -> P 1/2, R 1,   F1 2/3
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
Y_PRED = ["a", "a", "b", "b", "c", "c"]
SUPPORT = {"a": 3, "b": 2, "c": 1}
HAND = {
    "a": (1.0, 2 / 3, 0.8),
    "b": (0.5, 0.5, 0.5),
    "c": (0.5, 1.0, 2 / 3),
}


def _macro(k: int) -> float:
    return sum(v[k] for v in HAND.values()) / 3


def _weighted(k: int) -> float:
    return sum(HAND[c][k] * SUPPORT[c] for c in HAND) / 6


def test_scores_match_hand_computed_values() -> None:
    scores = score_predictions(Y_TRUE, Y_PRED)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["precision_macro"] == pytest.approx(2 / 3) == pytest.approx(_macro(0))
    assert scores["recall_macro"] == pytest.approx(13 / 18) == pytest.approx(_macro(1))
    assert scores["f1_macro"] == pytest.approx(59 / 90) == pytest.approx(_macro(2))
    assert scores["precision_weighted"] == pytest.approx(0.75) == pytest.approx(_weighted(0))
    assert scores["recall_weighted"] == pytest.approx(4 / 6) == pytest.approx(_weighted(1))
    assert scores["f1_weighted"] == pytest.approx(61 / 90) == pytest.approx(_weighted(2))


def test_per_class_rows_match_hand_computed_values_and_list_unseen_classes() -> None:
    ids = {"a": 0, "b": 1, "c": 2}
    rows = per_class_rows([ids[y] for y in Y_TRUE], [ids[y] for y in Y_PRED], ["a", "b", "c", "d"])
    assert [r["label"] for r in rows] == ["a", "b", "c", "d"]
    for row in rows[:3]:
        p, r, f = HAND[row["label"]]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p, r, f))
        assert row["support"] == SUPPORT[row["label"]]
    # "d" is neither true nor predicted anywhere: 0/0 counts as 0, not NaN
    assert rows[3] == {"label": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_a_class_never_predicted_scores_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's UndefinedMetricWarning would fail here
        scores = score_predictions(["a", "a", "b", "b"], ["a", "a", "a", "a"])
    # a: P 2/4, R 1, F1 2/3; b: never predicted: P 0, R 0, F1 0
    assert scores["precision_macro"] == pytest.approx(0.25)
    assert scores["recall_macro"] == pytest.approx(0.5)
    assert scores["f1_macro"] == pytest.approx(1 / 3)
    assert scores["accuracy"] == pytest.approx(0.5)


def test_scores_refuse_empty_or_mismatched_input() -> None:
    with pytest.raises(ValueError):
        score_predictions([], [])
    with pytest.raises(ValueError):
        score_predictions(["a"], ["a", "b"])


def test_confident_mistakes_surest_first_shortened_and_capped() -> None:
    texts = ["right", "wrong but unsure", "wrong and sure " + "x" * 300, "also wrong"]
    rows = confident_mistakes(texts, [0, 0, 1, 1], [0, 1, 0, 0], [0.99, 0.4, 0.9, 0.6], ["a", "b"], limit=2)
    assert [r["score"] for r in rows] == [0.9, 0.6]
    assert rows[0]["true"] == "b" and rows[0]["predicted"] == "a"
    assert len(rows[0]["text"]) == 160 and rows[0]["text"].endswith("…")
    assert rows[1]["text"] == "also wrong"


def test_shorten_flattens_whitespace() -> None:
    assert shorten("a\n  b\tc", 10) == "a b c"
    assert shorten("abcdefghij", 5) == "abcd…"


def test_confusion_counts_and_row_normalized() -> None:
    counts = confusion_counts([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], 4)
    assert counts.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    normalized = row_normalized(counts)
    assert normalized[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert normalized[3].tolist() == [0, 0, 0, 0]  # an empty row stays zero, not NaN


def test_confusion_png_is_written(tmp_path: Path) -> None:
    path = write_confusion_png(np.array([[3, 1], [0, 2]]), ["spam", "ham"], tmp_path / "sub" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- baseline
def _texts(rows: list[dict[str, str]]) -> list[str]:
    return [f"{r['title']}\n{r['description']}" for r in rows]


def test_baseline_learns_the_labeled_rows_and_is_deterministic() -> None:
    train, test = make_labeled_rows(120, seed=1), make_labeled_rows(60, seed=2)
    args = (_texts(train), [r["tag"] for r in train], _texts(test), [r["tag"] for r in test])
    first, second = baseline_scores(*args), baseline_scores(*args)
    assert first.accuracy >= 0.9 and first.f1_weighted >= 0.9 and first.f1_macro >= 0.9
    assert first == second
    assert set(first.metrics) == {"baseline/accuracy", "baseline/f1_weighted", "baseline/f1_macro"}


def test_baseline_with_one_training_class_predicts_it() -> None:
    result = baseline_scores(["a b", "a c"], ["x", "x"], ["a d", "b"], ["x", "y"])
    assert result.accuracy == pytest.approx(0.5)


# ------------------------------------------------------------------------------- evaluate_classifier
LABELS = ["mlops", "nlp", "vision"]


def _save_split(root: Path, name: str, rows: list[dict[str, str]]) -> None:
    import datasets

    data = {"text": _texts(rows), "label": [r["tag"] for r in rows]}
    datasets.Dataset.from_dict(data).save_to_disk(str(root / name))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labeled")
    rows = make_labeled_rows(150)
    _save_split(root, "train", rows[:90])
    _save_split(root, "validation", rows[90:114])
    _save_split(root, "test", rows[114:])
    write_label_set(root, LabelSet(labels=LABELS))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = _texts(make_labeled_rows(150))
    return make_tiny_classifier(tmp_path_factory.mktemp("clf") / "model", LABELS, texts)


def test_evaluate_classifier_figures_agree_with_each_other_and_with_the_model(
    dataset: Path, model_dir: Path, tmp_path: Path
) -> None:
    result = evaluate_classifier(
        model_dir, dataset, EvalConfig(), block_size=48, batch_size=5, device="cpu", out_dir=tmp_path
    )
    expected = {
        f"test/{k}"
        for k in (
            "accuracy",
            "precision_macro",
            "recall_macro",
            "f1_macro",
            "precision_weighted",
            "recall_weighted",
            "f1_weighted",
            "loss",
        )
    } | {"baseline/accuracy", "baseline/f1_weighted", "baseline/f1_macro"}
    assert set(result.metrics) == expected
    assert result.labels == LABELS and result.examples == 36
    counts = np.array(result.confusion)
    assert counts.sum() == 36
    assert result.metrics["test/accuracy"] == pytest.approx(np.trace(counts) / 36)
    assert [r["support"] for r in result.per_class] == counts.sum(axis=1).tolist()
    wrong = 36 - int(np.trace(counts))
    assert len(result.mistakes) == min(MISTAKES_SHOWN, wrong)
    scores = [m["score"] for m in result.mistakes]
    assert scores == sorted(scores, reverse=True)
    assert all(m["true"] != m["predicted"] for m in result.mistakes)
    assert result.metrics["baseline/f1_weighted"] >= 0.9  # the words give the tag away
    assert Path(result.confusion_png).parent == tmp_path
    assert Path(result.confusion_png).read_bytes()[:4] == b"\x89PNG"

    # test/loss is the mean cross-entropy of the model scoring each record alone, unpadded
    model, tokenizer = load_classifier(model_dir)
    import datasets

    test = datasets.load_from_disk(str(dataset / "test"))
    nll = []
    with torch.inference_mode():
        for text, label in zip(test["text"], test["label"], strict=True):
            ids = tokenizer(text, truncation=True, max_length=48, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits
            nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor([LABELS.index(label)])).item())
    assert result.metrics["test/loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)


def test_score_classifier_gives_the_same_test_metrics_without_files(
    dataset: Path, model_dir: Path, tmp_path: Path
) -> None:
    kwargs = {"block_size": 32, "batch_size": 8, "device": "cpu"}
    full = evaluate_classifier(model_dir, dataset, EvalConfig(), out_dir=tmp_path / "full", **kwargs)
    scores = score_classifier(model_dir, dataset, EvalConfig(), **kwargs)
    assert scores == {k: v for k, v in full.metrics.items() if k.startswith("test/")}
    assert not any(k.startswith("baseline/") for k in scores)


def test_max_examples_caps_the_records(dataset: Path, model_dir: Path, tmp_path: Path) -> None:
    result = evaluate_classifier(
        model_dir, dataset, EvalConfig(max_examples=7), block_size=32, batch_size=4, device="cpu", out_dir=tmp_path
    )
    assert result.examples == 7
    assert sum(r["support"] for r in result.per_class) == 7


def test_a_test_label_the_model_does_not_know_fails_naming_it(dataset: Path, tmp_path: Path) -> None:
    texts = _texts(make_labeled_rows(30))
    model = make_tiny_classifier(tmp_path / "two", ["mlops", "nlp"], texts)
    with pytest.raises(DataError, match="'vision'"):
        evaluate_classifier(model, dataset, EvalConfig(), block_size=32, batch_size=4, device="cpu", out_dir=tmp_path)


def test_batches_are_padded_per_batch_and_truncated_at_block_size(model_dir: Path) -> None:
    model, tokenizer = load_classifier(model_dir)
    texts = ["a", "project 3 image pixels camera", "pipeline deployment " * 10, "text"]
    one_by_one = predict_logits(model, tokenizer, texts, block_size=16, batch_size=1, device="cpu")
    together = predict_logits(model, tokenizer, texts, block_size=16, batch_size=4, device="cpu")
    assert np.allclose(one_by_one, together, atol=1e-5)  # padding changes nothing
    cut = predict_logits(model, tokenizer, [t[:16] for t in texts], block_size=16, batch_size=4, device="cpu")
    assert np.allclose(together, cut, atol=1e-5)  # char tokenizer: 16 tokens = the first 16 characters
    empty = predict_logits(model, tokenizer, ["", "a"], block_size=16, batch_size=2, device="cpu")
    assert np.isfinite(empty).all()  # an empty text is scored (as the end-of-text token), not a crash
    # a block size beyond the model's 64 positions is capped, not an index error
    long = predict_logits(model, tokenizer, ["x" * 500], block_size=1024, batch_size=1, device="cpu")
    assert np.isfinite(long).all() and not math.isnan(float(long.sum()))


def test_eval_device() -> None:
    assert eval_device("cpu") == "cpu"
    assert eval_device("cuda") == "cuda"
    assert eval_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.gpu
def test_cuda_logits_match_cpu(model_dir: Path) -> None:
    model, tokenizer = load_classifier(model_dir)
    texts = _texts(make_labeled_rows(20))
    cpu = predict_logits(model, tokenizer, texts, block_size=32, batch_size=8, device="cpu")
    cuda = predict_logits(model, tokenizer, texts, block_size=32, batch_size=8, device="cuda")
    assert np.allclose(cpu, cuda, atol=1e-3)  # TF32 matmuls on the GPU: close, not bit-equal
