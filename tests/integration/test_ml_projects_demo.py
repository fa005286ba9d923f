"""The text classification demo's configs (configs/ml_projects_lm.yaml then configs/ml_projects.yaml) against
the data they name: ``../shared/data/ml-projects/dataset.csv`` (issue 16, point 8).

The fast test runs no training: both configs pass ``forgeline validate``, name the CSV's own columns, and cut
the projects the same way, so the language model trains only on the classifier's training texts. The slow
test runs both steps, shrunk, end to end, on a generated file with the dataset's header and four tags placed
where the configs look for it (the suite never needs ``../shared``; ``bench/ml_projects.py`` runs the real file).
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
LM_CONFIG = REPO_ROOT / "configs" / "ml_projects_lm.yaml"
CLS_CONFIG = REPO_ROOT / "configs" / "ml_projects.yaml"
CSV_PATH = "../shared/data/ml-projects/dataset.csv"  # as the configs name it, from the repository root
DATASET = (REPO_ROOT / CSV_PATH).resolve()
# The dataset's columns, as its README (../shared/data/ml-projects/README.md) lists them.
HEADER = ["id", "created_on", "title", "description", "tag"]
TAGS = {
    "computer-vision": ["image", "pixels", "segmentation", "camera", "detection", "convolution"],
    "natural-language-processing": ["text", "language", "tokens", "translation", "sentiment", "parsing"],
    "mlops": ["pipeline", "deployment", "monitoring", "registry", "serving", "workflow"],
    "other": ["graph", "reinforcement", "tabular", "audio", "recommender", "forecasting"],
}


def _write_projects(path: Path, n: int = 240) -> None:
    """A CSV with the dataset's header whose titles and descriptions give their tag away."""
    from tests.classifier_support import make_labeled_rows

    rows = make_labeled_rows(n, labels=TAGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        for i, row in enumerate(rows):
            writer.writerow([i, "2020-02-20 06:43:18", row["title"], row["description"], row["tag"]])


def _csv_sources(cfg: object) -> list[Path]:
    return [(REPO_ROOT / p).resolve() for s in cfg.data.sources if s.kind == "files" for p in s.paths]  # type: ignore[attr-defined]


def test_demo_configs_validate_and_match_the_csv() -> None:
    from forgeline.tasks.config import load_config

    for config in (LM_CONFIG, CLS_CONFIG):
        proc = subprocess.run(
            [sys.executable, "-m", "forgeline", "validate", "--config", str(config.relative_to(REPO_ROOT))],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "is valid" in proc.stdout

    lm, cls = load_config(LM_CONFIG), load_config(CLS_CONFIG)
    assert set(cls.data.text_columns) <= set(HEADER) and cls.data.label_column in HEADER
    assert cls.kind == "classification" and lm.kind == "lm"
    assert _csv_sources(cls) == [DATASET] and _csv_sources(lm) == [DATASET]
    assert any(s.kind == "builtin" and s.name == "python-docs" for s in lm.data.sources)
    # A record's split is its cleaned text's hash: equal columns, cleaning and fractions put every project in
    # the same split for both models, so the classifier's held-out texts stay out of the LM's training split.
    assert lm.data.text_columns == cls.data.text_columns
    assert lm.data.cleaning == cls.data.cleaning and lm.data.fractions == cls.data.fractions
    # The demo trains from scratch; the documented fine-tune starts from the LM configs/ml_projects_lm.yaml
    # registers (the README's --set names it) and reads with its tokenizer and positions.
    assert cls.model.init_from is None
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert f"--set model.init_from=models:/{lm.registry.model_name}@{lm.registry.champion_alias}" in readme
    assert lm.tokenizer == cls.tokenizer and lm.model.block_size >= cls.model.block_size
    assert cls.tune.n_trials > 0 and cls.gate_metric() == ("test/f1_macro", True)


@pytest.mark.slow
def test_demo_runs_end_to_end_shrunk(module_project: Project) -> None:
    """Both demo steps, shrunk to seconds: an LM champion, then a classifier champion fine-tuned from it."""
    import forgeline

    root = module_project.root
    _write_projects(root / "shared" / "data" / "ml-projects" / "dataset.csv")
    work = root / "repo"  # so the configs' own ../shared/... path resolves, as from a checkout beside shared/
    (work / "configs").mkdir(parents=True)
    for config in (LM_CONFIG, CLS_CONFIG):
        shutil.copy(config, work / "configs" / config.name)

    with contextlib.chdir(work):
        lm = forgeline.run(
            "configs/ml_projects_lm.yaml",
            [
                f"data.sources=[{{kind: builtin, max_bytes: 60000}}, {{kind: files, paths: ['{CSV_PATH}']}}]",
                "train.max_steps=30",
                "train.eval_interval=30",
                "eval.max_tokens=2000",
            ],
        )
        cls = forgeline.run(
            "configs/ml_projects.yaml",
            [
                "train.epochs=1",
                "train.eval_interval=20",
                "tune.n_trials=1",
                "tune.max_steps=10",
                "model.init_from=models:/ml-projects-lm@champion",
            ],
            data=[CSV_PATH],
        )

    assert lm.promoted and lm.champion_version == lm.version
    assert cls.promoted and cls.champion_version == cls.version and cls.model_name == "ml-projects-classifier"
    for key in ("test/f1_weighted", "test/f1_macro", "test/accuracy", "baseline/f1_weighted"):
        assert 0.0 <= cls.metrics[key] <= 1.0, (key, cls.metrics)
    assert cls.metrics["baseline/f1_weighted"] > 0.8  # the TF-IDF baseline is strong on this data
