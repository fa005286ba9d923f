"""Sequence classifiers: a GPT-2 sized by the model section, or any saved model, with a head for the labels.

Sources (``model.init_from``), loaded from safetensors only and never with remote code:

* none: a fresh ``GPT2ForSequenceClassification`` from the model sizes;
* a GPT-2 language model (a local folder such as the demo's trained LM, a registered ``models:/NAME@champion``,
  or a hub id when online): its transformer becomes the backbone, the head is new;
* a local folder of any ``AutoModelForSequenceClassification`` architecture (BERT-style), with its own
  tokenizer. Its head is kept when it was trained on the same labels in the same order, else it is new.

GPT-2 pools each sequence at its last token that is not ``pad_token_id`` (last-token pooling), so the pad id is
always set on the model: without it a batch over 1 fails ("Cannot handle batch sizes > 1 if no padding token
is defined"). Batches are padded on the right, so the pad id never appears inside a text's tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    GPT2ForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from forgeline.tasks.config import ModelConfig, TokenizerConfig
from forgeline.tasks.data.labels import LabelSet
from forgeline.tasks.data.tokenization import build_tokenizer, load_tokenizer
from forgeline.tasks.model.modeling import (
    Fetch,
    count_parameters,
    gpt2_config,
    hold_biases_at_zero,
    n_positions,
    resolved_source,
)

log = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"


def build_classifier(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, label_set: LabelSet, *, fetch: Fetch | None = None
) -> PreTrainedModel:
    """A sequence classifier for ``label_set``: built from the model sizes, or from ``model_cfg.init_from``.

    Args:
        model_cfg: Model sizes, dropout, context length, optional ``init_from``.
        tokenizer: The tokenizer the model reads (:func:`classifier_tokenizer`); it must have a pad token.
        label_set: The dataset's classes: ``num_labels``, ``id2label`` and ``label2id`` of the model.
        fetch: Downloads ``init_from`` when it is a registry URI.

    Returns:
        The model, in training mode, on CPU, with ``config.pad_token_id`` set to the tokenizer's.

    Raises:
        ValueError: The tokenizer has no pad token, ``block_size`` exceeds a pretrained model's positions, or
            the source is refused (pickled weights, custom code, not a model folder).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the classifier's tokenizer has no pad token (see classifier_tokenizer)")
    labels = {"num_labels": len(label_set.labels), "id2label": label_set.id2label, "label2id": label_set.label2id}
    if model_cfg.init_from:
        with resolved_source(model_cfg.init_from, fetch=fetch) as (model_source, _):
            model = _load_classifier(model_source, model_cfg, label_set)
        positions = n_positions(model)
        if positions is not None and model_cfg.block_size > positions:
            raise ValueError(
                f"model.block_size ({model_cfg.block_size}) exceeds {model_cfg.init_from}'s positions ({positions})"
            )
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            log.warning("resizing %s token embeddings %d -> %d", model_cfg.init_from, vocab, len(tokenizer))
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = GPT2ForSequenceClassification(gpt2_config(model_cfg, tokenizer, **labels))
        if not model_cfg.bias:
            hold_biases_at_zero(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.config.model_type == "gpt2":
        model.config.use_cache = False  # a classifier never generates: no KV cache to fill
    model.train()
    log.info(
        "built %s classifier: %d classes, %d trained parameters%s",
        model.config.model_type,
        len(label_set.labels),
        count_parameters(model),
        f", from {model_cfg.init_from}" if model_cfg.init_from else "",
    )
    return model


def classifier_tokenizer(
    tok_cfg: TokenizerConfig, init_from: str | None, train_texts: Iterable[str], *, fetch: Fetch | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of a classifier: ``init_from``'s own when it has one, else built as for language models.

    An explicit ``tokenizer.kind: pretrained`` with a ``source`` wins over ``init_from``'s. A tokenizer without
    a pad token gets the eos token as pad, or a new ``<pad>`` token when it has no eos either.

    Args:
        tok_cfg: Tokenizer settings (used when ``init_from`` brings no tokenizer).
        init_from: ``model.init_from``.
        train_texts: The training split's texts (read only when a tokenizer is built).
        fetch: Downloads ``init_from`` when it is a registry URI.

    Returns:
        A tokenizer with a pad token.
    """
    tokenizer = None
    if init_from and not (tok_cfg.kind == "pretrained" and tok_cfg.source):
        with resolved_source(init_from, fetch=fetch) as (_, tok_source):
            if tok_source is not None:
                try:
                    tokenizer = load_tokenizer(tok_source)
                    log.info("fine-tuning %s: using its tokenizer (%d tokens)", init_from, len(tokenizer))
                except (OSError, ValueError) as exc:
                    log.warning("%s: no usable tokenizer (%s); building one", init_from, exc)
    if tokenizer is None:
        tokenizer = build_tokenizer(tok_cfg, train_texts)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


# ------------------------------------------------------------------------------------------- private
def _load_classifier(source: str, cfg: ModelConfig, label_set: LabelSet) -> PreTrainedModel:
    source_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    was_classifier = any(a.endswith("ForSequenceClassification") for a in source_config.architectures or [])
    old_labels = [source_config.id2label[i] for i in sorted(source_config.id2label)] if was_classifier else None
    extra = {}
    if source_config.model_type == "gpt2":  # the model section's dropout regularises the fine-tune
        extra = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        use_safetensors=True,
        trust_remote_code=False,
        ignore_mismatched_sizes=True,  # a head trained on another number of classes is replaced
        num_labels=len(label_set.labels),
        id2label=label_set.id2label,
        label2id=label_set.label2id,
        **extra,
    )
    if old_labels is not None and old_labels != label_set.labels:
        # Same count, other classes (or order): the old rows would score the wrong classes.
        log.info("%s was trained on labels %s, not %s: new head", source, old_labels, label_set.labels)
        _reset_head(model, len(label_set.labels))
    return model


def _reset_head(model: PreTrainedModel, num_labels: int) -> None:
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise ValueError(f"{type(model).__name__}: no classification layer with {num_labels} outputs found")
    head = heads[-1]  # the output layer comes last in every *ForSequenceClassification
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        head.weight.normal_(0.0, std)
        if head.bias is not None:
            head.bias.zero_()
