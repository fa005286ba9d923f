"""A classifier through the deployed path and through ingest -> retrain, as a language model goes (issue 16.10).

- ``forgeline ingest`` (and the watcher) take labeled CSV/JSONL files and refuse what the clean stage would
  refuse (plain text, a missing label column, an empty label), so a bad file never breaks every later retrain;
- the ``retrain`` flow fine-tunes the registered classifier champion on the old data plus the new file and
  registers a version gated on ``test/f1_macro``;
- ``forgeline run --deployed`` on the session's Prefect test server with real process workers for both pools:
  the ``train`` flow run on the gpu pool hands its outcome back through MLflow, and the summary shows F1
  beside the TF-IDF baseline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgeline.tasks.config import PipelineConfig, load_config
from tests.classifier_support import make_labeled_rows, write_labeled_csv
from tests.integration.conftest import REPO_ROOT, Project

pytestmark = pytest.mark.integration

NAME = "cls-deployed"
CONFIG = f"""\
name: {NAME}
seed: 3
task: {{kind: classification}}
data:
  sources: [{{kind: files, paths: [tags.csv]}}]
  record: line
  fractions: {{train: 0.6, validation: 0.2, test: 0.2}}
  text_columns: [title, description]
  label_column: tag
tokenizer: {{kind: char}}
model: {{n_layer: 1, n_head: 2, n_embd: 16, block_size: 48, dropout: 0.0}}
train: {{epochs: 2, batch_size: 8, learning_rate: 3.0e-3, eval_interval: 5, log_interval: 5, device: cpu}}
tracking: {{log_system_metrics: false}}
registry: {{model_name: {NAME}}}
deploy:
  cpu_pool: {{name: cpu-cls}}
  gpu_pool: {{name: gpu-cls}}
  allow_cpu_fallback: true
  watch_interval: null
"""


def _config(project: Project) -> PipelineConfig:
    (project.root / "cls.yaml").write_text(CONFIG, encoding="utf-8")
    write_labeled_csv(project.root / "tags.csv", make_labeled_rows(90))
    return load_config(project.root / "cls.yaml")


def _version_tags(project: Project, version: str) -> dict[str, str]:
    return project.client().get_model_version(NAME, version).tags


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_labeled_files_are_ingested_and_retrain_the_classifier_champion(project: Project) -> None:
    import forgeline
    from forgeline.flows.retrain import IngestError, ingest_files, retrain_config, retrain_flow
    from forgeline.flows.watch import REJECTED, scan_drop_folder

    cfg = _config(project)
    first = forgeline.run("cls.yaml")
    assert (first.version, first.promoted) == ("1", True)

    # What the clean stage would refuse is refused at the door, one line naming the file; nothing moves.
    (project.root / "notes.txt").write_text("a plain note with no label at all\n", encoding="utf-8")
    write_labeled_csv(project.root / "topics.csv", [{"title": "t", "description": "d", "topic": "nlp"}])
    rows = make_labeled_rows(4, seed=9)
    rows[1]["tag"] = " "
    (project.root / "blank.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    refusals = {
        "notes.txt": "plain text has no column 'tag'; labeled data is CSV, JSON or Parquet",
        "topics.csv": "topics.csv: no column 'tag' (columns: title, description, topic)",
        "blank.jsonl": "blank.jsonl:2: empty label (column 'tag')",
    }
    for name, why in refusals.items():
        with pytest.raises(IngestError) as err:
            ingest_files([str(project.root / name)], cfg, settle=0.0)
        assert why in str(err.value) and "\n" not in str(err.value)
        assert (project.root / name).exists()
    assert not (project.root / "data" / "incoming").exists() or not any((project.root / "data" / "incoming").iterdir())

    # The watcher takes the same decisions for files dropped by other means.
    drop = project.root / "data" / "drop"
    drop.mkdir(parents=True)
    shutil.copy(project.root / "notes.txt", drop / "notes.txt")
    write_labeled_csv(drop / "more.csv", make_labeled_rows(30, seed=5))
    watched = scan_drop_folder(cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"watch_settle": 0.0})}))
    assert len(watched.added) == 1 and watched.added[0].endswith(".csv")
    assert "plain text has no column 'tag'" in watched.rejected["notes.txt"]
    assert (drop / REJECTED / "notes.txt").exists()

    retrained = retrain_config(cfg, project.root)
    assert retrained.model.init_from == f"models:/{NAME}@champion"
    assert retrained.data.sources[-1].text_column == "text"  # data.text_columns name the columns

    said = _LogLines()
    classifier_log = logging.getLogger("forgeline.tasks.model.classifier")  # whatever Prefect made of its parents
    level = classifier_log.level
    classifier_log.addHandler(said)
    classifier_log.setLevel(logging.INFO)
    try:
        run_id = retrain_flow(cfg, fingerprint=watched.fingerprint)
    finally:
        classifier_log.removeHandler(said)
        classifier_log.setLevel(level)
    assert any(f"fine-tuning models:/{NAME}@champion: using its tokenizer" in m for m in said.lines), said.lines
    assert not any("new head" in m for m in said.lines)  # the same labels: the champion's head goes on learning
    client = project.client()
    run = client.get_run(run_id)
    assert run.data.tags["forgeline.retrain_fingerprint"] == watched.fingerprint
    assert run.data.tags["model_version"] == "2"
    assert run.data.params["model.init_from"] == f"models:/{NAME}@champion"
    assert "data/incoming" in run.data.params["data.sources"]
    assert 0.0 <= run.data.metrics["test/f1_macro"] <= 1.0 and "baseline/f1_weighted" in run.data.metrics
    tags = _version_tags(project, "2")
    assert tags["forgeline.gate_metric"] == "test/f1_macro"
    assert tags["forgeline.task"] == "classification"
    assert "bits_per_byte" not in " ".join(tags)  # nothing of a language model's gate on a classifier

    assert retrain_flow(cfg).startswith("skipped: ")  # the same incoming data: nothing to do
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")) == ["1", "2"]


@contextlib.contextmanager
def _workers(project: Project, pools: list[str]) -> Iterator[None]:
    """A ``prefect worker`` per pool against the session's test server, stopped at the end."""
    env = {**project.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    logs = [open(project.root / f"worker-{pool}.log", "w") for pool in pools]  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(  # noqa: S603
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", pool, "--type", "process"],
            cwd=project.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for pool, log in zip(pools, logs, strict=True)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


@pytest.mark.slow
def test_a_classifier_runs_deployed_with_train_on_the_gpu_pool(project: Project) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    _config(project)
    for name in ("flows",):  # the workers load the flows from the project folder, as `forgeline deploy` says
        shutil.copytree(REPO_ROOT / name, project.root / name, ignore=shutil.ignore_patterns("__pycache__"))
    deployed = project.cli("deploy", "--config", "cls.yaml")
    assert deployed.returncode == 0, deployed.describe()
    assert "deployment train/train on pool gpu-cls" in deployed.stdout, deployed.describe()

    with _workers(project, ["cpu-cls", "gpu-cls"]):
        ran = project.cli("run", "--config", "cls.yaml", "--deployed", timeout=420)
    logs = "".join((project.root / f"worker-{p}.log").read_text()[-3000:] for p in ("cpu-cls", "gpu-cls"))
    assert ran.returncode == 0, ran.describe() + logs
    assert f"completed: {NAME} version 1" in ran.stdout, ran.describe()
    assert "promoted to champion: true" in ran.stdout
    f1_line = next(line for line in ran.stdout.splitlines() if line.startswith("test/f1_macro: "))
    assert "(baseline " in f1_line, ran.stdout
    assert "bits_per_byte" not in ran.stdout

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["train"])))
    (train,) = [r for r in runs if r.work_pool_name == "gpu-cls"]  # other tests' runs are on other pools
    assert train.state.is_completed()
    assert train.parent_task_run_id is not None  # a subflow of the pipeline
    tags = _version_tags(project, "1")
    assert tags["forgeline.gate_metric"] == "test/f1_macro" and tags["forgeline.task"] == "classification"
    from mlflow.pyfunc import load_model

    frame = load_model(f"models:/{NAME}@champion").predict(["pipeline deployment registry serving"])
    assert frame.to_dict(orient="records")[0]["label"] in {"mlops", "nlp", "vision"}, frame
