"""The offline ``python-docs`` corpus: pydoc topics, then stdlib docstrings (read from source, never imported)."""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import tokenize
from collections.abc import Iterator

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
def builtin_corpus(max_bytes: int) -> str:
    """The offline ``python-docs`` corpus: pydoc topics, then stdlib docstrings, capped at ``max_bytes``.

    Deterministic for a given Python version: topics and modules are taken in a fixed sorted order.

    Args:
        max_bytes: Cap on the UTF-8 size of the corpus.

    Returns:
        Documents separated by blank lines.
    """
    parts: list[str] = []
    size = 0
    for doc in _builtin_docs():
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
    """Parse a stdlib module's source (read, not imported: runtime patching cannot change the corpus)."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # pragma: no cover - optional stdlib parts
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with tokenize.open(spec.origin) as handle:
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
