"""What a user's environment gets from ``pip install``: one package, ``forgeline``, holding flows and tasks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build would leave build/ in the clone and could package stale files from it.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("forgeline", "flows", "tasks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(src), "--no-deps", "--no-build-isolation", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("forgeline-*.whl")
    return zipfile.ZipFile(path)


@pytest.fixture(scope="module")
def wheel_names(wheel: zipfile.ZipFile) -> set[str]:
    return set(wheel.namelist())


def test_wheel_installs_one_top_level_package(wheel_names: set[str]) -> None:
    top = {name.split("/")[0] for name in wheel_names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"forgeline"}


def test_every_module_of_flows_and_tasks_is_in_the_wheel(wheel_names: set[str]) -> None:
    missing = []
    for folder in ("flows", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            name = f"forgeline/{path.relative_to(ROOT).as_posix()}"
            if name not in wheel_names:
                missing.append(name)
    assert not missing, f"not packaged (add the package to pyproject's [tool.setuptools] packages): {missing}"


def test_console_script_points_at_a_packaged_module(wheel: zipfile.ZipFile, wheel_names: set[str]) -> None:
    (member,) = [n for n in wheel_names if n.endswith("entry_points.txt")]
    text = wheel.read(member).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("forgeline ="))
    module = line.split("=", 1)[1].strip().split(":")[0]
    path = module.replace(".", "/")
    assert module.startswith("forgeline.flows.")
    assert f"{path}.py" in wheel_names or f"{path}/__init__.py" in wheel_names


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    """``import forgeline`` loads neither Prefect, MLflow nor torch, and writes nothing."""
    code = (
        "import sys, forgeline; "
        "print(sorted(m for m in ('prefect', 'mlflow', 'torch', 'transformers') if m in sys.modules)); "
        "print(callable(forgeline.run), callable(forgeline.load_config))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split("\n")[:2] == ["[]", "True True"]
    assert list(tmp_path.iterdir()) == []
