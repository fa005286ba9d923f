"""Bad input through the real command line: one ``error:`` line naming the culprit, no traceback, nothing written.

RELIABILITY.md rows F1-F3 and F5 (data) and G1-G3 (configuration). Prefect's engine logs a failed task or
flow run with its traceback; without ``--verbose`` the command keeps that out of the terminal and says what
is wrong in one line (with ``--verbose`` the whole story, checked last).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import CliResult, Project

pytestmark = pytest.mark.integration


def _file(name: str, content: bytes) -> Callable[[Path], list[str]]:
    def make(root: Path) -> list[str]:
        (root / name).write_bytes(content)
        return ["--data", name]

    return make


def _config(text: str) -> Callable[[Path], list[str]]:
    def make(root: Path) -> list[str]:
        (root / "bad.yaml").write_text(text, encoding="utf-8")
        return ["--config", "bad.yaml"]

    return make


CASES = {
    "F1 empty file": (_file("empty.txt", b""), "empty.txt"),
    "F2 not UTF-8": (
        _file("latin.txt", b"a fine first line of text\n\xff\xfe caf\xe9\n"),
        "latin.txt: not valid UTF-8",
    ),
    "F3 invalid JSON line": (_file("rows.jsonl", b'{"text": "one good record here"}\n{"text": oops}\n'), "rows.jsonl"),
    "F5 CSV without the text column": (_file("table.csv", b"title,body\nx,some body text here\n"), "table.csv"),
    "G1 unknown key": (lambda root: ["--set", "train.learnig_rate=1"], "train.learnig_rate"),
    "G2 bad value in a file": (_config("train:\n  learning_rate: -1\n"), "bad.yaml"),
    "G3 plain-folder store": (lambda root: ["--set", "tracking.uri=file:./plain-store"], "file:./plain-store"),
}


def _run(project: Project, make: Callable[[Path], list[str]], *extra: str) -> CliResult:
    args = make(project.root)
    if "--config" not in args:
        args = ["--config", "smoke.yaml", *args]
    return project.cli("run", *args, *extra)


SLOW_CASES = {"F1 empty file", "F3 invalid JSON line"}  # each a whole run (14 s on 2 cores); F2 and F5 stay default


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES])
def test_bad_input_is_one_line_without_traceback(project: Project, case: str) -> None:
    make, culprit = CASES[case]
    result = _run(project, make)

    assert result.returncode in (1, 2), result.describe()
    assert "Traceback" not in result.output, result.describe()
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], result.describe()
    assert len(lines) <= 2, result.describe()  # the error line and at most one hint
    if project.has_store():
        assert project.client().search_registered_models() == []


def test_verbose_tells_the_whole_story(project: Project) -> None:
    make, culprit = CASES["F2 not UTF-8"]
    result = _run(project, make, "--verbose")

    assert result.returncode == 2, result.describe()
    assert "Traceback" in result.output
    assert culprit in result.output
