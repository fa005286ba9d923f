"""The whole pipeline on smoke.yaml: what lands in MLflow, the registry and the summary.

Runs share one project folder: a first run through the CLI (its printed summary is under test), then,
in-process through ``forgeline.run``, the same config again (re-use, no new version), a deliberately
worse model (a new lineage: version 2, challenger but not champion), new data and another store.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CliResult, Project, runs_by_name

pytestmark = pytest.mark.integration

EXPERIMENT = "forgeline-smoke"
MODEL = "forgeline-smoke-lm"
STAGES = ("clean", "train", "evaluate", "register")
MAX_STEPS = 40  # smoke.yaml
LINEAGE = "forgeline.lineage"


def _squash(text: str) -> str:
    """Output with rich's table borders and line wrapping removed."""
    return re.sub(r"[\s│┃|]+", " ", text)


@pytest.fixture(scope="module")
def first(module_project: Project) -> CliResult:
    result = module_project.run_pipeline()
    assert result.returncode == 0, result.describe()
    return result


@pytest.fixture(scope="module")
def state(module_project: Project, first: CliResult) -> dict[str, Any]:
    """Experiment, runs and registry as the first run left them."""
    client = module_project.client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = runs_by_name(client, experiment.experiment_id)
    return {"client": client, "experiment": experiment, "runs": runs}


@pytest.fixture(scope="module")
def again(module_project: Project, state: dict[str, Any]) -> Any:
    return module_project.run_in_process()


@pytest.fixture(scope="module")
def worse(module_project: Project, again: Any) -> Any:
    return module_project.run_in_process("train.max_steps=1", "train.warmup_steps=0")


def _only(runs: dict[str, list[Any]], name: str) -> Any:
    assert len(runs.get(name, [])) == 1, {k: len(v) for k, v in runs.items()}
    return runs[name][0]


# ------------------------------------------------------------------------------------ first run
def test_summary_names_model_version_and_champion(first: CliResult) -> None:
    out = _squash(first.stdout)
    assert "Forgeline run summary" in out
    assert f"{MODEL} version 1" in out
    assert "champion promoted to champion" in out
    assert EXPERIMENT in out


def test_one_finished_pipeline_run_with_nested_stage_runs(state: dict[str, Any]) -> None:
    runs = state["runs"]
    assert sorted(runs) == sorted(["pipeline", *STAGES])
    parent = _only(runs, "pipeline")
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    for name in STAGES:
        child = _only(runs, name)
        assert child.info.status == "FINISHED", name
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id, name


def test_train_metric_histories(module_project: Project, state: dict[str, Any]) -> None:
    client = state["client"]
    train_id = _only(state["runs"], "train").info.run_id

    def steps(key: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(train_id, key))

    assert steps("train/loss") == list(range(1, MAX_STEPS + 1))
    assert steps("lr") == list(range(1, MAX_STEPS + 1))
    assert steps("grad_norm") == list(range(1, MAX_STEPS + 1))
    assert steps("val/loss") == [10, 20, 30, 40]  # eval_interval 10
    assert steps("tokens_per_sec") == list(range(5, MAX_STEPS + 1, 5))  # log_interval 5
    losses = {m.step: m.value for m in client.get_metric_history(train_id, "train/loss")}
    assert losses[MAX_STEPS] < losses[1]  # it learned something
    assert all(m.value > 0 for m in client.get_metric_history(train_id, "tokens_per_sec"))


def test_params_are_the_flattened_config(state: dict[str, Any]) -> None:
    for name in ("pipeline", "train"):
        params = _only(state["runs"], name).data.params
        assert params["train.max_steps"] == str(MAX_STEPS), name
        assert params["name"] == EXPERIMENT
        assert params["model.n_layer"] == "2"
        assert params["registry.model_name"] == MODEL


def test_runs_are_tagged_with_fingerprint_config_hash_and_prefect_run(state: dict[str, Any]) -> None:
    runs = state["runs"]
    parent = _only(runs, "pipeline")
    fingerprint = parent.data.tags["data_fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    config_hash = parent.data.tags["config_hash"]
    for name in ("pipeline", *STAGES):
        tags = _only(runs, name).data.tags
        assert tags["config_hash"] == config_hash, name
        assert tags.get("prefect.flow_run_id"), name
    for name in ("pipeline", "clean", "train"):
        assert _only(runs, name).data.tags["data_fingerprint"] == fingerprint, name
    # The train flow is a subflow: its runs carry its own Prefect flow run id.
    assert _only(runs, "train").data.tags["prefect.flow_run_id"] != parent.data.tags["prefect.flow_run_id"]
    assert _only(runs, "clean").data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"]


def test_prefect_flow_run_exists(state: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    parent = _only(state["runs"], "pipeline")
    with get_client(sync_client=True) as prefect_client:
        flow_run = prefect_client.read_flow_run(parent.data.tags["prefect.flow_run_id"])
        flow = prefect_client.read_flow(flow_run.flow_id)
    assert flow.name == "pipeline"
    assert flow_run.state.is_completed()


def test_artifacts(module_project: Project, state: dict[str, Any]) -> None:
    client, runs = state["client"], state["runs"]

    def paths(name: str) -> set[str]:
        return {a.path for a in client.list_artifacts(_only(runs, name).info.run_id)}

    assert {"resolved_config.yaml", "loss_curve.png"} <= paths("train")
    assert "resolved_config.yaml" in paths("pipeline")
    assert "cleaning_report.json" in paths("clean")
    assert "samples.md" in paths("evaluate")

    dest = module_project.root / "downloads"
    dest.mkdir(exist_ok=True)
    clean_id = _only(runs, "clean").info.run_id
    report = json.loads(Path(client.download_artifacts(clean_id, "cleaning_report.json", str(dest))).read_text())
    assert report["fingerprint"] == _only(runs, "pipeline").data.tags["data_fingerprint"]
    png = Path(client.download_artifacts(_only(runs, "train").info.run_id, "loss_curve.png", str(dest)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = Path(client.download_artifacts(_only(runs, "evaluate").info.run_id, "samples.md", str(dest)))
    assert "def " in samples.read_text()


def test_clean_run_records_dataset_inputs(state: dict[str, Any]) -> None:
    client, runs = state["client"], state["runs"]
    fingerprint = _only(runs, "pipeline").data.tags["data_fingerprint"]
    inputs = client.get_run(_only(runs, "clean").info.run_id).inputs.dataset_inputs
    assert {d.dataset.name for d in inputs} == {"cleaned-train", "cleaned-validation", "cleaned-test"}
    for ds_input in inputs:
        assert ds_input.dataset.digest
        assert fingerprint.startswith(ds_input.dataset.digest)


def test_registered_version_1_is_champion_and_challenger(state: dict[str, Any]) -> None:
    client, runs = state["client"], state["runs"]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "1"
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["data_fingerprint"] == _only(runs, "pipeline").data.tags["data_fingerprint"]
    assert tags["forgeline.promoted"] == "true"
    bpb = float(tags["test_bits_per_byte"])
    assert 0 < bpb < 10
    headline = _only(runs, "pipeline").data.metrics["test/bits_per_byte"]
    assert bpb == pytest.approx(headline, abs=1e-5)
    assert tags["train_run_id"] == _only(runs, "train").info.run_id


def test_champion_loads_and_generates(state: dict[str, Any]) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    prediction = model.predict(["def "])
    if hasattr(prediction, "iloc"):  # a DataFrame in some MLflow versions
        prediction = prediction.iloc[:, 0].tolist()
    assert isinstance(prediction, list) and len(prediction) == 1
    assert isinstance(prediction[0], str) and prediction[0].strip()


# ----------------------------------------------------------------------------- the same command again
def test_rerun_reuses_version_1(module_project: Project, again: Any) -> None:
    assert again.reused
    assert (again.model_name, again.version) == (MODEL, "1")
    client = module_project.client()
    assert [str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    runs = runs_by_name(client, client.get_experiment_by_name(EXPERIMENT).experiment_id)
    assert len(runs["pipeline"]) == 2
    assert all(r.info.status == "FINISHED" for r in runs["pipeline"])
    assert runs["pipeline"][1].data.tags["forgeline.reused_version"] == "1"
    assert len(runs["train"]) == 1  # nothing trained
    assert len(runs["clean"]) == 2
    assert runs["clean"][1].data.tags["forgeline.cache_hit"].lower() == "true"


# ------------------------------------------------------------------------------- a worse model
def test_worse_model_is_challenger_not_champion(module_project: Project, worse: Any) -> None:
    assert (worse.version, worse.promoted, worse.champion_version) == ("2", False, "1")
    assert worse.decision.startswith("not better")
    client = module_project.client()
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")) == ["1", "2"]
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    v1 = client.get_model_version(MODEL, "1").tags
    v2 = client.get_model_version(MODEL, "2").tags
    assert v2["forgeline.promoted"] == "false"
    assert v2[LINEAGE] != v1[LINEAGE]
    assert v2["config_hash"] != v1["config_hash"]
    assert float(v2["test_bits_per_byte"]) > float(v1["test_bits_per_byte"])
    assert worse.metrics["test/bits_per_byte"] == pytest.approx(float(v2["test_bits_per_byte"]), abs=1e-5)
    # Same data: the champion's stored score is what the candidate was compared with.
    assert float(v2["forgeline.champion_bits_per_byte"]) == pytest.approx(float(v1["test_bits_per_byte"]), abs=1e-5)

    runs = runs_by_name(client, client.get_experiment_by_name(EXPERIMENT).experiment_id)
    assert len(runs["train"]) == 2
    newest_train = runs["train"][-1]
    assert newest_train.data.params["train.max_steps"] == "1"
    assert [m.step for m in client.get_metric_history(newest_train.info.run_id, "train/loss")] == [1]


@pytest.fixture(scope="module")
def new_data(module_project: Project, worse: Any) -> Any:
    corpus = module_project.root / "new_data.txt"
    paragraphs = [f"def function_{i}(x):\n    return x * {i} + {i % 5}" for i in range(400)]
    corpus.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return module_project.run_in_process("train.max_steps=20", data=["new_data.txt"])


def test_champion_is_rescored_on_the_new_test_split(module_project: Project, new_data: Any) -> None:
    client = module_project.client()
    champion_v1 = client.get_model_version(MODEL, "1")
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    newest = versions[max(versions, key=int)]
    assert str(newest.version) == new_data.version
    assert newest.tags["data_fingerprint"] == new_data.fingerprint != champion_v1.tags["data_fingerprint"]
    # The champion's score in the decision is from the new test split, not its stored score on the old data.
    rescored = float(newest.tags["forgeline.champion_bits_per_byte"])
    assert rescored != pytest.approx(float(champion_v1.tags["test_bits_per_byte"]), abs=1e-6)
    assert "forgeline.decision" in newest.tags


# ------------------------------------------------------------------- the same checkpoints, another store
def test_another_tracking_store_gets_its_own_logged_model(module_project: Project, new_data: Any) -> None:
    # The checkpoint folder outlives a change of store (a local run, then `forgeline up`): the model logged
    # to the first store does not exist in the second, so the second must log and register its own.
    other = f"sqlite:///{module_project.root / 'other.db'}"
    moved = module_project.run_in_process(f"tracking.uri={other}")
    assert moved.tracking_uri == other and moved.version == "1"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=other, registry_uri=other)
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert str(version.version) == "1"
    assert version.source.startswith("models:/m-")
    assert str(client.get_logged_model(version.source.removeprefix("models:/")).status) == "READY"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
