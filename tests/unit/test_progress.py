"""Progress reporting: silent until enabled, bars on a terminal, log lines otherwise, never in the way."""

from __future__ import annotations

import io
import logging
import threading

import pytest
from rich.console import Console

from forgeline.flows.prefect_progress import PrefectTrainProgress
from forgeline.tasks import progress
from forgeline.tasks.progress import ProgressReporter


def _feed(r: ProgressReporter) -> None:
    """Everything a pipeline run feeds the reporter: cleaning, a training loop and a search."""
    with r.cleaning():
        for _ in range(600):
            r.clean_record("hello world")
    r.train_start(20)
    for step in range(1, 21):
        r.train_update(step, {"train/loss": 2.5, "tokens_per_sec": 1000.0})
    r.train_done()
    r.search_update({"complete": 1, "pruned": 0, "failed": 0}, 4, 0.5)
    r.search_done()


def test_nothing_is_shown_until_enabled(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # a plain cleaning line as soon as one is due
    threads = set(threading.enumerate())
    with caplog.at_level(logging.DEBUG):
        _feed(ProgressReporter())  # never enabled
        enabled_then_off = ProgressReporter()
        enabled_then_off.enable(Console(stderr=True, force_terminal=True), terminal=True)
        enabled_then_off.disable()
        _feed(enabled_then_off)
    assert capsys.readouterr() == ("", "")  # no bar, no line on stdout or stderr
    assert [rec.getMessage() for rec in caplog.records if rec.name.startswith("forgeline")] == []
    assert set(threading.enumerate()) - threads == set()  # no display thread started either

    # The same feed, enabled: bars on a terminal, log lines otherwise.
    screen = io.StringIO()
    bars = ProgressReporter()
    bars.enable(Console(file=screen, force_terminal=True, width=140), terminal=True)
    _feed(bars)
    bars.disable()
    assert "600 records" in screen.getvalue() and "step 20/20" in screen.getvalue()
    with caplog.at_level(logging.INFO, logger="forgeline.tasks.progress"):
        lines = ProgressReporter()
        lines.enable(Console(file=io.StringIO()), terminal=False)
        _feed(lines)
    assert any(rec.getMessage().startswith("cleaning: ") for rec in caplog.records)
    assert any(rec.getMessage().startswith("search: 1 of 4 trials done") for rec in caplog.records)


def test_terminal_bars_render_and_stop() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=140)
    threads = set(threading.enumerate())
    r = ProgressReporter()
    r.enable(console, terminal=True)
    with r.cleaning():
        for _ in range(300):
            r.clean_record("hello world")
    r.train_start(20, start_step=5)
    for step in range(6, 21):
        r.train_update(step, {"train/loss": 2.5, "tokens_per_sec": 1000.0})
    r.train_done()
    r.search_update({"complete": 2, "pruned": 1, "failed": 1}, 4, 1.2345)
    r.search_done()
    r.disable()
    out = buffer.getvalue()
    assert "300 records" in out
    assert "step 20/20" in out and "loss 2.5000" in out
    assert "3/4 trials: 2 ok, 1 pruned, 1 failed" in out and "best 1.2345" in out
    for thread in set(threading.enumerate()) - threads:  # rich's display thread ends with the bars
        thread.join(timeout=10)
        assert not thread.is_alive(), thread
    r.train_start(5)
    r.train_update(1, {"train/loss": 1.0})
    assert buffer.getvalue() == out  # off again: nothing more is drawn


def test_plain_lines_without_terminal(caplog: pytest.LogCaptureFixture) -> None:
    screen = io.StringIO()
    r = ProgressReporter()
    r.enable(Console(file=screen), terminal=False)
    with caplog.at_level(logging.INFO, logger="forgeline.tasks.progress"):
        r.train_start(10)
        r.train_update(1, {"train/loss": 1.0})
        r.search_update({"complete": 1, "pruned": 0, "failed": 0}, 4, 0.5)
        r.search_update({"complete": 1, "pruned": 0, "failed": 0}, 4, 0.5)  # unchanged: no second line
    assert screen.getvalue() == ""  # no bars drawn where there is no terminal
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines == ["search: 1 of 4 trials done (1 complete, 0 pruned, 0 failed), best 0.5000"]


def test_prefect_progress_outside_a_flow_is_quiet() -> None:
    artifact = PrefectTrainProgress(100)
    artifact.start()
    for step in range(1, 101):
        artifact.update(step, {"train/loss": 1.0})
    assert artifact.calls == 0


def test_prefect_progress_is_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefect.artifacts as artifacts
    import prefect.context

    monkeypatch.setattr(prefect.context.FlowRunContext, "get", classmethod(lambda cls: object()))

    calls: list[float] = []
    monkeypatch.setattr(artifacts, "create_progress_artifact", lambda pct, **_: calls.append(pct) or "id")
    monkeypatch.setattr(artifacts, "update_progress_artifact", lambda _id, pct, **_: calls.append(pct) or "id")
    artifact = PrefectTrainProgress(10_000, min_seconds=0.0)
    artifact.start()
    for step in range(1, 10_001):
        artifact.update(step, {"train/loss": 1.0})
    assert len(calls) == 21  # the start and one update per 5 %
    assert calls[0] == 0.0 and calls[-1] == 100.0

    calls.clear()
    fast = PrefectTrainProgress(40)  # a short run: percent steps come faster than min_seconds
    fast.start()
    for step in range(1, 41):
        fast.update(step, {"train/loss": 1.0})
    assert calls == [0.0, 100.0]  # the start and the last step only
