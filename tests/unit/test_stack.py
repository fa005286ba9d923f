"""The local stack's bookkeeping (stack.json, stopping exactly our processes) and deployed-mode config."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from forgeline.flows import stack
from forgeline.flows.contract import REQUIRE_CUDA_ENV, check_cuda
from forgeline.flows.deploy import base_job_template
from forgeline.flows.stack import processes
from forgeline.tasks.config import ConfigError, PipelineConfig, load_config


def _state(home: Path, procs: list[stack.Proc] | None = None) -> stack.StackState:
    return stack.StackState(home=str(home), prefect_port=4311, mlflow_port=5311, procs=procs or [])


def test_state_round_trip_and_urls(tmp_path: Path) -> None:
    me = psutil.Process()
    proc = stack.Proc("prefect-server", me.pid, me.create_time(), ["prefect"], str(tmp_path / "x.log"))
    stack.write_state(_state(tmp_path, [proc]))
    back = stack.read_state(tmp_path)
    assert back is not None
    assert back.proc("prefect-server") == proc
    assert back.prefect_api_url == "http://127.0.0.1:4311/api"
    assert back.mlflow_url == "http://127.0.0.1:5311"
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_missing_or_garbage_state_is_none(tmp_path: Path) -> None:
    assert stack.read_state(tmp_path) is None
    (tmp_path / stack.STATE_FILE).write_text("{not json")
    assert stack.read_state(tmp_path) is None


def test_alive_refuses_a_recycled_pid(tmp_path: Path) -> None:
    me = psutil.Process()
    assert stack.Proc("x", me.pid, me.create_time(), [], "").alive()
    assert not stack.Proc("x", me.pid, me.create_time() - 100, [], "").alive()


def test_home_defaults_to_dot_forgeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGELINE_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert stack.forgeline_home() == tmp_path.resolve() / ".forgeline"
    monkeypatch.setenv("FORGELINE_HOME", str(tmp_path / "h"))
    assert stack.forgeline_home() == tmp_path.resolve() / "h"


def test_stop_stack_stops_exactly_ours_and_escalates(tmp_path: Path) -> None:
    env = dict(os.environ)
    polite = processes._spawn(
        "worker-cpu", [sys.executable, "-c", "import time; time.sleep(60)"], env, tmp_path, tmp_path
    )
    stubborn_code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('rea' + 'dy', flush=True); time.sleep(60)"
    )
    stubborn = processes._spawn("prefect-server", [sys.executable, "-c", stubborn_code], env, tmp_path, tmp_path)
    bystander = psutil.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stack.write_state(_state(tmp_path, [polite, stubborn]))
        deadline = time.monotonic() + 10
        while not processes._log_says(stubborn.log, "ready") and time.monotonic() < deadline:
            time.sleep(0.1)
        results = stack.stop_stack(tmp_path, grace=1.0)
        assert results == {"worker-cpu": "stopped", "prefect-server": "killed"}
        assert list(results) == ["worker-cpu", "prefect-server"]  # workers before servers
        assert not polite.alive() and not stubborn.alive()
        assert bystander.is_running() and bystander.status() != psutil.STATUS_ZOMBIE
        assert not (tmp_path / stack.STATE_FILE).exists()
        assert stack.stop_stack(tmp_path) == {}
    finally:
        bystander.kill()
        bystander.wait()


def test_stack_env_ignores_a_dead_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dead = stack.Proc("prefect-server", 2**22 + 17, 0.0, [], "")
    stack.write_state(_state(tmp_path, [dead, stack.Proc("mlflow-server", 2**22 + 19, 0.0, [], "")]))
    assert stack.stack_env(tmp_path) is None
    assert "PREFECT_API_URL" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ


def test_state_file_is_plain_json(tmp_path: Path) -> None:
    stack.write_state(_state(tmp_path))
    raw = json.loads((tmp_path / stack.STATE_FILE).read_text())
    assert raw["prefect_port"] == 4311 and raw["procs"] == []


# ------------------------------------------------------------------------------------------ config
def test_partial_deploy_override_changes_that_key_and_keeps_the_rest() -> None:
    base = PipelineConfig().deploy
    deploy = load_config(None, ["deploy.gpu_pool.job_variables.env.CUDA_VISIBLE_DEVICES=0"]).deploy
    assert str(deploy.gpu_pool.job_variables["env"]["CUDA_VISIBLE_DEVICES"]) == "0"
    # The pool's name, concurrency limit and CUDA check are not reset by overriding one nested key.
    assert deploy.gpu_pool.model_copy(update={"job_variables": base.gpu_pool.job_variables}) == base.gpu_pool
    assert deploy.model_copy(update={"gpu_pool": base.gpu_pool}) == base
    with pytest.raises(ConfigError, match="deploy.gpu_pool.name"):
        load_config(None, ["deploy.gpu_pool.nme=x"])


def test_pool_template_carries_job_variables() -> None:
    cfg = load_config(None, ["deploy.gpu_pool.job_variables.env.CUDA_VISIBLE_DEVICES=0"])
    template = base_job_template(cfg.deploy.gpu_pool)
    env = template["variables"]["properties"]["env"]["default"]
    assert env == {"CUDA_VISIBLE_DEVICES": "0", "FORGELINE_WORK_POOL": "gpu", REQUIRE_CUDA_ENV: "1"}
    cpu_env = base_job_template(cfg.deploy.cpu_pool)["variables"]["properties"]["env"]["default"]
    assert REQUIRE_CUDA_ENV not in cpu_env
    bad = load_config(None, ["deploy.cpu_pool.job_variables.no_such_var=1"])
    with pytest.raises(ValueError, match="no_such_var"):
        base_job_template(bad.deploy.cpu_pool)


def test_gpu_pool_without_cuda_fails_fast_unless_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(REQUIRE_CUDA_ENV, raising=False)
    check_cuda(PipelineConfig())  # not on a GPU pool: nothing to check
    monkeypatch.setenv(REQUIRE_CUDA_ENV, "1")
    with pytest.raises(RuntimeError, match="allow_cpu_fallback"):
        check_cuda(PipelineConfig())
    check_cuda(load_config(None, ["deploy.allow_cpu_fallback=true"]))


# ------------------------------------------------------------------------------------------ ingest
def test_ingest_is_content_addressed_and_validates_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.flows.retrain import IngestError, incoming_fingerprint, ingest_files

    monkeypatch.chdir(tmp_path)
    cfg = PipelineConfig()
    good = tmp_path / "a.txt"
    good.write_text("some new text\n")
    bad = tmp_path / "b.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(IngestError, match="not UTF-8"):
        ingest_files([str(good), str(bad)], cfg)
    assert good.exists() and not (tmp_path / "data" / "incoming").exists()  # nothing moved
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(IngestError, match="unsupported"):
        ingest_files([str(tmp_path / "x.bin")], cfg)

    added, fingerprint = ingest_files([str(good)], cfg, keep=True)
    assert good.exists() and len(added) == 1 and added[0].suffix == ".txt"
    assert added[0].read_text() == "some new text\n"
    assert fingerprint == incoming_fingerprint(tmp_path / "data" / "incoming")
    again, same = ingest_files([str(good)], cfg)
    assert again == [] and same == fingerprint and not good.exists()  # moved; content already there
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix != ".lock") == [
        "incoming"
    ]  # no partial files left


def test_retrain_config_adds_the_incoming_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.flows.retrain import retrain_config

    cfg = load_config(None, ["deploy.retrain_from=scratch"])
    assert retrain_config(cfg, tmp_path).data.sources == cfg.data.sources  # empty incoming: unchanged
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    (tmp_path / "data" / "incoming" / "abc.txt").write_text("x")
    sources = retrain_config(cfg, tmp_path).data.sources
    assert sources[-1].kind == "directory" and sources[-1].path == str(tmp_path / "data" / "incoming")


# ------------------------------------------------------------------------------------ stores, secrets
SECRET = "s3cr:et@x"


def test_mask_url_secrets_hides_every_password() -> None:
    from forgeline.tasks.config import mask_url_secrets

    url = f"postgresql+asyncpg://forgeline:{SECRET}@db.internal:5432/prefect"
    assert mask_url_secrets(url) == "postgresql+asyncpg://forgeline:***@db.internal:5432/prefect"
    two = f"a postgresql://u:{SECRET}@h/db and http://admin:pw@proxy:8080/x"
    assert mask_url_secrets(two) == "a postgresql://u:***@h/db and http://admin:***@proxy:8080/x"
    assert mask_url_secrets("postgresql://u@h/db?sslmode=require&password=pw") == (
        "postgresql://u@h/db?sslmode=require&password=***"
    )
    for plain in ("postgresql://u@h/db", "sqlite:////abs/mlflow.db", "http://127.0.0.1:5000", "s3://bucket/path"):
        assert mask_url_secrets(plain) == plain


def test_redact_masks_urls_in_params() -> None:
    from forgeline.tasks.config import flatten, redact

    cfg = load_config(None, [f"tune.storage=postgresql+psycopg2://u:{SECRET}@h/optuna"])
    flat = flatten(redact(cfg.model_dump(mode="json")))
    assert flat["tune.storage"] == "postgresql+psycopg2://u:***@h/optuna"
    assert SECRET not in json.dumps(flat)


def test_store_urls_get_the_drivers_each_server_needs() -> None:
    assert stack.prefect_database_url("postgresql://u:p@h:5432/prefect") == "postgresql+asyncpg://u:p@h:5432/prefect"
    assert stack.prefect_database_url("postgres://u@h/prefect") == "postgresql+asyncpg://u@h/prefect"
    assert stack.prefect_database_url("postgresql+psycopg2://u@h/p") == "postgresql+asyncpg://u@h/p"
    assert stack.prefect_database_url("sqlite:////x/prefect.db") == "sqlite+aiosqlite:////x/prefect.db"
    assert stack.sync_database_url("postgresql://u:p@h/mlflow") == "postgresql+psycopg2://u:p@h/mlflow"
    assert stack.sync_database_url("postgresql+asyncpg://u@h/m") == "postgresql+psycopg2://u@h/m"
    assert stack.sync_database_url("postgresql+psycopg://u@h/m") == "postgresql+psycopg://u@h/m"  # chosen driver
    assert stack.sync_database_url("mysql+pymysql://u@h/m") == "mysql+pymysql://u@h/m"
    assert stack.sync_database_url("sqlite:////x/mlflow.db") == "sqlite:////x/mlflow.db"
    with pytest.raises(ValueError, match=r"mysql://u:\*\*\*@h/p.*postgresql and sqlite") as err:
        stack.prefect_database_url(f"mysql://u:{SECRET}@h/p")
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="not a URL"):
        stack.sync_database_url("db.internal/mlflow")


def test_backends_option_then_forgeline_env_then_tool_env_then_sqlite(tmp_path: Path) -> None:
    default = stack.resolve_backends(tmp_path, environ={})
    assert default.prefect_database_url == f"sqlite+aiosqlite:///{tmp_path / 'prefect' / 'prefect.db'}"
    assert default.mlflow_backend_store_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert default.mlflow_artifacts_destination == str(tmp_path / "mlflow" / "artifacts")
    assert default.tune_storage is None

    tool_env = {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://p@h/tool",
        "MLFLOW_BACKEND_STORE_URI": "postgresql://m@h/tool",
        "MLFLOW_ARTIFACTS_DESTINATION": "s3://tool/artifacts",
    }
    ours = {
        "FORGELINE_PREFECT_DATABASE_URL": "postgresql://p@h/ours",
        "FORGELINE_MLFLOW_BACKEND_STORE_URI": "postgresql://m@h/ours",
        "FORGELINE_TUNE_STORAGE": "postgresql://o@h/ours",
    }
    from_tool = stack.resolve_backends(tmp_path, environ=tool_env)
    assert from_tool.prefect_database_url.endswith("/tool") and from_tool.mlflow_backend_store_uri.endswith("/tool")
    assert from_tool.mlflow_artifacts_destination == "s3://tool/artifacts"
    from_ours = stack.resolve_backends(tmp_path, environ=tool_env | ours)
    assert from_ours.prefect_database_url == "postgresql+asyncpg://p@h/ours"
    assert from_ours.mlflow_backend_store_uri == "postgresql+psycopg2://m@h/ours"
    assert from_ours.tune_storage == "postgresql+psycopg2://o@h/ours"
    explicit = stack.resolve_backends(
        tmp_path, prefect_database="postgresql://p@h/arg", tune_storage="sqlite:////x/o.db", environ=tool_env | ours
    )
    assert explicit.prefect_database_url == "postgresql+asyncpg://p@h/arg"
    assert explicit.tune_storage == "sqlite:////x/o.db"


def test_state_records_stores_masked_and_reads_old_files(tmp_path: Path) -> None:
    backends = stack.resolve_backends(
        tmp_path,
        environ={
            "FORGELINE_PREFECT_DATABASE_URL": f"postgresql://f:{SECRET}@h/prefect",
            "FORGELINE_TUNE_STORAGE": f"postgresql://f:{SECRET}@h/optuna",
        },
    )
    state = _state(tmp_path)
    state.stores = backends.described()
    stack.write_state(state)
    text = (tmp_path / stack.STATE_FILE).read_text()
    assert SECRET not in text
    back = stack.read_state(tmp_path)
    assert back is not None
    assert back.stores["prefect database"] == "postgresql+asyncpg://f:***@h/prefect"
    assert back.stores["optuna storage"] == "postgresql+psycopg2://f:***@h/optuna"
    raw = json.loads(text)
    del raw["stores"]  # a stack.json written before stores were recorded
    (tmp_path / stack.STATE_FILE).write_text(json.dumps(raw))
    assert stack.read_state(tmp_path).stores == {}


def test_unreachable_database_fails_before_anything_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backends = stack.resolve_backends(
        tmp_path, environ={"FORGELINE_MLFLOW_BACKEND_STORE_URI": f"postgresql://f:{SECRET}@127.0.0.1:{port}/mlflow"}
    )
    with pytest.raises(RuntimeError, match=rf"MLflow backend store .*f:\*\*\*@127.0.0.1:{port}.*cannot connect") as err:
        stack.start_stack(tmp_path, prefect_port=port, mlflow_port=port, backends=backends)
    assert SECRET not in str(err.value)
    assert not (tmp_path / stack.STATE_FILE).exists() and not (tmp_path / "logs").exists()


def test_tune_storage_falls_back_to_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forgeline.tasks.tune.storage import resolve_storage_url

    monkeypatch.delenv(stack.TUNE_STORAGE_ENV, raising=False)
    assert resolve_storage_url(PipelineConfig().tune, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/optuna.db"
    monkeypatch.setenv(stack.TUNE_STORAGE_ENV, "postgresql+psycopg2://o@h/optuna")
    assert resolve_storage_url(PipelineConfig().tune, tmp_path) == "postgresql+psycopg2://o@h/optuna"
    own = load_config(None, ["tune.storage=sqlite:///own.db"]).tune
    assert resolve_storage_url(own, tmp_path) == f"sqlite:///{tmp_path.resolve()}/own.db"  # the config wins


# ------------------------------------------------------------------------------------------ exposure
def _guarded_client(port: int = 4200):  # noqa: ANN202 - httpx.AsyncClient
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    app = Starlette(routes=[Route("/api/health", lambda request: PlainTextResponse("ok"), methods=["GET", "POST"])])
    guard = stack.HostOriginGuard(app, stack.loopback_hosts(port), stack.loopback_origins(port))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url=f"http://127.0.0.1:{port}")


def test_guard_answers_only_its_own_host_and_origin() -> None:
    import asyncio

    async def statuses() -> dict[str, int]:
        async with _guarded_client() as client:
            cases = {
                "own host": {},
                "localhost": {"Host": "localhost:4200"},
                "own origin": {"Origin": "http://127.0.0.1:4200"},
                "foreign host": {"Host": "evil.example"},
                "foreign host, our port": {"Host": "evil.example:4200"},
                "private ip": {"Host": "192.168.1.5:4200"},
                "loopback, other port": {"Host": "127.0.0.1:9999"},
                "foreign origin": {"Origin": "http://evil.example"},
                "other local origin": {"Origin": "http://localhost:8888"},
                "null origin": {"Origin": "null"},
            }
            out = {}
            for name, headers in cases.items():
                resp = await client.post("/api/health", headers=headers)
                out[name] = resp.status_code
                if resp.status_code == 403:
                    assert "not allowed" in resp.text
            return out

    result = asyncio.run(statuses())
    assert {k for k, v in result.items() if v == 200} == {"own host", "localhost", "own origin"}, result
    assert all(v in (200, 403) for v in result.values()), result
