"""The import rules of docs/architecture.md, checked by machine: ``python -m tests.architecture``.

``flows/`` and ``tasks/`` install as ``forgeline.flows`` and ``forgeline.tasks`` through a package-dir
mapping, but grimp (import-linter's graph builder) finds a package's modules by walking its folder, and
``forgeline/`` holds neither. So the check runs against a throw-away tree of symlinks laid out as the
installed package is, first on ``PYTHONPATH`` in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CYCLES = """
import graphlib, grimp, json
graph = grimp.build_graph("forgeline")
# A module's own name among its imports is a guarded re-import (`if __name__ == "__main__"`), not a circle.
deps = {m: graph.find_modules_directly_imported_by(m) - {m} for m in graph.modules}
try:
    graphlib.TopologicalSorter(deps).prepare()
    cycles = []
except graphlib.CycleError as exc:
    cycles = [exc.args[1]]
print(json.dumps({"modules": len(deps), "cycles": cycles}))
"""


def make_shim(dest: Path) -> Path:
    """Lay out ``dest/forgeline`` as the installed package: symlinks to forgeline/*, flows/ and tasks/."""
    pkg = dest / "forgeline"
    pkg.mkdir(parents=True, exist_ok=True)
    for path in (ROOT / "forgeline").glob("*.py"):
        (pkg / path.name).symlink_to(path)
    (pkg / "flows").symlink_to(ROOT / "flows", target_is_directory=True)
    (pkg / "tasks").symlink_to(ROOT / "tasks", target_is_directory=True)
    return dest


def shim_env(shim: Path) -> dict[str, str]:
    """The environment for a child process that imports ``forgeline`` from the shim."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])}


def find_cycles(shim: Path) -> dict[str, object]:
    """An import circle among forgeline modules, if any (one is enough to fail), from grimp's graph."""
    import json

    out = subprocess.run(
        [sys.executable, "-c", _CYCLES], env=shim_env(shim), cwd=shim, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def lint_imports(shim: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter's contracts from pyproject.toml; its report is in stdout."""
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), str(ROOT / "pyproject.toml"), "--no-cache"],
        env=shim_env(shim),
        cwd=shim,
        capture_output=True,
        text=True,
        check=False,
    )


def main() -> int:
    """Check the contracts and the absence of import circles; print what breaks them."""
    with tempfile.TemporaryDirectory(prefix="forgeline-imports-") as tmp:
        shim = make_shim(Path(tmp))
        result = lint_imports(shim)
        sys.stdout.write(result.stdout + result.stderr)
        graph = find_cycles(shim)
        for cycle in graph["cycles"]:  # type: ignore[union-attr]
            sys.stdout.write(f"import circle: {' <-> '.join(cycle)}\n")
        sys.stdout.write(f"{graph['modules']} modules, {len(graph['cycles'])} import circles\n")  # type: ignore[arg-type]
        return 1 if result.returncode or graph["cycles"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
