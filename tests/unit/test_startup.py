"""The start-up and exit savings (flows/cli/startup.py) still rest on what they rely on.

Each saving leans on a behaviour of a library or of CPython; these tests fail, rather than the command
silently getting slower or leaving files behind, when that behaviour changes underneath.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **env},
        timeout=120,
    )


def test_temporary_server_factory_asks_create_app_for_an_ephemeral_final_app() -> None:
    import importlib

    from prefect.server.api.server import create_app

    from forgeline.flows.cli import startup

    params = inspect.signature(create_app).parameters
    assert {"ephemeral", "final"} <= set(params)  # the public arguments Prefect's own temporary server uses
    assert params["ephemeral"].default is False and params["final"].default is False
    module, _, name = startup.SERVER_FACTORY.partition(":")
    assert getattr(importlib.import_module(module), name) is startup.temporary_server_app  # what uvicorn loads


def test_fast_exit_skips_teardown_but_keeps_status_output_and_finalizers(tmp_path: Path) -> None:
    code = """
        import pathlib, sys, tempfile
        import forgeline.flows.cli.main  # everything the entry imports, loaded before the exit hook
        from forgeline.flows.cli import startup

        class Teardown:
            def __del__(self):  # runs in the interpreter's teardown, which the fast exit skips
                pathlib.Path("teardown-ran").write_text("yes")

        marker = Teardown()

        def command():
            kept = tempfile.TemporaryDirectory(dir=".")  # still alive at exit: its finalizer removes it
            pathlib.Path(kept.name, "f").write_text("x")
            globals()["kept"] = kept
            print("last line", kept.name)  # block-buffered into a pipe: must be flushed on the way out
            raise SystemExit(3)

        startup.run_with_fast_exit(command)
    """
    for mode in ("fast", "slow"):
        (tmp_path / mode).mkdir()
    fast = _python(code, tmp_path / "fast", FORGELINE_FAST_EXIT="1")
    slow = _python(code, tmp_path / "slow", FORGELINE_FAST_EXIT="0")
    for result, folder in ((fast, tmp_path / "fast"), (slow, tmp_path / "slow")):
        assert result.returncode == 3, result.stderr
        assert result.stdout.startswith("last line")
        assert not [p for p in folder.iterdir() if p.is_dir()], "a temporary directory outlived the command"
    assert not (tmp_path / "fast" / "teardown-ran").exists(), "the fast exit no longer skips the teardown"
    assert (tmp_path / "slow" / "teardown-ran").exists()  # the probe itself works


def test_the_command_lines_imports_create_no_finalizer_before_the_exit_hook(tmp_path: Path) -> None:
    # weakref.finalize registers its own exit hook with the first finalizer. Created by the command line's
    # imports, that hook would come before ours in atexit's order, run after it, and be skipped by the fast
    # exit: finalizers (temporary directories) would not run. CPython keeps the flag on the class.
    result = _python(
        """
        import weakref
        import forgeline.flows.cli.main
        print(weakref.finalize._registered_with_atexit)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
