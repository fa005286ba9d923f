"""Reliability rows B2 (concurrent writers), B5 (model upload fails), E4 (secrets) and F4 (huge line).

Each test injects the fault for real (processes racing on a brand-new SQLite store, an artifact upload that
dies half-way, secret values in the config of a full run, lines of tens of MB and of a GiB) and asserts the
outcome the row promises, counting metrics, versions and bytes of memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CLI_TIMEOUT, REPO_ROOT, CliResult, Project

pytestmark = pytest.mark.integration

# ----------------------------------------------------------------------------- B2 concurrent writers
WRITER = """
import sys, time
from pathlib import Path
base, go, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
from forgeline.tasks.tracking import metrics
from forgeline.tasks.tracking import store
from forgeline.tasks.tracking import runs as tracking_runs
from forgeline.tasks.config import TrackingConfig
while not go.exists():
    time.sleep(0.01)
store.setup_tracking(TrackingConfig(), base)
exp = store.ensure_experiment("shared", TrackingConfig(), base)
with tracking_runs.stage_run(exp, name) as run_id:
    buffer = metrics.MetricBuffer(run_id, flush_every=10)
    for step in range(1, 201):
        buffer.add(step, {"a": step, "b": 2.0 * step, "c": 1.0 / step})
    buffer.close()
print(exp, run_id, flush=True)
"""
WRITERS = 3


def test_concurrent_writers_on_a_fresh_store_create_one_experiment_and_lose_nothing(tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(go), f"writer-{i}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WRITERS)
    ]
    time.sleep(5)  # every writer has imported MLflow and waits at the barrier; no mlruns/ exists yet
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    go.touch()
    outputs = [p.communicate(timeout=CLI_TIMEOUT) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err[-4000:]}"

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == "shared"]
    assert len(experiments) == 1
    exp_ids = {out.split()[0] for out, _ in outputs}
    assert exp_ids == {experiments[0].experiment_id}
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"writer-{i}" for i in range(WRITERS)]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("a", "b", "c"):
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, 201)), (run.info.run_name, key)


# ------------------------------------------------------------------------- B5 model upload fails
UPLOAD_FAULT = """
import errno, runpy, sys
from pathlib import Path
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

real = LocalArtifactRepository.log_artifacts

def half_then_fail(self, local_dir, artifact_path=None):
    if not (Path(local_dir) / "MLmodel").exists():
        return real(self, local_dir, artifact_path)
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    half = files[: len(files) // 2]
    for f in half:
        sub = f.relative_to(local_dir).parent.as_posix()
        parts = [p for p in (artifact_path, None if sub == "." else sub) if p]
        self.log_artifact(str(f), "/".join(parts) or None)
    raise OSError(errno.EIO, f"injected upload failure after {len(half)} of {len(files)} files")

LocalArtifactRepository.log_artifacts = half_then_fail
sys.argv = ["forgeline", *sys.argv[1:]]
runpy.run_module("forgeline", run_name="__main__", alter_sys=True)
"""


def _cli_with(project: Project, prelude: str, *args: str) -> CliResult:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", prelude, *args],
        cwd=project.root,
        env=project.env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    result = CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
    project.runs.append(result)
    return result


@pytest.mark.slow  # a failing run, then a second run
def test_model_upload_failing_half_way_registers_nothing_and_rerun_gives_one_complete_version(
    project: Project,
) -> None:
    broken = _cli_with(project, UPLOAD_FAULT, "run", "--config", "smoke.yaml")
    assert broken.returncode == 1, broken.describe()
    errors = [line for line in broken.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "injected upload failure" in errors[0], broken.describe()
    client = project.client()
    assert client.search_model_versions("name = 'forgeline-smoke-lm'") == []
    exp = client.get_experiment_by_name("forgeline-smoke")
    (partial,) = client.search_logged_models(experiment_ids=[exp.experiment_id])  # filed with its run
    assert str(partial.status) == "FAILED"  # the half-uploaded model is never marked usable
    assert not list((project.root / "mlruns" / "checkpoints").rglob("logged_model.json"))

    rerun = project.run_in_process()  # the same run again; in-process, its output is not under test
    (version,) = client.search_model_versions("name = 'forgeline-smoke-lm'")
    assert rerun.version == str(version.version)
    assert str(version.version) == "1"
    model_id = version.model_id or str(version.source).removeprefix("models:/").split("/")[0]
    assert model_id.startswith("m-") and model_id != partial.model_id, version.source
    assert str(client.get_logged_model(model_id).status) == "READY"
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/forgeline-smoke-lm/{version.version}"))
    assert (local / "MLmodel").exists()
    assert list(local.rglob("*.safetensors")), sorted(p.name for p in local.rglob("*"))
    assert list(local.rglob("tokenizer*")), sorted(p.name for p in local.rglob("*"))


def test_registering_a_logged_model_that_is_not_ready_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from forgeline.tasks.config import TrackingConfig
    from forgeline.tasks.registry import versions as registry
    from forgeline.tasks.tracking import store
    from forgeline.tasks.tracking.registry_store import MlflowRegistry

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        uri = store.setup_tracking(TrackingConfig(), tmp_path)
        exp = store.ensure_experiment("b5-direct", TrackingConfig(), tmp_path)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        pending = client.create_logged_model(experiment_id=exp, name="model")  # as after a crash mid-upload
        failed = client.create_logged_model(experiment_id=exp, name="model")
        client.finalize_logged_model(failed.model_id, "FAILED")  # as after an upload that raised
        for model in (pending, failed):
            with pytest.raises(registry.RegistryError, match=f"{model.model_id} is (PENDING|FAILED), not READY"):
                registry.register_version(
                    MlflowRegistry(), "b5-direct-lm", f"models:/{model.model_id}", "lineage-1", {}
                )
        assert client.search_model_versions("name = 'b5-direct-lm'") == []
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


# ---------------------------------------------------------------------------------- E4 secrets
SECRETS = {
    "deploy.gpu_pool.job_variables.env.HF_TOKEN": "hf_e4tokenQ7w2Zk9",
    "deploy.cpu_pool.job_variables.db_password": "pw-e4Xy81Lq0",
    "deploy.cpu_pool.job_variables.client_secret": "sec-e4Mn55Tr",
    "deploy.gpu_pool.job_variables.api_key": "key-e4Pz37Vb",
}


def _prefect_logs(api_url: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    logs: list[Any] = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(limit=200, offset=len(logs))
            logs.extend(page)
            if len(page) < 200:
                return logs


def _prefect_flow_runs(api_url: str) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
    assert {r.name.split()[0] for r in runs} >= {"pipeline", "train"}, [r.name for r in runs]
    return runs


def _leaks(blob: bytes) -> list[str]:
    return [key for key, value in SECRETS.items() if value.encode() in blob]


def test_secrets_never_reach_params_tags_artifacts_or_logs(project: Project, prefect_server: str) -> None:
    overrides = [arg for key, value in SECRETS.items() for arg in ("--set", f"{key}={value}")]
    result = project.cli(
        "run", "--config", "smoke.yaml", "--verbose", *overrides, extra_env={"PREFECT_LOGGING_LEVEL": "DEBUG"}
    )
    assert result.returncode == 0, result.describe()
    assert _leaks(result.output.encode()) == [], "secret in the CLI's log output"

    client = project.client()
    exp = client.get_experiment_by_name("forgeline-smoke")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_name for r in runs} >= {"pipeline", "clean", "train", "evaluate", "register"}
    for run in runs:
        assert _leaks(json.dumps(run.data.params).encode()) == [], f"secret in params of {run.info.run_name}"
        assert _leaks(json.dumps(run.data.tags).encode()) == [], f"secret in tags of {run.info.run_name}"
    pipeline = next(r for r in runs if r.info.run_name == "pipeline")
    for key in SECRETS:
        assert pipeline.data.params[key] == "***"  # logged, and redacted

    (version,) = client.search_model_versions("name = 'forgeline-smoke-lm'")
    assert _leaks(json.dumps({"tags": version.tags, "description": version.description}).encode()) == []
    artifacts = [p for p in (project.root / "mlruns" / "artifacts").rglob("*") if p.is_file()]
    names = {p.name for p in artifacts}
    assert {"resolved_config.yaml", "model_card.md", "cleaning_report.json"} <= names
    card = next(p for p in artifacts if p.name == "model_card.md").read_text()
    assert "HF_TOKEN" in card and "***" in card  # the card shows the config, redacted
    # Every file the run left in the project: the MLflow database, artifacts, checkpoints, the cache.
    leaked = {str(p.relative_to(project.root)): _leaks(p.read_bytes()) for p in project.root.rglob("*") if p.is_file()}
    assert {k: v for k, v in leaked.items() if v} == {}

    # Flow-run parameters are stored by the Prefect server and shown in its UI.
    for flow_run in _prefect_flow_runs(prefect_server):
        assert _leaks(json.dumps(flow_run.parameters).encode()) == [], f"secret in parameters of {flow_run.name}"

    logs = _prefect_logs(prefect_server)
    ours = [log for log in logs if "val/loss" in log.message or "forgeline-smoke" in log.message]
    assert ours, "the run's logs did not reach Prefect (the check would see nothing)"
    assert [log.message for log in logs if _leaks(log.message.encode())] == []


# --------------------------------------------------------------------------------- F4 huge line
CLEAN_PROBE = """
import json, sys
from pathlib import Path
from forgeline.tasks.data.cleaning import clean_dataset
from forgeline.tasks.config import DataConfig
base, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
cfg = DataConfig(sources=[{"kind": "files", "paths": ["data/big.txt"]}], record="line", **overrides)
out = {}
try:
    result = clean_dataset(cfg, base_dir=base)
    out["bytes"] = sum(result.bytes_per_split.values())
    out["dropped"] = result.dropped
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
# VmHWM: this process image's peak RSS (ru_maxrss would carry over the forking parent's from before exec).
hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
out["peak_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""
MIB = 2**20


def _file_with_line(base: Path, line_bytes: int, *, sparse: bool = False) -> Path:
    path = base / "data" / "big.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(400):
            fh.write(f"ordinary line {i} with a few words of text in it\n")
        if sparse:
            # A hole reads back as NUL bytes: a GiB-long "line" that costs no disk.
            fh.flush()
            fh.truncate(fh.tell() + line_bytes)
            return path
        chunk = "huge line of text " * 4096
        left = line_bytes
        while left > 0:
            fh.write(chunk[: min(len(chunk), left)])
            left -= len(chunk)
        fh.write("\n")
        for i in range(400):
            fh.write(f"another ordinary line {i} after it\n")
    return path


def _clean_in_child(base: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CLEAN_PROBE, str(base), json.dumps(overrides or {})],
        cwd=base,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed)\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forty_megabyte_line_is_cleaned_in_bounded_memory(tmp_path: Path) -> None:
    _file_with_line(tmp_path, 40 * MIB)
    out = _clean_in_child(tmp_path)
    assert "error" not in out, out
    assert out["bytes"] > 40 * MIB  # the huge record was kept, whole
    # A few copies of the one line (bytes, str, normalized, JSON) on top of the interpreter: not the file
    # many times over, and far from what would get the process killed.
    assert out["peak_rss_mb"] < 480, out


def test_forty_megabyte_line_is_quarantined_by_max_chars(tmp_path: Path) -> None:
    _file_with_line(tmp_path, 40 * MIB)
    out = _clean_in_child(tmp_path, {"cleaning": {"max_chars": 100_000}})
    assert "error" not in out, out
    assert out["dropped"]["too_long"] == 1  # counted in the cleaning report, not silently lost
    assert out["bytes"] < MIB
    assert out["peak_rss_mb"] < 480, out


def test_gigabyte_line_fails_clearly_without_reading_it_whole(tmp_path: Path) -> None:
    path = _file_with_line(tmp_path, 2**30, sparse=True)
    out = _clean_in_child(tmp_path)
    assert out.get("error", "").startswith("DataError: "), out
    assert f"{path}:401: line longer than {64 * MIB} bytes" in out["error"]
    assert out["peak_rss_mb"] < 320, out  # one line's limit (64 MiB) in memory, not the 1 GiB file


def test_gigabyte_line_through_the_cli_ends_in_one_error_line(project: Project) -> None:
    _file_with_line(project.root, 2**30, sparse=True)
    result = project.run_pipeline("--data", "data/big.txt")
    assert result.returncode == 2, result.describe()  # bad data: exit 2 (docs/troubleshooting.md)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.describe()
    assert "big.txt:401: line longer than" in errors[0]
