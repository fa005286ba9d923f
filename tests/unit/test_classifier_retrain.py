"""What retraining a classifier rests on (issue 16.10), without servers.

- A registered GPT-2 classifier (MLflow's transformers layout: ``model/`` and ``components/tokenizer/``) as
  ``model.init_from``, the way ``deploy.retrain_from: champion`` sets it: the same labels keep its head, a
  changed label set gets a new one sized for it.
- ``check_file`` reads a new labeled file as the clean stage will and names what is wrong with it.
- The incoming folder's source reads its files with the text column of the data it joins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from forgeline.flows.retrain import IngestError, ingest_files, retrain_config
from forgeline.tasks.config import ModelConfig, PipelineConfig, TokenizerConfig
from forgeline.tasks.data.intake import check_file
from forgeline.tasks.data.labels import LabelSet
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.model.classifier import build_classifier, classifier_tokenizer
from tests.classifier_support import make_labeled_rows, make_tiny_classifier, write_labeled_csv

LABELS = ["mlops", "nlp", "vision"]
TEXTS = ["project image pixels camera", "text tokens", "pipeline deployment registry serving workflow"]


def _registered(tmp_path: Path) -> tuple[object, torch.Tensor]:
    """A fetch that serves a saved classifier in the transformers flavor's layout, and its head's weights."""
    folder = make_tiny_classifier(tmp_path / "saved", LABELS, TEXTS, seed=4)
    from transformers import GPT2ForSequenceClassification

    head = GPT2ForSequenceClassification.from_pretrained(str(folder)).score.weight.detach().clone()

    def fetch(uri: str, dst: Path) -> Path:
        shutil.copytree(folder, dst / "model", ignore=shutil.ignore_patterns("tokenizer*", "special*"))
        shutil.copytree(folder, dst / "components" / "tokenizer", ignore=shutil.ignore_patterns("model*", "config*"))
        return dst

    return fetch, head


def test_a_registered_classifier_of_the_same_labels_keeps_its_head(tmp_path: Path) -> None:
    fetch, head = _registered(tmp_path)
    cfg = ModelConfig(init_from="models:/clf@champion", block_size=32)
    tokenizer = classifier_tokenizer(TokenizerConfig(kind="bpe"), cfg.init_from, iter([]), fetch=fetch)

    model = build_classifier(cfg, tokenizer, LabelSet(labels=LABELS), fetch=fetch)

    torch.testing.assert_close(model.score.weight, head, rtol=0, atol=0)
    assert model.config.id2label == dict(enumerate(LABELS))


def test_a_registered_classifier_gets_a_new_head_for_a_changed_label_set(tmp_path: Path) -> None:
    fetch, head = _registered(tmp_path)
    cfg = ModelConfig(init_from="models:/clf@champion", block_size=32)
    tokenizer = classifier_tokenizer(TokenizerConfig(), cfg.init_from, iter([]), fetch=fetch)

    grown = build_classifier(cfg, tokenizer, LabelSet(labels=[*LABELS, "robotics"]), fetch=fetch)
    renamed = build_classifier(cfg, tokenizer, LabelSet(labels=["mlops", "nlp", "speech"]), fetch=fetch)

    assert grown.score.weight.shape == (4, head.shape[1]) and grown.config.id2label[3] == "robotics"
    assert renamed.score.weight.shape == head.shape and not torch.equal(renamed.score.weight, head)


def _classification(**data: object) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "task": {"kind": "classification"},
            "data": {"record": "line", "label_column": "tag", **data},
            "deploy": {"retrain_from": "scratch"},
        }
    )


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("notes.txt", "a note\n", "notes.txt: plain text has no column 'tag'; labeled data is CSV, JSON or Parquet"),
        ("t.csv", "title,topic\nx,nlp\n", "t.csv: no column 'tag' (columns: title, topic)"),
        ("t.jsonl", '{"title": "x", "tag": "nlp"}\n{"title": "y", "tag": ""}\n', "t.jsonl:2: empty label"),
    ],
)
def test_check_file_names_what_the_clean_stage_would_refuse(tmp_path: Path, name: str, content: str, why: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        check_file(_classification(text_columns=["title"]).data, path)
    assert why in str(err.value)


def test_check_file_wants_a_completion_configs_columns(tmp_path: Path) -> None:
    cfg = PipelineConfig.model_validate(
        {"task": {"kind": "completion"}, "data": {"prompt_column": "q", "completion_column": "a"}}
    )
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text": "x", "q": "def f():"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs\.jsonl(:1)?: no column 'a'"):
        check_file(cfg.data, path)


def test_check_file_takes_good_labeled_tables(tmp_path: Path) -> None:
    rows = make_labeled_rows(6)
    cfg = _classification(text_columns=["title", "description"]).data
    check_file(cfg, write_labeled_csv(tmp_path / "t.csv", rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    check_file(cfg, tmp_path / "t.jsonl")
    lm = PipelineConfig().data
    check_file(lm, write_labeled_csv(tmp_path / "lm.csv", [{"text": "any text"}]))


def test_ingest_refuses_a_bad_labeled_file_and_moves_nothing(tmp_path: Path) -> None:
    good = write_labeled_csv(tmp_path / "good.csv", make_labeled_rows(6))
    bad = write_labeled_csv(tmp_path / "bad.csv", [{"title": "x", "description": "y", "topic": "nlp"}])
    cfg = _classification(text_columns=["title", "description"])
    cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"incoming_dir": str(tmp_path / "in")})})
    with pytest.raises(IngestError, match=r"bad\.csv: no column 'tag'"):
        ingest_files([str(good), str(bad)], cfg, settle=0.0)
    assert good.exists() and bad.exists() and not any((tmp_path / "in").glob("*"))
    added, _ = ingest_files([str(good)], cfg, settle=0.0)
    assert [p.suffix for p in added] == [".csv"] and not good.exists()


def test_the_incoming_folder_reads_with_the_sources_text_column(tmp_path: Path) -> None:
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "abc.csv").write_text("body,tag\nx,nlp\n", encoding="utf-8")
    sources = [{"kind": "files", "paths": ["a.csv"], "text_column": "body"}]
    cfg = _classification(sources=sources)
    cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"incoming_dir": str(incoming)})})
    retrained = retrain_config(cfg, tmp_path)
    assert retrained.data.sources[-1].path == str(incoming)
    assert retrained.data.sources[-1].text_column == "body"
    assert retrained.config_hash() != cfg.config_hash()
