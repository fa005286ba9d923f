"""The fault-injection points: silent unless a test arms them, exact about when they fire."""

from __future__ import annotations

import errno

import pytest

from forgeline.tasks import faults


@pytest.fixture(autouse=True)
def _disarmed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (faults.AT_STEP_ENV, faults.KIND_ENV, faults.FILE_ENV, faults.TUNE_ENV):
        monkeypatch.delenv(name, raising=False)


def test_every_point_is_a_no_op_when_nothing_is_armed() -> None:
    for point in faults.POINTS:
        faults.hit(point, step=1, trial=0)
    assert not faults.nan_loss(1)
    assert faults.trial_fault(0) is None


def test_an_unknown_point_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.hit("train.stpe", step=1)


def test_a_step_fault_fires_at_its_step_and_point_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.AT_STEP_ENV, "3")
    monkeypatch.setenv(faults.KIND_ENV, "raise")
    faults.hit("train.step", step=2)
    faults.hit("checkpoint.write", step=3)  # another point: not armed by this kind
    with pytest.raises(RuntimeError, match="injected fault"):
        faults.hit("train.step", step=3)


def test_enospc_in_checkpoint_fails_like_a_full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.AT_STEP_ENV, "4")
    monkeypatch.setenv(faults.KIND_ENV, "enospc_in_checkpoint")
    with pytest.raises(OSError) as info:
        faults.hit("checkpoint.write", step=4)
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize(("kind", "expected"), [("nan", [False, True, False]), ("nan_from", [False, True, True])])
def test_nan_and_nan_from(monkeypatch: pytest.MonkeyPatch, kind: str, expected: list[bool]) -> None:
    monkeypatch.setenv(faults.AT_STEP_ENV, "2")
    monkeypatch.setenv(faults.KIND_ENV, kind)
    assert [faults.nan_loss(step) for step in (1, 2, 3)] == expected


def test_tune_faults_by_trial_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.TUNE_ENV, "1:diverge,2:raise,4")
    assert faults.trial_fault(1) == "diverge"
    assert faults.trial_fault(4) == "sigkill"  # the default kind
    assert faults.trial_fault(3) is None
    faults.hit("tune.eval", trial=1)  # diverge is read by the objective, not raised
    with pytest.raises(RuntimeError, match="FORGELINE_TUNE_FAULTS"):
        faults.hit("tune.eval", trial=2)


def test_pause_metrics_waits_for_the_release_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    release = tmp_path / "go"
    release.write_text("")  # already released: returns at once, after saying where it stopped
    monkeypatch.setenv(faults.AT_STEP_ENV, "5")
    monkeypatch.setenv(faults.KIND_ENV, "pause_metrics")
    monkeypatch.setenv(faults.FILE_ENV, str(release))
    faults.hit("metrics.queue", step=5)
    assert (tmp_path / "go.reached").read_text() == "5"
