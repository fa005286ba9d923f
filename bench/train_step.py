"""Training-step benchmark: the pipeline's loop (tracking on) against a bare PyTorch loop.

Same model (transformers GPT-2 at nanoGPT's Shakespeare-char CPU size), same batches, same optimizer
settings, interleaved in one process: bare, pipeline, bare, pipeline, ... Each round reports the median
milliseconds per step over its steady-state steps; the table gives median, min-max, n and the ratio.

    .venv/bin/python bench/train_step.py                 # 4 rounds x 150 steps
    .venv/bin/python bench/train_step.py --smoke         # seconds: checks it works (CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from forgeline.tasks.config import PipelineConfig, load_config  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def corpus_text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text(encoding="utf-8")
    import pydoc_data.topics

    return "\n".join(pydoc_data.topics.topics.values())


def make_dataset(tmp: Path, text: str | None = None) -> str:
    """A tail-split dataset folder in the cleaned layout (Arrow splits), without running the cleaning stage."""
    import datasets

    text = corpus_text() if text is None else text
    n = len(text)
    out = tmp / "dataset"
    features = datasets.Features({"text": datasets.Value("string")})
    parts = {"train": text[: int(n * 0.9)], "validation": text[int(n * 0.9) :], "test": ""}
    splits = {
        name: datasets.Dataset.from_dict({"text": [part] if part else []}, features=features)
        for name, part in parts.items()
    }
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return str(out)


def bare_loop(cfg: PipelineConfig, train_data: torch.Tensor, tokenizer: object, steps: int) -> list[float]:
    """The loop a person would write by hand: no tracking, no checkpoints, no callbacks."""
    from forgeline.tasks.model.modeling import build_model
    from forgeline.tasks.train.batches import lm_loss, sample_batch
    from forgeline.tasks.train.schedule import get_lr, make_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, tokenizer)
    model.train()
    opt = make_optimizer(model, cfg.train, torch.device("cpu"))
    gen = torch.Generator().manual_seed(cfg.seed)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg.train)
        x, y = sample_batch(train_data, cfg.train.batch_size, cfg.model.block_size, gen)
        loss = lm_loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def train_pipeline(cfg: PipelineConfig, dataset_dir: str, run_dir: Path, callbacks: object = None) -> object:
    """The pipeline's training loop on ``cfg``'s slices, as the train stage calls it (``train_task_model``)."""
    from forgeline.tasks.train.kinds import train_task_model

    return train_task_model(cfg, dataset_dir, run_dir, callbacks)


def pipeline_loop(cfg: PipelineConfig, dataset_dir: str, run_dir: Path, run_id: str) -> list[float]:
    """``train_model`` with the pipeline's real tracking callbacks (batched MLflow metrics)."""
    from forgeline.tasks.tracking.metrics import MetricBuffer
    from forgeline.tasks.train.loop import TrainCallbacks

    stamps: list[tuple[int, float]] = []
    buffer = MetricBuffer(run_id, flush_every=cfg.tracking.metric_flush_interval)

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        buffer.add(step, metrics)
        if "tokens_per_sec" in metrics:  # a log step: the steps since the last one arrive together, at its end
            stamps.append((step, time.perf_counter()))

    train_pipeline(cfg, dataset_dir, run_dir, TrainCallbacks(on_metrics=on_metrics))
    buffer.close()
    # Each step of an interval gets the interval's mean time, so the list lines up with the bare loop's.
    times: list[float] = []
    for (s0, t0), (s1, t1) in zip(stamps, stamps[1:], strict=False):
        times += [(t1 - t0) / (s1 - s0)] * (s1 - s0)
    return times


def steady(times: list[float], skip: int) -> float:
    return statistics.median(times[skip:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of each loop")
    parser.add_argument("--smoke", action="store_true", help="tiny run that only checks the benchmark works")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_step.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    steps, rounds = (12, 1) if args.smoke else (args.steps, args.rounds)
    overrides = [
        f"train.max_steps={steps}",
        f"train.eval_interval={steps}",
        "train.eval_batches=2",
        f"train.checkpoint_interval={steps}",
        "train.device=cpu",
        "tracking.log_system_metrics=false",
        *(["train.log_interval=2"] if args.smoke else []),  # the pipeline's step times come at its log steps
    ]
    cfg = load_config(ROOT / "configs" / "shakespeare_char.yaml", overrides)

    from forgeline.tasks.tracking import store
    from forgeline.tasks.tracking.runs import stage_run
    from forgeline.tasks.train.tokens import load_token_splits, prepare_tokenizer

    bare_ms: list[float] = []
    pipe_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-") as tmp_str:
        tmp = Path(tmp_str)
        dataset_dir = make_dataset(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        store.setup_tracking(cfg.tracking, tmp)
        exp = store.ensure_experiment("bench-train-step", cfg.tracking, tmp)
        tokenizer = prepare_tokenizer(cfg.tokenizer, dataset_dir, tmp / "tok")
        train_data, _ = load_token_splits(tokenizer, dataset_dir, cfg.model.block_size)
        skip = min(10, steps // 3)
        for r in range(rounds):
            bare_ms.append(steady(bare_loop(cfg, train_data, tokenizer, steps), skip))
            with stage_run(exp, f"bench-{r}") as run_id:
                pipe_ms.append(steady(pipeline_loop(cfg, dataset_dir, tmp / f"run-{r}", run_id), skip))
    ratios = [b / p for b, p in zip(bare_ms, pipe_ms, strict=True)]
    rows = {
        "bare loop (ms/step)": bare_ms,
        "pipeline loop, tracking on (ms/step)": pipe_ms,
        "speed ratio pipeline/bare (higher is better)": ratios,
    }
    print(f"{'measure':48} {'median':>9} {'min':>9} {'max':>9} {'n':>3}")
    for name, vals in rows.items():
        print(f"{name:48} {statistics.median(vals):9.3f} {min(vals):9.3f} {max(vals):9.3f} {len(vals):3d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "steps": steps,
        "rounds": rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **{k: v for k, v in rows.items()},
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
