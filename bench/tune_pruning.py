"""Tuning benchmark: a pruned search against the same search unpruned and against the hand-set recipe.

On Tiny Shakespeare with ``configs/shakespeare_char.yaml`` (nanoGPT's CPU recipe, 2000 steps):

* ``untuned``: the recipe as written, trained for its full ``train.max_steps``.
* ``search, no pruning`` / ``search, median pruning``: the same TPE search (same seed, same space,
  ``--trials`` trials of ``--trial-steps`` steps each), then the best parameters trained for the
  recipe's full ``train.max_steps``.

Reported per row: best validation loss of the search (trial length), total search steps spent, search
wall time, and the validation loss of the full-length training (equal steps to the untuned row). The
claims to check: pruning reaches the same best trial loss for clearly fewer steps, and the tuned
parameters beat the recipe at an equal number of training steps. No MLflow or Prefect involved: this
measures the search itself (``forgeline.tasks.tune``) and the training loop.

    .venv/bin/python bench/tune_pruning.py            # full: 8 trials x 500 steps per search, ~30-40 min on 2 cores
    .venv/bin/python bench/tune_pruning.py --smoke    # < 60 s: a 1-layer model, 4 trials x 20 steps (checks it works)

Results go to ``bench/results/tune_pruning[-smoke].json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_step import train_pipeline  # noqa: E402

from forgeline.tasks.config import PipelineConfig, load_config  # noqa: E402
from forgeline.tasks.data.cleaning import clean_dataset  # noqa: E402
from forgeline.tasks.tune import space, workers  # noqa: E402
from forgeline.tasks.tune import study as studies  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RESULTS = ROOT / "bench" / "results"
logger = logging.getLogger("bench.tune_pruning")

SEARCH_SPACE: dict[str, Any] = {
    "train.learning_rate": {"type": "float", "low": 3.0e-4, "high": 1.0e-2, "log": True},
    "model.dropout": {"type": "float", "low": 0.0, "high": 0.2},
    "train.beta2": {"type": "categorical", "choices": [0.95, 0.99]},
}


def bench_config(args: argparse.Namespace, work: Path) -> PipelineConfig:
    """The recipe plus the tune block; ``--smoke`` shrinks model and steps."""
    overrides = [
        f"data.sources=[{{kind: files, paths: ['{SHAKESPEARE}']}}]",
        f"data.cache_dir={work / 'cache'}",
        f"train.checkpoint_dir={work / 'checkpoints'}",
        "train.compile=false",
    ]
    if args.smoke:
        overrides += [
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.block_size=32",
            "train.batch_size=8",
            "train.max_steps=40",
            "train.lr_decay_steps=40",
            "train.warmup_steps=4",
            "train.eval_interval=20",
            "train.eval_batches=2",
            "train.checkpoint_interval=1000",
        ]
    cfg = load_config(ROOT / "configs" / "shakespeare_char.yaml", overrides)
    tree = cfg.model_dump(mode="json")
    tree["tune"] = {
        "n_trials": args.trials,
        "max_steps": args.trial_steps,
        "eval_interval": args.eval_interval,
        "startup_trials": args.startup_trials,
        "storage": f"sqlite:///{work / 'optuna.db'}",
        "search_space": SEARCH_SPACE,
    }
    return PipelineConfig.model_validate(tree)


def train_full(cfg: PipelineConfig, dataset_dir: str, run_dir: Path) -> dict[str, Any]:
    """Train ``cfg`` for its full ``train.max_steps``; validation loss and wall time."""
    t0 = time.perf_counter()
    result = train_pipeline(cfg, dataset_dir, run_dir)
    return {
        "steps": result.steps,
        "best_val_loss": result.best_val_loss,
        "final_val_loss": result.final_val_loss,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_search(cfg: PipelineConfig, pruner: str, dataset_dir: str, fingerprint: str, work: Path) -> dict[str, Any]:
    """One search with ``pruner``, then its best parameters trained at full length."""
    searched = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"pruner": pruner})})
    spec = studies.build_spec(searched, dataset_dir, fingerprint, trials_root=work / f"trials-{pruner}")
    t0 = time.perf_counter()
    result = workers.run_study(spec)
    search_seconds = time.perf_counter() - t0
    result.require_best()
    final = train_full(space.apply_params(cfg, result.best_params), dataset_dir, work / f"final-{pruner}")
    return {
        "pruner": pruner,
        "trials": result.counts,
        "search_steps": result.steps_spent,
        "search_seconds": round(search_seconds, 1),
        "best_trial_val_loss": result.best_value,
        "best_params": result.best_params,
        "final": final,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'variant':<26}{'trials c/p/f':>14}{'search steps':>14}{'search s':>10}"
        f"{'best trial val':>16}{'full-run val':>14}{'full steps':>12}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        counts = row.get("trials")
        cpf = f"{counts['complete']}/{counts['pruned']}/{counts['failed']}" if counts else "-"
        best = f"{row['best_trial_val_loss']:.4f}" if row.get("best_trial_val_loss") is not None else "-"
        lines.append(
            f"{row['variant']:<26}{cpf:>14}{row.get('search_steps', 0):>14}{row.get('search_seconds', 0):>10}"
            f"{best:>16}{row['final']['best_val_loss']:>14.4f}{row['final']['steps']:>12}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and budgets: checks the script works")
    parser.add_argument("--trials", type=int, default=None, help="trials per search (default 8; smoke 4)")
    parser.add_argument("--trial-steps", type=int, default=None, help="steps per trial (default 500; smoke 30)")
    parser.add_argument("--eval-interval", type=int, default=None, help="trial evaluation interval (default 50)")
    parser.add_argument("--startup-trials", type=int, default=2, help="trials before the pruner may stop one")
    parser.add_argument("--out", type=Path, default=None, help="JSON output file")
    args = parser.parse_args()
    args.trials = args.trials or (4 if args.smoke else 8)
    args.trial_steps = args.trial_steps or (20 if args.smoke else 500)
    args.eval_interval = args.eval_interval or (5 if args.smoke else 50)
    args.startup_trials = 1 if args.smoke else args.startup_trials
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    if not SHAKESPEARE.exists():
        print(f"Tiny Shakespeare not found at {SHAKESPEARE}", file=sys.stderr)
        return 2
    import optuna
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forgeline-bench-tune-") as tmp:
        work = Path(tmp)
        cfg = bench_config(args, work)
        cleaned = clean_dataset(cfg.data, base_dir=ROOT)
        logger.info("untuned recipe: %d steps", cfg.train.max_steps)
        rows: list[dict[str, Any]] = [
            {"variant": "untuned recipe", "final": train_full(cfg, cleaned.dataset_dir, work / "untuned")}
        ]
        for pruner, label in (("none", "search, no pruning"), ("median", "search, median pruning")):
            logger.info("%s: %d trials x %d steps", label, args.trials, args.trial_steps)
            rows.append({"variant": label, **run_search(cfg, pruner, cleaned.dataset_dir, cleaned.fingerprint, work)})
    report = {
        "benchmark": "tune_pruning",
        "smoke": args.smoke,
        "data": str(SHAKESPEARE),
        "recipe": "configs/shakespeare_char.yaml" + (" (smoke-shrunk)" if args.smoke else ""),
        "trials_per_search": args.trials,
        "trial_steps": args.trial_steps,
        "trial_eval_interval": args.eval_interval,
        "full_steps": cfg.train.max_steps,
        "search_space": SEARCH_SPACE,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "device": _device()},
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    print(table(rows))
    print(f"total {report['total_seconds']} s")
    out = args.out or RESULTS / ("tune_pruning-smoke.json" if args.smoke else "tune_pruning.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return 0


def _device() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


if __name__ == "__main__":
    sys.exit(main())
