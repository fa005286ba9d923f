"""The deployments' one description (flows/deploy.py) and the prefect.yaml generated from it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from forgeline.flows import deploy
from forgeline.tasks.config import PipelineConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_committed_prefect_yaml_is_the_generated_one() -> None:
    generated = deploy.prefect_yaml(load_config(ROOT / "configs" / "default.yaml"), "configs/default.yaml")
    committed = (ROOT / "prefect.yaml").read_text(encoding="utf-8")
    assert committed == generated, (
        "prefect.yaml is stale; regenerate it: forgeline deploy --config configs/default.yaml --write-prefect-yaml"
    )


def test_prefect_yaml_reads_as_prefect_deploy_reads_it() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    model = PrefectYamlModel.model_validate(yaml.safe_load((ROOT / "prefect.yaml").read_text(encoding="utf-8")))
    by_name = {d.name: d for d in model.deployments}
    assert {name: d.work_pool.name for name, d in by_name.items()} == {
        "pipeline": "cpu",
        "train": "gpu",
        "tune": "gpu",
        "retrain": "cpu",
        "watch": "cpu",
    }
    assert model.pull is None and all(d.pull is None for d in model.deployments)  # prefect deploy adds the cwd
    assert not by_name["watch"].schedules  # one long-lived run, not one run per interval (issue 14.5)
    (restart,) = _initialize_deployment_triggers("watch/watch", by_name["watch"].triggers)
    assert restart.expect == {"prefect.flow-run.Crashed"} and restart.schedule_after == timedelta(seconds=60)
    (cron,) = [RawScheduleConfig.model_validate(s) for s in by_name["retrain"].schedules]
    assert cron.cron == "0 3 * * 1" and cron.active is False
    (trigger,) = _initialize_deployment_triggers("retrain/retrain", by_name["retrain"].triggers)
    assert trigger.expect == {"forgeline.dataset.updated"}
    assert trigger.parameters == {"fingerprint": "{{ event.payload.fingerprint }}"}
    config = PipelineConfig.model_validate(by_name["pipeline"].parameters["config"])
    assert config == load_config(ROOT / "configs" / "default.yaml")
    assert by_name["watch"].concurrency_limit.collision_strategy == "CANCEL_NEW"


def test_specs_follow_the_config() -> None:
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        ["deploy.gpu_pool.name=a100", "deploy.watch_interval=15", "deploy.retrain_cron=null"],
    )
    specs = {s["name"]: s for s in deploy.deployment_specs(cfg)}
    assert list(specs) == ["pipeline", "train", "tune", "retrain", "watch"]
    assert specs["train"]["work_pool"] == specs["tune"]["work_pool"] == {"name": "a100"}
    assert "schedules" not in specs["retrain"]
    assert deploy._deploy_options(specs["retrain"])["concurrency_limit"] == 1
    no_watch = load_config(ROOT / "configs" / "smoke.yaml", ["deploy.watch_interval=null"])
    assert "triggers" not in {s["name"]: s for s in deploy.deployment_specs(no_watch)}["watch"]


def test_watch_deployment_creates_no_run_per_interval() -> None:
    """Issue 14.5: an interval schedule on `watch` left a run a minute (1,440 a day) in the Prefect run list."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["deploy.watch_interval=15"])
    watch = {s["name"]: s for s in deploy.deployment_specs(cfg)}["watch"]
    assert "schedules" not in watch and watch["parameters"]["config"]["deploy"]["watch_interval"] == 15
    options = deploy._deploy_options(watch)
    assert "schedules" not in options  # nothing creates runs on a clock
    assert options["concurrency_limit"].limit == 1
    assert options["concurrency_limit"].collision_strategy.value == "CANCEL_NEW"  # a second start is cancelled
    (restart,) = options["triggers"]  # a crashed watcher comes back, a cancelled one does not
    assert restart.expect == {"prefect.flow-run.Crashed"}
    assert restart.match_related.model_dump() == {
        "prefect.resource.role": "deployment",
        "prefect.resource.name": "watch",
    }
    assert restart.schedule_after == timedelta(seconds=deploy.WATCH_RESTART_DELAY) and restart.parameters is None


def test_watcher_needs_a_cpu_slot_of_its_own() -> None:
    from forgeline.tasks.config import ConfigError

    with pytest.raises(ConfigError, match="leaves no slot beside the watcher"):
        load_config(ROOT / "configs" / "smoke.yaml", ["deploy.cpu_pool.concurrency_limit=1"])
    off = ["deploy.cpu_pool.concurrency_limit=1", "deploy.watch_interval=null"]
    assert load_config(ROOT / "configs" / "smoke.yaml", off).deploy.cpu_pool.concurrency_limit == 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_parameter_means_the_same_config_and_passes_the_schema(path: Path) -> None:
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from forgeline.flows.retrain import retrain_flow

    cfg = load_config(path, ["deploy.allow_cpu_fallback=true", "deploy.gpu_pool.concurrency_limit=2"])
    short = deploy.config_parameter(cfg)
    assert PipelineConfig.model_validate(short) == cfg
    # only what differs from the defaults, plus what the schema requires of a section that is written
    assert short["deploy"] == {"allow_cpu_fallback": True, "gpu_pool": {"name": "gpu", "concurrency_limit": 2}}
    # the Prefect server checks every run's parameters (an event trigger's run included) against this schema
    schema = parameter_schema(retrain_flow).model_dump_for_openapi()
    assert validate({"config": short, "fingerprint": "f", "deployed": True}, schema) == []
