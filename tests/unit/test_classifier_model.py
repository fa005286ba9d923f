"""build_classifier and classifier_tokenizer: GPT-2 from sizes, from a GPT-2 LM, from a BERT-style folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    GPT2ForSequenceClassification,
)

from forgeline.tasks.config import ModelConfig, TokenizerConfig
from forgeline.tasks.data.labels import LabelSet
from forgeline.tasks.data.tokenization import build_tokenizer
from forgeline.tasks.model.classifier import build_classifier, classifier_tokenizer
from forgeline.tasks.model.modeling import build_model

LABELS = LabelSet(labels=["mlops", "nlp", "vision"])
TEXTS = ["project image pixels camera", "text tokens", "pipeline deployment registry serving workflow"]
SIZES = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)


def _padded(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")


def _logits_alone_and_batched(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        batched = model(**_padded(tokenizer, TEXTS)).logits
        alone = torch.cat([model(**_padded(tokenizer, [t])).logits for t in TEXTS])
    return alone, batched


def test_from_sizes_pools_each_record_at_its_last_token() -> None:
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), TEXTS)
    torch.manual_seed(0)
    model = build_classifier(SIZES, tokenizer, LABELS)

    assert isinstance(model, GPT2ForSequenceClassification)
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "mlops", 1: "nlp", 2: "vision"}
    assert model.config.label2id == {"mlops": 0, "nlp": 1, "vision": 2}
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert model.config.n_positions == 32 and model.config.n_layer == 1
    alone, batched = _logits_alone_and_batched(model, tokenizer)  # batch of 3 with padding: no pad-token error
    assert batched.shape == (3, 3)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)  # padding does not move the pooled token


def _saved_lm(folder: Path) -> tuple[Path, torch.nn.Module]:
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), TEXTS)
    torch.manual_seed(1)
    lm = build_model(SIZES, tokenizer)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, lm


def test_from_a_local_gpt2_lm_the_backbone_is_the_lm(tmp_path: Path) -> None:
    folder, lm = _saved_lm(tmp_path / "lm")
    cfg = ModelConfig(init_from=str(folder), block_size=32, dropout=0.1)
    tokenizer = classifier_tokenizer(TokenizerConfig(kind="bpe"), cfg.init_from, iter(["never read"]))
    assert tokenizer.get_vocab() == build_tokenizer(TokenizerConfig(kind="char"), TEXTS).get_vocab()  # the LM's own

    model = build_classifier(cfg, tokenizer, LABELS)

    assert isinstance(model, GPT2ForSequenceClassification)
    lm_weights = lm.transformer.state_dict()
    for name, tensor in model.transformer.state_dict().items():
        torch.testing.assert_close(tensor, lm_weights[name], rtol=0, atol=0, msg=name)
    assert model.score.weight.shape == (3, 16)  # the head is new, one row per class
    assert model.config.resid_pdrop == 0.1
    assert model.config.id2label[2] == "vision"
    alone, batched = _logits_alone_and_batched(model, tokenizer)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_from_a_registered_lm_goes_through_fetch(tmp_path: Path) -> None:
    folder, lm = _saved_lm(tmp_path / "lm")
    calls: list[str] = []

    def fetch(uri: str, dst: Path) -> Path:  # as the tracking package's download_model: an artifact tree
        calls.append(uri)
        shutil.copytree(folder, dst / "model")
        return dst

    cfg = ModelConfig(init_from="models:/demo-lm@champion", block_size=32)
    tokenizer = classifier_tokenizer(TokenizerConfig(), cfg.init_from, iter([]), fetch=fetch)
    model = build_classifier(cfg, tokenizer, LABELS, fetch=fetch)

    assert calls == ["models:/demo-lm@champion"] * 2
    torch.testing.assert_close(model.transformer.wte.weight, lm.transformer.wte.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a fetch function"):
        build_classifier(cfg, tokenizer, LABELS)


def _saved_bert(folder: Path, labels: list[str]) -> Path:
    folder.mkdir(parents=True)
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_from_a_bert_style_folder_with_its_own_tokenizer(tmp_path: Path) -> None:
    folder = _saved_bert(tmp_path / "bert", ["a", "b"])
    cfg = ModelConfig(init_from=str(folder), block_size=32)
    tokenizer = classifier_tokenizer(TokenizerConfig(kind="char"), cfg.init_from, iter([]))
    assert tokenizer.cls_token == "[CLS]" and tokenizer.pad_token == "[PAD]"

    model = build_classifier(cfg, tokenizer, LABELS)

    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_labels == 3 and model.config.id2label[0] == "mlops"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    alone, batched = _logits_alone_and_batched(model, tokenizer)
    assert batched.shape == (3, 3)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_a_classifier_of_the_same_labels_keeps_its_head_another_gets_a_new_one(tmp_path: Path) -> None:
    same = _saved_bert(tmp_path / "same", LABELS.labels)
    reordered = _saved_bert(tmp_path / "reordered", ["vision", "nlp", "mlops"])
    saved = BertForSequenceClassification.from_pretrained(str(same)).classifier.weight
    tokenizer = classifier_tokenizer(TokenizerConfig(), str(same), iter([]))

    kept = build_classifier(ModelConfig(init_from=str(same), block_size=32), tokenizer, LABELS)
    new = build_classifier(ModelConfig(init_from=str(reordered), block_size=32), tokenizer, LABELS)

    torch.testing.assert_close(kept.classifier.weight, saved, rtol=0, atol=0)
    assert not torch.equal(new.classifier.weight, saved)  # same shapes, but its rows scored other classes


def test_refuses_a_context_longer_than_the_model_and_pickled_weights(tmp_path: Path) -> None:
    folder = _saved_bert(tmp_path / "bert", ["a", "b"])
    tokenizer = classifier_tokenizer(TokenizerConfig(), str(folder), iter([]))
    with pytest.raises(ValueError, match=r"block_size \(128\) exceeds .* positions \(64\)"):
        build_classifier(ModelConfig(init_from=str(folder), block_size=128), tokenizer, LABELS)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        build_classifier(ModelConfig(init_from=str(folder), block_size=32), tokenizer, LABELS)
