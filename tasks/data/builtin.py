"""The offline built-in corpora: ``python-docs`` (lm) and ``python-docstrings`` (completion pairs).

``python-docs`` is pydoc topics, then stdlib docstrings read from source (never imported). ``python-docstrings``
pairs each documented public function, class and method of a fixed list of standard library modules (imported:
C modules have no source) with the first sentence of its docstring; both are deterministic for a Python version.
"""

from __future__ import annotations

# Standard library only: this file also runs as a script in a bare interpreter (see _all_docstring_pairs).
import ast
import functools
import hashlib
import importlib
import inspect
import json
import logging
import re
import subprocess
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILTIN_LABEL = "builtin:python-docs"
_MODULE_NAMES = (
    "argparse ast asyncio base64 bisect calendar cmd collections concurrent.futures configparser  contextlib copy "
    "csv dataclasses datetime decimal difflib email.message enum fileinput fnmatch  fractions ftplib functools "
    "getopt gettext glob gzip hashlib heapq hmac html.parser http.client  http.server imaplib inspect ipaddress "
    "json logging logging.handlers mailbox mimetypes numbers  operator optparse pathlib pickle pkgutil platform "
    "poplib pprint queue random re sched secrets  selectors shelve shlex shutil smtplib socket socketserver "
    "statistics string struct subprocess  tarfile tempfile textwrap threading timeit tokenize trace traceback "
    "types typing unittest  urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile "
)
BUILTIN_MODULES = tuple(_MODULE_NAMES.split())
"""Stdlib modules whose docstrings (after ``pydoc_data`` topics) make up the builtin corpus, in order."""


@functools.lru_cache(maxsize=4)
def builtin_corpus(max_bytes: int, exclude: frozenset[str] = frozenset()) -> str:
    """The offline ``python-docs`` corpus: pydoc topics, then stdlib docstrings, capped at ``max_bytes``.

    Deterministic for a given Python version: topics and modules are taken in a fixed sorted order.

    Args:
        max_bytes: Cap on the UTF-8 size of the corpus.
        exclude: Sentences to keep out (e.g. the test completions of ``python-docstrings``): a document whose
            whitespace-normalized text contains any of them is left out whole. Empty: every document.

    Returns:
        Documents separated by blank lines.
    """
    parts: list[str] = []
    size = 0
    for doc in _builtin_docs():
        if exclude and _mentions_any(doc, exclude):
            continue
        piece = doc if not parts else "\n\n" + doc
        room = max_bytes - size
        encoded = piece.encode("utf-8")
        if len(encoded) >= room:
            parts.append(encoded[:room].decode("utf-8", errors="ignore"))
            break
        parts.append(piece)
        size += len(encoded)
    return "".join(parts)


def _builtin_docs() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python installs
        logger.warning("pydoc_data is missing; the builtin corpus has docstrings only")
        topics = {}
    for key in sorted(topics):
        yield topics[key].strip()
    for name in BUILTIN_MODULES:
        tree = _module_ast(name)
        if tree is not None:
            yield from _ast_docs(name, tree)


def _module_ast(name: str) -> ast.Module | None:
    """Parse a stdlib module's source (read, not imported: runtime patching cannot change the corpus).

    Looked up in the stdlib folder only: through ``sys.path`` a ``mailbox.py`` in the working directory
    (``python -m forgeline`` puts it first) would take the real module's place in the corpus.
    """
    base = Path(sysconfig.get_paths()["stdlib"]).joinpath(*name.split("."))
    source = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
    if source is None:  # pragma: no cover - optional stdlib parts
        return None
    try:
        with tokenize.open(source) as handle:
            return ast.parse(handle.read())
    except (OSError, SyntaxError, UnicodeDecodeError):  # pragma: no cover - stripped installs
        return None


def _ast_docs(name: str, tree: ast.Module) -> Iterator[str]:
    """The module docstring, then each public class/function (and class method) docstring in source order."""
    doc = ast.get_docstring(tree)
    if doc:
        yield f"{name}\n\n{doc}"
    for node in tree.body:
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if doc:
            yield f"{name}.{node.name}\n\n{doc}"
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                is_def = isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
                doc = ast.get_docstring(member) if is_def and not member.name.startswith("_") else None
                if doc:
                    yield f"{name}.{node.name}.{member.name}\n\n{doc}"


def _mentions_any(doc: str, sentences: frozenset[str]) -> bool:
    flat = " ".join(doc.split())
    return any(sentence in flat for sentence in sentences)


# ------------------------------------------------------------------------------ python-docstrings
DOCSTRINGS_LABEL = "builtin:python-docstrings"
# C modules beside the python-docs ones; all import without side effects (no windows, threads or output).
_C_MODULES = (
    "array binascii builtins bz2 cmath codecs colorsys io itertools keyword lzma math os os.path stat time zlib"
)
DOCSTRING_MODULES = tuple(sorted(set(BUILTIN_MODULES) | set(_C_MODULES.split())))
"""Modules whose public functions, classes and methods make up ``python-docstrings``, in this order."""
_LITERALS = (type(None), bool, int, float, complex, str, bytes)


def docstring_pairs(max_bytes: int | None = None) -> list[dict[str, str]]:
    """The ``python-docstrings`` corpus: ``{"prompt": "json.dumps(obj, *, ...)", "completion": "Serialize ..."}``.

    Each documented public function, class (its constructor signature) and class method of
    :data:`DOCSTRING_MODULES` that has a signature, in module order, then name order (a class's methods right
    after it). Defaults that are not plain literals are written by name (``copy_function=copy2``) or as ``...``,
    never with a memory address, so the records are the same in every process of one Python version. Duplicates
    are kept: the cleaning stage counts and drops them.

    Args:
        max_bytes: Stop before the record that would take the UTF-8 size of prompts and completions past this.

    Returns:
        The records (a fresh list; the corpus itself is computed once per process).
    """
    records = _all_docstring_pairs()
    if max_bytes is not None:
        size, kept = 0, 0
        for prompt, completion in records:
            size += len(prompt.encode("utf-8")) + len(completion.encode("utf-8"))
            if size > max_bytes:
                break
            kept += 1
        records = records[:kept]
    return [{"prompt": prompt, "completion": completion} for prompt, completion in records]


def docstring_texts() -> frozenset[str]:
    """Every completion of ``python-docstrings``: the first sentences a pretraining text must not hold for test pairs.

    Returns:
        The set of completions (pass the test split's to :func:`builtin_corpus` as ``exclude``).
    """
    return frozenset(completion for _, completion in _all_docstring_pairs())


def docstrings_digest(max_bytes: int | None = None) -> str:
    """A SHA-256 of the records :func:`docstring_pairs` returns: the corpus fingerprint for the dataset cache key.

    Args:
        max_bytes: As for :func:`docstring_pairs`.

    Returns:
        Hex digest.
    """
    blob = json.dumps(docstring_pairs(max_bytes), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def first_sentence(doc: str, name: str = "") -> str:
    """The first sentence of a docstring: its first paragraph up to the first ``". "``, whitespace normalized.

    Args:
        doc: A docstring (indentation is cleaned here).
        name: The documented name; a leading paragraph that merely restates its signature (``count(start=0) ->
            ...``, common in C docstrings) is passed over.

    Returns:
        The sentence (with its full stop when it has one), or ``""`` for an empty docstring.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc))]
    paragraphs = [p for p in paragraphs if p]
    if name and len(paragraphs) > 1 and paragraphs[0].startswith(f"{name}("):
        paragraphs = paragraphs[1:]
    if not paragraphs:
        return ""
    text = paragraphs[0]
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


@functools.lru_cache(maxsize=1)
def _all_docstring_pairs() -> tuple[tuple[str, str], ...]:
    """Extract the pairs in a fresh interpreter without site-packages: what a library patched into the stdlib of
    this process (transformers adds ``logging.Logger`` methods, others wrap ``inspect`` functions) stays out."""
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "utf8", __file__],  # utf8: no locale in defaults
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"python-docstrings: extracting the corpus failed ({tail[0]})")
    pairs = tuple((prompt, completion) for prompt, completion in json.loads(done.stdout))
    logger.debug("python-docstrings: %d pairs from %d modules", len(pairs), len(DOCSTRING_MODULES))
    return pairs


def _extract_pairs() -> list[tuple[str, str]]:
    """The pairs, read from the modules imported into this interpreter (run it bare: see _all_docstring_pairs)."""
    pairs: list[tuple[str, str]] = []
    for module_name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - stripped Python installs
            continue
        for name, obj in _public_members(module):
            pairs.extend(_pairs_of(f"{module_name}.{name}", name, obj))
            if inspect.isclass(obj):
                for method_name in sorted(vars(obj)):
                    method = getattr(obj, method_name, None) if not method_name.startswith("_") else None
                    if inspect.isroutine(method):
                        pairs.extend(_pairs_of(f"{module_name}.{name}.{method_name}", method_name, method))
    return pairs


def _public_members(module: Any) -> list[tuple[str, Any]]:
    """Public classes and routines: those ``__all__`` names, else those the module itself defines."""
    listed = getattr(module, "__all__", None)
    names = sorted(set(listed if listed is not None else vars(module)))
    members = []
    for name in names:
        obj = getattr(module, name, None)
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if listed is None and getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere
        members.append((name, obj))
    return members


def _pairs_of(qualified: str, name: str, obj: Any) -> list[tuple[str, str]]:
    """``[(prompt, completion)]`` for one object, or ``[]`` when it has no own docstring or no signature."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str):  # a class's __doc__ is its own (never inherited) only through its __dict__
        return []
    completion = first_sentence(doc, name)
    if not completion:
        return []
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # many C callables have none
        return []
    return [(qualified + _plain_signature(signature), completion)]


class _Shown:
    """A default value shown by a fixed text (its repr may hold a memory address or a hash-seeded order)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _plain_signature(signature: inspect.Signature) -> str:
    """The signature without annotations, defaults written so that they read the same in every process."""
    params = [
        p.replace(
            annotation=inspect.Parameter.empty,
            default=p.default if p.default is inspect.Parameter.empty else _Shown(_show_default(p.default)),
        )
        for p in signature.parameters.values()
    ]
    return str(signature.replace(parameters=params, return_annotation=inspect.Signature.empty))


def _show_default(value: Any) -> str:
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, str) and sys.executable and sys.executable in value:
        # platform.architecture(executable=sys.executable): the install's path would change the corpus
        return repr(value.replace(sys.executable, "python"))
    if isinstance(value, _LITERALS):
        return repr(value)
    if isinstance(value, tuple | list) and all(isinstance(v, _LITERALS) for v in value):
        return repr(value)
    if isinstance(value, set | frozenset) and all(isinstance(v, _LITERALS) for v in value):
        return "{" + ", ".join(sorted(repr(v) for v in value)) + "}" if value else "set()"
    if inspect.isclass(value) or inspect.isroutine(value):
        return getattr(value, "__qualname__", None) or getattr(value, "__name__", "...")
    return "..."


if __name__ == "__main__":  # the bare interpreter _all_docstring_pairs starts
    json.dump(_extract_pairs(), sys.stdout, ensure_ascii=True)
