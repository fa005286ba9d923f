"""Reading a config file: its text, its YAML (a key given twice and alias bombs refused), a key's line.

Every problem is one ``ConfigError`` line naming the file and, where known, the line: the config loader
(``tasks/config.py``) turns a file into the pydantic tree, this module gets it that far.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from forgeline.tasks.errors import ConfigError

_YAML_KEY = re.compile(
    r"^(?P<indent>[ ]*)(?P<dashes>(?:-[ ]+)*)(?P<key>[^\s:#'\"-][^:#]*?|'[^']*'|\"[^\"]*\")[ ]*:(?:\s|$)"
)


def line_of_key(text: str, key: str) -> int | None:
    """Best-effort line of a dotted key in block-style YAML text (for error messages).

    The whole path must match, by indentation (``eval.max_steps`` is not ``train.max_steps``), list items
    by their index (``data.sources.1.paths``); a key that is absent (a missing field) gets the line of
    its deepest section present.
    """
    parts = key.split(".") if key else []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, is a list index) enclosing the current line
    items: dict[str, int] = {}  # path of a list -> index of its latest item
    best: tuple[int, int] | None = None  # (parts matched, line)
    for number, line in enumerate(text.splitlines(), start=1):
        match = _YAML_KEY.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        for dash in re.finditer(r"-[ ]+", match["dashes"]):
            at = indent + dash.start()
            # a list may sit at its key's own indent (``sources:`` / ``- kind: files``): keep that key
            while stack and (stack[-1][0] > at or (stack[-1][0] == at and stack[-1][2])):
                stack.pop()
            parent = ".".join(k for _, k, _ in stack)
            items[parent] = items.get(parent, -1) + 1
            stack.append((at, str(items[parent]), True))
            item = ".".join(k for _, k, _ in stack).split(".")
            if parts[: len(item)] == item and (best is None or len(item) > best[0]):
                best = (len(item), number)
        indent += len(match["dashes"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"].strip("'\""), False))
        path = ".".join(k for _, k, _ in stack).split(".")  # search-space keys are dotted themselves
        if path == parts:
            return number
        if parts[: len(path)] == path and (best is None or len(path) > best[0]):
            best = (len(path), number)
    return best[1] if best else None


MAX_YAML_NODES = 100_000
"""Values a config may hold once its aliases are expanded: far above any real config, far below a bomb."""


class _YamlRefusal(Exception):
    """A YAML document this loader refuses; ``line`` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _ConfigLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: SafeConstructor reports it below
                continue
            if first is not None:
                raise _YamlRefusal(line, f"key {key!r} appears twice (first at line {first})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> None:
    """Refuse a node graph whose aliases expand past ``MAX_YAML_NODES`` values, or refer to themselves.

    Each node is sized once (aliases share their node), so a billion-value alias bomb costs a few steps.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise _YamlRefusal(node.start_mark.line + 1, "an alias refers to its own anchor (recursive YAML)")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        open_nodes.discard(id(node))
        if total > MAX_YAML_NODES:
            raise _YamlRefusal(
                node.start_mark.line + 1,
                f"aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?); refusing it",
            )
        sizes[id(node)] = total
        return total

    size(root)


def parse_yaml(text: str, path: str | Path) -> Any:
    """The YAML document in ``text``; every problem becomes one ``ConfigError`` line naming ``path`` and the line."""
    loader: _ConfigLoader | None = None
    try:
        loader = _ConfigLoader(text)  # the reader refuses control characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except _YamlRefusal as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc}") from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        bad = f"control character 0x{exc.character:02x} at offset {exc.position}"
        raise ConfigError(f"{path}:{line}: invalid YAML ({bad})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"{path}{line}: invalid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_config_text(path: str | Path) -> str:
    """The text of a config file, or one ``ConfigError`` line: missing, unreadable, or not UTF-8 (with its line)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
