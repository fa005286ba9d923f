"""Config files and values the loader refuses, through the real command line (RELIABILITY.md G4-G7): one
``error:`` line naming the file and line (or the ``--set``), exit 2, no traceback, no store created."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Project

pytestmark = pytest.mark.integration

BOMB = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
]
CHOICE = "tune.search_space.train.max_steps={type: categorical, choices: [ten]}"

CASES: dict[str, tuple[bytes | None, list[str], str]] = {
    "G4 not UTF-8": (b"name: caf\xe9\n", [], "bad.yaml:1: not valid UTF-8 (byte 0xe9 at offset 9)"),
    "G4 key given twice": (
        b"train:\n  max_steps: 3\nseed: 1\ntrain:\n  batch_size: 4\n",
        [],
        "bad.yaml:4: key 'train' appears twice (first at line 1)",
    ),
    "G4 alias bomb": (
        ("deploy:\n  cpu_pool:\n    job_variables:\n" + "".join(f"      {b}\n" for b in BOMB)).encode(),
        [],
        "aliases expand to more than 100,000 values",
    ),
    "G5 seed past 2^31": (None, ["--set", f"seed={2**64}"], f"--set seed={2**64}: Input should be less than"),
    "G6 search-space choice": (None, ["--set", CHOICE], f"--set {CHOICE}: train.max_steps: choice 'ten' does not fit"),
    "G7 a --set is blamed, not the file": (
        None,
        ["--set", "train.nproc_per_node=0"],
        "--set train.nproc_per_node=0: train.nproc_per_node must be >= 1",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_config_is_one_line_and_creates_nothing(project: Project, case: str) -> None:
    content, extra, culprit = CASES[case]
    config = "smoke.yaml"
    if content is not None:
        (project.root / "bad.yaml").write_bytes(content)
        config = "bad.yaml"
    result = project.cli("run", "--config", config, *extra, timeout=60)

    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.output, result.describe()
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], result.describe()
    assert not project.has_store(), result.describe()
