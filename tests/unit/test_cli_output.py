"""What the listing commands print: tables that stay readable at 80 columns, CSV and JSON for scripts, and log
lines that stay one line each when standard error is a file or a pipe (flows/cli/format.py, console.py)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from forgeline.flows.cli import console
from forgeline.flows.cli.format import Column, Listing, blocks, csv_text, fit, json_text, plain
from forgeline.flows.cli.history import compare_listing, rank_runs
from forgeline.flows.cli.models import history_listing, models_listing

START = 1_796_000_000_000  # ms


def _run(run_id: str, lr: str, steps: str, bpb: float, loss: float, *, seconds: int = 75) -> Any:
    params = {"model.n_layer": "2", "model.n_embd": "32", "train.max_steps": steps, "train.learning_rate": lr}
    params |= {"seed": "7", "data.record": "paragraph"}
    metrics = {"test/bits_per_byte": bpb, "test/loss": loss, "val/loss": loss - 0.07, "time/clean": 0.25}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=START, end_time=START + seconds * 1000, status="FINISHED"),
        data=SimpleNamespace(params=params, metrics=metrics, tags={"model_version": run_id[-1]}),
    )


RUNS = [
    _run("a" * 31 + "1", "0.003", "40", 4.7825, 3.3200),
    _run("b" * 31 + "2", "0.0007", "1", 6.6059, 4.5791, seconds=3725),
]


def _render(parts: list[Any], width: int) -> str:
    sink = Console(width=width, file=io.StringIO(), color_system=None)
    for part in parts:
        sink.print(part, highlight=False, soft_wrap=True)
    return sink.file.getvalue()


def test_compare_at_80_columns_shows_every_param_and_metric() -> None:
    listing = compare_listing(rank_runs(RUNS, "test/bits_per_byte"), "test/bits_per_byte", title="demo: best 2")
    text = _render(fit(listing, 80), 80)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines if not line.startswith("(")), text
    assert "│ │" not in text  # the squeezed table
    for value in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "0.003", "0.0007", "4.7825", "6.6059", "3.3200", "4.5791", "1h02m"):
        assert value in text, (value, text)
    for head in ("layers: 2", "width: 32", "steps: 40", "steps: 1", "test bpb:", "val loss: 3.2500"):
        assert head in text, (head, text)
    assert lines[1].startswith("run: aaaaaaaaaaaa")  # the best run comes first
    assert "--output csv|json" in lines[-1]


def test_compare_is_a_table_where_it_fits() -> None:
    listing = compare_listing(RUNS, "test/bits_per_byte", title="demo")
    text = _render(fit(listing, 200), 200)
    head = next(line for line in text.splitlines() if "run" in line and "┃" in line)
    for column in ("started", "status", "duration", "version", "layers", "lr", "test bpb", "test loss", "val loss"):
        assert column in head
    assert "--output" not in text


def test_csv_and_json_hold_the_same_rows_with_every_column() -> None:
    listing = compare_listing(RUNS, "val/loss", title="demo")
    rows = list(csv.DictReader(io.StringIO(csv_text(listing))))
    records = json.loads(json_text(listing))
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in records] == ["a" * 31 + "1", "b" * 31 + "2"]
    assert set(rows[0]) == set(records[0])
    for row, record in zip(rows, records, strict=True):
        assert row == {k: "" if v is None else str(v) for k, v in record.items()}
    # Every metric (also those the table leaves out) and the params that differ; not the ones all runs share.
    assert records[0]["time/clean"] == 0.25 and records[1]["duration_s"] == 3725.0
    assert records[0]["train.learning_rate"] == "0.003" and "seed" not in records[0]
    assert records[0]["started"].endswith("+00:00")


def test_several_listings_are_one_json_object_and_csv_takes_the_first() -> None:
    first = Listing("a", "A", [Column("x", "x")], [{"x": 1}])
    second = Listing("b", "B", [Column("y", "y")], [{"y": [1, 2]}])
    assert json.loads(json_text(first, second)) == {"a": [{"x": 1}], "b": [{"y": [1, 2]}]}
    assert csv_text(second) == "y\n1;2\n"


def test_blocks_never_split_a_pair_and_keep_values_literal() -> None:
    long = "why " * 30
    listing = Listing("t", "", [Column("k", "key"), Column("w", "why"), Column("m", "markup")], [])
    listing.rows = [{"k": "v1", "w": long, "m": "[bold]x[/bold]"}]
    lines = blocks(listing, 80)
    assert lines[0] == "key: v1"
    assert lines[1] == "  why: " + long.strip()  # longer than the width: alone on its line, never cut
    assert lines[2] == "  markup: [bold]x[/bold]"
    assert "[bold]x[/bold]" in _render(fit(listing, 80), 80)  # a value is not read as rich markup


def test_models_listings_fit_80_columns() -> None:
    model = SimpleNamespace(
        name="forgeline-demo-lm",
        latest_versions=[SimpleNamespace(version="3")],
        aliases={"champion": "1", "challenger": "3"},
        last_updated_timestamp=START,
    )
    text = _render(fit(models_listing([model]), 80), 80)
    assert "forgeline-demo-lm" in text and "challenger→3, champion→1" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_empty_alias_history_keeps_its_caption(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.tasks.tracking import registry_store

    monkeypatch.setattr(registry_store, "alias_history", lambda name: [])
    version = SimpleNamespace(version="1", tags={"forgeline.promoted": "true"})
    text = _render(fit(history_listing("m", [version]), 80), 80)
    assert "no alias moves recorded yet; versions the gate promoted: 1" in text


@pytest.mark.parametrize(("value", "shown"), [(None, "-"), ("", "-"), (["a", "b"], "a, b"), ("x\ny", "x y")])
def test_plain_cells_are_one_line(value: Any, shown: str) -> None:
    assert plain(value) == shown


@pytest.fixture
def root_logging() -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger("forgeline")
    saved = (root.handlers[:], root.level, ours.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    ours.setLevel(saved[2])


def test_log_lines_to_a_file_are_never_wrapped(
    root_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert not console.err.is_terminal  # pytest captures standard error, as a pipe or a file would
    console.configure_logging(verbose=False)
    message = "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  " + "x" * 60
    logging.getLogger("forgeline.tasks.train.loop").info(message, 40, 200, 3.2667, 3.05e-4, 123456)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert " INFO    step 40/200  loss 3.2667  lr 3.05e-04  123456 tok/s  xxx" in lines[0]


def test_a_terminal_keeps_rich_log_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.logging import RichHandler

    monkeypatch.setattr(console.err, "_force_terminal", True)
    assert isinstance(console.log_handler(), RichHandler)
