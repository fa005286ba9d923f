"""Re-scoring a registered model on a run's held-out split, by the champion gate's metric.

The register stage re-scores the champion when the data changed (the stored score is then not comparable);
``forgeline promote`` does the same for a manual promotion. No Prefect here: plain calls into the stage
packages, the model fetched through the tracking package.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.evaluate.candidate import score_model
from forgeline.tasks.evaluate.classification import eval_device, score_classifier
from forgeline.tasks.evaluate.completion import evaluate_completion
from forgeline.tasks.registry.versions import BPB_METRIC, RegistryError
from forgeline.tasks.tracking import classifiers, models


def rescore_model(model_uri: str, cfg: PipelineConfig, dataset_dir: str) -> float:
    """The gate metric (``cfg.gate_metric()``) of a registered model on this run's held-out split.

    The register stage re-scores the champion with it when the data changed, ``forgeline promote`` too. A
    language model is scored in bits per byte (another ``registry.metric`` cannot be re-scored); a classifier
    by the classification evaluation's ``score_classifier`` (its ``test/...`` figures, no baseline).
    """
    metric, _ = cfg.gate_metric()
    if cfg.kind == "completion":
        scores = evaluate_completion(model_uri, dataset_dir, cfg, fetch=models.download_model).metrics
        if metric not in scores:
            raise RegistryError(f"re-scoring a completion model gives {', '.join(sorted(scores))}, not {metric!r}")
        return float(scores[metric])
    if cfg.kind == "classification":
        with tempfile.TemporaryDirectory(prefix="forgeline-rescore-") as tmp:
            model_dir = classifiers.download_classifier(model_uri, Path(tmp))
            scores = score_classifier(
                model_dir,
                dataset_dir,
                cfg.eval,
                block_size=cfg.model.block_size,
                batch_size=cfg.train.batch_size,
                device=eval_device(cfg.train.device),
            )
        if metric not in scores:
            raise RegistryError(f"re-scoring a classifier gives {', '.join(sorted(scores))}, not {metric!r}")
        return float(scores[metric])
    if metric != BPB_METRIC:
        raise RegistryError(f"re-scoring a language model gives {BPB_METRIC}, not registry.metric {metric!r}")
    return score_model(
        model_uri, dataset_dir, cfg.eval, cfg.train, block_size=cfg.model.block_size, fetch=models.download_model
    )
