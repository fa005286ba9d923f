"""Models in the tracking store: log a trained model, check a logged model is complete, download one.

This is also the one home of a start-up trick that writes a private MLflow attribute
(:func:`skip_installed_files_scan`); ``tests/unit/test_fixed_cost_levers.py`` fails when MLflow changes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from forgeline.tasks.tracking.store import client

logger = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["torch", "transformers", "tokenizers", "safetensors", "mlflow"]


def log_transformers_model(run_id: str, model_dir: str | Path, prompt: str) -> str:
    """Log model plus tokenizer with the ``transformers`` flavor (text-generation); returns its URI.

    Generation defaults stay inside the model's context (prompt plus new tokens within ``n_positions``),
    so ``pyfunc.load_model(...).predict([prompt])`` works for short prompts. The signature's params schema
    (:func:`generation_signature`) lets a request override them: ``predict(data, params={...})`` and the
    ``"params"`` of a served request reach the pipeline as generation arguments.
    """
    import mlflow

    from forgeline.tasks.model.modeling import load_pretrained_model

    model, tokenizer = load_pretrained_model(str(model_dir))
    context = int(getattr(model.config, "n_positions", 1024))
    generation = generation_defaults(context)
    # Given only run_id, MLflow files the logged model under the Default experiment (no active run here);
    # create it in the run's experiment, where the UI and searches look for it.
    run = client().get_run(run_id)
    logged = mlflow.initialize_logged_model(
        name="model", source_run_id=run_id, params=dict(run.data.params), experiment_id=run.info.experiment_id
    )
    skip_installed_files_scan()
    info = mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        signature=generation_signature(generation),
        input_example=[prompt],
        # batch_size is a pipeline argument, not a request param: a list of prompts runs as one padded forward,
        # and a server may raise it at load time (pyfunc only lets load_model override keys logged here).
        model_config={**generation, "batch_size": DEFAULT_BATCH_SIZE},
        pip_requirements=PIP_REQUIREMENTS,
        run_id=run_id,
        model_id=logged.model_id,
    )
    return info.model_uri


DEFAULT_BATCH_SIZE = 8
"""Prompts per forward when ``predict`` gets a list (the pipeline pads them on the left)."""

GENERATION_PARAMS = ("max_new_tokens", "temperature", "top_k", "do_sample")
"""Generation settings a request may set through ``params``. ``seed`` is not one: the transformers flavor hands
every param to ``generate``, which refuses keyword arguments it does not know."""


def generation_defaults(context: int) -> dict[str, int | float | bool]:
    """Sampling defaults for a model with ``context`` positions (new tokens fit with a short prompt)."""
    return {"max_new_tokens": max(1, min(128, context // 2)), "temperature": 1.0, "top_k": 50, "do_sample": True}


def generation_signature(generation: dict[str, int | float | bool]) -> object:
    """Text in, text out, with :data:`GENERATION_PARAMS` as the params schema (defaults from ``generation``).

    MLflow fills a missing param with its schema default, so the defaults must equal the logged model config.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    types = {bool: "boolean", int: "long", float: "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec(name, types[type(generation[name])], generation[name]) for name in GENERATION_PARAMS]
        ),
    )


def skip_installed_files_scan() -> bool:
    """Seed MLflow's module-to-package map with :data:`PIP_REQUIREMENTS` before ``log_model`` checks them.

    ``log_model`` checks the explicit pip requirements against this environment. Before the first check
    MLflow maps every installed file to its package (``importlib_metadata.packages_distributions()``: 1 s on
    a quiet 2-core machine, 3 s loaded), although for the packages we name it reads the versions from
    their metadata anyway. MLflow has no public switch for that check (``MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK``
    skips only pip's dry run), so this writes its private ``requirements_utils._MODULES_TO_PACKAGES``; the
    check then costs milliseconds and reports the same mismatches.

    Returns:
        Whether the map was seeded (``False`` when MLflow had built it already, or no longer has it: then a
        warning says the speed-up is lost, and the unit test of this function fails).
    """
    from mlflow.utils import requirements_utils

    if not hasattr(requirements_utils, "_MODULES_TO_PACKAGES"):
        logger.warning("mlflow.utils.requirements_utils._MODULES_TO_PACKAGES is gone: log_model scans every file")
        return False
    if requirements_utils._MODULES_TO_PACKAGES is not None:
        return False
    requirements_utils._MODULES_TO_PACKAGES = {name: [name] for name in PIP_REQUIREMENTS}
    return True


def logged_model_status(model_uri: str) -> str | None:
    """``READY``, ``PENDING`` or ``FAILED`` for a logged-model URI (``models:/m-<id>``); ``None`` for other URIs.

    MLflow marks a logged model READY only after all its files are uploaded (FAILED when the upload raised,
    PENDING when the process died mid-way).
    """
    if not model_uri.startswith("models:/m-"):
        return None
    model_id = model_uri.removeprefix("models:/").split("/", 1)[0]
    return str(client().get_logged_model(model_id).status)


def download_model(uri: str, dst: Path) -> Path:
    """Download a registered or logged model (``models:/NAME@alias``, ``models:/NAME/3``) into ``dst``.

    Returns:
        The downloaded artifact folder (hand it to ``load_pretrained_model``'s ``fetch``).
    """
    import mlflow

    logger.info("downloading %s to %s", uri, dst)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def load_model(source: str) -> tuple[object, object | None]:
    """``load_pretrained_model`` that also takes registry URIs (downloaded with :func:`download_model`)."""
    from forgeline.tasks.model.modeling import load_pretrained_model

    return load_pretrained_model(source, fetch=download_model)


def load_artifact_text(run_id: str, artifact: str) -> str:
    """The text of one artifact of a run."""
    import mlflow

    return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact}")
