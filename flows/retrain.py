"""Retraining on new data: ``forgeline ingest`` and the ``retrain`` flow.

``ingest`` waits until each new file is complete (open for writing nowhere and unchanged for a moment: a
slow writer's file is never taken half-written), validates it (a labeled file of a classification or
completion config is read as the clean stage will read it), and moves it atomically into
``deploy.incoming_dir`` under its content hash (written next door and renamed into place, under a lock on
the folder so concurrent ingests of the same content add it once). It then emits the Prefect event
``forgeline.dataset.updated`` with the incoming data's fingerprint. The ``retrain`` deployment has a trigger
on that event; it runs the pipeline on the config's sources plus the incoming folder, fine-tuning the
champion (``deploy.retrain_from``). Incoming data that already produced a finished retrain is skipped, and
the deployment's concurrency limit of 1 queues events that arrive together."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from prefect import flow

from forgeline.flows.contract import EVENT, resource_id
from forgeline.tasks.config import PipelineConfig
from forgeline.tasks.data.intake import carried_columns, check_file
from forgeline.tasks.data.paths import DataError
from forgeline.tasks.locks import host_lock
from forgeline.tasks.tracking import records, store
from forgeline.tasks.tracking.registry_store import champion_version
from forgeline.tasks.tracking.runs import find_runs
from forgeline.tasks.tracking.tags import RUN_NAME_TAG

logger = logging.getLogger(__name__)

RETRAIN_TAG = "forgeline.retrain_fingerprint"
SUPPORTED = {".txt", ".md", ".jsonl", ".json", ".csv", ".parquet"}


class IngestError(ValueError):
    """A file cannot be ingested; the message is one line."""


class StillBeingWritten(IngestError):
    """A file was still open for writing, or changing, when ingest stopped waiting for it."""


SETTLE_SECONDS = 2.0  # a file untouched this long, and open for writing nowhere, is taken as complete
WAIT_SECONDS = 60.0  # how long ingest waits for a file still being written before refusing it


# --------------------------------------------------------------------------------------------- ingest
def incoming_dir(config: PipelineConfig, base_dir: Path | None = None) -> Path:
    """The absolute incoming-data folder of ``config``."""
    path = Path(config.deploy.incoming_dir)
    return path if path.is_absolute() else (base_dir or Path.cwd()).resolve() / path


def incoming_files(folder: Path) -> list[Path]:
    """The data files in the incoming folder, sorted (hidden entries are not data; cleaning skips them too)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def incoming_fingerprint(folder: Path) -> str:
    """Hash of the set of files in ``folder`` (their names are their content hashes); ``""`` when empty."""
    names = [p.name for p in incoming_files(folder)]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:32] if names else ""


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


def _validate(path: Path, data: bytes, config: PipelineConfig) -> bytes:
    if not data.strip():
        raise IngestError(f"{path}: empty file")
    if path.suffix.lower() in {".txt", ".md", ".jsonl", ".json", ".csv"}:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IngestError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if carried_columns(config.data):  # labeled data: read as the clean stage will, or it fails every retrain
        try:
            check_file(config.data, path, text_column=incoming_text_column(config))
        except DataError as exc:
            raise IngestError(str(exc)) from None
    return data


def open_for_writing(paths: list[Path]) -> set[Path]:
    """Which of ``paths`` some process on this machine holds open for writing (``/proc`` through psutil).

    Processes this user may not inspect, and writers on other machines, are not seen: the quiet period in
    :func:`read_complete` covers those.
    """
    import psutil

    wanted: dict[tuple[int, int], Path] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            st = path.stat()
            wanted[(st.st_dev, st.st_ino)] = path
    busy: set[Path] = set()
    for proc in psutil.process_iter():
        try:
            handles = proc.open_files()
        except (psutil.Error, OSError):
            continue
        for handle in handles:
            if handle.mode not in ("w", "a", "r+", "a+"):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(handle.path)
                if (st.st_dev, st.st_ino) in wanted:
                    busy.add(wanted[(st.st_dev, st.st_ino)])
    return busy


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_complete(
    paths: list[Path], *, settle: float = SETTLE_SECONDS, wait: float = WAIT_SECONDS
) -> dict[Path, bytes]:
    """Read each file once it is complete: nobody has it open for writing and it has not changed for ``settle`` s.

    A file that another process is still writing (or that changed while it was read) is waited for, up
    to ``wait`` seconds, so a slow writer's file is never taken half-written.

    Raises:
        StillBeingWritten: a file was still being written after ``wait`` seconds (``wait=0``: not waited for).
        IngestError: a file vanished.
    """
    deadline = time.monotonic() + wait
    done: dict[Path, bytes] = {}
    pending = list(paths)
    waited = False
    while pending:
        try:
            sigs = {p: _signature(p) for p in pending}
        except FileNotFoundError as exc:
            raise IngestError(f"{exc.filename}: no such file or directory") from None
        busy = open_for_writing(pending)
        now_ns = time.time_ns()
        quiet = [p for p in pending if p not in busy and (now_ns - sigs[p][2]) / 1e9 >= settle]
        read = {p: p.read_bytes() for p in quiet}
        busy = open_for_writing(quiet) if quiet else set()
        for path, data in read.items():
            # Unchanged while we read it, and still nobody writing: this is the whole file.
            if path not in busy and _signature(path) == sigs[path] and len(data) == sigs[path][1]:
                done[path] = data
                pending.remove(path)
        if not pending:
            break
        if time.monotonic() >= deadline:
            raise StillBeingWritten(
                f"{pending[0]}: still being written after {wait:.0f} s (open for writing or changing); "
                "ingest it once it is complete"
            )
        if not waited:
            logger.info("waiting for %d file(s) still being written, first %s", len(pending), pending[0])
            waited = True
        time.sleep(min(0.5, max(0.05, settle / 4)))
    return {p: done[p] for p in paths}


def _folder_lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive lock for the incoming folder: one ingest at a time.

    The lock file sits beside the folder, hidden like the ``.partial`` staging folder: inside, it would show
    up among the incoming files. It stays there (removing it would race with the next ingest).
    """
    return host_lock(folder.parent / f".{folder.name}.lock")


def ingest_files(
    paths: list[str],
    config: PipelineConfig,
    *,
    keep: bool = False,
    settle: float = SETTLE_SECONDS,
    wait: float = WAIT_SECONDS,
) -> tuple[list[Path], str]:
    """Validate every file first, then place each in the incoming folder under its content hash.

    Concurrent ingests are serialized by a lock on the incoming folder, so the same content arriving twice
    at once is added (and reported new) once.

    Args:
        paths: Files or directories (searched recursively for supported files).
        config: Supplies ``deploy.incoming_dir``.
        keep: Copy instead of moving the originals.
        settle: Seconds a file must be unchanged (and open for writing nowhere) to count as complete.
        wait: Seconds to wait for files still being written before refusing them.

    Returns:
        The newly added files (already present content is skipped) and the incoming fingerprint.

    Raises:
        IngestError: a file is missing, empty, of an unsupported type, not UTF-8, still being written after
            ``wait`` seconds, or (labeled data) one the clean stage would refuse; nothing is moved then.
    """
    files = _expand(paths)
    for path in files:
        if path.suffix.lower() not in SUPPORTED:
            raise IngestError(
                f"{path}: unsupported file type {path.suffix!r} (supported: {', '.join(sorted(SUPPORTED))})"
            )
    try:
        contents = read_complete(files, settle=settle, wait=wait)
    except FileNotFoundError as exc:  # gone since it was listed: another ingest of the same file moved it
        raise IngestError(f"{exc.filename}: no such file or directory") from exc
    payloads = [(path, _validate(path, contents[path], config)) for path in files]
    target = incoming_dir(config)
    target.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial"
    added: list[Path] = []
    with _folder_lock(target):
        partial.mkdir(parents=True, exist_ok=True)
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
                with contextlib.suppress(FileNotFoundError):  # a concurrent ingest of the same file moved it
                    path.unlink()
        shutil.rmtree(partial, ignore_errors=True)
        fingerprint = incoming_fingerprint(target)
    return added, fingerprint


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


def incoming_text_column(config: PipelineConfig) -> str:
    """The text column of the incoming folder's files: that of the config's first table source, else ``text``.

    New files look like the data they add to: a labeled set read from a ``body`` column comes with ``body``.
    """
    for source in config.data.sources:
        column = getattr(source, "text_column", None)
        if column:
            return str(column)
    return "text"


# -------------------------------------------------------------------------------------------- retrain
def retrain_config(config: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """The config's sources plus the incoming folder; ``init_from`` the champion when configured and present."""
    tree = config.model_dump(mode="json")
    folder = incoming_dir(config, base_dir)
    if incoming_files(folder):
        source = {"kind": "directory", "path": str(folder), "text_column": incoming_text_column(config)}
        tree["data"]["sources"].append(source)
    if config.deploy.retrain_from == "champion" and not config.model.init_from:
        uri = f"models:/{config.registry.model_name}@{config.registry.champion_alias}"
        if champion_version(config.registry.model_name, config.registry.champion_alias) is not None:
            tree["model"]["init_from"] = uri
        else:  # no champion yet: train from scratch
            logger.info("no %s yet; retraining from scratch", uri)
    return PipelineConfig.model_validate(tree)


@flow(name="retrain", flow_run_name="retrain {config.name}")
def retrain_flow(config: PipelineConfig, fingerprint: str | None = None, deployed: bool = False) -> str:
    """Retrain on the config's data plus the incoming folder, once per incoming-data fingerprint.

    The fingerprint that counts is the incoming folder's when this run starts (the data it trains on), not
    the event's: events that arrive in a burst queue behind each other (the deployment's concurrency limit
    of 1), the first of them trains on everything ingested by then, and the rest find that data already
    retrained. An old event replayed later is skipped the same way.

    Args:
        config: The pipeline config (the deployment's default is the deployed config).
        fingerprint: The incoming data's fingerprint from the ``forgeline.dataset.updated`` event (recorded
            as ``forgeline.retrain_event_fingerprint``).
        deployed: Run ``train`` on the GPU pool (the deployment sets it).

    Returns:
        The pipeline's MLflow run id, or ``skipped: ...`` when this data was already retrained.
    """
    from prefect.logging import get_run_logger

    from forgeline.flows.pipeline import pipeline_flow

    log = get_run_logger()  # the deployment loads this module by path: its own logger's name is not ours
    base_dir = Path.cwd()
    key = incoming_fingerprint(incoming_dir(config, base_dir)) or "none"
    if fingerprint and fingerprint != key:
        log.info("event for incoming data %s; the folder now holds %s, which is what counts", fingerprint, key)
    store.setup_tracking(config.tracking, base_dir)
    experiment_id = store.ensure_experiment(config.name, config.tracking, base_dir)
    done = [
        run_id
        for run_id, tags in find_runs(experiment_id, {RETRAIN_TAG: key, RUN_NAME_TAG: "pipeline"})
        if tags.get("forgeline.retrain_status") == "done"
    ]
    if done:
        log.info("incoming data %s was already retrained (pipeline run %s); nothing to do", key, done[0])
        return f"skipped: {key} already retrained by {done[0]}"
    cfg = retrain_config(config, base_dir)
    result = pipeline_flow(cfg, deployed=deployed)
    tags = {RETRAIN_TAG: key, "forgeline.retrain_status": "done"}
    if fingerprint:
        tags["forgeline.retrain_event_fingerprint"] = fingerprint
    records.set_tags(result.run_id, tags)
    return result.run_id
