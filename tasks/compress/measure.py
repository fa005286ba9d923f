"""The trade-off: what a model costs (parameters, bytes on disk, CPU generation speed, latency) and scores.

Every number of teacher and student is measured by the same code on the same machine, one after the other.
Generation is timed as serving does it: batch 1, greedy, the KV cache on, on CPU.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import PreTrainedModel

from forgeline.tasks.compress.student import mlp_width, non_embedding_parameters
from forgeline.tasks.evaluate.evaluation import bits_per_byte, score_text
from forgeline.tasks.model.modeling import count_parameters

logger = logging.getLogger(__name__)

METRIC = "bits_per_byte"
"""The task metric of causal language models (lower is better); classifiers have their own
(:data:`.classify.METRIC`, macro F1, higher is better)."""


class GenerationMeasure(BaseModel):
    """The size and generation speed of a model that generates: the table's first rows, before its task metric."""

    parameters: int
    non_embedding_parameters: int
    n_layer: int
    n_inner: int
    bytes_on_disk: int
    tokens_per_sec: float
    latency_p50_ms: float
    latency_p95_ms: float


class ModelMeasure(GenerationMeasure):
    """One model's side of the trade-off table."""

    bits_per_byte: float


def safetensors_bytes(model: PreTrainedModel) -> int:
    """Size of the model's ``model.safetensors`` as ``save_pretrained`` writes it."""
    with tempfile.TemporaryDirectory(prefix="forgeline-size-") as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


def footprint(model: PreTrainedModel) -> dict[str, int]:
    """The size rows every measure shares after ``parameters``: non-embedding parameters, depth, MLP width, bytes."""
    return {
        "non_embedding_parameters": non_embedding_parameters(model),
        "n_layer": int(model.config.n_layer),
        "n_inner": mlp_width(model.config),
        "bytes_on_disk": safetensors_bytes(model),
    }


@torch.no_grad()
def time_generation(
    models: list[PreTrainedModel], prompt_ids: torch.Tensor, *, new_tokens: int, requests: int
) -> list[tuple[float, float, float]]:
    """Tokens per second and latency p50/p95 (ms) of ``requests`` greedy ``generate`` calls per model.

    Batch 1, KV cache on, CPU. The models take turns call by call (interleaved), so a machine that gets
    busier halfway slows both alike; each first warms up untimed. Each call generates exactly ``new_tokens``.
    """
    kwargs = []
    for model in models:
        model.eval()
        limit = int(getattr(model.config, "n_positions", 1024))
        ids = prompt_ids[-max(1, limit - new_tokens) :].unsqueeze(0)  # (1, P)
        n_new = min(new_tokens, limit - ids.shape[1])
        kw: dict[str, Any] = {
            "input_ids": ids,
            "max_new_tokens": n_new,
            "min_new_tokens": n_new,
            "do_sample": False,
            "use_cache": True,
            "pad_token_id": model.config.eos_token_id or 0,
            "attention_mask": torch.ones_like(ids),
        }
        model.generate(**kw)
        kwargs.append(kw)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(requests):
        for i, model in enumerate(models):
            t0 = time.perf_counter()
            model.generate(**kwargs[i])
            times[i].append(time.perf_counter() - t0)
    out = []
    for kw, ts in zip(kwargs, times, strict=True):
        ms = sorted(t * 1000 for t in ts)
        p95 = ms[min(len(ms) - 1, max(0, round(0.95 * len(ms)) - 1))]
        out.append((requests * kw["max_new_tokens"] / sum(ts), statistics.median(ms), p95))
    return out


def measure_models(
    models: list[PreTrainedModel],
    tokenizer: Any,
    held_out: str,
    *,
    max_tokens: int,
    prompt: str,
    new_tokens: int,
    requests: int,
) -> list[ModelMeasure]:
    """Size, speed and bits per byte of each model (on CPU, as a CPU server runs them), timed interleaved."""
    from forgeline.tasks.data.tokenization import encode_text

    models = [m.to("cpu") for m in models]
    prompt_ids = encode_text(tokenizer, prompt).long() if prompt else torch.zeros(0, dtype=torch.long)
    if prompt_ids.numel() == 0:
        prompt_ids = torch.tensor([models[0].config.eos_token_id or 0])
    timings = time_generation(models, prompt_ids, new_tokens=new_tokens, requests=requests)
    out = []
    for model, (rate, p50, p95) in zip(models, timings, strict=True):
        nats, _, n_bytes = score_text(
            model, tokenizer, held_out, block_size=int(model.config.n_positions), max_tokens=max_tokens
        )
        out.append(
            ModelMeasure(
                parameters=count_parameters(model),
                **footprint(model),
                tokens_per_sec=rate,
                latency_p50_ms=p50,
                latency_p95_ms=p95,
                bits_per_byte=bits_per_byte(nats, n_bytes),
            )
        )
    return out


def relative_drop(teacher_metric: float, student_metric: float, *, higher_is_better: bool = False) -> float:
    """How much worse the student is, relative to the teacher (0.1 = 10% worse; negative: better).

    For a lower-is-better metric (bits per byte) worse is higher; for a higher-is-better one (F1) lower.
    """
    drop = (student_metric - teacher_metric) / abs(teacher_metric)
    return -drop if higher_is_better else drop


def tradeoff_table(teacher: BaseModel, student: BaseModel) -> dict[str, list[Any]]:
    """Teacher against student, one row per quantity, as columns (what ``mlflow.log_table`` takes).

    The rows are the measure's fields: a language model's (:class:`ModelMeasure`, tokens per second and bits
    per byte) or a classifier's (:class:`~.classify.ClassifierMeasure`, records per second and macro F1).
    """
    rows = list(type(teacher).model_fields)
    t, s = teacher.model_dump(), student.model_dump()
    return {
        "quantity": rows,
        "teacher": [t[k] for k in rows],
        "student": [s[k] for k in rows],
        "student/teacher": [round(s[k] / t[k], 4) if t[k] else None for k in rows],
    }


def tradeoff_markdown(table: dict[str, list[Any]]) -> str:
    """The table as markdown (the model card's body)."""
    lines = ["| quantity | teacher | student | student/teacher |", "|---|---|---|---|"]
    for q, t, s, r in zip(table["quantity"], table["teacher"], table["student"], table["student/teacher"], strict=True):
        lines.append(f"| {q} | {_fmt(t)} | {_fmt(s)} | {_fmt(r)} |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)
