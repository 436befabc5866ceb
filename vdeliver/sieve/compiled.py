"""The compiled form of a script: what the validator makes and the interpreter runs.

Plain classes with __slots__ (no dataclasses: importing them costs more than running a
30-rule script), and a byte form for the compiled-script cache (cache.py): `dump()` and
`load()` turn a Compiled into nested tuples, dicts, lists, strings and numbers and back,
through `marshal`, which builds data and never runs code.
"""

from __future__ import annotations

import marshal

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

FORMAT = 1  # bumped whenever the byte form, or what the validator makes, changes


class Node:
    """A checked command or test: tags by name (a flag's value is True), positional
    arguments as str, list of str or int, and its tests and block."""

    __slots__ = ("name", "line", "tags", "args", "tests", "block")

    def __init__(self, name: str, line: int, tags: dict[str, object], args: tuple[object, ...],
                 tests: tuple[Node, ...] = (), block: tuple[Node, ...] | None = None) -> None:
        self.name = name
        self.line = line
        self.tags = tags
        self.args = args
        self.tests = tests
        self.block = block

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and _node_tuple(self) == _node_tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Node({self.name!r}, line {self.line}, {self.tags!r}, {self.args!r})"


class Compiled:
    """A script ready to run, with every script its include tree names, compiled with it, by
    (location, name); an :optional one that does not exist is absent."""

    __slots__ = ("commands", "extensions", "includes")

    def __init__(self, commands: tuple[Node, ...], extensions: frozenset[str],
                 includes: dict[tuple[str, str], Compiled] | None = None) -> None:
        self.commands = commands
        self.extensions = extensions
        self.includes = includes if includes is not None else {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compiled) and _tuple(self) == _tuple(other)

    __hash__ = None  # type: ignore[assignment]


def _node_tuple(n: Node) -> Any:
    return (n.name, n.line, n.tags, n.args, tuple(_node_tuple(t) for t in n.tests),
            None if n.block is None else tuple(_node_tuple(b) for b in n.block))


def _tuple(c: Compiled) -> Any:
    """The script and, once, every script of its include tree (they share one table)."""
    return (_own(c), {key: _own(sub) for key, sub in c.includes.items()})


def _own(c: Compiled) -> Any:
    return (tuple(_node_tuple(n) for n in c.commands), sorted(c.extensions))


def _node(t: Any) -> Node:
    name, line, tags, args, tests, block = t
    return Node(name, line, tags, args, tuple(_node(x) for x in tests),
                None if block is None else tuple(_node(x) for x in block))


def _compiled(t: Any) -> Compiled:
    main, included = t
    table: dict[tuple[str, str], Compiled] = {}
    for key, (commands, extensions) in included.items():
        table[key] = Compiled(tuple(_node(n) for n in commands), frozenset(extensions), table)
    commands, extensions = main
    return Compiled(tuple(_node(n) for n in commands), frozenset(extensions), table)


def dump(compiled: Compiled) -> bytes:
    """The byte form; ValueError if the tree holds something marshal cannot write."""
    return marshal.dumps((FORMAT, _tuple(compiled)))


def load(data: bytes) -> Compiled:
    """Back from dump(); ValueError (or EOFError, TypeError) for bytes that are not one."""
    version, tree = marshal.loads(data)
    if version != FORMAT:
        raise ValueError("another format")
    return _compiled(tree)
