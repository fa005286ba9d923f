"""A text classifier through the registry, for real: logged to a SQLite MLflow store as ``text-classification``,
registered and gated on test/f1_macro, answered by pyfunc, `forgeline predict` and `forgeline serve` with the
dataset's label names (issue 16, point 6).

No pipeline run and no Prefect: tiny untrained classifiers (tests/classifier_support.py) stand in for trained
ones, and made-up F1 figures stand in for the evaluation; the gate, the store, the model files and the servers
are real.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.classifier_support import make_labeled_rows, make_tiny_classifier
from tests.classify_train_support import write_labeled_dataset

pytestmark = pytest.mark.integration

MODEL = "clf-test"
LABELS = ["mlops", "nlp", "vision"]
F1 = "test/f1_macro"
TEXTS = ["pipeline deployment monitoring", "image pixels camera", "text tokens translation"]
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A SQLite store with two classifier versions of MODEL: v1 (F1 0.70) then v2 (F1 0.80, champion)."""
    from mlflow import MlflowClient

    from forgeline.tasks.config import TrackingConfig
    from forgeline.tasks.registry.versions import FINGERPRINT_TAG, TASK_TAG, gate_champion, metric_tags
    from forgeline.tasks.registry.versions import register_version as register
    from forgeline.tasks.tracking.registry_store import MlflowRegistry
    from forgeline.tasks.tracking.stage_records import log_model
    from forgeline.tasks.tracking.store import setup_tracking

    root = tmp_path_factory.mktemp("clf-project")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = setup_tracking(TrackingConfig(), root)
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient()
    experiment = client.create_experiment("clf-test")
    texts = [f"{r['title']}\n{r['description']}" for r in make_labeled_rows(60)]

    def version(seed: int, f1: float, fingerprint: str = "fp") -> Any:
        folder = make_tiny_classifier(root / f"model-{seed}", LABELS, texts, seed=seed)
        run_id = client.create_run(experiment, run_name="train").info.run_id
        run_dir = root / f"run-{seed}"
        run_dir.mkdir()
        model_uri = log_model(run_dir, run_id, SimpleNamespace(model_dir=str(folder)), TEXTS[0])
        scores = {F1: f1, "test/accuracy": f1 + 0.02, "baseline/f1_weighted": 0.9}
        tags = {**metric_tags(scores), FINGERPRINT_TAG: fingerprint, TASK_TAG: "classification"}
        tags |= {"forgeline.gate_metric": F1, "train_run_id": run_id}
        mv, _ = register(MlflowRegistry(), MODEL, model_uri, f"lineage-{seed}", tags)
        return gate_champion(
            MlflowRegistry(),
            MODEL,
            mv,
            f1,
            fingerprint=fingerprint,
            min_improvement=0.0,
            champion_alias="champion",
            challenger_alias="challenger",
            rescore=None,
            metric=F1,
            higher_is_better=True,
        )

    first = version(0, 0.70)
    second = version(1, 0.80)
    (root / "smoke.yaml").write_text((REPO_ROOT / "configs" / "smoke.yaml").read_text())
    yield SimpleNamespace(root=root, uri=uri, client=client, first=first, second=second, version=version)
    mp.undo()
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def forgeline(store: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The ``forgeline`` app in-process; returns ``(exit_code, stdout, stderr)``."""
    from typer.testing import CliRunner

    from forgeline.flows.cli import console
    from forgeline.flows.cli.main import app

    monkeypatch.setattr(console, "configure_logging", lambda verbose: None)  # keep pytest's log handlers
    monkeypatch.setattr(console.out, "width", 200)
    monkeypatch.setattr(console.err, "width", 200)
    names = ("forgeline", "mlflow", "alembic", "httpx")
    levels = {name: logging.getLogger(name).level for name in names}
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(app, list(args))
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    yield invoke
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_logged_as_text_classification_and_gated_on_f1(store: Any) -> None:
    from mlflow.models import get_model_info

    assert store.first.promoted and store.second.promoted
    assert store.second.metric == F1 and store.second.champion_score == pytest.approx(0.70)
    champion = store.client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == store.second.version
    info = get_model_info(f"models:/{MODEL}@champion")
    assert info.flavors["transformers"]["task"] == "text-classification"
    assert [c["name"] for c in info.signature.outputs.to_dict()] == ["label", "score"]
    tags = champion.tags
    assert float(tags["test_f1_macro"]) == pytest.approx(0.80) and "test_bits_per_byte" not in tags
    assert float(tags["baseline_f1_weighted"]) == pytest.approx(0.9)
    # A lower F1 is refused; the champion stays.
    worse = store.version(2, 0.75)
    assert not worse.promoted and "not better" in worse.reason and "test/f1_macro" in worse.reason
    assert str(store.client.get_model_version_by_alias(MODEL, "champion").version) == store.second.version


def test_pyfunc_predicts_the_dataset_label_names(store: Any) -> None:
    import mlflow

    frame = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(TEXTS)
    records = frame.to_dict(orient="records")
    assert len(records) == len(TEXTS)
    for record in records:
        assert record["label"] in LABELS and 0.0 < record["score"] <= 1.0


def test_forgeline_predict_on_the_champion(store: Any, forgeline: Any, tmp_path: Path) -> None:
    code, out, err = forgeline(
        "predict", "--config", "smoke.yaml", "--set", f"registry.model_name={MODEL}", "-t", TEXTS[0], "-t", TEXTS[1],
        "--output", "json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)
    assert [r["text"] for r in rows] == TEXTS[:2]
    assert all(r["label"] in LABELS and 0 < r["score"] <= 1 for r in rows)
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(TEXTS) + "\n")
    code, out, err = forgeline("predict", "--model", f"models:/{MODEL}/1", "--file", str(lines), "-o", "csv")
    assert code == 0, err
    assert out.splitlines()[0] == "text,label,score" and len(out.splitlines()) == 1 + len(TEXTS)
    code, out, err = forgeline("predict", "--model", f"models:/{MODEL}/99", "-t", "x")
    assert code != 0 and "has no version 99" in err and len(err.strip().splitlines()) == 1
    # generate is for language models: it names predict instead of failing on a classifier's weights.
    code, out, err = forgeline("generate", "--model", f"models:/{MODEL}@champion", "--prompt", "x")
    assert code == 2 and "is a text classifier: use `forgeline predict" in err


def test_models_compare_and_promote_use_f1(store: Any, forgeline: Any) -> None:
    from forgeline.tasks.tracking.tags import RUN_NAME_TAG

    code, out, err = forgeline("models", MODEL, "--output", "json")
    assert code == 0, err
    versions = {v["version"]: v for v in json.loads(out)["versions"]}
    assert versions[store.second.version]["test_f1_macro"] == pytest.approx(0.80)
    # Version 1 (F1 0.70) is worse than the champion (0.80): promote refuses, naming the metric.
    code, out, err = forgeline("promote", MODEL, "1")
    assert code == 1 and "refused: not better" in err and "test/f1_macro" in err
    # compare ranks pipeline runs by F1, highest first, and shows the baseline beside it.
    exp = store.client.create_experiment("clf-compare")
    for f1 in (0.6, 0.9, 0.7):
        run_id = store.client.create_run(exp, tags={RUN_NAME_TAG: "pipeline"}).info.run_id
        for key, value in {F1: f1, "test/accuracy": f1, "baseline/f1_weighted": 0.88}.items():
            store.client.log_metric(run_id, key, value)
        store.client.set_terminated(run_id)
    code, out, err = forgeline("compare", "--experiment", "clf-compare", "--output", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r[F1] for r in rows] == [0.9, 0.7, 0.6]
    assert all(r["baseline/f1_weighted"] == 0.88 for r in rows)


def test_model_card_of_a_classifier(store: Any) -> None:
    from forgeline.tasks.config import PipelineConfig, dump_config
    from forgeline.tasks.tracking.stage_records import write_model_card

    cfg = PipelineConfig()
    run_id = store.client.create_run(store.client.create_experiment("clf-card")).info.run_id
    evaluation = SimpleNamespace(
        metrics={F1: 0.8, "test/accuracy": 0.82, "baseline/accuracy": 0.9},
        per_class=[{"label": "mlops", "precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 4}],
    )
    card = write_model_card(
        cfg.data,
        store.second,
        evaluation,
        config_yaml=dump_config(cfg),
        config_hash=cfg.config_hash(),
        fingerprint="fp",
        experiment_id="0",
        train_run_id=run_id,
        register_run_id=run_id,
    )
    assert card is not None
    description = store.client.get_model_version(MODEL, store.second.version).description
    assert "| test/f1_macro | 0.8000 | - | 0.7000 | +0.1000 (better) |" in description
    assert "| test/accuracy | 0.8200 | 0.9000 |" in description and "## Per class" in description


def test_register_stage_gates_a_classifier_on_its_f1(store: Any, tmp_path: Path) -> None:
    """The register task body (``register_task.fn``): every evaluation figure a tag, the gate on test/f1_macro."""
    from forgeline.flows.rescore import rescore_model
    from forgeline.flows.stages import RunContext, register_task
    from forgeline.tasks.config import PipelineConfig
    from forgeline.tasks.registry.versions import RegistryError
    from forgeline.tasks.tracking.stage_records import log_model

    cfg = PipelineConfig.model_validate(
        {"task": {"kind": "classification"}, "data": {"label_column": "tag"}, "registry": {"model_name": "clf-stage"}}
    )
    experiment = store.client.create_experiment("clf-stage")
    ctx = RunContext(experiment_id=experiment, base_dir=str(store.root))
    texts = [f"{r['title']}\n{r['description']}" for r in make_labeled_rows(30)]

    def outcome(seed: int) -> Any:
        folder = make_tiny_classifier(tmp_path / f"m{seed}", LABELS, texts, seed=seed)
        run_id = store.client.create_run(experiment, run_name="train").info.run_id
        (tmp_path / f"r{seed}").mkdir()
        uri = log_model(tmp_path / f"r{seed}", run_id, SimpleNamespace(model_dir=str(folder)), TEXTS[0])
        return SimpleNamespace(train_run_id=run_id, model_uri=uri, lineage=f"stage-{seed}")

    def evaluation(f1: float) -> Any:
        metrics = {
            F1: f1,
            "test/accuracy": 0.5,
            "test/loss": 1.0,
            "baseline/accuracy": 0.9,
            "baseline/f1_weighted": 0.9,
        }
        return SimpleNamespace(metrics=metrics, per_class=[{"label": "nlp", "f1": f1, "support": 3}])

    first = register_task.fn(cfg, outcome(0), evaluation(0.6), "fp", str(tmp_path), ctx)
    assert first.promoted and first.metric == F1 and first.higher_is_better
    better = register_task.fn(cfg, outcome(1), evaluation(0.7), "fp", str(tmp_path), ctx)
    assert better.promoted and better.champion_score == pytest.approx(0.6)
    tags = store.client.get_model_version("clf-stage", better.version).tags
    assert float(tags["test_f1_macro"]) == 0.7 and float(tags["baseline_f1_weighted"]) == 0.9
    assert tags["forgeline.task"] == "classification" and tags["forgeline.gate_metric"] == F1
    assert "## Per class" in store.client.get_model_version("clf-stage", better.version).description
    worse = register_task.fn(cfg, outcome(2), evaluation(0.65), "fp", str(tmp_path), ctx)
    assert not worse.promoted and str(store.client.get_model_version_by_alias("clf-stage", "champion").version) == "2"
    # New data: the champion (version 2, F1 0.7 on "fp") is re-scored on the candidate's test split.
    dataset = write_labeled_dataset(tmp_path / "new-data", n=60)
    expected = rescore_model("models:/clf-stage/2", cfg, str(dataset))
    assert 0.0 <= expected <= 1.0
    moved = register_task.fn(cfg, outcome(4), evaluation(expected + 0.01), "fp-new", str(dataset), ctx)
    assert moved.promoted and moved.champion_score == pytest.approx(expected) and moved.previous_champion == "2"
    # A gate metric the evaluation does not have: refused before anything is registered.
    odd = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"metric": "test/rougeL"})})
    with pytest.raises(RegistryError, match="registry.metric 'test/rougeL' is not one of the evaluation's metrics"):
        register_task.fn(odd, outcome(3), evaluation(0.9), "fp", str(tmp_path), ctx)
    assert len(store.client.search_model_versions("name = 'clf-stage'")) == 4


def _post(base: str, payload: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(
        base + "/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextmanager
def _server(store: Any, cmd: list[str], port: int) -> Iterator[str]:
    """Start ``cmd`` (a server on ``port``) in the project folder; its base URL once /ping answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORGELINE_HOME", "PREFECT_API_URL")}
    env |= {"MLFLOW_TRACKING_URI": store.uri, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # mlflow's uvicorn
    log = store.root / f"server-{port}.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=store.root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _assert_labels(base: str) -> None:
    status, body = _post(base, {"inputs": TEXTS})
    assert status == 200, body
    assert len(body["predictions"]) == len(TEXTS)
    for answer in body["predictions"]:
        assert set(answer) == {"label", "score"} and answer["label"] in LABELS and 0 < answer["score"] <= 1


def test_forgeline_serve_answers_labels_over_http(store: Any) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "forgeline", "serve", f"models:/{MODEL}@champion", "--port", str(port)]
    with _server(store, cmd, port) as base:
        _assert_labels(base)
        # Generation settings mean nothing to a classifier: refused in one line, not silently dropped.
        status, body = _post(base, {"inputs": TEXTS[:1], "params": {"max_new_tokens": 5}})
        assert status == 400 and "takes no params (got max_new_tokens)" in body
        # Concurrent requests share forwards and each gets its own answers back.
        answers: dict[int, Any] = {}

        def client(i: int) -> None:
            answers[i] = _post(base, {"inputs": TEXTS[: 1 + i % 3]})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(answers) == 6
        for i, (status, body) in answers.items():
            assert status == 200 and len(body["predictions"]) == 1 + i % 3, body


@pytest.mark.slow
def test_mlflow_models_serve_answers_labels(store: Any) -> None:
    """MLflow's own server answers the same labels and scores (about 15 s more)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with _server(store, cmd, port) as base:
        _assert_labels(base)
