"""The clean task inside a real Prefect flow (test server) against a temporary SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

pytestmark = pytest.mark.integration

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def _paragraph(i: int) -> str:
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)]
    return f"Paragraph {i}: " + " ".join(words) + f" and the number {i} in words."


def _write_corpus(folder: Path) -> dict[str, int]:
    """Two text files of blank-line paragraphs with known duplicates, short and non-text records."""
    folder.mkdir(parents=True)
    good = [_paragraph(i) for i in range(80)]
    duplicates = [good[3], good[10], good[42]]  # exact copies: dropped as duplicate
    short = ["hi", "ok then"]  # under min_chars=10
    nontext = ["#### $$$$ 1234 ____ !!!! %%%% 5678 ****"]  # no letters at all
    first = good[:40] + duplicates[:1] + short
    second = good[40:] + duplicates[1:] + nontext
    (folder / "a.txt").write_text("\n\n".join(first) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n\n".join(second) + "\n", encoding="utf-8")
    return {
        "rows_in": len(first) + len(second),
        "kept": len(good),
        "duplicate": len(duplicates),
        "too_short": len(short),
        "non_text": len(nontext),
    }


@pytest.fixture(scope="module")
def cleaned(module_project: Any) -> dict[str, Any]:
    """Run a flow that calls ``clean_task`` twice on the same corpus; everything the tests read."""
    from prefect import flow
    from prefect.runtime import flow_run

    from forgeline.flows import stages
    from forgeline.flows.stages import RunContext, clean_task
    from forgeline.tasks.config import load_config
    from forgeline.tasks.tracking import store

    project = module_project
    expected = _write_corpus(project.root / "corpus")
    cfg = load_config(
        None,
        [
            "name=clean-flow-test",
            "data.sources=[{kind: files, paths: [corpus/a.txt, corpus/b.txt]}]",
            "data.record=paragraph",
            "data.fractions={train: 0.6, validation: 0.2, test: 0.2}",
            "data.cleaning.min_chars=10",
        ],
    )
    uri = store.setup_tracking(cfg.tracking, project.root)
    assert uri == project.tracking_uri
    experiment_id = store.ensure_experiment(cfg.name, cfg.tracking, project.root)

    @flow(name="clean-twice")
    def clean_twice() -> tuple[Any, Any, str]:
        tags = {**stages.prefect_tags(), "config_hash": cfg.config_hash()}
        ctx = RunContext(experiment_id=experiment_id, tags=tags, base_dir=str(project.root))
        return clean_task(cfg.data, ctx), clean_task(cfg.data, ctx), str(flow_run.id)

    first, second, prefect_run_id = clean_twice()
    runs = project.client().search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    return {
        "project": project,
        "cfg": cfg,
        "expected": expected,
        "first": first,
        "second": second,
        "prefect_run_id": prefect_run_id,
        "runs": runs,
    }


def test_report_accounts_for_every_record(cleaned: dict[str, Any]) -> None:
    first, expected, project = cleaned["first"], cleaned["expected"], cleaned["project"]
    assert first.cache_hit is False
    assert first.rows_in == expected["rows_in"]
    assert first.dropped["duplicate"] == expected["duplicate"]
    assert first.dropped["too_short"] == expected["too_short"]
    assert first.dropped["non_text"] == expected["non_text"]
    assert sum(first.dropped.values()) == expected["rows_in"] - expected["kept"]
    assert set(first.rows_per_split) == {"train", "validation", "test"}
    assert all(n > 0 for n in first.rows_per_split.values()), first.rows_per_split
    assert sum(first.rows_per_split.values()) == expected["kept"]
    assert first.rows_per_split["train"] > first.rows_per_split["test"]
    dataset_dir = Path(first.dataset_dir)
    assert dataset_dir.is_relative_to(project.root / "mlruns" / "cache")
    for split, rows in first.rows_per_split.items():
        assert len(datasets.load_from_disk(str(dataset_dir / split))) == rows


def test_second_call_is_a_cache_hit(cleaned: dict[str, Any]) -> None:
    first, second = cleaned["first"], cleaned["second"]
    assert second.cache_hit is True
    assert second.fingerprint == first.fingerprint
    assert second.dataset_dir == first.dataset_dir
    assert second.rows_per_split == first.rows_per_split
    assert second.dropped == first.dropped


def test_each_call_is_a_finished_clean_run(cleaned: dict[str, Any]) -> None:
    first, expected, cfg, runs = cleaned["first"], cleaned["expected"], cleaned["cfg"], cleaned["runs"]
    assert [r.info.run_name for r in runs] == ["clean", "clean"]
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert run.data.tags["data_fingerprint"] == first.fingerprint
        assert run.data.tags["prefect.flow_run_id"] == cleaned["prefect_run_id"]
        assert run.data.tags["config_hash"] == cfg.config_hash()
        assert run.data.metrics["rows_in"] == expected["rows_in"]
        assert run.data.metrics["dropped/duplicate"] == expected["duplicate"]
        assert run.data.metrics["rows/train"] == first.rows_per_split["train"]


def test_cache_hit_tag(cleaned: dict[str, Any]) -> None:
    # Boolean tags are lowercase elsewhere (forgeline.promoted, forgeline.git_dirty): filterable as 'true'.
    run1, run2 = cleaned["runs"]
    assert run1.data.tags["forgeline.cache_hit"] == "false"
    assert run2.data.tags["forgeline.cache_hit"] == "true"


def test_splits_are_dataset_inputs_with_the_fingerprint(cleaned: dict[str, Any]) -> None:
    first, project = cleaned["first"], cleaned["project"]
    for run in cleaned["runs"]:
        inputs = project.client().get_run(run.info.run_id).inputs.dataset_inputs
        by_name = {d.dataset.name: d for d in inputs}
        assert set(by_name) == {"cleaned-train", "cleaned-validation", "cleaned-test"}
        for split in ("train", "validation", "test"):
            ds_input = by_name[f"cleaned-{split}"]
            assert first.fingerprint.startswith(ds_input.dataset.digest)
            assert len(ds_input.dataset.digest) >= 12
            assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == split
            assert json.loads(ds_input.dataset.profile)["rows"] == first.rows_per_split[split]
            assert json.loads(ds_input.dataset.source)["uri"].endswith(f"/{split}")
            assert "text" in json.loads(ds_input.dataset.schema)["mlflow_colspec"][0]["name"]


def test_cleaning_report_artifact(cleaned: dict[str, Any]) -> None:
    first, expected, project = cleaned["first"], cleaned["expected"], cleaned["project"]
    client = project.client()
    run_id = cleaned["runs"][0].info.run_id
    assert "cleaning_report.json" in {a.path for a in client.list_artifacts(run_id)}
    report_path = client.download_artifacts(run_id, "cleaning_report.json", str(project.root / "dl"))
    report = json.loads(Path(report_path).read_text())
    assert report["fingerprint"] == first.fingerprint
    assert report["rows_in"] == expected["rows_in"]
    assert report["rows_per_split"] == first.rows_per_split
    assert report["dropped"] == first.dropped


def test_cleaning_report_tables_are_mlflow_tables(cleaned: dict[str, Any]) -> None:
    first, project = cleaned["first"], cleaned["project"]
    client = project.client()
    run_id = cleaned["runs"][0].info.run_id
    assert {"cleaning_rules.json", "cleaning_splits.json"} <= {a.path for a in client.list_artifacts(run_id)}
    rules = json.loads(Path(client.download_artifacts(run_id, "cleaning_rules.json", str(project.root))).read_text())
    assert rules["columns"] == ["rule", "records", "share_of_input"]
    assert {row[0]: row[1] for row in rules["data"]} == first.dropped
    splits = client.download_artifacts(run_id, "cleaning_splits.json", str(project.root))
    assert {row[0]: row[1] for row in json.loads(Path(splits).read_text())["data"]} == first.rows_per_split


def test_prefect_table_artifact(cleaned: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["cleaning-report"]))
        )
    ours = [a for a in artifacts if str(a.flow_run_id) == cleaned["prefect_run_id"]]
    assert len(ours) == 2, artifacts
    assert all(a.type == "table" for a in ours)


def test_cache_hit_logs_the_kept_chart_without_drawing(
    cleaned: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgeline.tasks.tracking import runs as tracking_runs
    from forgeline.tasks.tracking import stage_records

    project, first, second = cleaned["project"], cleaned["first"], cleaned["second"]
    client = project.client()
    downloaded = []
    for i, run in enumerate(cleaned["runs"][:2]):  # the first run drew the chart, the cache hit re-used it
        assert "cleaning_report.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        dest = project.root / f"chart-{i}"
        dest.mkdir()
        downloaded.append(Path(client.download_artifacts(run.info.run_id, "cleaning_report.png", str(dest))))
    assert downloaded[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert downloaded[0].read_bytes() == downloaded[1].read_bytes()
    assert list(Path(first.dataset_dir).glob("cleaning_report-*.png"))

    def no_drawing(*_: Any) -> None:
        raise AssertionError("drew the chart again")

    monkeypatch.setattr(stage_records, "_draw_cleaning_chart", no_drawing)
    exp = cleaned["runs"][0].info.experiment_id
    with tracking_runs.stage_run(exp, "chart-again") as run_id:
        stage_records.log_cleaning_chart(run_id, second)
    assert "cleaning_report.png" in {a.path for a in client.list_artifacts(run_id)}


def test_clean_retries_a_transient_failure_but_not_bad_input(
    cleaned: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    from forgeline.flows import stages
    from forgeline.tasks.data.cleaning import DataError

    cfg, project = cleaned["cfg"], cleaned["project"]
    ctx = stages.RunContext(experiment_id=cleaned["runs"][0].info.experiment_id, tags={}, base_dir=str(project.root))
    real = stages.clean_dataset
    calls: list[str] = []

    def flaky(data_cfg: Any, **kwargs: Any) -> Any:
        calls.append("flaky")
        if len(calls) == 1:
            raise OSError("the network mount went away")
        return real(data_cfg, **kwargs)

    def bad_input(data_cfg: Any, **kwargs: Any) -> Any:
        calls.append("bad")
        raise DataError("no records left after cleaning")

    clean = stages.clean_task.with_options(retry_delay_seconds=0)

    @flow(name="clean-once")
    def clean_once() -> Any:
        return clean(cfg.data, ctx)

    monkeypatch.setattr(stages, "clean_dataset", flaky)
    assert clean_once().fingerprint == cleaned["first"].fingerprint
    assert calls == ["flaky", "flaky"]  # failed once, retried once

    calls.clear()
    monkeypatch.setattr(stages, "clean_dataset", bad_input)
    with pytest.raises(DataError, match="no records"):
        clean_once()
    assert calls == ["bad"]  # bad input fails at once
