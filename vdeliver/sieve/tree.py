"""A parsed Sieve script: frozen dataclasses, and `to_sieve()` that prints one back.

The tree is the grammar of RFC 5228 section 8.2 and nothing more: which commands, tests and
tags exist and what their arguments mean is the validator's business.  Names are lower
case (Sieve identifiers are case-insensitive).  Line numbers are kept for error messages
but do not take part in equality, so a script printed and parsed again is the same tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Tag:
    name: str  # without the ':'
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Number:
    value: int  # after its K, M or G
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class StringList:
    values: tuple[str, ...]
    bracketed: bool  # written as [ ... ] (a list of one differs from a single string for some commands)
    line: int = field(default=0, compare=False)


Argument = Tag | Number | StringList


@dataclass(frozen=True, slots=True)
class Test:
    name: str
    arguments: tuple[Argument, ...] = ()
    tests: tuple[Test, ...] = ()
    test_list: bool = False  # the tests were written as ( ... ): allof, anyof
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    arguments: tuple[Argument, ...] = ()
    tests: tuple[Test, ...] = ()
    test_list: bool = False
    block: tuple[Command, ...] | None = None  # None: the command ended with ';'
    line: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Script:
    commands: tuple[Command, ...]


# -- printing -------------------------------------------------------------------------------


def quote(value: str) -> str:
    """A Sieve quoted string holding exactly `value`."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _argument(arg: Argument) -> str:
    if isinstance(arg, Tag):
        return ":" + arg.name
    if isinstance(arg, Number):
        return str(arg.value)
    if arg.bracketed:
        return "[" + ", ".join(quote(v) for v in arg.values) + "]"
    return quote(arg.values[0])


def _test(test: Test) -> str:
    words = [test.name, *(_argument(a) for a in test.arguments)]
    if test.test_list:
        words.append("(" + ", ".join(_test(t) for t in test.tests) + ")")
    elif test.tests:
        words.append(_test(test.tests[0]))
    return " ".join(words)


def _commands(commands: tuple[Command, ...], indent: str) -> list[str]:
    lines: list[str] = []
    for cmd in commands:
        words = [cmd.name, *(_argument(a) for a in cmd.arguments)]
        if cmd.test_list:
            words.append("(" + ", ".join(_test(t) for t in cmd.tests) + ")")
        elif cmd.tests:
            words.append(_test(cmd.tests[0]))
        head = indent + " ".join(words)
        if cmd.block is None:
            lines.append(head + ";")
        else:
            lines.append(head + " {")
            lines += _commands(cmd.block, indent + "    ")
            lines.append(indent + "}")
    return lines


def to_sieve(script: Script) -> str:
    """The script as Sieve text (one command per line, blocks indented)."""
    lines = _commands(script.commands, "")
    return "\n".join(lines) + ("\n" if lines else "")
