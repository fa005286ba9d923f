"""Atomic, verifiable training checkpoints.

A checkpoint is ``ckpt-<step>.pt`` plus a marker ``ckpt-<step>.ok`` written last. The ``.pt`` is
written to a temp file, fsynced and renamed; the marker records its size and sha256. A checkpoint
without a marker, or whose bytes no longer match the marker, is never chosen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from forgeline.tasks import faults

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or belongs to another config; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_path(directory: Path, step: int) -> Path:
    """The checkpoint file of ``step`` in ``directory``."""
    return directory / f"ckpt-{step:08d}.pt"


def training_dir(checkpoint_root: str | Path, name: str, fingerprint: str, config_hash: str, base_dir: Path) -> Path:
    """The run folder of one config and data: re-running the same pair resumes it.

    Args:
        checkpoint_root: ``train.checkpoint_dir`` (relative paths resolve against ``base_dir``).
        name: The config's name (the experiment); unsafe characters become ``_``.
        fingerprint: The cleaned data's fingerprint.
        config_hash: The (tuned) config's hash.
        base_dir: The project folder.
    """
    root = Path(checkpoint_root)
    if not root.is_absolute():
        root = base_dir / root
    safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return root / safe_name / f"{fingerprint[:12]}-{config_hash}"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` atomically as the checkpoint for ``step`` and prune old ones.

    Args:
        directory: Checkpoint folder (created if missing).
        step: Completed optimizer steps.
        state: Tensors and plain values only (it is read back with ``weights_only=True``).
        keep: Complete checkpoints to keep.

    Returns:
        The checkpoint file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)
    tmp = final.with_suffix(".pt.tmp")
    try:
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        faults.hit("checkpoint.write", step=step)  # temp file written, not yet renamed
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {final}: {exc.strerror or exc}") from exc
    os.replace(tmp, final)
    marker = final.with_suffix(".ok")
    marker_tmp = marker.with_suffix(".ok.tmp")
    marker_tmp.write_text(json.dumps({"step": step, "size": final.stat().st_size, "sha256": _sha256(final)}))
    with marker_tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(marker_tmp, marker)
    _fsync_dir(directory)
    _prune(directory, keep)
    return final


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints that have a marker, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.with_suffix(".ok").exists():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _verify(path: Path) -> None:
    marker = json.loads(path.with_suffix(".ok").read_text())
    size = path.stat().st_size
    if size != marker["size"] or _sha256(path) != marker["sha256"]:
        raise CheckpointError(f"checkpoint corrupt: {path} (size or checksum differs from its marker)")


def load_latest_checkpoint(directory: Path, config_hash: str) -> dict[str, Any] | None:
    """The newest complete, intact checkpoint for ``config_hash``, or ``None`` when there is none.

    Leftover temp files are removed. A corrupt newest checkpoint falls back to the previous complete
    one (with a warning); if every checkpoint is corrupt, that is an error rather than a silent
    restart from step 0.

    Raises:
        CheckpointError: a checkpoint from another config, or every checkpoint corrupt.
    """
    if directory.is_dir():
        for leftover in directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
    candidates = complete_checkpoints(directory)
    errors: list[str] = []
    for step, path in candidates:
        try:
            _verify(path)
            state = torch.load(path, map_location="cpu", weights_only=True)
        except CheckpointError as exc:
            errors.append(str(exc))
            logger.warning("%s; trying an older checkpoint", exc)
            continue
        except Exception as exc:  # noqa: BLE001 - any unreadable file is corrupt for our purposes
            errors.append(f"checkpoint corrupt: {path} ({type(exc).__name__})")
            logger.warning("checkpoint corrupt: %s (%s); trying an older checkpoint", path, exc)
            continue
        if state.get("config_hash") != config_hash:
            raise CheckpointError(
                f"checkpoint {path} was written by config {state.get('config_hash')}, not {config_hash}; "
                "use --fresh to start over"
            )
        if state.get("step") != step:
            raise CheckpointError(f"checkpoint corrupt: {path} (holds step {state.get('step')})")
        return state
    if errors:
        raise CheckpointError(errors[0] + " (no intact checkpoint left; use --fresh to start over)")
    return None


def _prune(directory: Path, keep: int) -> None:
    for _, path in complete_checkpoints(directory)[keep:]:
        path.with_suffix(".ok").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
