"""Registry safety on a real SQLite registry (RELIABILITY.md C4, C6, G3): racing promotions, idempotent versions."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest

from forgeline.tasks.config import TrackingConfig
from forgeline.tasks.registry.versions import BPB_TAG, FINGERPRINT_TAG, gate_champion, register_version
from forgeline.tasks.tracking.registry_store import MlflowRegistry
from forgeline.tasks.tracking.store import TrackingError, resolve_tracking_uri, setup_tracking

pytestmark = pytest.mark.integration

NAME = "race-lm"


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = setup_tracking(TrackingConfig(), tmp_path)
    yield uri
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _version(name: str, bpb: float, lineage: str, source: Path) -> object:
    source.mkdir(parents=True, exist_ok=True)
    mv, existed = register_version(
        MlflowRegistry(), name, str(source), lineage, {BPB_TAG: f"{bpb}", FINGERPRINT_TAG: "fp"}
    )
    assert not existed
    return mv


def _gate(uri: str, version: str, bpb: float, barrier: mp.Barrier, out: mp.Queue) -> None:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mv = MlflowClient().get_model_version(NAME, version)
    barrier.wait(timeout=60)
    result = gate_champion(
        MlflowRegistry(),
        NAME,
        mv,
        bpb,
        fingerprint="fp",
        min_improvement=0.0,
        champion_alias="champion",
        challenger_alias="challenger",
        rescore=None,
    )
    out.put((version, result.promoted, result.reason))


def test_racing_promotions_leave_the_better_model_champion(registry: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    first = _version(NAME, 2.0, "a", tmp_path / "m1")
    gate_champion(
        MlflowRegistry(),
        NAME,
        first,
        2.0,
        fingerprint="fp",
        min_improvement=0.0,
        champion_alias="champion",
        challenger_alias="challenger",
        rescore=None,
    )
    better = _version(NAME, 1.5, "b", tmp_path / "m2")
    worse = _version(NAME, 1.8, "c", tmp_path / "m3")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_gate, args=(registry, str(v.version), bpb, barrier, out))
        for v, bpb in ((better, 1.5), (worse, 1.8))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = {out.get(timeout=5)[0]: None for _ in procs}
    assert set(results) == {str(better.version), str(worse.version)}
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(better.version)
    worse_tags = client.get_model_version(NAME, str(worse.version)).tags
    assert worse_tags["forgeline.promoted"] in {"true", "false"}  # decided, whichever order the race took


def test_same_lineage_never_registers_twice(registry: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    (tmp_path / "m").mkdir()
    first, existed_first = register_version(MlflowRegistry(), NAME, str(tmp_path / "m"), "same", {BPB_TAG: "1.0"})
    again, existed_again = register_version(MlflowRegistry(), NAME, str(tmp_path / "m"), "same", {BPB_TAG: "1.0"})
    assert (existed_first, existed_again) == (False, True)
    assert str(first.version) == str(again.version)
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 1


def test_worse_candidate_never_moves_the_champion(registry: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    champ = _version(NAME, 1.2, "x", tmp_path / "m1")
    gate_champion(
        MlflowRegistry(),
        NAME,
        champ,
        1.2,
        fingerprint="fp",
        min_improvement=0.0,
        champion_alias="champion",
        challenger_alias="challenger",
        rescore=None,
    )
    worse = _version(NAME, 1.9, "y", tmp_path / "m2")
    result = gate_champion(
        MlflowRegistry(),
        NAME,
        worse,
        1.9,
        fingerprint="fp",
        min_improvement=0.0,
        champion_alias="champion",
        challenger_alias="challenger",
        rescore=None,
    )
    assert not result.promoted and "not better" in result.reason
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(champ.version)
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == str(worse.version)
    assert client.get_model_version(NAME, str(worse.version)).tags["forgeline.decision"].startswith("not better")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:./mlruns", "plain-folder stores are not supported"),
        ("./mlruns", "plain-folder stores are not supported"),
    ],
)
def test_plain_folder_store_is_refused(uri: str, message: str) -> None:
    with pytest.raises(TrackingError, match=message):
        resolve_tracking_uri(TrackingConfig(uri=uri))


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match=r"tracking server http://127.0.0.1:9 is not reachable"):
        setup_tracking(TrackingConfig(uri="http://127.0.0.1:9"), tmp_path)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
