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
    (interval,) = [RawScheduleConfig.model_validate(s) for s in by_name["watch"].schedules]
    assert interval.interval == timedelta(seconds=60) and interval.active is True
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
    assert specs["watch"]["schedules"][0]["interval"] == 15
    assert "schedules" not in specs["retrain"]
    options = deploy._deploy_options(specs["watch"])
    (schedule,) = options["schedules"]
    assert schedule.interval == timedelta(seconds=15) and schedule.active is True
    assert str(schedule.anchor_date.date()) == deploy.INTERVAL_ANCHOR[:10]
    assert options["concurrency_limit"].limit == 1
    assert options["concurrency_limit"].collision_strategy.value == "CANCEL_NEW"
    assert deploy._deploy_options(specs["retrain"])["concurrency_limit"] == 1
    no_watch = load_config(ROOT / "configs" / "smoke.yaml", ["deploy.watch_interval=null"])
    assert "schedules" not in {s["name"]: s for s in deploy.deployment_specs(no_watch)}["watch"]


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
