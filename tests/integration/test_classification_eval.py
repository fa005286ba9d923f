"""The evaluate task on a classifier inside a real Prefect flow, recording to a temporary SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.classifier_support import make_labeled_rows, make_tiny_classifier

pytestmark = pytest.mark.integration

LABELS = ["mlops", "nlp", "vision"]


def _write_dataset(root: Path) -> Path:
    import datasets

    from forgeline.tasks.data.labels import LabelSet, write_label_set

    rows = make_labeled_rows(150, seed=3)
    parts = {"train": rows[:90], "validation": rows[90:114], "test": rows[114:]}
    for split, part in parts.items():
        data = {"text": [f"{r['title']}\n{r['description']}" for r in part], "label": [r["tag"] for r in part]}
        datasets.Dataset.from_dict(data).save_to_disk(str(root / split))
    write_label_set(root, LabelSet(labels=LABELS))
    return root


@pytest.fixture(scope="module")
def evaluated(module_project: Any) -> dict[str, Any]:
    """A flow that runs ``evaluate_task`` once on a tiny classifier; everything the tests read."""
    from prefect import flow
    from prefect.runtime import flow_run

    from forgeline.flows import stages
    from forgeline.flows.stages import RunContext, TrainOutcome, evaluate_task
    from forgeline.tasks.config import load_config
    from forgeline.tasks.tracking import store
    from forgeline.tasks.train.loop import TrainResult

    project = module_project
    dataset_dir = _write_dataset(project.root / "dataset")
    texts = [f"{r['title']}\n{r['description']}" for r in make_labeled_rows(150, seed=3)]
    run_dir = project.root / "checkpoints" / "run"
    model_dir = make_tiny_classifier(run_dir / "model", LABELS, texts)
    cfg = load_config(
        None,
        [
            "name=classification-eval-test",
            "task.kind=classification",
            "data.label_column=tag",
            "model.block_size=32",
            "train.batch_size=8",
            "train.device=cpu",
        ],
    )
    store.setup_tracking(cfg.tracking, project.root)
    experiment_id = store.ensure_experiment(cfg.name, cfg.tracking, project.root)
    outcome = TrainOutcome(
        train_run_id="not-used",
        model_uri="models:/m-not-used",
        lineage="lineage",
        result=TrainResult(run_dir=str(run_dir), model_dir=str(model_dir), steps=0),
    )

    @flow(name="evaluate-classifier")
    def evaluate_once() -> tuple[Any, str]:
        ctx = RunContext(experiment_id=experiment_id, tags=stages.prefect_tags(), base_dir=str(project.root))
        return evaluate_task(cfg, outcome, str(dataset_dir), ctx), str(flow_run.id)

    result, prefect_run_id = evaluate_once()
    (run,) = project.client().search_runs([experiment_id], filter_string="tags.`mlflow.runName` = 'evaluate'")
    return {"project": project, "result": result, "run": run, "prefect_run_id": prefect_run_id, "run_dir": run_dir}


def _table(evaluated: dict[str, Any], name: str) -> dict[str, Any]:
    project = evaluated["project"]
    dest = project.root / "downloads"
    dest.mkdir(exist_ok=True)
    path = project.client().download_artifacts(evaluated["run"].info.run_id, name, str(dest))
    return json.loads(Path(path).read_text())


def test_every_metric_is_logged_with_its_value(evaluated: dict[str, Any]) -> None:
    result, run = evaluated["result"], evaluated["run"]
    logged = run.data.metrics
    assert {
        "test/accuracy",
        "test/precision_macro",
        "test/recall_macro",
        "test/f1_macro",
        "test/precision_weighted",
        "test/recall_weighted",
        "test/f1_weighted",
        "test/loss",
        "baseline/accuracy",
        "baseline/f1_weighted",
        "baseline/f1_macro",
    } == set(logged)
    assert logged == pytest.approx(result.metrics)
    assert logged["baseline/f1_weighted"] >= 0.9  # the words give each tag away
    assert 0.0 <= logged["test/accuracy"] <= 1.0
    assert "test/bits_per_byte" not in logged  # nothing of the language-model evaluation


def test_per_class_table_is_an_mlflow_table(evaluated: dict[str, Any]) -> None:
    result = evaluated["result"]
    table = _table(evaluated, "per_class.json")
    assert table["columns"] == ["label", "precision", "recall", "f1", "support"]
    assert [row[0] for row in table["data"]] == LABELS
    assert sum(row[4] for row in table["data"]) == result.examples == 36
    for row, expected in zip(table["data"], result.per_class, strict=True):
        assert row == pytest.approx([expected[c] for c in table["columns"]])


def test_confident_mistakes_table_holds_the_mistakes(evaluated: dict[str, Any]) -> None:
    result = evaluated["result"]
    table = _table(evaluated, "confident_mistakes.json")
    assert table["columns"] == ["text", "true", "predicted", "score"]
    wrong = result.examples - sum(result.confusion[i][i] for i in range(len(LABELS)))
    assert len(table["data"]) == min(20, wrong) > 0  # an untrained model gets many wrong
    scores = [row[3] for row in table["data"]]
    assert scores == sorted(scores, reverse=True)
    assert all(row[1] != row[2] and row[1] in LABELS and row[2] in LABELS for row in table["data"])
    # the run page lists both as tables (the tag MLflow's table viewer reads)
    logged = json.loads(evaluated["run"].data.tags["mlflow.loggedArtifacts"])
    assert {"per_class.json", "confident_mistakes.json"} <= {a["path"] for a in logged if a["type"] == "table"}


def test_confusion_matrix_png_and_counts(evaluated: dict[str, Any]) -> None:
    project, run = evaluated["project"], evaluated["run"]
    names = {a.path for a in project.client().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "confusion_matrix.json"} <= names
    dest = project.root / "png"
    dest.mkdir()
    png = project.client().download_artifacts(run.info.run_id, "confusion_matrix.png", str(dest))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    counts = _table(evaluated, "confusion_matrix.json")
    assert counts["labels"] == LABELS
    assert counts["counts"] == evaluated["result"].confusion
    assert sum(map(sum, counts["counts"])) == 36
    # the local copy sits beside the model, in the training run's folder
    assert Path(evaluated["result"].confusion_png) == evaluated["run_dir"] / "evaluation" / "confusion_matrix.png"


def test_prefect_table_artifacts(evaluated: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["per-class", "confident-mistakes"]))
        )
    ours = {a.key: a for a in artifacts if str(a.flow_run_id) == evaluated["prefect_run_id"]}
    assert set(ours) == {"per-class", "confident-mistakes"}
    assert all(a.type == "table" for a in ours.values())
    per_class = json.loads(ours["per-class"].data)
    assert [row["label"] for row in per_class] == LABELS
