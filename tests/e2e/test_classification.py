"""A text classifier through the stack's retrain path, as a language model goes (issue 16.10).

``forgeline up`` -> ``deploy`` a classification config -> a plain ``forgeline run`` (recorded in the stack's
MLflow server) makes the champion -> ``ingest`` a labeled CSV (a plain text file is refused first) -> the
``retrain`` deployment's trigger fine-tunes the classifier champion with ``train`` on the gpu pool -> version 2,
gated on ``test/f1_macro`` -> ``down``. About 3 minutes on 2 cores.
"""

from __future__ import annotations

import time

import pytest

from tests.classifier_support import make_labeled_rows, write_labeled_csv
from tests.e2e.conftest import Project, prefect_client

pytestmark = pytest.mark.e2e

NAME = "cls-e2e"
CONFIG = f"""\
name: {NAME}
task: {{kind: classification}}
data:
  sources: [{{kind: files, paths: [tags.csv]}}]
  record: line
  text_columns: [title, description]
  label_column: tag
tokenizer: {{kind: char}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 48, dropout: 0.0}}
train: {{epochs: 1, batch_size: 8, learning_rate: 3.0e-3, eval_interval: 4, device: cpu}}
tracking: {{log_system_metrics: false}}
registry: {{model_name: {NAME}}}
deploy: {{allow_cpu_fallback: true, watch_interval: null, incoming_dir: data/incoming-{NAME}}}
"""


def _retrains(api: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(api) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain"])))


def test_a_classifier_is_ingested_and_retrained_on_the_stack(project: Project) -> None:
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    project.forgeline("up", "--prefect-port", str(project.prefect_port), "--mlflow-port", str(project.mlflow_port))
    api = f"http://127.0.0.1:{project.prefect_port}/api"
    (project.root / "cls.yaml").write_text(CONFIG, encoding="utf-8")
    write_labeled_csv(project.root / "tags.csv", make_labeled_rows(90))
    cls = ["--config", "cls.yaml"]
    deployed = project.forgeline("deploy", *cls).stdout
    assert "deployment retrain/retrain on pool cpu" in deployed, deployed

    first = project.forgeline("run", *cls).stdout
    assert f"{NAME} version 1" in first and "promoted to champion" in first, first

    notes = project.root / "notes.txt"
    notes.write_text("a plain note, no label\n", encoding="utf-8")
    refused = project.forgeline("ingest", *cls, str(notes), check=False)
    assert refused.returncode == 2 and "plain text has no column 'tag'" in refused.stderr, refused
    assert notes.exists() and not _retrains(api)

    new = write_labeled_csv(project.root / "more.csv", make_labeled_rows(30, seed=5))
    out = project.forgeline("ingest", *cls, str(new)).stdout
    assert "emitted forgeline.dataset.updated" in out, out
    fingerprint = out.split("incoming fingerprint ")[1].split()[0]
    deadline = time.monotonic() + 300
    while not ((runs := _retrains(api)) and all(r.state and r.state.is_final() for r in runs)):
        assert time.monotonic() < deadline, [r.state for r in runs]
        time.sleep(2)
    (retrain,) = runs
    assert retrain.state.is_completed(), retrain.state
    assert retrain.parameters["fingerprint"] == fingerprint

    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{project.mlflow_port}")
    experiment = client.get_experiment_by_name(NAME)
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`forgeline.retrain_fingerprint` = '{fingerprint}'"
    )
    assert run.data.tags["model_version"] == "2"
    assert run.data.params["model.init_from"] == f"models:/{NAME}@champion"
    assert "test/f1_macro" in run.data.metrics and "baseline/f1_weighted" in run.data.metrics
    with prefect_client(api) as prefect:  # the plain run trained in-process: the one train deployment run is this
        (train,) = prefect.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])))
    assert train.state.is_completed() and train.work_pool_name == "gpu"
    assert client.get_model_version(NAME, "2").tags["forgeline.gate_metric"] == "test/f1_macro"

    project.forgeline("down")
