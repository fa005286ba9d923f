"""Held-out scoring (loss, perplexity, bits per byte) and seeded sample generations.

Scoring is nanoGPT-style: the token stream is cut into consecutive, non-overlapping windows of
``block_size`` inputs, each predicting the next ``block_size`` tokens, and cross-entropy is computed here
from the logits (never through the model's own ``labels=``, which would shift and drop one target per
window). Every token but the first is predicted exactly once.

Bits per byte divides the summed nats by ``ln 2`` and by the UTF-8 bytes of the text those predicted tokens
cover, so char and BPE models compare on the same scale. The byte count is exact for the char tokenizer (ids
align with code points) and for byte-level BPE tokenizers (each vocabulary symbol is one byte); for any other
tokenizer it is estimated as ``total_bytes * predicted_tokens / total_tokens``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from forgeline.tasks.config import EvalConfig
from forgeline.tasks.data.tokenization import encode_text, is_char_tokenizer
from forgeline.tasks.train.batches import lm_logits

log = logging.getLogger(__name__)

_BYTE_TABLE_ATTR = "_forgeline_byte_table"


class EvalResult(BaseModel):
    """Scores of one model on one held-out text, plus sample generations."""

    loss: float
    """Mean nats per predicted token."""
    perplexity: float
    """``exp(loss)``."""
    bits_per_byte: float
    """Summed nats / ln 2 / UTF-8 bytes covered by the predicted tokens."""
    tokens: int
    """Predicted tokens scored."""
    bytes: int
    """UTF-8 bytes those tokens cover."""
    samples: list[dict]
    """``[{"prompt": ..., "text": ...}]``; ``text`` is the continuation only."""

    @property
    def metrics(self) -> dict[str, float]:
        """The headline scores under their MLflow names; every task's result has ``metrics`` (the gate reads it)."""
        return {"test/loss": self.loss, "test/perplexity": self.perplexity, "test/bits_per_byte": self.bits_per_byte}


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Convert summed nats to bits per byte.

    Args:
        total_nats: Summed negative log-likelihood in nats.
        n_bytes: UTF-8 bytes of the text scored.

    Returns:
        ``total_nats / ln(2) / n_bytes``.

    Raises:
        ValueError: If ``n_bytes`` is not positive.
    """
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return total_nats / math.log(2) / n_bytes


LOGIT_BUDGET = 2**26
"""Floats of logits in one scoring batch (256 MB in float32): bounds a large vocabulary's memory."""


def score_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    block_size: int,
    max_tokens: int,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[float, int, int]:
    """Sum the model's negative log-likelihood over a text, in non-overlapping windows.

    The text is encoded and cut to ``max_tokens + 1`` tokens; window ``k`` feeds ``ids[i:i+T]`` and scores
    ``ids[i+1:i+T+1]`` (``T = block_size``, the last window may be shorter). The model must already be on
    ``device``; its train/eval mode is restored afterwards.

    Args:
        model: A causal LM whose ``forward(input_ids=...)`` returns ``.logits``.
        tokenizer: Its tokenizer.
        text: The held-out text.
        block_size: Window length (cropped to the model's positions if larger).
        max_tokens: Most tokens to predict.
        batch_size: Windows per forward pass; default: as many as keep one batch's logits near 256 MB
            (:data:`LOGIT_BUDGET`), at most 256 (a char model's whole batch; GPT-2 small at 1024 tokens: 1).
        device: Where the inputs go.

    Returns:
        ``(total_nats, n_tokens_predicted, n_bytes_covered)``; all zero when fewer than 2 tokens.
    """
    if block_size < 1 or (batch_size is not None and batch_size < 1) or max_tokens < 1:
        raise ValueError("block_size, batch_size and max_tokens must be positive")
    all_ids = encode_text(tokenizer, text)
    ids = all_ids[: max_tokens + 1]
    n = int(ids.numel())
    if n < 2:
        return 0.0, 0, 0
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    T = min(block_size, limit) if isinstance(limit, int) else block_size
    if batch_size is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
        batch_size = max(1, min(256, LOGIT_BUDGET // (T * vocab)))
    n_pred = n - 1
    n_full = n_pred // T
    windows: list[tuple[torch.Tensor, torch.Tensor]] = []
    if n_full:
        x_all = ids[: n_full * T].view(n_full, T)
        y_all = ids[1 : n_full * T + 1].view(n_full, T)
        for start in range(0, n_full, batch_size):
            windows.append((x_all[start : start + batch_size], y_all[start : start + batch_size]))
    if n_pred % T:
        windows.append((ids[n_full * T : n - 1].unsqueeze(0), ids[n_full * T + 1 : n].unsqueeze(0)))
    total = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in windows:
                x, y = x.to(device), y.to(device)
                logits = lm_logits(model, x)  # the training forward: no KV cache to fill, no output objects
                nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
                total += nll.sum(dtype=torch.float64)
    finally:
        model.train(was_training)
    n_bytes = _bytes_covered(tokenizer, text, all_ids, n)
    return float(total.item()), n_pred, n_bytes


def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    device: str | torch.device = "cpu",
    block_size: int | None = None,
) -> list[dict]:
    """Sample a continuation of each prompt, reproducibly for a given seed.

    A simple loop (no KV cache): the context is cropped to the last ``block_size`` tokens, logits are divided
    by ``temperature``, restricted to the ``top_k`` best, and sampled with a private ``torch.Generator``
    (global RNG untouched). A sampled eos token ends that prompt's continuation. An empty prompt starts from
    the eos token. The model must already be on ``device``.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        prompts: Prompts, each sampled in turn from the same generator.
        max_new_tokens: Tokens to sample per prompt.
        temperature: Softmax temperature (> 0).
        top_k: Keep only the k most likely tokens; None keeps all.
        seed: Generator seed.
        device: Where the inputs go.
        block_size: Context crop; defaults to the model's ``n_positions``.

    Returns:
        ``[{"prompt": prompt, "text": continuation}]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if block_size is None:
        block_size = getattr(getattr(model, "config", None), "n_positions", None) or 1024
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    eos_id = tokenizer.eos_token_id
    samples: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for prompt in prompts:
                ids = encode_text(tokenizer, prompt)
                if ids.numel() == 0:
                    ids = torch.tensor([eos_id if eos_id is not None else 0], dtype=torch.long)
                seq = ids.to(device).unsqueeze(0)
                new: list[int] = []
                for _ in range(max_new_tokens):
                    # The training forward: no KV cache built and dropped each token (a third of a char model's call)
                    logits = lm_logits(model, seq[:, -block_size:])[:, -1, :].float() / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = torch.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                    token = int(nxt.item())
                    if eos_id is not None and token == eos_id:
                        break
                    new.append(token)
                    seq = torch.cat([seq, nxt], dim=1)
                text = tokenizer.decode(new, skip_special_tokens=True)
                samples.append({"prompt": prompt, "text": text})
    finally:
        model.train(was_training)
    return samples


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    cfg: EvalConfig,
    *,
    block_size: int,
    seed: int,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """Score a held-out text and generate samples from the configured prompts.

    Args:
        model: A causal LM, already on ``device``.
        tokenizer: Its tokenizer.
        text: Held-out text.
        cfg: Evaluation settings (token cap, prompts, sampling).
        block_size: Scoring window and generation context.
        seed: Sampling seed.
        device: Where the inputs go.

    Returns:
        The scores and samples.

    Raises:
        ValueError: If the text yields fewer than two tokens.
    """
    total_nats, n_tokens, n_bytes = score_text(
        model, tokenizer, text, block_size=block_size, max_tokens=cfg.max_tokens, device=device
    )
    if n_tokens == 0 or n_bytes == 0:
        raise ValueError("evaluation text is too short: fewer than two tokens to score")
    loss = total_nats / n_tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf
    samples = generate_samples(
        model,
        tokenizer,
        cfg.prompts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        seed=seed,
        device=device,
        block_size=block_size,
    )
    result = EvalResult(
        loss=loss,
        perplexity=perplexity,
        bits_per_byte=bits_per_byte(total_nats, n_bytes),
        tokens=n_tokens,
        bytes=n_bytes,
        samples=samples,
    )
    log.info(
        "eval: loss %.4f, ppl %.2f, %.4f bits/byte over %d tokens (%d bytes)",
        result.loss,
        result.perplexity,
        result.bits_per_byte,
        n_tokens,
        n_bytes,
    )
    return result


# ------------------------------------------------------------------------------------------- private
def _bytes_covered(tokenizer: PreTrainedTokenizerBase, text: str, all_ids: torch.Tensor, n: int) -> int:
    """UTF-8 bytes of the text covered by tokens ``1..n-1`` of ``all_ids`` (token 0 is never predicted)."""
    if is_char_tokenizer(tokenizer):
        # ids align with code points: tokens 1..n-1 are text[1:n].
        return len(text[1:n].encode("utf-8", errors="surrogatepass"))
    table = _byte_table(tokenizer)
    if table is not None:
        return int(table[all_ids[1:n].numpy()].sum())
    n_total = int(all_ids.numel())
    total_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    return round(total_bytes * (n - 1) / n_total)


def _byte_table(tokenizer: PreTrainedTokenizerBase) -> np.ndarray | None:
    """Per-id byte lengths for byte-level BPE tokenizers (one vocabulary symbol = one byte), else None."""
    cached = tokenizer.__dict__.get(_BYTE_TABLE_ATTR, False)
    if cached is not False:
        return cached
    table: np.ndarray | None = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel" and backend.normalizer is None:
        vocab = backend.get_vocab(with_added_tokens=False)
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        size = max([*vocab.values(), *added.keys(), -1]) + 1
        table = np.zeros(size, dtype=np.int64)
        for token, i in vocab.items():
            table[i] = len(token)
        for i, content in added.items():
            table[i] = len(content.encode("utf-8"))
    tokenizer.__dict__[_BYTE_TABLE_ATTR] = table
    return table
