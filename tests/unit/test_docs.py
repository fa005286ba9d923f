"""The docs that are generated from code must match the code."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():  # noqa: ANN202 - a module loaded from docs/
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "docs" / "gen_config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == _generator().render(), (
        "docs/configuration.md is stale: run `.venv/bin/python docs/gen_config_reference.py` and commit it"
    )


def test_reference_lists_every_leaf_key() -> None:
    from forgeline.tasks.config import PipelineConfig, _leaf_keys

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = sorted(k for k in _leaf_keys(PipelineConfig) if f"`{k}`" not in text)
    assert not missing


def test_docs_are_linked_from_readme() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in ("configuration", "architecture", "operations", "troubleshooting"):
        assert (ROOT / "docs" / f"{page}.md").is_file()
        assert f"docs/{page}.md" in readme


_PATH = re.compile(r"(?<![\w./-])((?:flows|tasks|forgeline|bench|configs|docs|tests)/[\w./-]*\.(?:py|yaml|md|sh))")
_EXAMPLES = {"configs/my.yaml"}  # a user's own file in an example, not ours
_DOTTED = re.compile(r"`(?:python -m )?(forgeline\.(?:flows|tasks|api)(?:\.\w+)*)")


def _doc_texts() -> dict[str, str]:
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "RELIABILITY.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in docs}


def test_file_paths_named_in_the_docs_exist() -> None:
    missing = {
        f"{doc}: {path}"
        for doc, text in _doc_texts().items()
        for path in _PATH.findall(text)
        if "*" not in path and "<" not in path and path not in _EXAMPLES and not (ROOT / path).exists()
    }
    assert not missing, sorted(missing)


def test_python_names_in_the_docs_resolve() -> None:
    broken = set()
    for doc, text in _doc_texts().items():
        for dotted in _DOTTED.findall(text):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    broken.add(f"{doc}: {dotted}")
                break
            else:
                broken.add(f"{doc}: {dotted}")
    assert not broken, sorted(broken)
