"""Retraining on new data: ``forgeline ingest`` and the ``retrain`` flow.

``ingest`` validates new files and moves them atomically into ``deploy.incoming_dir`` under their content
hash (a half-written file is never visible there: it is written next door and renamed into place), then
emits the Prefect event ``forgeline.dataset.updated`` with the incoming data's fingerprint. The ``retrain``
deployment has a trigger on that event and gets the fingerprint as a parameter; it runs the pipeline on the
config's sources plus the incoming folder, fine-tuning the champion (``deploy.retrain_from``). A fingerprint
that already produced a finished retrain is skipped, and the deployment's concurrency limit of 1 queues
events that arrive together.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from prefect import flow

from tasks import tracking
from tasks.config import PipelineConfig

logger = logging.getLogger(__name__)

EVENT = "forgeline.dataset.updated"
RETRAIN_TAG = "forgeline.retrain_fingerprint"
SUPPORTED = {".txt", ".md", ".jsonl", ".json", ".csv", ".parquet"}


class IngestError(ValueError):
    """A file cannot be ingested; the message is one line."""


# --------------------------------------------------------------------------------------------- ingest
def incoming_dir(config: PipelineConfig, base_dir: Path | None = None) -> Path:
    """The absolute incoming-data folder of ``config``."""
    path = Path(config.deploy.incoming_dir)
    return path if path.is_absolute() else (base_dir or Path.cwd()).resolve() / path


def incoming_fingerprint(folder: Path) -> str:
    """Hash of the set of files in ``folder`` (their names are their content hashes); ``""`` when empty."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:32] if names else ""


def resource_id(config: PipelineConfig) -> str:
    """The event resource of this config's dataset (triggers match it exactly)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in config.name)
    return f"forgeline.dataset.{safe}"


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED)
        elif path.is_file():
            files.append(path)
        else:
            raise IngestError(f"{raw}: no such file or directory")
    if not files:
        raise IngestError(f"no {', '.join(sorted(SUPPORTED))} files in {', '.join(paths)}")
    return files


def _validate(path: Path) -> bytes:
    if path.suffix.lower() not in SUPPORTED:
        raise IngestError(f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(sorted(SUPPORTED))})")
    data = path.read_bytes()
    if not data.strip():
        raise IngestError(f"{path}: empty file")
    if path.suffix.lower() in {".txt", ".md", ".jsonl", ".json", ".csv"}:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IngestError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return data


def ingest_files(paths: list[str], config: PipelineConfig, *, keep: bool = False) -> tuple[list[Path], str]:
    """Validate every file first, then place each in the incoming folder under its content hash.

    Args:
        paths: Files or directories (searched recursively for supported files).
        config: Supplies ``deploy.incoming_dir``.
        keep: Copy instead of moving the originals.

    Returns:
        The newly added files (already present content is skipped) and the incoming fingerprint.

    Raises:
        IngestError: a file is missing, empty, of an unsupported type or not UTF-8; nothing is moved then.
    """
    files = _expand(paths)
    payloads = [(path, _validate(path)) for path in files]
    target = incoming_dir(config)
    partial = target.parent / f".{target.name}.partial"
    target.mkdir(parents=True, exist_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
    added: list[Path] = []
    for path, data in payloads:
        digest = hashlib.sha256(data).hexdigest()[:32]
        final = target / f"{digest}{path.suffix.lower()}"
        if not final.exists():
            tmp = partial / f"{final.name}.{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)  # atomic: readers see the whole file or none
            added.append(final)
        if not keep:
            path.unlink()
    shutil.rmtree(partial, ignore_errors=True)
    return added, incoming_fingerprint(target)


def emit_dataset_updated(config: PipelineConfig, fingerprint: str, files: int) -> bool:
    """Emit ``forgeline.dataset.updated`` for this config's dataset; ``False`` if no Prefect server is set."""
    if not os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": resource_id(config), "prefect.resource.name": config.name},
        payload={"fingerprint": fingerprint, "files": files, "incoming_dir": str(incoming_dir(config))},
    )
    EventsWorker.drain_all()
    return event is not None


# -------------------------------------------------------------------------------------------- retrain
def retrain_config(config: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """The config's sources plus the incoming folder; ``init_from`` the champion when configured and present."""
    tree = config.model_dump(mode="json")
    folder = incoming_dir(config, base_dir)
    if any(folder.glob("*")):
        tree["data"]["sources"].append({"kind": "directory", "path": str(folder)})
    if config.deploy.retrain_from == "champion" and not config.model.init_from:
        uri = f"models:/{config.registry.model_name}@{config.registry.champion_alias}"
        try:
            tracking.client().get_model_version_by_alias(config.registry.model_name, config.registry.champion_alias)
            tree["model"]["init_from"] = uri
        except Exception:  # noqa: BLE001 - no champion yet: train from scratch
            logger.info("no %s yet; retraining from scratch", uri)
    return PipelineConfig.model_validate(tree)


@flow(name="retrain", flow_run_name="retrain {config.name}")
def retrain_flow(config: PipelineConfig, fingerprint: str | None = None, deployed: bool = False) -> str:
    """Retrain on the config's data plus the incoming folder, once per incoming-data fingerprint.

    Args:
        config: The pipeline config (the deployment's default is the deployed config).
        fingerprint: The incoming data's fingerprint from the ``forgeline.dataset.updated`` event; default:
            the folder's current fingerprint.
        deployed: Run ``train`` on the GPU pool (the deployment sets it).

    Returns:
        The pipeline's MLflow run id, or ``skipped: ...`` when this fingerprint was already retrained.
    """
    from flows.pipeline import pipeline_flow

    base_dir = Path.cwd()
    key = fingerprint or incoming_fingerprint(incoming_dir(config, base_dir)) or "none"
    tracking.setup_tracking(config.tracking, base_dir)
    experiment_id = tracking.ensure_experiment(config.name, config.tracking, base_dir)
    done = [
        run_id
        for run_id, tags in tracking.find_runs(experiment_id, {RETRAIN_TAG: key, tracking.RUN_NAME_TAG: "pipeline"})
        if tags.get("forgeline.retrain_status") == "done"
    ]
    if done:
        logger.info("incoming data %s was already retrained (pipeline run %s); nothing to do", key, done[0])
        return f"skipped: {key} already retrained by {done[0]}"
    cfg = retrain_config(config, base_dir)
    result = pipeline_flow(cfg, deployed=deployed)
    tracking.set_tags(result.run_id, {RETRAIN_TAG: key, "forgeline.retrain_status": "done"})
    return result.run_id
