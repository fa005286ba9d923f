"""train_classifier: steps from epochs, batches, class weights, best weights and patience, resume, NaN policy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import pipeline

from forgeline.tasks.config import TrainConfig
from forgeline.tasks.data.cleaning import load_split
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.errors import NonFiniteLossError
from forgeline.tasks.train import classify
from forgeline.tasks.train.classify import improvement_metric, train_classifier
from forgeline.tasks.train.classify_data import (
    LabeledSplit,
    batch_indices,
    class_weights,
    classify_loss,
    encode_split,
    total_steps,
)
from forgeline.tasks.train.journal import read_journal
from forgeline.tasks.train.loop import TrainCallbacks
from tests.classify_train_support import classification_config, write_labeled_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labeled_dataset(tmp_path_factory.mktemp("cls") / "dataset", n=60)


def _weights(model_dir: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.mark.parametrize(
    ("epochs", "max_steps", "accum", "expected"),
    [(None, 7, 1, 7), (2, 100, 1, 9), (2.5, 100, 2, 6), (3, 10, 1, 10), (0.01, 100, 1, 1)],
)
def test_epochs_set_the_steps_and_max_steps_caps_them(epochs, max_steps, accum, expected) -> None:
    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=8, grad_accum_steps=accum)
    assert total_steps(cfg, 36) == expected  # 2 epochs of 36 records in batches of 8: ceil(72 / 8) = 9


def test_each_epoch_is_a_seeded_shuffle_of_every_record() -> None:
    split = LabeledSplit(ids=[[1]] * 10, labels=torch.zeros(10, dtype=torch.long))
    first = [i for m in range(5) for i in batch_indices(split, 2, m, seed=3)]
    second = [i for m in range(5, 10) for i in batch_indices(split, 2, m, seed=3)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # another order each epoch
    assert batch_indices(split, 4, 2, seed=3) == first[8:10] + second[:2]  # a batch may span two epochs
    fresh = LabeledSplit(ids=[[1]] * 10, labels=torch.zeros(10, dtype=torch.long))
    assert batch_indices(fresh, 2, 7, seed=3) == second[4:6]  # a function of (seed, index) alone: resumable


def test_records_are_cut_at_the_context_and_labels_map_to_class_ids(dataset: Path) -> None:
    from forgeline.tasks.config import TokenizerConfig
    from forgeline.tasks.data.cleaning import iter_split
    from forgeline.tasks.data.labels import read_label_set
    from forgeline.tasks.data.tokenization import build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), iter_split(dataset, "train"))
    split = encode_split(tokenizer, dataset, "validation", read_label_set(dataset), block_size=5)
    texts = list(load_split(dataset, "validation")["text"])
    assert len(split) == len(texts) == 12
    assert all(ids == tokenizer.encode(t)[:5] for ids, t in zip(split.ids, texts, strict=True))
    assert split.labels.tolist() == [
        ["mlops", "nlp", "vision"].index(v) for v in load_split(dataset, "validation")["label"]
    ]


def test_balanced_class_weights_and_the_weighted_loss() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    assert class_weights("none", labels, 2) is None
    weights = class_weights("balanced", labels, 2)
    torch.testing.assert_close(weights, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))  # n / (classes * count)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.tensor([[2.0, 0.0], [2.0, 0.0]])})()

    y = torch.tensor([0, 1])
    plain = classify_loss(Fixed(), None, None, y)
    weighted = classify_loss(Fixed(), None, None, y, weights)
    right, wrong = -math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (math.exp(2) + 1))
    assert float(plain) == pytest.approx((right + wrong) / 2)
    assert float(weighted) == pytest.approx((2 / 3 * right + 2 * wrong) / (2 / 3 + 2))  # the rare class counts more


def test_trains_logs_validation_metrics_and_answers_with_label_names(dataset: Path, tmp_path: Path) -> None:
    cfg = classification_config(epochs=2, max_steps=100)  # 36 training records, batch 8: 9 steps
    seen: list[tuple[int, dict[str, float]]] = []
    starts: list[dict] = []
    result = train_classifier(
        cfg,
        dataset_dir=dataset,
        run_dir=tmp_path / "run",
        callbacks=TrainCallbacks(on_start=starts.append, on_metrics=lambda s, m: seen.append((s, m))),
    )

    assert result.steps == 9 and starts[0]["total_steps"] == 9 and starts[0]["classes"] == 3
    evals = [(s, m) for s, m in seen if "val/loss" in m]
    assert [s for s, _ in evals] == [4, 8, 9]  # every eval_interval, and at the end
    assert all({"val/loss", "val/accuracy", "val/f1_macro"} <= m.keys() for _, m in evals)
    assert all({"train/loss", "lr"} <= m.keys() for _, m in seen)
    journal = read_journal(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _, _ in journal] == list(range(1, 10))
    assert "val/f1_macro" in journal[-1][2]
    classifier = pipeline("text-classification", model=result.model_dir)
    answers = classifier(["project 7 image pixels camera", "pipeline deployment registry"])
    assert {a["label"] for a in answers} <= {"mlops", "nlp", "vision"} and all(0 < a["score"] <= 1 for a in answers)

    again = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "run")  # done.json: reused
    assert again.already_done and again.steps == 9


def _scripted_evaluations(monkeypatch: pytest.MonkeyPatch, metric: str, values: list[float]) -> list[dict]:
    """Replace the validation scores by ``values`` (in order); returns the weights seen at each evaluation."""
    seen: list[dict] = []

    def fake(model, split, pad_id, device, cfg):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        scores = {"val/loss": 1.0, "val/accuracy": 0.5, "val/f1_macro": 0.5}
        scores[metric] = values[len(seen) - 1]
        return scores

    monkeypatch.setattr(classify, "evaluate_split", fake)
    return seen


def test_keeps_the_best_evaluations_weights_and_stops_after_patience(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = classification_config(max_steps=40, eval_interval=2, patience=2)
    assert improvement_metric(cfg) == ("val/f1_macro", True)
    at_eval = _scripted_evaluations(monkeypatch, "val/f1_macro", [0.4, 0.8, 0.7, 0.8, 0.9])
    result = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "run")

    assert result.stopped_early and result.steps == 8  # 0.8 at step 4, then two evaluations without a higher F1
    saved = _weights(result.model_dir)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, at_eval[1][name], rtol=0, atol=0, msg=name)  # step 4's weights
    assert not torch.equal(saved["score.weight"], at_eval[3]["score.weight"])

    (tmp_path / "run" / "done.json").unlink()  # killed after the early-stop checkpoint, before the marker
    again = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "run")
    assert again.resumed_from == 8 and again.steps == 8 and again.stopped_early and len(at_eval) == 4
    torch.testing.assert_close(_weights(again.model_dir)["score.weight"], at_eval[1]["score.weight"], rtol=0, atol=0)


def test_improvement_on_val_loss_when_tune_metric_names_it(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = classification_config(max_steps=40, eval_interval=2, patience=1, keep_best=False)
    cfg = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"metric": "val/loss"})})
    assert improvement_metric(cfg) == ("val/loss", False)
    _scripted_evaluations(monkeypatch, "val/loss", [1.0, 0.9, 0.95])
    result = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "run")
    assert result.stopped_early and result.steps == 6 and result.best_val_loss == 0.9


def test_resume_after_an_interruption_ends_with_the_same_weights(dataset: Path, tmp_path: Path) -> None:
    cfg = classification_config({"dropout": 0.1}, max_steps=12, checkpoint_interval=4, patience=0)
    whole = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "whole")

    def die_at_6(step: int, _metrics: dict) -> None:
        if step == 6:  # before step 6 would checkpoint: the last complete checkpoint is step 4's
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train_classifier(
            cfg, dataset_dir=dataset, run_dir=tmp_path / "cut", callbacks=TrainCallbacks(on_metrics=die_at_6)
        )
    resumed = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "cut")

    assert resumed.resumed_from == 4 and resumed.steps == 12
    first, second = _weights(whole.model_dir), _weights(resumed.model_dir)
    for name, tensor in first.items():
        torch.testing.assert_close(second[name], tensor, rtol=0, atol=0, msg=name)
    assert [s for s, _, _ in read_journal(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, 13))


def test_a_nonfinite_step_is_skipped_and_too_many_in_a_row_fail(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGELINE_FAULT_AT_STEP", "3")
    monkeypatch.setenv("FORGELINE_FAULT_KIND", "nan")
    result = train_classifier(classification_config(max_steps=6), dataset_dir=dataset, run_dir=tmp_path / "one")
    assert result.nonfinite_steps == 1 and result.steps == 6
    assert math.isfinite(result.final_train_loss)

    monkeypatch.setenv("FORGELINE_FAULT_KIND", "nan_from")
    cfg = classification_config(max_steps=10, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 steps in a row"):
        train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "many")
    assert not (tmp_path / "many" / "done.json").exists()


def test_a_validation_label_the_training_split_lacks_is_one_line(tmp_path: Path) -> None:
    import datasets

    dataset = write_labeled_dataset(tmp_path / "dataset", n=30)
    datasets.Dataset.from_dict({"text": ["odd one"], "label": ["robotics"]}).save_to_disk(str(tmp_path / "v"))
    (dataset / "validation").rename(tmp_path / "old")
    (tmp_path / "v").rename(dataset / "validation")
    with pytest.raises(DataError, match="label 'robotics' is not in the training split's labels"):
        train_classifier(classification_config(), dataset_dir=dataset, run_dir=tmp_path / "run")
    assert json.loads((dataset / "labels.json").read_text())["labels"] == ["mlops", "nlp", "vision"]


# ------------------------------------------------------------------------------- config and search
def test_several_ranks_and_an_unlogged_tune_metric_are_refused_in_one_line() -> None:
    from forgeline.tasks.config import ConfigError, load_config

    base = ["task.kind=classification", "data.label_column=tag"]
    with pytest.raises(ConfigError, match="train.nproc_per_node: task.kind 'classification' trains in one process"):
        load_config(None, [*base, "train.nproc_per_node=2"])
    with pytest.raises(ConfigError, match="tune.metric: task.kind 'classification' logs val/f1_macro"):
        load_config(None, [*base, "tune.metric=val/rougeL"])
    assert load_config(None, [*base, "tune.metric=val/accuracy"]).tune_metric() == ("val/accuracy", True)


def test_the_study_direction_and_name_follow_the_metric(tmp_path: Path) -> None:
    from forgeline.tasks.config import load_config
    from forgeline.tasks.tune.space import study_name
    from forgeline.tasks.tune.study import build_spec, open_study, study_metric

    space = ["tune.n_trials=1", "tune.search_space={train.learning_rate: {type: float, low: 0.001, high: 0.01}}"]
    cls = ["task.kind=classification", "data.label_column=tag", *space]
    cases = {
        "f1": (load_config(None, cls), "maximize"),
        "loss": (load_config(None, [*cls, "tune.metric=val/loss"]), "minimize"),
        "lm": (load_config(None, space), "minimize"),
    }
    names = set()
    for key, (cfg, direction) in cases.items():
        spec = build_spec(cfg, str(tmp_path), "ef" * 32, trials_root=tmp_path / key, base_dir=tmp_path / key)
        assert open_study(spec, create=True).direction.name.lower() == direction, key
        names.add(study_name(cfg, "ef" * 32))
    assert study_metric(cases["f1"][0]) == ("val/f1_macro", True)
    assert len(names) == 3  # another metric (or direction), another study


def test_fine_tunes_a_bert_style_folder_and_saves_its_tokenizer(dataset: Path, tmp_path: Path) -> None:
    from tests.unit.test_classifier_model import _saved_bert

    bert = _saved_bert(tmp_path / "bert", ["x", "y"])
    cfg = classification_config({"init_from": str(bert), "block_size": 32}, max_steps=3, eval_interval=3)
    result = train_classifier(cfg, dataset_dir=dataset, run_dir=tmp_path / "run")

    saved = json.loads((Path(result.model_dir) / "config.json").read_text())
    assert saved["model_type"] == "bert" and saved["id2label"] == {"0": "mlops", "1": "nlp", "2": "vision"}
    assert (Path(result.model_dir) / "vocab.txt").exists() or (Path(result.model_dir) / "tokenizer.json").exists()
    answers = pipeline("text-classification", model=result.model_dir)(["image pixels camera", "text tokens"])
    assert {a["label"] for a in answers} <= {"mlops", "nlp", "vision"}
