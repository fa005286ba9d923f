"""The two reference points of the docstrings demo, on its own test pairs (BENCHMARKS.md, section 11).

*copy_name*: every prompt answered with its function name; *most_common*: every prompt answered with the most
common completion of the training split. Both scored with the evaluation's own code (``score_generations``) on
the test split that ``configs/docstrings.yaml`` cleans, so they sit beside the trained model's figures.

    .venv/bin/python bench/docstrings_reference.py [--config configs/docstrings.yaml]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from forgeline.tasks.config import load_config
from forgeline.tasks.data.cleaning import clean_dataset
from forgeline.tasks.evaluate.generation_metrics import reference_points
from forgeline.tasks.train.complete import load_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/docstrings.yaml")
    args = parser.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        data = cfg.data.model_copy(update={"cache_dir": str(Path(tmp) / "cache")})
        cleaned = clean_dataset(data, base_dir=Path(tmp))
        prompts, references = load_pairs(cleaned.dataset_dir, "test")
        _, train_completions = load_pairs(cleaned.dataset_dir, "train")
    points = reference_points(prompts, references, train_completions=train_completions)
    print(f"{len(prompts)} test pairs ({args.config})")
    print("| predictor | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L | exact match | chrF |")
    print("|---|---|---|---|---|---|---|")
    for name, s in points.items():
        cells = [f"{s.bleu:.2f}", *(f"{v:.4f}" for v in (s.rouge1, s.rouge2, s.rougeL, s.exact_match)), f"{s.chrf:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
