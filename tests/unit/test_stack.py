"""The local stack's bookkeeping (stack.json, stopping exactly our processes) and deployed-mode config."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows import stack
from flows.deploy import REQUIRE_CUDA_ENV, base_job_template
from flows.seam import check_cuda
from tasks.config import ConfigError, PipelineConfig, load_config


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
    polite = stack._spawn("worker-cpu", [sys.executable, "-c", "import time; time.sleep(60)"], env, tmp_path, tmp_path)
    stubborn_code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('rea' + 'dy', flush=True); time.sleep(60)"
    )
    stubborn = stack._spawn("prefect-server", [sys.executable, "-c", stubborn_code], env, tmp_path, tmp_path)
    bystander = psutil.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stack.write_state(_state(tmp_path, [polite, stubborn]))
        deadline = time.monotonic() + 10
        while not stack._log_says(stubborn.log, "ready") and time.monotonic() < deadline:
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
def test_deploy_section_defaults_and_partial_overrides() -> None:
    cfg = PipelineConfig()
    assert (cfg.deploy.cpu_pool.name, cfg.deploy.gpu_pool.name) == ("cpu", "gpu")
    assert cfg.deploy.gpu_pool.concurrency_limit == 1 and cfg.deploy.gpu_pool.require_cuda
    assert not cfg.deploy.allow_cpu_fallback
    cfg = load_config(None, ["deploy.gpu_pool.job_variables.env.CUDA_VISIBLE_DEVICES=0"])
    assert cfg.deploy.gpu_pool.name == "gpu" and cfg.deploy.gpu_pool.concurrency_limit == 1
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
    from flows.retrain import IngestError, incoming_fingerprint, ingest_files

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
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["incoming"]  # no partial files left


def test_retrain_config_adds_the_incoming_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.retrain import retrain_config

    cfg = load_config(None, ["deploy.retrain_from=scratch"])
    assert retrain_config(cfg, tmp_path).data.sources == cfg.data.sources  # empty incoming: unchanged
    (tmp_path / "data" / "incoming").mkdir(parents=True)
    (tmp_path / "data" / "incoming" / "abc.txt").write_text("x")
    sources = retrain_config(cfg, tmp_path).data.sources
    assert sources[-1].kind == "directory" and sources[-1].path == str(tmp_path / "data" / "incoming")
