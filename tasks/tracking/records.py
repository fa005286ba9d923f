"""One-shot writes to a run: params, the resolved config, tags, a few metrics, text, figures, dataset inputs.

Per-step training metrics go through :class:`forgeline.tasks.tracking.metrics.MetricBuffer` instead.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from forgeline.tasks.config import PipelineConfig, dump_config, flatten, is_secret_key, redact
from forgeline.tasks.tracking.store import client


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log flat params (values truncated to MLflow's limit; secrets redacted)."""
    from mlflow.entities import Param

    items = [Param(k, "***" if is_secret_key(k) else str(v)[:6000]) for k, v in params.items() if v is not None]
    c = client()
    for start in range(0, len(items), 100):
        c.log_batch(run_id, params=items[start : start + 100])


def log_config(run_id: str, cfg: PipelineConfig) -> None:
    """Flattened resolved config as params, and ``resolved_config.yaml`` as an artifact."""
    log_params(run_id, flatten(redact(cfg.model_dump(mode="json"))))
    log_text(run_id, dump_config(cfg), "resolved_config.yaml")


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set tags (booleans as ``true``/``false``; secret-named keys redacted)."""
    c = client()
    for key, value in tags.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        c.set_tag(run_id, key, "***" if is_secret_key(key) else text)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log a few metrics at once (one request)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
    client().log_batch(run_id, metrics=batch)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    """Store ``text`` as the artifact ``artifact_file`` of the run."""
    client().log_text(run_id, text, artifact_file)


def log_dict(run_id: str, data: dict[str, Any], artifact_file: str) -> None:
    """Store ``data`` as indented JSON (secrets redacted) under ``artifact_file``."""
    client().log_text(run_id, json.dumps(redact(data), indent=2, default=str), artifact_file)


def log_table(run_id: str, rows: list[dict[str, Any]], artifact_file: str, columns: list[str] | None = None) -> None:
    """Store rows as an MLflow table artifact (``.json``; the run page shows it, ``mlflow.load_table`` reads it).

    Args:
        run_id: The run.
        rows: One dict per row; the columns are the first row's keys unless ``columns`` is given.
        artifact_file: A ``.json`` name.
        columns: The columns, so that an empty table still has them.
    """
    names = columns if columns is not None else list(rows[0]) if rows else []
    client().log_table(run_id, {name: [row.get(name) for row in rows] for name in names}, artifact_file)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a local file as an artifact of the run."""
    client().log_artifact(run_id, str(path), artifact_path)


def log_figure(run_id: str, figure: Any, artifact_file: str) -> None:
    """Store a matplotlib figure as the image ``artifact_file``."""
    client().log_figure(run_id, figure, artifact_file)


def log_dataset_input(
    run_id: str, *, name: str, digest: str, source: str, context: str, profile: dict[str, Any]
) -> None:
    """Record a cleaned split as an MLflow dataset input of ``run_id`` with its fingerprint as digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name,
        digest=digest[:36],
        source_type="local",
        source=json.dumps({"uri": source}),
        profile=json.dumps(profile),
    )
    client().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
