"""Text classifiers in the tracking store: log one with MLflow's transformers flavor, download one, predict.

A classifier is logged as a ``text-classification`` pipeline, so ``mlflow.pyfunc.load_model(uri).predict([...])``,
``mlflow models serve`` and ``forgeline serve`` all answer with one ``{"label": ..., "score": ...}`` per text,
the labels being the dataset's own names (the model config's ``id2label``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from forgeline.tasks.tracking.models import PIP_REQUIREMENTS, skip_installed_files_scan
from forgeline.tasks.tracking.store import client

logger = logging.getLogger(__name__)

CLASSIFICATION_TASK = "text-classification"
GENERATION_TASK = "text-generation"
DEFAULT_BATCH_SIZE = 8
"""Texts per forward when ``predict`` gets a list (the pipeline pads them into one batch)."""


def is_classifier_dir(model_dir: str | Path) -> bool:
    """Whether a saved model folder holds a sequence classifier (its config's architecture says so)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return any(str(a).endswith("ForSequenceClassification") for a in architectures or [])


def load_classifier(model_dir: str | Path) -> tuple[Any, Any]:
    """A saved classifier and its tokenizer, from safetensors only and without remote code.

    Raises:
        ValueError: The folder is unsafe to load (pickled weights, custom code) or holds no tokenizer.
    """
    from transformers import AutoModelForSequenceClassification

    from forgeline.tasks.data.tokenization import load_tokenizer
    from forgeline.tasks.model.modeling import check_model_dir

    check_model_dir(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), use_safetensors=True, trust_remote_code=False
    )
    tokenizer = load_tokenizer(model_dir)
    if model.config.pad_token_id is None:  # GPT-2 pads batches with its end-of-text token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def classifier_config(model: Any) -> dict[str, Any]:
    """The pipeline arguments logged with a classifier: batched, truncated to the model's context, top label."""
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    config: dict[str, Any] = {"batch_size": DEFAULT_BATCH_SIZE, "truncation": True}
    if isinstance(context, int):
        config["max_length"] = context
    return config


def classifier_signature() -> object:
    """Text in; one label and its score out (no params: a classifier has nothing to tune per request)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
    )


def log_classifier(run_id: str, model_dir: str | Path, example: str) -> str:
    """Log a saved classifier plus tokenizer as a ``text-classification`` pipeline; returns its model URI.

    Args:
        run_id: The train run the model belongs to.
        model_dir: The ``save_pretrained`` folder (``id2label`` in its config names the labels).
        example: One input text, stored as the model's input example.
    """
    import mlflow

    model, tokenizer = load_classifier(model_dir)
    run = client().get_run(run_id)
    # As for language models: file the logged model under the run's experiment, not the Default one.
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, params=dict(run.data.params), experiment_id=run.info.experiment_id
    )
    skip_installed_files_scan()
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        task=CLASSIFICATION_TASK,
        signature=classifier_signature(),
        input_example=[example],
        model_config=classifier_config(model),
        pip_requirements=PIP_REQUIREMENTS,
        run_id=run_id,
        model_id=logged.model_id,
    )
    return info.model_uri


def model_task(uri: str) -> str | None:
    """The transformers task a logged model or model folder serves (``text-classification``, ``text-generation``).

    Reads only the model's ``MLmodel`` file (or a folder's ``config.json``); ``None`` when it names no task.
    """
    path = Path(uri)
    if path.is_dir() and (path / "config.json").is_file():
        return CLASSIFICATION_TASK if is_classifier_dir(path) else GENERATION_TASK
    from mlflow.models import get_model_info

    flavor = get_model_info(uri).flavors.get("transformers") or {}
    task = flavor.get("task")
    return str(task) if task else None


def download_classifier(uri: str, dst: Path) -> Path:
    """Download a logged classifier into ``dst``: one folder with the model and its tokenizer (``save_pretrained``).

    MLflow's flavor keeps the weights under ``model/`` and the tokenizer under ``components/tokenizer/``; the
    tokenizer files are copied beside the weights so anything that loads a saved folder loads this one.
    """
    from forgeline.tasks.model.modeling import find_model_dir
    from forgeline.tasks.tracking.models import download_model

    root = download_model(uri, dst)
    model_dir = find_model_dir(root)
    tokenizer_dir = root / "components" / "tokenizer"
    if tokenizer_dir.is_dir():
        for item in tokenizer_dir.iterdir():
            if item.is_file() and not (model_dir / item.name).exists():
                shutil.copy2(item, model_dir / item.name)
    return model_dir


def predict_labels(uri: str, texts: list[str]) -> list[dict[str, Any]]:
    """``{"label", "score"}`` for each text, from a logged or registered classifier (or a saved folder).

    A registry URI goes through ``mlflow.pyfunc`` (the same answers as a served model); a local
    ``save_pretrained`` folder through a transformers pipeline with the same arguments.
    """
    if Path(uri).is_dir() and (Path(uri) / "config.json").is_file():
        from transformers import pipeline

        model, tokenizer = load_classifier(uri)
        config = classifier_config(model)
        classify = pipeline(CLASSIFICATION_TASK, model=model, tokenizer=tokenizer, device="cpu")
        raw = classify(list(texts), **config)
        return [{"label": str(r["label"]), "score": float(r["score"])} for r in raw]
    import mlflow

    frame = mlflow.pyfunc.load_model(uri).predict(list(texts))
    return as_predictions(frame)


def as_predictions(output: Any) -> list[dict[str, Any]]:
    """A classifier's pyfunc output (a frame with ``label`` and ``score``) as plain records."""
    records = output.to_dict(orient="records") if hasattr(output, "to_dict") else list(output)
    return [{"label": str(r["label"]), "score": float(r["score"])} for r in records]
