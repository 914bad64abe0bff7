"""Reading the YAML that users and runs write: bounded, duplicate-free, each scalar's text kept.

Invariants:
- Reading costs time and memory proportional to the file, whatever it holds: files over
  ``MAX_BYTES`` are refused unread, and a document whose aliases would expand past ``MAX_NODES``
  values (an alias bomb) or that nests deeper than ``MAX_DEPTH`` is refused while it is being
  composed, before any Python object is built.
- A key given twice in one mapping is an error naming the key and both lines (PyYAML would keep the
  last silently); keys brought in by a ``<<`` merge may be overridden, as YAML intends.
- Every scalar keeps its source text next to what YAML makes of it, so a caller that knows a key's
  type can read ``0123`` as the string "0123" (YAML 1.1: octal 83), ``1:30`` as "1:30" (YAML: 90).
- Names in messages are cut by `errors.shorten_text`: a message's length is bounded too.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from distrain.errors import UserError, shorten_text

MAX_BYTES = 1 << 20  # a config is a few KB; a megabyte is a mistake (a dataset given to -c)
MAX_NODES = 10_000  # values after expanding aliases; distrain's whole config has about 60
MAX_DEPTH = 32

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(Exception):
    """What is wrong with a YAML document, and the 1-based line where it shows (0: unknown)."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class Scalar:
    """A leaf: ``text`` as written (a plain scalar's; else ""), ``value`` what YAML makes of it."""

    text: str
    value: Any
    plain: bool
    line: int = 0


class Section(dict):
    """A YAML mapping: keys (as written) to `Section` or `Scalar`; ``key_lines``: their lines."""

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}


Tree = Union[Section, Scalar]


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader counting the values each node expands to (aliases included) and the depth."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}
        self._depth = 0

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        if self.check_event(AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._sizes:  # anchored on a collection still being composed
                raise YamlProblem("an alias refers to the collection that contains it", line)
            return node
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlProblem(f"nests more than {MAX_DEPTH} levels deep", line)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count(node, line)
        return node

    def _count(self, node, line: int) -> None:
        # Children are composed (and counted) before their parent; an alias's node was counted when
        # it was composed, so the sum costs one addition per child whatever the aliases expand to.
        if isinstance(node, ScalarNode):
            children: list = []
        elif isinstance(node, SequenceNode):
            children = node.value
        else:
            children = [n for pair in node.value for n in pair]
        size = 1 + sum(self._sizes[id(c)] for c in children)
        if size > MAX_NODES:
            raise YamlProblem(f"expands to more than {MAX_NODES} values (aliases of aliases?); "
                              f"a config needs no more than a few dozen", line)
        self._sizes[id(node)] = size


def _tree(loader: _BoundedLoader, node) -> Tree:
    line = node.start_mark.line + 1
    if not isinstance(node, MappingNode):
        plain = isinstance(node, ScalarNode) and node.style is None
        text = node.value if isinstance(node, ScalarNode) else ""
        try:
            value = loader.construct_object(node, deep=True)
        except (ValueError, OverflowError):  # e.g. a 5000-digit integer: the text may be a name
            if not isinstance(node, ScalarNode):
                raise YamlProblem("a value cannot be read", line) from None
            value = node.value
        return Scalar(text, value, plain, line)
    explicit = sum(1 for k, _ in node.value if k.tag != _MERGE_TAG)
    loader.flatten_mapping(node)  # merged pairs first, then the explicit ones (which win)
    first_explicit = len(node.value) - explicit
    out = Section(line)
    for i, (k, v) in enumerate(node.value):
        if not isinstance(k, ScalarNode):
            raise YamlProblem("a key must be a plain name, not a list or a mapping",
                              k.start_mark.line + 1)
        key, kline = k.value, k.start_mark.line + 1
        if i >= first_explicit and key in out and out.key_lines[key] > 0:
            raise YamlProblem(f"key '{shorten_text(key)}' appears twice (lines "
                              f"{out.key_lines[key]} and {kline}); keep one: YAML would silently "
                              f"drop the first", kline)
        out[key] = _tree(loader, v)
        out.key_lines[key] = kline if i >= first_explicit else -kline  # negative: came from a merge
    return out


def parse(text: str) -> Optional[Tree]:
    """The document in ``text`` as a tree (None when empty); YamlProblem or yaml.YAMLError."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _tree(loader, node)
    except RecursionError:
        raise YamlProblem(f"nests more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def plain(tree: Optional[Tree]) -> Any:
    """The tree as ordinary Python values (what yaml.safe_load would give, minus the dangers)."""
    if isinstance(tree, Section):
        return {k: plain(v) for k, v in tree.items()}
    return None if tree is None else tree.value


def describe_problem(e: Exception) -> str:
    """One line about a YAML error, with its line number where known."""
    if isinstance(e, YamlProblem):
        return (f"line {e.line}: {e}" if e.line else str(e))
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{where}{shorten_text(str(problem), 160)}"


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of a file, ``-`` (stdin) or a pipe (``/dev/stdin``, ``<(...)``), <= MAX_BYTES.

    ``what`` names the file in messages, e.g. "config file 'c.yaml'".
    """
    if path == "-":
        _refuse_stream_under_launcher(what)
        data = sys.stdin.buffer.read(MAX_BYTES + 1)
    else:
        p = Path(path).expanduser()
        try:
            st = os.stat(p)
            if stat.S_ISDIR(st.st_mode):
                raise UserError(f"{what} is a directory; give a YAML file")
            if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
                _refuse_stream_under_launcher(what)
            with open(p, "rb") as f:
                data = f.read(MAX_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise UserError(f"{what} does not exist") from None
        except OSError as e:
            raise UserError(f"cannot read {what}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise UserError(f"{what} is larger than {MAX_BYTES // 1024} KiB; a config is a small "
                        f"YAML file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} is not UTF-8 text (byte {e.start} is 0x{data[e.start]:02x}); "
                        f"save it as UTF-8") from None


def _refuse_stream_under_launcher(what: str) -> None:
    # Every rank of a multi-process launch reads the config itself; only one of them could read a
    # stream, and the others would silently train with another config.
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UserError(f"{what} is a stream (stdin or a pipe): every process of a multi-process "
                        f"launch reads the config, so write it to a file and pass that")
