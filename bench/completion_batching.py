"""Prompt -> completion training: padding per batch vs packing, in completion (target) tokens per second.

Pairs are the built-in ``python-docstrings`` corpus, repeated to ``--pairs``; a byte-level BPE tokenizer is trained
on them and a tiny GPT-2 takes AdamW steps on CPU. *padding*: random batches of ``--batch`` examples, right-padded
to the longest (``tasks/train/completion.py``); *grouped*: the same, examples of similar length batched together
(``pair_batches(group_by_length=True)``). *packing*: whole examples laid end to end in rows of ``--block``
tokens, kept apart by position ids that restart per example (``pack_batches``), ``--batch * mean length / block``
rows a step (about as many real tokens a step). Each layout runs ``--steps`` steps per round, rounds
interleaved; the best round counts.

    .venv/bin/python bench/completion_batching.py                 # 5k pairs, 3 rounds
    .venv/bin/python bench/completion_batching.py --smoke         # seconds
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from forgeline.tasks.config import TokenizerConfig
from forgeline.tasks.data.builtin import docstring_pairs
from forgeline.tasks.data.tokenization import build_tokenizer
from forgeline.tasks.train.completion import IGNORE_INDEX, completion_loss, encode_pairs, pack_batches, pair_batches


def run(model: GPT2LMHeadModel, batches: list[dict], steps: int) -> tuple[float, int]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    real = 0
    start = time.perf_counter()
    for batch in batches[:steps]:
        loss, _ = completion_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += int((batch["labels"] != IGNORE_INDEX).sum())
    return time.perf_counter() - start, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", default=["padding", "grouped", "packing"])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.steps, args.rounds = 300, 3, 1
    torch.set_num_threads(args.threads)
    pairs = docstring_pairs()
    pairs = (pairs * (args.pairs // len(pairs) + 1))[: args.pairs]
    prompts, completions = [p["prompt"] for p in pairs], [p["completion"] for p in pairs]
    tokenizer = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=1024), prompts + completions)
    encoded = encode_pairs(tokenizer, prompts, completions, block_size=args.block)
    lengths = [len(r) for r in encoded.input_ids]
    mean = sum(lengths) / len(lengths)
    padded = pair_batches(encoded, args.batch, tokenizer.pad_token_id, seed=0, group_by_length=False)
    grouped = pair_batches(encoded, args.batch, tokenizer.pad_token_id, seed=0)
    rows = max(1, round(args.batch * mean / args.block))
    packed = pack_batches(encoded, args.block, rows, tokenizer.pad_token_id, seed=0)
    print(f"{len(encoded)} pairs kept of {args.pairs}, mean {mean:.1f} tokens")
    for name, batches in (("padding", padded), ("grouped", grouped), ("packing", packed)):
        real = sum(len(encoded.input_ids[i]) for i in range(len(encoded)))
        share = 1 - real / sum(b["input_ids"].numel() for b in batches)
        print(f"{name}: padding share {share:.1%}")
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.block, n_embd=128, n_layer=4, n_head=4,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, batches in (("padding", padded), ("grouped", grouped), ("packing", packed)):
            if name not in args.layouts:
                continue
            torch.manual_seed(0)
            seconds, real = run(GPT2LMHeadModel(config).train(), batches, args.steps)
            best[name] = max(best.get(name, 0.0), real / seconds)
    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in padded)
    print(f"completion target tokens per epoch: {targets}")
    print("| layout | completion tokens/s (best of rounds) |\n|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
