"""Where a training step goes at nanoGPT's CPU size: the GPT-2 module, variant by variant, against nanoGPT's model.

Each variant trains the same batches for ``--steps`` steps (same loop: random windows, loss from the
logits, clip, AdamW), interleaved over ``--rounds`` rounds in one process; the table gives the median ms
per step of each round's steady state. Variants:

- ``gpt2 as before``: transformers' GPT-2 with biases, GPT-2's ``gelu_new`` written as five Python ops,
  AdamW ``foreach`` (what Forgeline built before ``model.activation`` / ``model.bias``);
- ``+ fused gelu``: the same function as one PyTorch op (``model.activation: gelu_new`` today);
- ``+ fused AdamW``: one optimizer kernel for every tensor (what ``make_optimizer`` does today);
- ``+ no biases``: ``model.bias: false``; ``+ exact gelu``: ``model.activation: gelu`` (configs/shakespeare_char.yaml);
- ``+ no KV cache``: the forward call the training loop makes (``use_cache=False``);
- ``nanoGPT's model by hand``: bench/nanogpt_reference.py's module, with foreach and with fused AdamW.

    .venv/bin/python bench/model_variants.py                 # 3 rounds x 120 steps, about 4 min
    .venv/bin/python bench/model_variants.py --smoke         # seconds: checks it works
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import nanogpt_reference as ref  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from train_step import corpus_text  # noqa: E402

from forgeline.tasks.config import ModelConfig, TokenizerConfig  # noqa: E402


def gpt2_variant(tokenizer: object, *, activation: str, bias: bool, legacy_gelu: bool) -> torch.nn.Module:
    from transformers import GPT2LMHeadModel

    from forgeline.tasks.model.modeling import build_model

    cfg = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, activation=activation, bias=bias)
    model = build_model(cfg, tokenizer)
    if legacy_gelu:  # the same weights in a GPT-2 whose MLP runs gelu_new op by op
        config = model.config.__class__.from_dict({**model.config.to_dict(), "activation_function": "gelu_new"})
        legacy = GPT2LMHeadModel(config)
        legacy.load_state_dict(model.state_dict())
        model = legacy
    return model


def run(model: torch.nn.Module, forward: Callable, data: torch.Tensor, steps: int, fused: bool) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), fused=fused)
    gen = torch.Generator().manual_seed(2)
    model.train()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        starts = torch.randint(len(data) - 65, (12,), generator=gen)
        window = data[starts[:, None] + torch.arange(65)]
        x, y = window[:, :-1], window[:, 1:]
        loss = F.cross_entropy(forward(model, x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[min(20, steps // 3) :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "model_variants.json")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 6, 1
    from forgeline.tasks.data.tokenization import build_tokenizer

    text = corpus_text()
    tokenizer = build_tokenizer(TokenizerConfig(kind="char"), [text])
    data = torch.tensor(tokenizer(text[:900_000])["input_ids"], dtype=torch.long)
    hf = lambda m, x: m(input_ids=x).logits  # noqa: E731
    hf_no_cache = lambda m, x: m(input_ids=x, use_cache=False).logits  # noqa: E731
    by_hand = lambda m, x: m(x)  # noqa: E731 - the reference module gives logits without targets

    def gpt2(activation: str, bias: bool, legacy_gelu: bool = False) -> Callable[[], torch.nn.Module]:
        return lambda: gpt2_variant(tokenizer, activation=activation, bias=bias, legacy_gelu=legacy_gelu)

    # name: (model builder, forward, fused AdamW); each GPT-2 row adds one change to the row above
    variants: dict[str, tuple[Callable[[], torch.nn.Module], Callable, bool]] = {
        "gpt2 as before": (gpt2("gelu_new", bias=True, legacy_gelu=True), hf, False),
        "+ fused gelu": (gpt2("gelu_new", bias=True), hf, False),
        "+ fused AdamW": (gpt2("gelu_new", bias=True), hf, True),
        "+ no biases": (gpt2("gelu_new", bias=False), hf, True),
        "+ exact gelu": (gpt2("gelu", bias=False), hf, True),
        "+ no KV cache": (gpt2("gelu", bias=False), hf_no_cache, True),
        "nanoGPT's model by hand, foreach AdamW": (lambda: ref.GPT(len(tokenizer)), by_hand, False),
        "nanoGPT's model by hand, fused AdamW": (lambda: ref.GPT(len(tokenizer)), by_hand, True),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (build, forward, fused) in variants.items():
            torch.manual_seed(1)
            results[name].append(run(build(), forward, data, args.steps, fused))
    base = statistics.median(results["gpt2 as before"])
    print(f"{'variant':42} {'median ms':>9} {'min':>7} {'max':>7} {'n':>2} {'vs before':>9}")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:42} {med:9.2f} {min(values):7.2f} {max(values):7.2f} {len(values):2d} {med / base:9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({**payload, "median ms per step": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
