"""Re-scoring a registered model on a run's held-out split, by the champion gate's metric.

The register stage re-scores the champion when the data changed (the stored score is then not comparable);
``forgeline promote`` does the same for a manual promotion. No Prefect here: plain calls into the stage
packages, the model fetched through the tracking package.
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.evaluate.candidate import score_model
from forgeline.tasks.registry.versions import BPB_METRIC, RegistryError
from forgeline.tasks.tracking import classifiers, models


def rescore_model(model_uri: str, cfg: PipelineConfig, dataset_dir: str) -> float:
    """The gate metric (``cfg.gate_metric()``) of a registered model on this run's held-out split.

    The register stage re-scores the champion with it when the data changed; ``forgeline promote`` and
    ``forgeline reproduce`` use it too. A language model is scored in bits per byte unless ``registry.metric``
    names another of its metrics; a classifier by the classification evaluation.
    """
    metric, _ = cfg.gate_metric()
    if cfg.kind == "classification":
        # Loaded by name: tasks/evaluate/classification.py comes with the classification evaluation (issue 16),
        # not yet on this branch. TODO(merge): a plain import of score_classifier and eval_device.
        evaluation = importlib.import_module("forgeline.tasks.evaluate.classification")
        with tempfile.TemporaryDirectory(prefix="forgeline-rescore-") as tmp:
            model_dir = classifiers.download_classifier(model_uri, Path(tmp))
            scores = evaluation.score_classifier(
                model_dir,
                dataset_dir,
                cfg.eval,
                block_size=cfg.model.block_size,
                batch_size=cfg.train.batch_size,
                device=evaluation.eval_device(cfg.train.device),
            )
        if metric not in scores:
            raise RegistryError(f"re-scoring a classifier gives {', '.join(sorted(scores))}, not {metric!r}")
        return float(scores[metric])
    if metric != BPB_METRIC:
        raise RegistryError(f"re-scoring a language model gives {BPB_METRIC}, not registry.metric {metric!r}")
    return score_model(
        model_uri, dataset_dir, cfg.eval, cfg.train, block_size=cfg.model.block_size, fetch=models.download_model
    )
