"""The house rules: import contracts (import-linter), no import circles, rooms of a readable size."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.architecture import ROOT, find_cycles, lint_imports, make_shim

MAX_LINES = 420  # "about 400"
# The schema is one tree on purpose.
EXEMPT = {"tasks/config.py"}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shim(tmp_path_factory.mktemp("imports"))


def test_import_contracts_are_kept(shim: Path) -> None:
    result = lint_imports(shim)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_import_circles(shim: Path) -> None:
    graph = find_cycles(shim)
    assert graph["modules"] > 40  # the shim exposes flows/ and tasks/, not just forgeline/
    assert graph["cycles"] == []


def test_no_module_over_about_400_lines() -> None:
    big = {}
    for folder in ("forgeline", "flows", "tasks"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES and rel not in EXEMPT:
                big[rel] = lines
    assert big == {}
