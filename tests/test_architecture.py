"""The package's import graph, computed from the source, counting imports inside functions
(not those under `if TYPE_CHECKING:`, which never run):
no import circle, and no upward import (docs/architecture.md draws the layers).

A module imports only from its own layer or from layers below it.  Every module must be
placed in LAYERS: a new module is a deliberate decision about where it lives."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vdeliver"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only(tree: ast.AST) -> set[int]:
    """The ids of the import nodes under `if TYPE_CHECKING:`: seen by mypy, never run."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            found.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the vdeliver modules it imports (anywhere in its body, but for the imports
    under `if TYPE_CHECKING:`, which only mypy sees)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        type_only = _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("vdeliver") and t != "vdeliver":
                    found.add(t)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


# Bottom to top.  A pattern ending in ".*" takes a whole package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("vdeliver", "vdeliver.errors", "vdeliver.hooks", "vdeliver.log", "vdeliver.fileio", "vdeliver.privileges",
              "vdeliver.unixd", "vdeliver.metrics")),
    ("inputs", ("vdeliver.config", "vdeliver.recipient", "vdeliver.message", "vdeliver.locking", "vdeliver.srs")),
    ("stores", ("vdeliver.mbox", "vdeliver.maildir", "vdeliver.flags", "vdeliver.tracking")),
    ("recovery", ("vdeliver.recovery", "vdeliver.groupjournal")),
    ("sieve", ("vdeliver.sieve.*",)),
    ("delivery", ("vdeliver.deliver",)),
    ("front doors of delivery", ("vdeliver.cli", "vdeliver.__main__", "vdeliver.launcher", "vdeliver.lmtp.*")),
    ("accounts", ("vdeliver.accounts.*",)),
    ("socketmap", ("vdeliver.socketmap.*",)),
    ("demo", ("vdeliver.demo",)),
]


def layer_of(module: str) -> int:
    for rank, (_name, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and
                                     (module + ".").startswith(pattern[:-1])):
                return rank
    raise KeyError(module)


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for module in import_graph():
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in LAYERS (and docs/architecture.md): {unplaced}"


def test_no_upward_import() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "upward imports: " + "; ".join(upward)


def test_the_layer_check_sees_an_upward_import() -> None:
    """The rule is not vacuous: the delivery core importing the accounts package is caught."""
    assert layer_of("vdeliver.accounts.store") > layer_of("vdeliver.deliver")
    assert layer_of("vdeliver.lmtp.session") > layer_of("vdeliver.deliver") > layer_of("vdeliver.mbox")
    assert layer_of("vdeliver.socketmap.lookup") > layer_of("vdeliver.accounts.snapshot")


def test_no_import_circle() -> None:
    cycles = _cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


# One Maildir delivery as the launcher runs it (benchmarks/import_set.py: /usr/bin/python3 -IS, as
# root with `user = "vmail"`, so privileges and pwd are in; the mailbox is created on delivery).
# Issue 21: without `os` (1 ms a process, vdeliver/fileio.py says why) and without `stat` (the
# Python module over the built-in `_stat`: 0.05 ms).  A module added to this set costs every
# message about 0.05 ms plus its own work: add it here only with a reason.
MAILDIR_IMPORT_SET = [
    "_stat", "errno", "pwd",
    "vdeliver", "vdeliver.cli", "vdeliver.config", "vdeliver.deliver", "vdeliver.errors", "vdeliver.fileio",
    "vdeliver.log", "vdeliver.maildir", "vdeliver.message", "vdeliver.privileges", "vdeliver.recipient",
]


# The mbox path adds the locks, the store and its crash journal (binascii for the record's CRC-32,
# a built-in module; fcntl for the kernel lock), still without `os`.
MBOX_IMPORT_SET = sorted(
    {*MAILDIR_IMPORT_SET, "binascii", "fcntl", "vdeliver.locking", "vdeliver.mbox", "vdeliver.recovery"}
    - {"vdeliver.maildir"}
)


@pytest.mark.parametrize(("fmt", "pinned"), [("maildir", MAILDIR_IMPORT_SET), ("mbox", MBOX_IMPORT_SET)])
def test_delivery_imports_exactly_the_pinned_set_without_os(fmt: str, pinned: list[str]) -> None:
    from benchmarks.import_set import measure

    found = measure(str(PACKAGE.parent), fmt)
    expected = pinned
    if os.geteuid() != 0:  # not started as root: nothing to drop
        found = [m for m in found if m not in ("pwd", "vdeliver.privileges")]
        expected = [m for m in expected if m not in ("pwd", "vdeliver.privileges")]
    assert sorted(found) == sorted(expected)
