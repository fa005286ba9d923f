"""The built-in ``python-docstrings`` corpus: deterministic signature -> first-sentence pairs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forgeline.tasks.data import builtin
from forgeline.tasks.data.builtin import (
    builtin_corpus,
    docstring_pairs,
    docstring_texts,
    docstrings_digest,
    first_sentence,
)


def test_pairs_are_deterministic_and_substantial() -> None:
    first = docstring_pairs()
    digest = docstrings_digest()
    builtin._all_docstring_pairs.cache_clear()  # extracted again, in a fresh interpreter
    assert docstring_pairs() == first
    assert docstrings_digest() == digest
    assert len(first) > 1000
    assert all(set(r) == {"prompt", "completion"} and r["prompt"] and r["completion"] for r in first)
    assert len({r["prompt"] for r in first}) == len(first)
    assert not any("\n" in r["prompt"] + r["completion"] for r in first)  # one line each: newline can end decoding
    assert [r["prompt"].split(".", 1)[0] for r in first] == sorted(r["prompt"].split(".", 1)[0] for r in first)


def test_known_records() -> None:
    records = {r["prompt"]: r["completion"] for r in docstring_pairs()}
    dumps = (
        "json.dumps(obj, *, skipkeys=False, ensure_ascii=True, check_circular=True, allow_nan=True, cls=None, "
        "indent=None, separators=None, default=None, sort_keys=False, **kw)"
    )
    assert records[dumps] == "Serialize ``obj`` to a JSON formatted ``str``."
    assert records["math.cos(x, /)"] == "Return the cosine of x (measured in radians)."
    assert records["json.JSONDecoder.raw_decode(self, s, idx=0)"].startswith("Decode a JSON document from ``s``")
    # A class prompt is its constructor's signature; a default function is written by name, not its repr.
    assert records["shutil.move(src, dst, copy_function=copy2)"].startswith("Recursively move a file or directory")
    assert records["json.JSONDecoder.decode(self, s, _w=Pattern.match)"].startswith("Return the Python representation")
    assert not any(" at 0x" in prompt for prompt in records)


def test_patched_stdlib_does_not_change_the_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Libraries patch the stdlib at import (transformers adds Logger methods): the corpus must not see it."""
    expected = docstring_pairs()

    def dumps(obj: object) -> str:
        """Patched."""
        return ""

    def extra(self: logging.Logger) -> None:
        """Added by a library."""

    monkeypatch.setattr(json, "dumps", dumps)
    monkeypatch.setattr(logging.Logger, "extra_once", extra, raising=False)
    builtin._all_docstring_pairs.cache_clear()
    assert docstring_pairs() == expected


def test_max_bytes_caps_the_records() -> None:
    records = docstring_pairs(max_bytes=2_000)
    size = sum(len(r["prompt"].encode()) + len(r["completion"].encode()) for r in records)
    assert 0 < len(records) < 100 and size <= 2_000
    assert records == docstring_pairs()[: len(records)]
    assert docstrings_digest(2_000) != docstrings_digest()


@pytest.mark.parametrize(
    ("doc", "name", "sentence"),
    [
        ("Return the sum.  More text. And more.", "", "Return the sum."),
        ("Return   the\n    sum of\n\tvalues\n\nSecond paragraph.", "", "Return the sum of values"),
        ("Use e.g. this.\n", "", "Use e.g."),
        ("    Indented first line.\n    Next.", "", "Indented first line."),
        ("count(start=0, step=1) --> count object\n\nReturn a count object.", "count", "Return a count object."),
        ("count(start=0) --> count object", "count", "count(start=0) --> count object"),
        ("Version 3.0 or later.", "", "Version 3.0 or later."),
        ("   \n\n  ", "", ""),
    ],
)
def test_first_sentence(doc: str, name: str, sentence: str) -> None:
    assert first_sentence(doc, name) == sentence


def test_docstring_texts_are_the_completions() -> None:
    texts = docstring_texts()
    assert texts == {r["completion"] for r in docstring_pairs()}


def test_python_docs_corpus_can_leave_test_pairs_out() -> None:
    completions = sorted(docstring_texts())
    full = " ".join(builtin_corpus(2_000_000).split())
    held_out = frozenset(c for c in completions[::10] if c in full)
    assert len(held_out) > 50  # the lm corpus really does hold many of the same sentences
    kept_out = " ".join(builtin_corpus(2_000_000, held_out).split())
    assert not [c for c in held_out if c in kept_out]
    assert len(kept_out) > 0.8 * len(full)  # whole documents go, not the corpus
    assert builtin_corpus(2_000_000, frozenset()) == builtin_corpus(2_000_000)  # default unchanged


def test_pairs_do_not_depend_on_where_python_is_installed(tmp_path: Path) -> None:
    # platform.architecture's default is sys.executable: a checkout's path once changed the corpus and its fingerprint
    elsewhere = tmp_path / "somewhere-else" / "python3"
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(sys.executable)
    done = subprocess.run(
        [str(elsewhere), "-I", "-S", "-X", "utf8", builtin.__file__], capture_output=True, check=True, text=True
    )
    moved = [tuple(pair) for pair in json.loads(done.stdout)]
    assert moved == list(builtin._all_docstring_pairs())
    assert "platform.architecture(executable='python', bits='', linkage='')" in dict(moved)


def test_a_module_file_in_the_working_directory_does_not_shadow_the_stdlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = list(builtin._builtin_docs())
    (tmp_path / "mailbox.py").write_text('"""A local mailbox.py that is not the standard library\'s."""\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what `python -m forgeline` does with the working directory
    monkeypatch.delitem(sys.modules, "mailbox", raising=False)
    shadowed = list(builtin._builtin_docs())
    assert shadowed == expected
    assert not any("not the standard library" in doc for doc in shadowed)


@pytest.mark.slow
def test_pairs_do_not_depend_on_the_locale(tmp_path: Path) -> None:
    # tarfile.TarInfo.tobuf's default encoding is the file-system encoding, which a Latin-1 locale changes
    assert shutil.which("localedef"), "localedef (Debian's libc-bin) builds the test's locale"
    subprocess.run(
        ["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(tmp_path / "en_US.ISO-8859-1")],
        check=True,
        capture_output=True,
    )
    env = {"LOCPATH": str(tmp_path), "LC_ALL": "en_US.ISO-8859-1", "PATH": os.environ.get("PATH", "")}
    script = (
        "import sys; from forgeline.tasks.data import builtin; "
        "assert sys.getfilesystemencoding() == 'iso8859-1', sys.getfilesystemencoding(); "
        "print(builtin.docstrings_digest())"
    )
    latin = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert latin.stdout.strip() == builtin.docstrings_digest()
