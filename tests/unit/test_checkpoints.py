"""Atomic checkpoints: markers, corruption fallback, config mismatch, leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forgeline.tasks.train.checkpoints import (
    CheckpointError,
    complete_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)


def _state(step: int, config_hash: str = "abc") -> dict:
    return {"step": step, "config_hash": config_hash, "w": torch.full((4,), float(step))}


def test_latest_complete_checkpoint_is_loaded_and_old_ones_pruned(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _state(step), keep=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [30, 20]
    state = load_latest_checkpoint(tmp_path, "abc")
    assert state is not None and state["step"] == 30
    assert torch.equal(state["w"], torch.full((4,), 30.0))


def test_checkpoint_without_marker_is_never_chosen(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, _state(10))
    save_checkpoint(tmp_path, 20, _state(20))
    (tmp_path / "ckpt-00000020.ok").unlink()
    (tmp_path / "ckpt-00000030.pt.tmp").write_bytes(b"partial")
    state = load_latest_checkpoint(tmp_path, "abc")
    assert state is not None and state["step"] == 10
    assert not (tmp_path / "ckpt-00000030.pt.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "zero"])
def test_corrupt_newest_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    save_checkpoint(tmp_path, 10, _state(10))
    path = save_checkpoint(tmp_path, 20, _state(20))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    state = load_latest_checkpoint(tmp_path, "abc")
    assert state is not None and state["step"] == 10


def test_all_corrupt_is_an_error_not_a_silent_restart(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 10, _state(10))
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint corrupt: .*ckpt-00000010.pt"):
        load_latest_checkpoint(tmp_path, "abc")


def test_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, _state(10, config_hash="other"))
    with pytest.raises(CheckpointError, match="written by config other"):
        load_latest_checkpoint(tmp_path, "abc")


def test_no_checkpoint_means_none(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path / "missing", "abc") is None


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (sentinel,))

    save_checkpoint(tmp_path, 10, {"step": 10, "config_hash": "abc", "evil": Evil()})
    with pytest.raises(CheckpointError):
        load_latest_checkpoint(tmp_path, "abc")
    assert not sentinel.exists()
