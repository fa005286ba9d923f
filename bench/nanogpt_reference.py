"""The hand-written script Forgeline is measured against: nanoGPT's CPU Shakespeare-char recipe, by hand.

Written for this benchmark (no nanoGPT code is vendored), following nanoGPT's ``train.py`` and ``model.py``
as its README's CPU command runs them: character tokens from the first 90% of the text (the last 10%
validates), a GPT with no biases and the exact GELU, weights tied, N(0, 0.02) init with the residual
projections scaled by 1/sqrt(2 * n_layer), random windows read from a ``uint16`` memmap on every step,
AdamW (not fused on CPU, as nanoGPT) with decay on matrices only, warm-up then cosine decay, gradients
clipped at 1.0, and ``estimate_loss`` on 20 random train and validation batches every 250 steps.

    .venv/bin/python bench/nanogpt_reference.py --data ../shared/data/tinyshakespeare/input.txt --out ref.json

The JSON holds the whole process's wall time (from interpreter start, imports included), the
steady-state ms per step, the validation losses with the seconds since start at which each was
measured, and the loss over the whole validation text (non-overlapping windows), computed the way
Forgeline's evaluate stage computes it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

T_START = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# nanoGPT's config/train_shakespeare_char.py with the README's CPU flags
BATCH, BLOCK, LAYERS, HEADS, WIDTH = 12, 64, 4, 4, 128
STEPS, LR, MIN_LR, WARMUP, DECAY_STEPS = 2000, 1e-3, 1e-4, 100, 2000
WEIGHT_DECAY, BETAS, GRAD_CLIP = 0.1, (0.9, 0.99), 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH, bias=False)
        self.c_attn = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.attn_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.ln_2 = nn.LayerNorm(WIDTH, bias=False)
        self.c_fc = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
        self.mlp_proj = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, WIDTH)
        self.wpe = nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.lm_head = nn.Linear(WIDTH, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith("_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The loss against ``targets``; the logits when there are none."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def prepare(text: str, folder: Path) -> int:
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    for split, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{split}.bin")
    return len(chars)


def get_batch(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.memmap(folder / f"{split}.bin", dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT
    ix = torch.randint(len(data) - BLOCK, (BATCH,))
    x = torch.stack([torch.from_numpy(data[i : i + BLOCK].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + BLOCK].astype(np.int64)) for i in ix])
    return x, y


@torch.no_grad()
def estimate_loss(model: GPT, folder: Path) -> dict[str, float]:
    model.eval()
    out = {}
    for split in ("train", "val"):
        out[split] = torch.stack([model(*get_batch(folder, split)) for _ in range(EVAL_ITERS)]).mean().item()
    model.train()
    return out


@torch.no_grad()
def whole_text_loss(model: GPT, folder: Path) -> float:
    data = torch.from_numpy(np.fromfile(folder / "val.bin", dtype=np.uint16).astype(np.int64))
    n = (len(data) - 1) // BLOCK * BLOCK
    x, y = data[:n].view(-1, BLOCK), data[1 : n + 1].view(-1, BLOCK)
    model.eval()
    total = sum(model(x[i : i + 64], y[i : i + 64]).item() * len(x[i : i + 64]) for i in range(0, len(x), 64))
    return total / len(x)


def get_lr(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY_STEPS:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY_STEPS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Tiny Shakespeare input.txt")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, required=True, help="JSON result file")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="nanogpt-ref-") as tmp:
        folder = Path(tmp)
        model = GPT(prepare(args.data.read_text(encoding="utf-8"), folder))
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
        evals, step_s = [], []
        for it in range(args.steps + 1):
            if it % EVAL_INTERVAL == 0 or it == args.steps:
                losses = estimate_loss(model, folder)
                evals.append({"step": it, "val": losses["val"], "train": losses["train"], "t": time.time() - T_START})
            if it == args.steps:
                break
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = get_lr(it)
            loss = model(*get_batch(folder, "train"))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            step_s.append(time.perf_counter() - t0)
        wall = time.time() - T_START
        result = {
            "seed": args.seed,
            "steps": args.steps,
            "wall_s": wall,
            "ms_per_step": 1000 * statistics.median(step_s[10:] or step_s),
            "evals": evals,
            "final_val": evals[-1]["val"],
            "whole_val_loss": whole_text_loss(model, folder),
        }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
