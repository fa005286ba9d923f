"""The start-up savings keep their behaviour: heartbeats where they are read, MLflow's requirement check."""

from __future__ import annotations

import pytest


def test_heartbeats_off_only_on_our_temporary_server() -> None:
    from prefect.settings import get_current_settings

    from forgeline.flows.cli.startup import no_heartbeats

    default = get_current_settings().flows.heartbeat_frequency
    assert default is not None  # Prefect 3.9 beats by default
    with no_heartbeats(server=None):  # a stack or a configured API: its crash automation reads them
        assert get_current_settings().flows.heartbeat_frequency == default
    with no_heartbeats(server=object()):  # type: ignore[arg-type] - only its presence matters
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == default


def test_requirement_check_still_reports_a_mismatch_without_scanning_every_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.utils import requirements_utils

    from forgeline.tasks.tracking.models import skip_installed_files_scan

    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)

    def scan() -> None:
        raise AssertionError("scanned every installed file")

    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", scan)
    warnings: list[str] = []
    monkeypatch.setattr(
        requirements_utils._logger, "warning", lambda msg, *a, **k: warnings.append(msg % a if a else msg)
    )
    assert skip_installed_files_scan(), "MLflow changed its module map: log_model scans every installed file again"
    requirements_utils.warn_dependency_requirement_mismatches(["torch==0.0.1", "transformers"])
    text = "\n".join(warnings)
    assert "torch==0.0.1" in text and "mismatches" in text  # the wrong pin is still reported
    assert "transformers" not in text.split("torch==0.0.1")[1]  # the satisfied one is not


def test_mlflow_builds_its_module_map_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # The seeding trick relies on MLflow filling _MODULES_TO_PACKAGES lazily, once, and only when it is None.
    from mlflow.utils import requirements_utils

    assert hasattr(requirements_utils, "_MODULES_TO_PACKAGES"), "MLflow renamed its private module map"
    seeded = {"torch": ["torch"]}
    monkeypatch.setattr(requirements_utils, "_MODULES_TO_PACKAGES", seeded)
    monkeypatch.setattr(requirements_utils, "_PACKAGES_TO_MODULES", None)

    def scan() -> None:
        raise AssertionError("MLflow rebuilt a map that was already set")

    monkeypatch.setattr(requirements_utils.importlib_metadata, "packages_distributions", scan)
    requirements_utils._init_packages_to_modules_map()
    assert requirements_utils._MODULES_TO_PACKAGES is seeded
    assert requirements_utils._PACKAGES_TO_MODULES == {"torch": "torch"}


@pytest.mark.parametrize("fast", ["1", "0"])
def test_cli_exit_status_and_output_survive_the_fast_exit(fast: str, tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "FORGELINE_FAST_EXIT": fast}
    bad = subprocess.run(
        [sys.executable, "-m", "forgeline", "run", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "config file not found" in bad.stdout + bad.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "forgeline", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0 and "run" in ok.stdout


def test_process_age_is_measured_from_this_process_start() -> None:
    import time

    from forgeline.flows.cli.runs import process_age

    age = process_age()
    assert 0.0 < age < time.monotonic()  # pytest has been running a while; never a future or boot-time value
    assert abs(process_age() - age) < 1.0


def test_a_language_model_run_imports_no_task_metrics_it_does_not_use() -> None:
    """The completion metrics (rouge-score -> nltk -> scikit-learn -> pandas, scipy) cost 1.3 s of every run's start."""
    import subprocess
    import sys

    code = (
        "import sys, forgeline.flows.pipeline, forgeline.flows.cli.main;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'rouge_score', 'nltk', 'sacrebleu', 'sklearn'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
