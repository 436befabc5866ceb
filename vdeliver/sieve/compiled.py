"""The compiled form of a script, what the validator makes and the interpreter runs, and the
cache that keeps it between deliveries.

Plain classes with __slots__ (no dataclasses: importing them costs more than running a
30-rule script), and a byte form for the compiled-script cache: `dump()` and
`load()` turn a Compiled into nested tuples, dicts, lists, strings and numbers and back,
through `marshal`, which builds data and never runs code.

The cache (load_cached, store_cached): `<script>.vdc` beside the script (for the active
script, `~/.dovecot.sieve.vdc`, beside its `.log`) holds the compiled form (dump()) with the
exact bytes of the script and of
every script its include tree read when it was compiled.  It is used only when all of them
are still byte for byte the same, so a script changed, replaced or renamed over, or an
included one changed, added or removed, is compiled again at once: no timestamps, which a
quick edit within the same second would defeat.

Trust: the file is opened without following a symlink and used only when the process's own
user owns it and nobody else can write it (mode without group or other write); anything
else is ignored, as is a file that does not read back (truncated, another format, another
Python).  It is written to a new file and renamed over the old one, 0600, so a reader sees
the old file or the new one whole; when the directory cannot be written (a global script in
/etc), there is no cache, and nothing fails.

With a cache hit, a delivery imports nothing of the lexer, parser or validator: compiled.py
and marshal build the tree.
"""

import marshal
import os

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

FORMAT = 1  # bumped whenever the byte form, or what the validator makes, changes


class Node:
    """A checked command or test: tags by name (a flag's value is True), positional
    arguments as str, list of str or int, and its tests and block."""

    __slots__ = ("name", "line", "tags", "args", "tests", "block")

    def __init__(self, name: str, line: int, tags: dict[str, object], args: tuple[object, ...],
                 tests: "tuple[Node, ...]" = (), block: "tuple[Node, ...] | None" = None) -> None:
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

    def __init__(self, commands: "tuple[Node, ...]", extensions: frozenset[str],
                 includes: "dict[tuple[str, str], Compiled] | None" = None) -> None:
        self.commands = commands
        self.extensions = extensions
        self.includes = includes if includes is not None else {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compiled) and _tuple(self) == _tuple(other)

    __hash__ = None  # type: ignore[assignment]


def _node_tuple(n: "Node") -> "Any":
    return (n.name, n.line, n.tags, n.args, tuple(_node_tuple(t) for t in n.tests),
            None if n.block is None else tuple(_node_tuple(b) for b in n.block))


def _tuple(c: "Compiled") -> "Any":
    """The script and, once, every script of its include tree (they share one table)."""
    return (_own(c), {key: _own(sub) for key, sub in c.includes.items()})


def _own(c: "Compiled") -> "Any":
    return (tuple(_node_tuple(n) for n in c.commands), sorted(c.extensions))


def _node(t: "Any") -> "Node":
    name, line, tags, args, tests, block = t
    return Node(name, line, tags, args, tuple(map(_node, tests)) if tests else (),
                None if block is None else tuple(map(_node, block)))


def _compiled(t: "Any") -> "Compiled":
    main, included = t
    table: "dict[tuple[str, str], Compiled]" = {}
    for key, (commands, extensions) in included.items():
        table[key] = Compiled(tuple(map(_node, commands)), frozenset(extensions), table)
    commands, extensions = main
    return Compiled(tuple(map(_node, commands)), frozenset(extensions), table)


def dump(compiled: "Compiled") -> bytes:
    """The byte form; ValueError if the tree holds something marshal cannot write."""
    return marshal.dumps((FORMAT, _tuple(compiled)))


def load(data: bytes) -> "Compiled":
    """Back from dump(); ValueError (or EOFError, TypeError) for bytes that are not one."""
    version, tree = marshal.loads(data)
    if version != FORMAT:
        raise ValueError("another format")
    return _compiled(tree)


# -- the cache ----------------------------------------------------------------------------------

SUFFIX = ".vdc"
MAX_CACHE = 16 << 20  # bytes: a bigger file is not one of ours
Key = tuple[str, str]  # (location, name) of an included script


def path_for(script: str) -> str:
    return script + SUFFIX


def load_cached(script: str, source: bytes, reread: "Callable[[Key], bytes | None]") -> Compiled | None:
    """The cached compiled form of `script` whose text is `source`, or None (no cache, not
    ours, stale).  `reread(key)` reads an included script now (None: it does not exist)."""
    try:
        fd = os.open(path_for(script), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not 0 < st.st_size <= MAX_CACHE:
            return None
        data = os.read(fd, st.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        version, cached_source, included, tree = marshal.loads(data)
        if version != (FORMAT, marshal.version) or cached_source != source:
            return None
        for location, name, text in included:
            if reread((location, name)) != text:
                return None
        return load(tree)
    except (ValueError, EOFError, TypeError):
        return None


def store_cached(script: str, source: bytes, included: "dict[Key, bytes | None]", compiled: Compiled) -> None:
    """Write the cache; never raises (a cache that cannot be written is no cache)."""
    target = path_for(script)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        data = marshal.dumps(((FORMAT, marshal.version), source,
                              [(loc, name, text) for (loc, name), text in included.items()], dump(compiled)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except (OSError, ValueError):
        return
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            from vdeliver.fileio import write_all

            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
