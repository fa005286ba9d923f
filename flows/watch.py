"""The ``watch`` flow: ``forgeline ingest`` for files dropped into ``deploy.drop_dir`` by other means.

The ``watch`` deployment has no schedule: ``forgeline deploy`` starts one long-lived flow run of it on the
``cpu`` pool, which looks at the drop folder every ``deploy.watch_interval`` seconds (one run in the Prefect
UI's run list, not one a minute). Each look takes the folder twice, ``deploy.watch_settle`` seconds apart, and
takes only the files whose size and modification time did not change in between: a file still being copied in
is left for a later look. Hidden files and names ending in ``.part``, ``.partial``, ``.tmp`` or
``.crdownload`` are never taken (writers that write under such a name and rename when done are always safe).
Each complete file goes through :func:`forgeline.flows.retrain.ingest_files`, exactly like ``forgeline ingest``:
validated, then moved atomically into ``deploy.incoming_dir`` under its content hash. A file that fails
validation is moved to ``.rejected/`` in the drop folder with a ``.reason.txt`` beside it, so it is reported
once instead of every look. When anything new arrived the look emits ``forgeline.dataset.updated`` with the
incoming fingerprint, which triggers ``retrain``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from forgeline.tasks.config import PipelineConfig

logger = logging.getLogger("forgeline.flows.watch")  # a deployment loads this file by path: not __name__

REJECTED = ".rejected"
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload")

Signature = tuple[int, int, int]  # inode, size, mtime_ns


class WatchResult(BaseModel):
    """What one look at the drop folder did: small and serializable."""

    added: list[str] = []  # new files in the incoming folder (their content-hash names)
    duplicates: list[str] = []  # dropped files whose content was already there (removed from the drop folder)
    rejected: dict[str, str] = {}  # dropped file name -> why (moved to .rejected/)
    waiting: list[str] = []  # files still being written, left for the next run
    fingerprint: str = ""  # the incoming folder's fingerprint after this run
    emitted: bool = False  # whether forgeline.dataset.updated was emitted


def drop_dir(config: PipelineConfig, base_dir: Path | None = None) -> Path:
    """The absolute drop folder of ``config``."""
    path = Path(config.deploy.drop_dir)
    return path if path.is_absolute() else (base_dir or Path.cwd()).resolve() / path


def candidates(folder: Path) -> list[Path]:
    """Files under ``folder`` that may be data: not hidden, not under a hidden folder, not an in-progress name."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.name.lower().endswith(IN_PROGRESS_SUFFIXES):
            continue
        if path.is_file():
            found.append(path)
    return found


def _signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def complete_files(folder: Path, settle: float) -> tuple[list[Path], list[Path]]:
    """Split the candidates into complete files and files still being written.

    Two looks ``settle`` seconds apart: a file is complete when it is in both with the same inode, size and
    modification time. A file that vanished in between is in neither list.
    """
    first = {path: _signature(path) for path in candidates(folder)}
    if first and settle > 0:
        time.sleep(settle)
    complete: list[Path] = []
    waiting: list[Path] = []
    for path, before in first.items():
        after = _signature(path)
        if after is None or before is None:
            continue
        (complete if after == before else waiting).append(path)
    waiting += [p for p in candidates(folder) if p not in first]  # appeared during the look
    return complete, waiting


def scan_drop_folder(config: PipelineConfig, base_dir: Path | None = None) -> WatchResult:
    """Ingest every complete file of the drop folder; reject the invalid ones. No event is emitted here.

    Args:
        config: Supplies ``deploy.drop_dir``, ``deploy.watch_settle`` and ``deploy.incoming_dir``.
        base_dir: What relative folders resolve against (default: the working directory).

    Returns:
        What was added, found already present, rejected and left waiting, and the incoming fingerprint.
    """
    from forgeline.flows.retrain import IngestError, StillBeingWritten, incoming_dir, incoming_fingerprint, ingest_files

    base = (base_dir or Path.cwd()).resolve()
    folder = drop_dir(config, base)
    if not Path(config.deploy.incoming_dir).is_absolute():
        # ingest_files resolves the incoming folder against the working directory: give it an absolute one.
        config = config.model_copy(
            update={"deploy": config.deploy.model_copy(update={"incoming_dir": str(incoming_dir(config, base))})}
        )
    complete, waiting = complete_files(folder, config.deploy.watch_settle)
    result = WatchResult(waiting=[str(p.relative_to(folder)) for p in waiting])
    for path in complete:
        name = str(path.relative_to(folder))
        signature = _signature(path)
        try:
            added, _ = ingest_files([str(path)], config, settle=config.deploy.watch_settle, wait=0)
        except StillBeingWritten:  # open for writing (a paused writer): never rejected, looked at next run
            result.waiting.append(name)
            continue
        except IngestError as exc:
            if _signature(path) != signature:  # it changed after all: a writer paused longer than the settle time
                result.waiting.append(name)
                continue
            result.rejected[name] = str(exc)
            _reject(folder, path, str(exc))
            continue
        except FileNotFoundError:  # taken by a concurrent run or removed by its owner
            continue
        if added:
            result.added += [p.name for p in added]
        else:
            result.duplicates.append(name)
    result.fingerprint = incoming_fingerprint(incoming_dir(config, base))
    for name, reason in result.rejected.items():
        logger.warning("watch: rejected %s: %s (moved to %s)", name, reason, folder / REJECTED)
    return result


def _reject(folder: Path, path: Path, reason: str) -> None:
    target = folder / REJECTED / path.relative_to(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")


def look_and_emit(config: PipelineConfig) -> WatchResult:
    """One look at the drop folder (:func:`scan_drop_folder`); emit ``forgeline.dataset.updated`` if any was new."""
    from forgeline.flows.contract import EVENT
    from forgeline.flows.retrain import emit_dataset_updated

    result = scan_drop_folder(config)
    if result.added:
        result.emitted = emit_dataset_updated(config, result.fingerprint, len(result.added))
        _log().info(
            "watch: %d new file(s); %s %s (incoming fingerprint %s)",
            len(result.added),
            "emitted" if result.emitted else "no Prefect server: did not emit",
            EVENT,
            result.fingerprint,
        )
    return result


@flow(name="watch", flow_run_name="watch {config.name}")
def watch_flow(config: PipelineConfig, looks: int | None = None) -> WatchResult:
    """Watch ``deploy.drop_dir``: every ``deploy.watch_interval`` seconds, :func:`look_and_emit`.

    One long-lived flow run (``forgeline deploy`` starts it) instead of one run per look, so the run list
    keeps showing the pipelines. It logs only when something happens, keeps going when a look fails, and
    ends when its run is no longer Running on the server (cancelled, or replaced by a newer deploy).

    Args:
        config: The pipeline config (the deployment's default is the deployed config).
        looks: Stop after this many looks (tests; ``None``: until cancelled).

    Returns:
        Everything its looks added, found again and rejected, the last fingerprint and whether it emitted.
    """
    interval = config.deploy.watch_interval or 60.0
    total = WatchResult()
    said: set[str] = set()  # problems already logged: a folder that stays unreadable is reported once
    count = 0
    log = _log()
    log.info("watch: looking at %s every %g s", drop_dir(config), interval)
    while True:
        try:
            result = look_and_emit(config)
        except Exception as exc:  # noqa: BLE001 - one bad look must not end the watcher
            problem = f"{type(exc).__name__}: {exc}"
            if problem not in said:
                said.add(problem)
                log.warning("watch: a look failed (retried every %g s): %s", interval, problem)
        else:
            total.added += result.added
            total.duplicates += result.duplicates
            total.rejected |= result.rejected
            if result.waiting and result.waiting != total.waiting:  # said once, not every look
                log.info("watch: still being written, left for a later look: %s", ", ".join(result.waiting))
            total.waiting = result.waiting
            total.fingerprint = result.fingerprint or total.fingerprint
            total.emitted = total.emitted or result.emitted
        count += 1
        if (looks is not None and count >= looks) or not _still_running():
            return total
        time.sleep(interval)


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger in a flow run (INFO reaches the Prefect UI whatever the root level), else ours."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def _still_running() -> bool:
    """Whether this flow run is still Running on the server (not cancelled or replaced); unknown counts as yes."""
    from prefect import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return True
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
    except Exception:  # noqa: BLE001 - a server restart must not end the watcher
        return True
    return state is None or state.is_running()
