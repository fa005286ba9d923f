"""The text classification demo (configs/ml_projects*.yaml) measured: scratch vs pretrained, over seeds.

For each seed: pretrain the language model (configs/ml_projects_lm.yaml), fine-tune the classifier from it
(configs/ml_projects.yaml), and train the same classifier from scratch (``model.init_from=null``). Every
run's TF-IDF baseline is scored on the same test split. Prints one row a run and the mean over seeds, then
checks that no classifier test or validation text is in the language model's training split.

Run from the repository root (the configs read ``../shared/data/ml-projects/dataset.csv``):

    .venv/bin/python bench/ml_projects.py                       # 3 seeds, each run's own short search
    .venv/bin/python bench/ml_projects.py --seeds 1337 1338 1339 --no-tune --lm-once   # BENCHMARKS.md section 10
    .venv/bin/python bench/ml_projects.py --seeds 1 --no-tune --set train.max_steps=10   # a smoke run, minutes

With ``--lm-once`` one language model (the first seed's) is the backbone of every seed's classifier. Each
language model registers under its own name (``ml-projects-lm-bench-s<SEED>``) and the classifiers go to
``ml-projects-bench``, so the demo's own registered models are left alone.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import forgeline
from forgeline.tasks.config import parse_override as forgeline_override
from forgeline.tasks.data.cleaning import clean_dataset, iter_split

METRICS = ("test/f1_weighted", "test/f1_macro", "test/accuracy", "baseline/f1_weighted", "baseline/accuracy")
LM_CONFIG, CLS_CONFIG = "configs/ml_projects_lm.yaml", "configs/ml_projects.yaml"


def run_one(config: str, overrides: dict[str, object]) -> tuple[dict[str, float], float]:
    """One fresh ``forgeline run``: its metrics and its wall seconds."""
    start = time.perf_counter()
    result = forgeline.run(config, overrides, fresh=True)
    return result.metrics, time.perf_counter() - start


def leaked_texts(seed: int) -> int:
    """Classifier validation and test texts found in the language model's training split (should be 0)."""
    lm = forgeline.load_config(LM_CONFIG, {"seed": seed})
    cls = forgeline.load_config(CLS_CONFIG, {"seed": seed})
    lm_train = set(iter_split(clean_dataset(lm.data, base_dir=Path.cwd()).dataset_dir, "train"))
    held_out = clean_dataset(cls.data, base_dir=Path.cwd()).dataset_dir
    return sum(text in lm_train for split in ("validation", "test") for text in iter_split(held_out, split))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--no-tune", action="store_true", help="Skip the classifiers' search (tune.n_trials=0).")
    parser.add_argument("--lm-once", action="store_true", help="One language model for every classifier seed.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override, every run.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    extra = dict(forgeline_override(line) for line in args.set)
    tune = {"tune.n_trials": 0} if args.no_tune else {}
    rows: list[tuple[str, int, dict[str, float], float]] = []
    lm_name = ""
    for seed in args.seeds:
        if not (args.lm_once and lm_name):
            lm_name = f"ml-projects-lm-bench-s{seed}"
            lm_metrics, lm_wall = run_one(LM_CONFIG, {"seed": seed, "registry.model_name": lm_name, **extra})
            loss = lm_metrics.get("test/loss", float("nan"))
            print(f"seed {seed}: language model {lm_name} test/loss {loss:.3f}, {lm_wall:.0f} s wall")
        common = {"seed": seed, "registry.model_name": "ml-projects-bench", **tune, **extra}
        pre, pre_wall = run_one(CLS_CONFIG, {**common, "model.init_from": f"models:/{lm_name}@champion"})
        rows.append(("pretrained", seed, pre, pre_wall))
        scratch, scratch_wall = run_one(CLS_CONFIG, {**common, "model.init_from": None})
        rows.append(("scratch", seed, scratch, scratch_wall))
        print(f"seed {seed}: classifier validation/test texts in the LM's training split: {leaked_texts(seed)}")

    header = f"{'variant':<11} {'seed':>5} " + " ".join(f"{m:>20}" for m in METRICS) + f" {'wall s':>7}"
    print("\nwall s: the classifier's run (each language model's is printed above)\n" + header)
    for variant, seed, metrics, wall in rows:
        values = " ".join(f"{metrics.get(m, float('nan')):>20.3f}" for m in METRICS)
        print(f"{variant:<11} {seed:>5} {values} {wall:>7.0f}")
    for variant in ("pretrained", "scratch"):
        mine = [(m, w) for v, _, m, w in rows if v == variant]
        means = " ".join(f"{statistics.fmean(r[0].get(m, float('nan')) for r in mine):>20.3f}" for m in METRICS)
        print(f"{variant:<11} {'mean':>5} {means} {statistics.fmean(w for _, w in mine):>7.0f}")


if __name__ == "__main__":
    main()
