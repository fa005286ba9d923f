"""Labeled data through the real command line and the clean task (issue 16; RELIABILITY.md row H4).

Each bad labeled input fails in the clean stage: one ``error:`` line naming the file, column or class (and
its count), exit 2, no model version. Two cases run in the default suite; the others (a CLI run each, about
30 s on 2 cores) are marked slow. The clean task on good labeled data logs the per-class counts as an
MLflow table and a Prefect table artifact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.classifier_support import make_labeled_rows, write_labeled_csv
from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

CONFIG = """\
name: cls-data-test
seed: 7
task: {{kind: classification}}
data:
  sources: [{{kind: files, paths: [{paths}]}}]
  record: line
  split: {split}
  fractions: {{train: 0.8, validation: 0.1, test: 0.1}}
  text_columns: [title, description]
  label_column: {label}
tokenizer: {{kind: char}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 32, dropout: 0.0}}
train: {{epochs: 1, batch_size: 8}}
tracking: {{log_system_metrics: false}}
registry: {{model_name: cls-data-test}}
"""


def _rare(root: Path) -> list[str]:
    rows = make_labeled_rows(60) + [{"title": f"rare {i}", "description": "odd one", "tag": "rare"} for i in range(2)]
    write_labeled_csv(root / "d.csv", rows)
    return ["d.csv"]


def _single(root: Path) -> list[str]:
    write_labeled_csv(root / "d.csv", make_labeled_rows(40, labels={"nlp": ["text", "tokens", "parsing"]}))
    return ["d.csv"]


def _only_one(root: Path) -> list[str]:  # the stratified split can put it nowhere but one split
    rows = make_labeled_rows(60) + [{"title": "a lone robotics project", "description": "arm", "tag": "robotics"}]
    write_labeled_csv(root / "d.csv", rows)
    return ["d.csv"]


def _empty(root: Path) -> list[str]:
    rows = make_labeled_rows(40)
    rows[6]["tag"] = ""
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ["d.jsonl"]


def _mixed(root: Path) -> list[str]:
    rows = make_labeled_rows(60)
    write_labeled_csv(root / "names.csv", rows[:30])
    ids = [r | {"tag": i % 3} for i, r in enumerate(rows[30:])]
    (root / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ids), encoding="utf-8")
    return ["names.csv", "ids.jsonl"]


def _parquet(root: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(make_labeled_rows(40)), root / "d.parquet")
    return ["d.parquet"]


# case: (make data, label column, split, culprit in the error line)
CASES: dict[str, tuple[Callable[[Path], list[str]], str, str, str]] = {
    "class too rare": (_rare, "tag", "hash", "class 'rare' (2 records) in column 'tag'"),
    "no label column": (_parquet, "topic", "hash", "d.parquet: no column 'topic' (columns: title, description, tag)"),
    "empty label": (_empty, "tag", "hash", "d.jsonl:7: empty label (column 'tag')"),
    "one class only": (_single, "tag", "hash", "column 'tag' holds one class only ('nlp', 40 records"),
    "numbers and text": (_mixed, "tag", "hash", "ids.jsonl but text in "),
    "label seen once": (_only_one, "tag", "hash", "class 'robotics' (1 record) in column 'tag'"),
    "split tail": (_rare, "tag", "tail", "data.split: 'tail' joins all records"),
}
CORE = {"class too rare", "split tail"}  # in the default suite (the tail case fails before any start)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in CORE else pytest.mark.slow) for c in CASES], ids=list(CASES)
)
def test_bad_labeled_data_is_one_error_line_and_nothing_registered(project: Project, case: str) -> None:
    make, label, split, culprit = CASES[case]
    paths = make(project.root)
    text = CONFIG.format(paths=", ".join(paths), split=split, label=label)
    (project.root / "cls.yaml").write_text(text, encoding="utf-8")

    result = project.cli("run", "--config", "cls.yaml")

    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], result.describe()
    if project.has_store():
        assert project.client().search_registered_models() == []


def test_clean_task_logs_class_counts_as_tables(module_project: Project) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.runtime import flow_run

    from forgeline.flows.stages import RunContext, clean_task
    from forgeline.tasks.config import load_config
    from forgeline.tasks.tracking import store

    project = module_project
    write_labeled_csv(project.root / "tags.csv", make_labeled_rows(90))
    overrides = [
        "name=cls-clean-flow",
        "task.kind=classification",
        "data.sources=[{kind: files, paths: [tags.csv]}]",
        "data.text_columns=[title, description]",
        "data.label_column=tag",
        "data.record=line",
    ]
    cfg = load_config(None, overrides)
    store.setup_tracking(cfg.tracking, project.root)
    experiment_id = store.ensure_experiment(cfg.name, cfg.tracking, project.root)

    @flow(name="clean-labeled")
    def clean_labeled() -> tuple[Any, str]:
        ctx = RunContext(experiment_id=experiment_id, base_dir=str(project.root))
        return clean_task(cfg.data, ctx), str(flow_run.id)

    result, prefect_run_id = clean_labeled()

    assert set(result.class_counts["test"]) == {"mlops", "nlp", "vision"}
    client = project.client()
    (run,) = client.search_runs([experiment_id])
    assert run.data.metrics["classes"] == 3
    table = json.loads(
        Path(client.download_artifacts(run.info.run_id, "cleaning_classes.json", str(project.root))).read_text()
    )
    assert table["columns"] == ["label", "train", "validation", "test", "total"]
    assert {row[0]: row[4] for row in table["data"]} == {"mlops": 30, "nlp": 30, "vision": 30}
    with get_client(sync_client=True) as prefect_client:
        artifacts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["class-counts"]))
        )
    ours = [a for a in artifacts if str(a.flow_run_id) == prefect_run_id]
    assert len(ours) == 1 and ours[0].type == "table"
    assert "vision" in str(ours[0].data)
