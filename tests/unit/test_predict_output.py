"""`forgeline predict` without a store: its texts, its refusals, its three output formats; and the classifier
figures that `compare`, `models` and the model card show (flows/cli/predict.py, history.py, models.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer

from forgeline.flows.cli import console
from forgeline.flows.cli.console import Output
from forgeline.flows.cli.format import emit
from forgeline.flows.cli.history import compare_listing, rank_runs, ranking
from forgeline.flows.cli.models import has_held_out_split, registry_metric, version_gate, versions_listing
from forgeline.flows.cli.predict import check_classifier, predictions_listing, read_texts
from forgeline.tasks.registry.model_card import build_model_card

TEXTS = ["A pipeline that deploys models", "Segmenting pixels | in images"]
PREDICTIONS = [{"label": "mlops", "score": 0.93}, {"label": "vision", "score": 0.61}]


def test_predictions_as_json_csv_and_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    listing = predictions_listing("models:/clf@champion", TEXTS, PREDICTIONS)
    emit(Output.JSON, listing)
    assert json.loads(capsys.readouterr().out) == [
        {"text": TEXTS[0], "label": "mlops", "score": 0.93},
        {"text": TEXTS[1], "label": "vision", "score": 0.61},
    ]
    emit(Output.CSV, listing)
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["text"], r["label"], float(r["score"])) for r in rows] == [
        (TEXTS[0], "mlops", 0.93),
        (TEXTS[1], "vision", 0.61),
    ]
    monkeypatch.setattr(console.out, "width", 100)
    emit(Output.TABLE, listing)
    table = capsys.readouterr().out
    assert "models:/clf@champion: 2 texts" in table
    assert "mlops" in table and "0.9300" in table and "0.6100" in table


def test_long_texts_are_cut_in_the_table_only(capsys: pytest.CaptureFixture[str]) -> None:
    text = "word " * 40
    listing = predictions_listing("m", [text], PREDICTIONS[:1])
    assert listing.title == "m: 1 text"
    assert len(listing.columns[0].text(listing.rows[0])) == 60
    emit(Output.JSON, listing)
    assert json.loads(capsys.readouterr().out)[0]["text"] == text


def test_texts_from_options_and_file(tmp_path: Path) -> None:
    lines = tmp_path / "texts.txt"
    lines.write_text("first line\n\n  \nsecond line\n", encoding="utf-8")
    assert read_texts(["given"], lines) == ["given", "first line", "second line"]
    assert read_texts(None, lines) == ["first line", "second line"]


@pytest.mark.parametrize(
    ("texts", "content", "message"),
    [
        (None, "\n \n", "empty: no text to classify"),
        (None, None, "nothing to classify"),
        ([" "], None, "--text is empty"),
        (None, b"\xff\xfe bad", "cannot read it"),
    ],
)
def test_no_text_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], texts: list[str] | None, content: Any, message: str
) -> None:
    path = None
    if content is not None:
        path = tmp_path / "in.txt"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(typer.Exit) as exit_info:
        read_texts(texts, path)
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit):
        read_texts(None, tmp_path / "nope.txt")
    assert "nope.txt: no such file" in capsys.readouterr().err


def test_a_language_model_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(typer.Exit) as exit_info:
        check_classifier(str(tmp_path), None)
    assert exit_info.value.exit_code == 2
    assert "is a language model: predict is for text classifiers; use `forgeline generate`" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2ForSequenceClassification"]}))
    check_classifier(str(tmp_path), None)  # a classifier folder passes
    with pytest.raises(typer.Exit):
        check_classifier(str(tmp_path / "missing"), None)
    assert "no such model folder" in capsys.readouterr().err


# ------------------------------------------------------------------------ classifier figures in listings
def _run(run_id: str, f1: float, accuracy: float, baseline: float) -> Any:
    metrics = {
        "test/f1_macro": f1,
        "test/accuracy": accuracy,
        "test/f1_weighted": f1 + 0.01,
        "baseline/accuracy": baseline,
        "baseline/f1_weighted": baseline - 0.01,
        "test/loss": 0.5,
    }
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=1, end_time=2000, status="FINISHED"),
        data=SimpleNamespace(params={}, metrics=metrics, tags={}),
    )


def test_compare_ranks_classifiers_by_f1_highest_first_beside_the_baseline() -> None:
    runs = [_run("a" * 32, 0.70, 0.72, 0.90), _run("b" * 32, 0.85, 0.86, 0.91)]
    metric, higher = ranking(None, runs, None, None)
    assert (metric, higher) == ("test/f1_macro", True)
    ranked = rank_runs(runs, metric, higher_is_better=higher)
    assert [r.info.run_id[0] for r in ranked] == ["b", "a"]
    listing = compare_listing(ranked, metric, title="t")
    heads = [c.head for c in listing.columns if c.head]
    for head in ("test f1", "test acc", "base acc", "test f1 w", "base f1 w"):
        assert head in heads
    assert "test bpb" not in heads
    assert listing.records()[0]["baseline/f1_weighted"] == pytest.approx(0.90)
    assert ranking(None, runs, "test/loss", None) == ("test/loss", False)  # direction from the name
    assert ranking(None, runs, "test/loss", True) == ("test/loss", True)  # unless given


def test_models_listing_shows_the_gate_metric_of_a_classifier() -> None:
    tags = {"forgeline.gate_metric": "test/f1_macro", "test_f1_macro": "0.8125", "data_fingerprint": "f" * 64}
    versions = [SimpleNamespace(version="1", creation_timestamp=1, tags=tags, run_id="r")]
    assert registry_metric(versions) == "test/f1_macro"
    listing = versions_listing("clf", versions, {"1": ["champion"]})
    assert "test f1" in [c.head for c in listing.columns]
    assert listing.records()[0]["test_f1_macro"] == pytest.approx(0.8125)
    assert version_gate(versions[0], None) == ("test/f1_macro", True)
    lm = SimpleNamespace(version="1", creation_timestamp=1, tags={"test_bits_per_byte": "2.5"}, run_id="r")
    assert registry_metric([lm]) == "test/bits_per_byte" and version_gate(lm, None) == ("test/bits_per_byte", False)


def test_held_out_split_found_in_arrow_and_older_caches(tmp_path: Path) -> None:
    assert not has_held_out_split(tmp_path)
    (tmp_path / "test").mkdir()
    assert has_held_out_split(tmp_path)
    older = tmp_path / "older"
    older.mkdir()
    (older / "validation.jsonl").write_text("{}\n")
    assert has_held_out_split(older)


def test_model_card_of_a_classifier_shows_baseline_and_per_class() -> None:
    card = build_model_card(
        {
            "model_name": "clf",
            "version": "2",
            "previous_champion": "1",
            "gate_metric": "test/f1_macro",
            "higher_is_better": True,
            "metrics": {
                "test/accuracy": 0.8,
                "test/f1_macro": 0.75,
                "test/loss": 0.6,
                "baseline/accuracy": 0.9,
                "baseline/f1_macro": 0.88,
            },
            "champion_metrics": {"test/f1_macro": 0.70},
            "per_class": [
                {"label": "mlops", "precision": 0.9, "recall": 0.8, "f1": 0.847, "support": 10},
                {"label": "vision", "precision": 0.5, "recall": 0.6, "f1": 0.545, "support": 5},
            ],
        }
    )
    assert "- **Gate metric:** `test/f1_macro` (higher is better)" in card
    assert "| metric | this version | baseline | champion (v1) | difference |" in card
    assert "| test/f1_macro | 0.7500 | 0.8800 | 0.7000 | +0.0500 (better) |" in card
    assert "| test/accuracy | 0.8000 | 0.9000 | - | - |" in card
    assert "| test/loss | 0.6000 | - | - | - |" in card
    assert "baseline/accuracy |" not in card  # the baseline is a column, not rows
    assert card.index("test/f1_macro |") < card.index("test/accuracy |")
    assert "## Per class" in card and "| label | precision | recall | f1 | support |" in card
    assert "| mlops | 0.9000 | 0.8000 | 0.8470 | 10 |" in card
    assert "Higher is better for accuracy" in card


def test_version_metrics_read_a_classifier_figures_from_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.flows.cli import lookup
    from forgeline.tasks.tracking import queries

    monkeypatch.setattr(queries, "parent_run_metrics", lambda run_id: {"test/loss": 1.0, "time/train": 3.0})
    tags = {"test_loss": "1.5", "test_f1_macro": "0.5", "baseline_f1_weighted": "0.9", "forgeline.test_x": "1"}
    version = SimpleNamespace(tags={**tags, "train_run_id": "r"}, run_id="r")
    assert lookup.version_metrics(version) == {"test/loss": 1.0, "test/f1_macro": 0.5, "baseline/f1_weighted": 0.9}


def test_promote_rescores_a_champion_when_the_candidate_data_is_an_arrow_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`promote` looked for the pre-Arrow `test.jsonl` and so never re-scored: now the Arrow split is found."""
    from forgeline.flows import rescore
    from forgeline.flows.cli import lookup, models
    from forgeline.tasks.config import PipelineConfig

    cfg = PipelineConfig.model_validate({"data": {"cache_dir": str(tmp_path)}})
    (tmp_path / "datasets" / "fp2" / "test").mkdir(parents=True)
    monkeypatch.setattr(lookup, "version_config", lambda version: cfg)
    asked: list[tuple[str, str, str]] = []

    def scored(uri: str, config: Any, dataset_dir: str) -> float:
        asked.append((uri, config.gate_metric()[0], dataset_dir))
        return 2.5

    monkeypatch.setattr(rescore, "rescore_model", scored)
    candidate = SimpleNamespace(version="3", tags={"data_fingerprint": "fp2", "test_bits_per_byte": "2.4"})
    champion = SimpleNamespace(name="lm", version="2", tags={"data_fingerprint": "fp1", "test_bits_per_byte": "2.0"})
    promoted, reason = models.manual_gate(candidate, champion, 0.0)
    assert asked == [("models:/lm/2", "test/bits_per_byte", str(tmp_path / "datasets" / "fp2"))]
    assert promoted and "2.4000 vs champion 2.5000 bits/byte" in reason and "re-scored" in reason
    # On F1 the same figures read the other way round, and the re-scoring is asked for that metric.
    candidate.tags["test_f1_macro"] = "0.6"
    promoted, reason = models.manual_gate(candidate, champion, 0.0, metric="test/f1_macro", higher_is_better=True)
    assert asked[-1][1] == "test/f1_macro" and not promoted and "test/f1_macro" in reason
