"""The student: its shape, initialised from the teacher (DistilGPT2's ``extract.py``), or pruned from it.

Only structured changes that a stock GPT-2 still loads: fewer layers and a narrower MLP (``n_inner``).
transformers 5 has no ``prune_heads`` any more, and unstructured sparsity saves neither time nor disk with
dense kernels, so neither is offered. Every check here raises :class:`CompressError` with one line.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from pydantic import BaseModel
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedModel

from forgeline.tasks.config import CompressConfig

logger = logging.getLogger(__name__)


class CompressError(ValueError):
    """A compression that cannot be done as asked (bad teacher, student or layers); one line for the user."""


class StudentSpec(BaseModel):
    """The student's shape, resolved against the teacher."""

    layers: list[int] | None
    """Teacher layers copied in order; ``None`` when the student is not built from teacher layers."""
    n_layer: int
    n_embd: int
    n_head: int
    n_inner: int
    from_teacher: bool
    """Whether weights are copied from the teacher (same width and heads, ``init: teacher``)."""


def mlp_width(config: Any) -> int:
    """A GPT-2 config's MLP width (``n_inner``, which ``None`` means ``4 * n_embd``)."""
    return int(config.n_inner) if config.n_inner else 4 * int(config.n_embd)


def spaced_layers(n_teacher: int, n_student: int) -> list[int]:
    """``n_student`` teacher layers evenly spaced from the first to the last (12 -> 6 gives DistilGPT2's choice).

    >>> spaced_layers(12, 6)
    [0, 2, 4, 7, 9, 11]
    """
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def resolve_student(cfg: CompressConfig, teacher_config: Any) -> StudentSpec:
    """The student's shape from the ``compress`` section and the teacher's config.

    Raises:
        CompressError: a layer index out of range, or a student not smaller than the teacher.
    """
    t_layers, t_embd, t_head = int(teacher_config.n_layer), int(teacher_config.n_embd), int(teacher_config.n_head)
    t_inner = mlp_width(teacher_config)
    if cfg.layers_from_teacher is not None:
        bad = [i for i in cfg.layers_from_teacher if i >= t_layers]
        if bad:
            raise CompressError(
                f"compress.layers_from_teacher {cfg.layers_from_teacher}: layer {bad[0]} is out of range "
                f"(the teacher has {t_layers} layers, 0..{t_layers - 1})"
            )
    n_embd = cfg.n_embd or t_embd
    n_head = cfg.n_head or (t_head if n_embd == t_embd else _heads_for(n_embd, t_head))
    if n_embd % n_head:
        raise CompressError(f"compress.n_embd ({n_embd}) must be divisible by compress.n_head ({n_head})")
    default_layers = t_layers if cfg.method == "prune" else max(1, t_layers // 2)
    n_layer = cfg.n_layer or (len(cfg.layers_from_teacher) if cfg.layers_from_teacher else default_layers)
    default_inner = max(1, t_inner // 2) if cfg.method == "prune" else t_inner
    n_inner = cfg.n_inner or (default_inner if n_embd == t_embd else 4 * n_embd)
    for what, mine, theirs in (
        ("n_layer", n_layer, t_layers),
        ("n_embd", n_embd, t_embd),
        ("n_inner", n_inner, t_inner),
    ):
        if mine > theirs:
            raise CompressError(
                f"the student is larger than the teacher: compress.{what} {mine} > the teacher's {theirs}"
            )
    if (n_layer, n_embd, n_inner) == (t_layers, t_embd, t_inner):
        raise CompressError(
            f"the student is not smaller than the teacher ({t_layers} layers, width {t_embd}, MLP {t_inner}): "
            "set compress.n_layer, compress.layers_from_teacher, compress.n_embd or compress.n_inner"
        )
    same_shape = n_embd == t_embd and n_head == t_head
    from_teacher = cfg.init == "teacher" and same_shape and cfg.student_from is None
    layers = None
    if from_teacher:
        layers = list(cfg.layers_from_teacher) if cfg.layers_from_teacher else spaced_layers(t_layers, n_layer)
    return StudentSpec(
        layers=layers, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=n_inner, from_teacher=from_teacher
    )


def build_student(teacher: PreTrainedModel, spec: StudentSpec, *, seed: int) -> PreTrainedModel:
    """A GPT-2 student of shape ``spec``: teacher weights copied (and MLPs pruned) when ``spec.from_teacher``.

    Copied: token and position embeddings, the final layer norm, the head (an LM's, tied to the embeddings,
    or a classifier's ``score``) and teacher block ``spec.layers[i]`` as student block ``i``; MLP neurons
    beyond ``spec.n_inner`` are dropped by magnitude (:func:`prune_mlp`). Otherwise the student starts from
    random weights (seeded). A sequence-classifier teacher gives a sequence-classifier student (same labels).
    """
    config = student_config(teacher.config, spec)
    torch.manual_seed(seed)
    cls = GPT2ForSequenceClassification if is_classifier(teacher) else GPT2LMHeadModel
    student = cls(config)
    if not spec.from_teacher:
        logger.info("student: %d layers, width %d, MLP %d, random init", spec.n_layer, spec.n_embd, spec.n_inner)
        return student
    assert spec.layers is not None
    t_state = teacher.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in t_state.items():
        if not name.startswith("transformer.h."):
            state[name] = tensor.clone()
    for i, src in enumerate(spec.layers):
        block = {
            k.removeprefix(f"transformer.h.{src}."): v
            for k, v in t_state.items()
            if k.startswith(f"transformer.h.{src}.")
        }
        if spec.n_inner < mlp_width(teacher.config):
            block = prune_mlp(block, spec.n_inner)
        state.update({f"transformer.h.{i}.{k}": v.clone() for k, v in block.items()})
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and k != "lm_head.weight"]
    if missing or unexpected:
        raise CompressError(f"student weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    student.tie_weights()
    logger.info(
        "student: teacher layers %s, MLP %d of %d neurons kept", spec.layers, spec.n_inner, mlp_width(teacher.config)
    )
    return student


def is_classifier(model: PreTrainedModel) -> bool:
    """Whether ``model`` is a GPT-2 sequence classifier (class logits ``(B, classes)``, not next-token logits)."""
    return isinstance(model, GPT2ForSequenceClassification)


def student_config(teacher_config: Any, spec: StudentSpec) -> GPT2Config:
    """The teacher's config with the student's sizes (vocabulary, context, activation and ids unchanged)."""
    config = copy.deepcopy(teacher_config)
    config.n_layer, config.n_embd, config.n_head = spec.n_layer, spec.n_embd, spec.n_head
    config.n_inner = spec.n_inner
    return config


def neuron_importance(block: dict[str, torch.Tensor]) -> torch.Tensor:
    """Magnitude of each MLP neuron of a GPT-2 block: ``|c_fc column| * |c_proj row|``  # (n_inner,)

    GPT-2's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``: neuron ``j`` reads
    column ``j`` of ``mlp.c_fc.weight`` (n_embd, n_inner) and writes row ``j`` of ``mlp.c_proj.weight``
    (n_inner, n_embd).
    """
    fan_in = block["mlp.c_fc.weight"].norm(dim=0)  # (n_inner,)
    fan_out = block["mlp.c_proj.weight"].norm(dim=1)  # (n_inner,)
    return fan_in * fan_out


def prune_mlp(block: dict[str, torch.Tensor], n_inner: int) -> dict[str, torch.Tensor]:
    """The block's tensors with only the ``n_inner`` largest-magnitude MLP neurons, in their original order."""
    keep = torch.topk(neuron_importance(block), n_inner).indices.sort().values
    out = dict(block)
    out["mlp.c_fc.weight"] = block["mlp.c_fc.weight"][:, keep]
    out["mlp.c_fc.bias"] = block["mlp.c_fc.bias"][keep]
    out["mlp.c_proj.weight"] = block["mlp.c_proj.weight"][keep, :]
    return out


def check_vocabularies(
    teacher: PreTrainedModel, teacher_tokenizer: Any, student: PreTrainedModel, student_tokenizer: Any | None
) -> None:
    """The student must predict over the teacher's vocabulary, token for token.

    Raises:
        CompressError: another vocabulary size, or a tokenizer whose ids mean other tokens.
    """
    t_vocab = int(teacher.get_input_embeddings().weight.shape[0])
    s_vocab = int(student.get_input_embeddings().weight.shape[0])
    if s_vocab != t_vocab:
        raise CompressError(f"the student's vocabulary ({s_vocab} tokens) differs from the teacher's ({t_vocab})")
    if student_tokenizer is not None and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise CompressError(
            f"the student's tokenizer ({len(student_tokenizer)} tokens) maps ids to other tokens than the "
            f"teacher's ({len(teacher_tokenizer)}); distillation needs the same vocabulary"
        )


def non_embedding_parameters(model: PreTrainedModel) -> int:
    """Parameters outside the token and position embeddings (the part compression shrinks)."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.transformer.wpe) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def _heads_for(n_embd: int, teacher_heads: int) -> int:
    # The largest head count up to the teacher's that divides the new width.
    return next(h for h in range(min(teacher_heads, n_embd), 0, -1) if n_embd % h == 0)
