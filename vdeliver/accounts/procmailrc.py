"""`vmailctl sieve from-procmailrc`: a procmailrc turned into one Sieve script.

The recipes people write (folders, forwards, /dev/null, nesting blocks, constant variables,
`^TO_`, `^FROM_DAEMON`, size and body conditions, `\\/` into `$MATCH`) become Sieve; every
recipe or line that cannot be converted is listed with its line and the reason, and is left
out of the script.  What converts exactly, and what does not, is documented in docs/sieve.md
("Moving from procmail").

Procmail's semantics kept:

- a delivering recipe ends the run: `stop` after its actions, unless the `c` flag (then
  `:copy`, and the run goes on);
- the conditions of a recipe are ANDed (`allof`), `!` is `not`;
- a header condition is searched in the whole header, line by line: `^Field:rest` becomes
  `header :regex "field" "rest"` over that field's values (each occurrence), with the
  alternatives and optional groups before the colon (`^(To|Cc):`, `^TO_`, `^FROM_DAEMON`)
  spread into the list of field names; case-insensitive unless `D`;
- a body condition (`B`) and `VAR ?? regex` are searched in a block of lines: `^` and `$`
  become "after/before a line break or the edge", `.` and `[^...]` do not cross a line.

The regular expressions are procmail's egrep dialect, rewritten as the POSIX ERE that
vdeliver's `:regex` (RE2) reads.  Each converted recipe is compiled on its own with
vdeliver's validator; one that does not compile is reported, never written.  Standard
library only; nothing here runs a program or reads more than the rcfile and its INCLUDERC
files.

One file of about 1200 lines on purpose: the reader of procmail's syntax and the converter
share its quirks (line continuation, flags, `\\/`, INCLUDERC scoping) line by line; split,
each half would have to re-learn the other's rules.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

MAX_INCLUDE_DEPTH = 8
MAX_REGEX_DEPTH = 40
MAX_FIELD_BRANCHES = 64
MAX_FILE = 1 << 20

# procmailrc(5), MISCELLANEOUS.  The daemon macros end in `$([^>]|$)` (the next line does not
# start with '>'): one header field's value cannot see its next line, so here they end in `$`.
_TO_HEADERS = "(^((Original-)?(Resent-)?(To|Cc|Bcc)|(X-Envelope|Apparently(-Resent)?)-To):"
MACROS = (
    ("^FROM_DAEMON",
     ("(^(Mailing-List:|Precedence:.*(junk|bulk|list)|To: Multiple recipients of |"
     "(((Resent-)?(From|Sender)|X-Envelope-From):|>?From )([^>]*[^(.%@a-z0-9])?"
     "(Post(ma?(st(e?r)?|n)|office)|(send)?Mail(er)?|daemon|m(mdf|ajordomo)|n?uucp|LIST(SERV|proc)|NETSERV|"
     "o(wner|ps)|r(e(quest|sponse)|oot)|b(ounce|bs\\.smtp)|echo|mirror|s(erv(ices?|er)|mtp(error)?|ystem)|"
     "A(dmin(istrator)?|MMGR|utoanswer))(([^).!:a-z0-9][-_a-z0-9]*)?[%@>\t ][^<)]*(\\(.*\\).*)?)?$))")),
    ("^FROM_MAILER",
     ("(^(((Resent-)?(From|Sender)|X-Envelope-From):|>?From )([^>]*[^(.%@a-z0-9])?"
     "(Post(ma(st(er)?|n)|office)|(send)?Mail(er)?|daemon|mmdf|n?uucp|ops|r(esponse|oot)|(bbs\\.)?smtp(error)?|"
     "s(erv(ices?|er)|ystem)|A(dmin(istrator)?|MMGR))(([^).!:a-z0-9][-_a-z0-9]*)?[%@>\t ][^<)]*(\\(.*\\).*)?)?$)")),
    ("^TO_", _TO_HEADERS + "(.*[^-a-zA-Z0-9_.])?)"),
    ("^TO", _TO_HEADERS + "(.*[^a-zA-Z])?)"),
)
FROM_LINE = "From_"  # the pseudo field name of the mbox From_ line (`^From ` in a pattern)

# Assignments that only steer procmail itself: ignored, with a note.
IGNORED = frozenset({
    "LOGFILE", "LOG", "VERBOSE", "LOGABSTRACT", "COMSAT", "LOCKTIMEOUT", "LOCKFILE", "LOCKSLEEP", "UMASK",
    "PATH", "SHELL", "SHELLMETAS", "SHELLFLAGS", "LINEBUF", "SENDMAIL", "SENDMAILFLAGS", "NORESRETRY",
    "SUSPEND", "TIMEOUT", "PROCMAIL_OVERFLOW", "EXITCODE", "LANG", "LC_ALL", "TZ",
})
# Assignments that change what procmail does in ways Sieve cannot follow.
REFUSED = {
    "TRAP": "TRAP runs a program when procmail ends; Sieve runs no programs",
    "HOST": "assigning HOST ends the run on other hosts; Sieve does not know the host",
    "DELIVERED": "DELIVERED tells the caller the mail was delivered; there is no such switch in Sieve",
    "SHIFT": "SHIFT changes procmail's arguments, which the script does not see",
}
FLAGS = frozenset("HBDhbcfwWiraAeE")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(.*)", re.S)
_FIELD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_DEFAULT = "\0DEFAULT"  # the value of DEFAULT and ORGMAIL until the rcfile sets them: the inbox


class ProcmailrcError(Exception):
    """The rcfile cannot be read (the command's I/O error, exit 2)."""


@dataclass(frozen=True, slots=True)
class Skipped:
    line: int
    reason: str
    text: str
    file: str | None = None  # an INCLUDERC file; None for the rcfile itself

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"line": self.line, "reason": self.reason, "text": self.text}
        if self.file is not None:
            out["file"] = self.file
        return out


@dataclass
class Result:
    script: str
    skipped: list[Skipped]
    converted: int
    notes: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"script": self.script, "skipped": [s.to_json() for s in self.skipped], "converted": self.converted,
                "notes": [n.to_json() for n in self.notes]}


class _Unconvertible(Exception):
    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line


# -- reading the rcfile ------------------------------------------------------------------------------


@dataclass
class _Line:
    number: int
    text: str  # continuation lines joined, leading blanks removed
    raw: str  # as written


def _logical_lines(source: str) -> list[_Line]:
    out: list[_Line] = []
    physical = source.split("\n")
    i = 0
    while i < len(physical):
        start, text, raw = i + 1, physical[i], [physical[i]]
        while text.endswith("\\") and not text.endswith("\\\\") and i + 1 < len(physical) \
                and not text.lstrip().startswith("#"):
            i += 1
            nxt = physical[i]
            raw.append(nxt)
            # A continued condition loses the next line's indentation (procmailrc(5), CAVEATS).
            text = text[:-1] + (nxt.lstrip(" \t") if text.lstrip().startswith("*") else nxt)
        out.append(_Line(start, text.strip(" \t\r"), "\n".join(raw)))
        i += 1
    return out


@dataclass
class _Recipe:
    line: int
    flags: str
    conditions: list[_Line]
    action: object  # _Line (folder, forward, pipe) or list of items (a nesting block) or None
    text: str


@dataclass
class _Assign:
    line: int
    name: str
    value: str
    text: str


@dataclass
class _Bad:
    line: int
    reason: str
    text: str


_Item = _Recipe | _Assign | _Bad


def _parse(lines: list[_Line]) -> list[_Item]:
    pos = 0
    pending: list[_Line] = []

    def next_line() -> _Line | None:
        nonlocal pos
        if pending:
            return pending.pop()
        while pos < len(lines):
            ln = lines[pos]
            pos += 1
            if ln.text and not ln.text.startswith("#"):
                return ln
        return None

    def block(depth: int) -> tuple[list[_Item], bool]:
        items: list[_Item] = []
        while True:
            ln = next_line()
            if ln is None:
                return items, False
            t = ln.text
            if depth > 0 and len(t) > 1 and t.endswith("}") and t[-2] in " \t" and not t.startswith(":"):
                pending.append(_Line(ln.number, "}", ln.raw))  # `{ VAR=value }` on one line
                t = t[:-1].rstrip()
                ln = _Line(ln.number, t, ln.raw)
            if t.startswith("}"):
                rest = t[1:].strip()
                if rest:
                    pending.append(_Line(ln.number, rest, ln.raw))
                return items, True
            if t.startswith(":"):
                items.append(recipe(ln, depth))
            elif (m := _ASSIGN.fullmatch(t)) is not None:
                items.append(_Assign(ln.number, m.group(1), m.group(2), ln.raw))
            elif t.startswith("{"):
                block(depth + 1)
                items.append(_Bad(ln.number, "a nesting block without a recipe line (:0) before it", ln.raw))
            else:
                items.append(_Bad(ln.number, "not a recipe, an assignment or a comment", ln.raw))

    def recipe(head: _Line, depth: int) -> _Item:
        m = re.fullmatch(r":([0-9]*)([^:]*)(:.*)?", head.text.split(" #")[0].split("\t#")[0].rstrip())
        texts = [head.raw]
        if m is None:
            return _Bad(head.number, "not a recipe line", head.raw)
        conds: list[_Line] = []
        while True:
            ln = next_line()
            if ln is None:
                return _Bad(head.number, "a recipe without an action", "\n".join(texts))
            if ln.text.startswith("*"):
                conds.append(ln)
                texts.append(ln.raw)
                continue
            break
        if m.group(1) not in ("", "0"):
            # The old form `:N` counts its conditions; read the lines, refuse the recipe.
            return _Bad(head.number, f"the old recipe form ':{m.group(1)}' (a count of conditions)",
                        "\n".join([*texts, ln.raw]))
        flags = "".join(m.group(2).split())
        action: object
        if ln.text.startswith("{"):
            rest = ln.text[1:].strip()
            if rest:
                pending.append(_Line(ln.number, rest, ln.raw))
            if depth > 50:
                return _Bad(head.number, "nesting blocks too deep", "\n".join(texts))
            inner, closed = block(depth + 1)
            if not closed:
                return _Bad(head.number, "a nesting block '{' without its '}'", "\n".join([*texts, ln.raw]))
            action = inner
            texts.append(ln.raw + " ... }")
        elif ln.text.startswith("}") or ln.text.startswith(":"):
            pending.append(ln)
            return _Bad(head.number, "a recipe without an action", "\n".join(texts))
        else:
            action = ln
            texts.append(ln.raw)
        return _Recipe(head.number, flags, conds, action, "\n".join(texts))

    items, closed = block(0)
    if closed:
        items.append(_Bad(0, "a '}' without its '{'", "}"))
        rest, _ = block(0)  # what follows a stray '}' is still read
        items.extend(rest)
    return items


# -- variables -----------------------------------------------------------------------------------------


class _Unknown:
    """A variable whose value is not known when converting."""

    def __init__(self, why: str) -> None:
        self.why = why


_Value = str | _Unknown
_REGEX_MAGIC = frozenset("\\^$.[]()*+?|")


def _expand(text: str, env: dict[str, _Value], *, match_var: bool = False, quote_regex: bool = False,
            shell: bool = True) -> str:
    """Expand $NAME, ${NAME}, ${NAME:-x}, ${NAME-x}, ${NAME:+x}, ${NAME+x} and $\\NAME; with `shell`,
    also take quotes and backslashes as sh does inside an assignment.  `match_var`: $MATCH becomes
    the Sieve variable ${MATCH}."""
    out: list[str] = []
    i, n = 0, len(text)
    quote = ""
    while i < n:
        c = text[i]
        if shell and c == "'" and quote != '"':
            j = text.find("'", i + 1)
            if j < 0:
                raise _Unconvertible("a quote ' without its end")
            out.append(text[i + 1:j])
            i = j + 1
            continue
        if shell and c == '"':
            quote = "" if quote else '"'
            i += 1
            continue
        if c == "`":
            raise _Unconvertible("a command in backquotes: its output is not known when converting")
        if shell and c == "\\" and i + 1 < n:
            # As sh: inside double quotes a backslash stays unless it quotes $ ` " or itself.
            if quote and text[i + 1] not in '$`"\\':
                out.append(c)
            out.append(text[i + 1])
            i += 2
            continue
        if shell and not quote and c in " \t" and text[i:].lstrip(" \t").startswith("#"):
            break  # a comment after the value
        if c == "$" and i + 1 < n:
            j = i + 1
            quoted = False
            if text[j] == "\\":
                quoted, j = True, j + 1
            braced = j < n and text[j] == "{"
            m = _NAME.match(text, j + 1 if braced else j)
            if m is None:
                if j < n and (text[j] in "#?$=_-" or text[j].isdigit()):
                    raise _Unconvertible(f"${text[j]} is only known when procmail runs")
                out.append(c)
                i += 1
                continue
            name, j = m.group(0), m.end()
            op, word = "", ""
            if braced:
                close = text.find("}", j)
                if close < 0:
                    raise _Unconvertible("a '${' without its '}'")
                tail = text[j:close]
                for o in (":-", ":+", "-", "+"):
                    if tail.startswith(o):
                        op, word = o, tail[len(o):]
                        break
                else:
                    if tail:
                        raise _Unconvertible(f"the expansion ${{{name}{tail}}} is not procmail's")
                j = close + 1
            value = env.get(name)
            if name == "MATCH" and match_var and not op and not isinstance(value, str):
                out.append("${MATCH}")
                i = j
                continue
            if isinstance(value, _Unknown):
                if op in (":-", ":+"):
                    raise _Unconvertible(f"${name} is not known when converting: {value.why}")
                raise _Unconvertible(f"${name} is not known when converting: {value.why}")
            if value is None and name not in env and op not in ("-", ":-"):
                raise _Unconvertible(f"${name} is not set in the rcfile (its value comes from the environment)")
            if value == _DEFAULT and not op:
                value = _DEFAULT
            if op == ":-":
                value = value if value else _expand(word, env, shell=False)
            elif op == "-":
                value = value if value is not None else _expand(word, env, shell=False)
            elif op == ":+":
                value = _expand(word, env, shell=False) if value else ""
            elif op == "+":
                value = _expand(word, env, shell=False) if value is not None else ""
            text_value = value or ""
            if quoted or quote_regex:
                text_value = "".join("\\" + ch if ch in _REGEX_MAGIC else ch for ch in text_value)
            out.append(text_value)
            i = j
            continue
        out.append(c)
        i += 1
    if quote:
        raise _Unconvertible('a quote " without its end')
    return "".join(out)


# -- procmail's regular expressions --------------------------------------------------------------------


@dataclass(frozen=True)
class _Atom:
    kind: str  # lit any class bol eol group repeat split wordl wordr anchor
    char: str = ""
    negated: bool = False
    items: tuple[tuple[str, str], ...] = ()
    alts: tuple[tuple[_Atom, ...], ...] = ()
    inner: _Atom | None = None
    op: str = ""


_Seq = tuple[_Atom, ...]


def _parse_regex(text: str) -> tuple[_Seq, ...]:
    pos = 0

    def alt(depth: int) -> tuple[_Seq, ...]:
        nonlocal pos
        if depth > MAX_REGEX_DEPTH:
            raise _Unconvertible("parentheses nested too deep")
        seqs = [seq(depth)]
        while pos < len(text) and text[pos] == "|":
            pos += 1
            seqs.append(seq(depth))
        return tuple(seqs)

    def seq(depth: int) -> _Seq:
        nonlocal pos
        atoms: list[_Atom] = []
        while pos < len(text):
            c = text[pos]
            if c == "|" or c == ")":
                if c == ")" and depth == 0:
                    raise _Unconvertible("a ')' without its '(' in the regular expression")
                break
            pos += 1
            if c in "*+?" and atoms and atoms[-1].kind not in ("bol", "anchor", "split"):
                atoms[-1] = _Atom("repeat", inner=atoms[-1], op=c)
                continue
            if c == "(":
                alts = alt(depth + 1)
                if pos >= len(text) or text[pos] != ")":
                    raise _Unconvertible("a '(' without its ')' in the regular expression")
                pos += 1
                atoms.append(_Atom("group", alts=alts))
            elif c == "[":
                atoms.append(bracket())
            elif c == ".":
                atoms.append(_Atom("any"))
            elif c == "^":
                if pos < len(text) and text[pos] == "^":
                    pos += 1
                    atoms.append(_Atom("anchor"))
                else:
                    atoms.append(_Atom("bol"))
            elif c == "$":
                atoms.append(_Atom("eol"))
            elif c == "\\" and pos < len(text):
                e = text[pos]
                pos += 1
                atoms.append(_Atom({"/": "split", "<": "wordl", ">": "wordr"}.get(e, "lit"), char=e))
            else:
                atoms.append(_Atom("lit", char=c))
        return tuple(atoms)

    def bracket() -> _Atom:
        nonlocal pos
        negated = pos < len(text) and text[pos] == "^"
        if negated:
            pos += 1
        chars: list[str] = []
        first = True
        while True:
            if pos >= len(text):
                raise _Unconvertible("a '[' without its ']' in the regular expression")
            c = text[pos]
            pos += 1
            if c == "]" and not first:
                break
            if c == "\\" and pos < len(text):
                c = text[pos]
                pos += 1
            chars.append(c)
            first = False
        items: list[tuple[str, str]] = []
        i = 0
        while i < len(chars):
            if i + 2 < len(chars) and chars[i + 1] == "-":
                lo, hi = chars[i], chars[i + 2]
                if lo > hi:
                    raise _Unconvertible(f"the range {lo}-{hi} is backwards")
                items.append((lo, hi))
                i += 3
            else:
                items.append((chars[i], chars[i]))
                i += 1
        return _Atom("class", negated=negated, items=tuple(items))

    result = alt(0)
    if pos != len(text):
        raise _Unconvertible("a ')' without its '(' in the regular expression")
    return result


def _expand_macros(text: str) -> str:
    for name, value in MACROS:
        text = text.replace(name, value)
    return text


class _Emitter:
    """Procmail atoms -> POSIX ERE for vdeliver's :regex.  `block`: the value holds several lines
    (a body, a variable); otherwise it is one header field's value."""

    def __init__(self, block: bool) -> None:
        self.block = block
        self.groups = 0

    def seq(self, atoms: _Seq, at_end: bool, at_start: bool) -> str:
        out = []
        for i, a in enumerate(atoms):
            out.append(self.atom(a, at_end and i == len(atoms) - 1, at_start and i == 0))
        return "".join(out)

    def group(self, body: str) -> str:
        self.groups += 1
        return "(" + body + ")"

    def atom(self, a: _Atom, at_end: bool, at_start: bool) -> str:
        k = a.kind
        if k == "lit":
            return "\\" + a.char if a.char in "\\.[]()*+?{}|^$" else a.char
        if k == "any":
            return "[^\r\n]" if self.block else "."
        if k == "class":
            return self.bracket(a)
        if k == "group":
            self.groups += 1
            alts = [self.seq(s, at_end, at_start) for s in a.alts]
            return "(" + "|".join(alts) + ")"
        if k == "repeat":
            assert a.inner is not None
            inner = self.atom(a.inner, False, False)
            if a.inner.kind in ("bol", "eol", "wordl", "wordr") and not self.block:
                raise _Unconvertible("a repeated ^ or $ in a header pattern")
            return inner + a.op
        if k == "wordl":
            return self.group("^|[^a-zA-Z0-9_]")
        if k == "wordr":
            return self.group("[^a-zA-Z0-9_]|$")
        if k == "bol":
            if not self.block:
                raise _Unconvertible("a ^ inside the pattern matches the start of another header line; "
                                     "one header field's value is one line")
            return self.group("^|\n")
        if k == "eol":
            if not self.block:
                if not at_end:
                    raise _Unconvertible("a $ before the end of the pattern spans header lines")
                return "$"
            return self.group("\r?\n|$")
        if k == "anchor":
            if self.block and at_start:
                return "^"
            if self.block and at_end:
                return "$"
            raise _Unconvertible("^^ (the very start or end of the search area)")
        if k == "split":
            raise _Unconvertible("\\/ inside parentheses")
        raise _Unconvertible(f"unknown regular expression element {k}")

    def bracket(self, a: _Atom) -> str:
        chars: set[str] = set()
        ranges: list[str] = []
        for lo, hi in a.items:
            if lo == hi:
                chars.add(lo)
            elif any(c in "]^-[\\" for c in (lo, hi)):
                if ord(hi) - ord(lo) > 256:
                    raise _Unconvertible(f"the range {lo}-{hi} is too wide")
                chars.update(chr(x) for x in range(ord(lo), ord(hi) + 1))
            else:
                ranges.append(lo + "-" + hi)
        if a.negated and self.block:
            chars.update("\r\n")
        if not a.negated and not ranges and len(chars) == 1:
            (c,) = chars
            return "\\" + c if c in "\\.[]()*+?{}|^$" else c
        if not chars and not ranges:
            raise _Unconvertible("an empty bracket expression")
        body = ("]" if "]" in chars else "") + "".join(ranges)
        body += "".join(sorted(c for c in chars if c not in "]^-["))
        body += ("[" if "[" in chars else "") + ("^" if "^" in chars else "") + ("-" if "-" in chars else "")
        if body.startswith("^") and not a.negated:
            body = body[1:] + "^" if len(body) > 1 else body
        return "[" + ("^" if a.negated else "") + body + "]"


def _is_blank(a: _Atom) -> bool:
    base = a.inner if a.kind == "repeat" and a.inner is not None else a
    if base.kind == "lit":
        return base.char in " \t"
    if base.kind == "class" and not base.negated:
        return all(lo == hi and lo in " \t" for lo, hi in base.items)
    return False


def _is_any_run(a: _Atom) -> bool:
    return a.kind == "repeat" and a.op in "*+" and a.inner is not None and a.inner.kind == "any"


@dataclass
class _Key:
    """One regex test: the ERE, the group holding $MATCH (0: none), or None for `exists`."""

    ere: str | None
    capture: int = 0


def _value_key(rest: _Seq, block: bool) -> _Key:
    """The ERE for what follows `Field:` (header) or for a whole block pattern."""
    atoms = list(rest)
    anchored = not block
    if not block:
        # The value Sieve sees starts after the blanks that follow the colon.
        while atoms and _is_blank(atoms[0]):
            atoms.pop(0)
        if atoms and _is_any_run(atoms[0]):
            atoms.pop(0)
            anchored = False
    splits = [i for i, a in enumerate(atoms) if a.kind == "split"]
    if len(splits) > 1:
        raise _Unconvertible("more than one \\/ in a pattern")
    em = _Emitter(block)
    if not atoms:
        return _Key(None if anchored else ".*")
    if splits:
        k = splits[0]
        left = em.seq(tuple(atoms[:k]), False, True)
        capture = em.groups + 1
        right = em.seq(tuple(atoms[k + 1:]), True, not left)
        ere = ("^" if anchored else "") + left + "(" + right + ")"
        return _Key(ere, capture)
    return _Key(("^" if anchored else "") + em.seq(tuple(atoms), True, True))


def _fields(alts: tuple[_Seq, ...]) -> list[tuple[str, _Seq]]:
    """Spread a header pattern into (field name, what follows its colon): every branch must
    start with ^ and spell a field name up to its colon."""
    out: list[tuple[str, _Seq]] = []

    def walk(atoms: _Seq, name: str, anchored: bool) -> None:
        if len(out) > MAX_FIELD_BRANCHES:
            raise _Unconvertible("the pattern spreads over too many header fields")
        for i, a in enumerate(atoms):
            rest = atoms[i + 1:]
            if a.kind == "bol" and not anchored and not name:
                anchored = True
                continue
            if a.kind == "group":
                for s in a.alts:
                    walk(s + rest, name, anchored)
                return
            if a.kind == "repeat" and a.op == "?" and a.inner is not None:
                walk(rest, name, anchored)
                walk((a.inner, *rest), name, anchored)
                return
            if not anchored:
                raise _Unconvertible("a header pattern that does not start with ^Field: can match anywhere "
                                     "in the header; Sieve tests named fields")
            if a.kind == "lit" and a.char == ":" and name:
                out.append((name.lower(), rest))
                return
            if a.kind == "lit" and a.char == " " and name.lstrip(">").lower() == "from":
                out.append((FROM_LINE, rest))
                return
            if a.kind == "lit" and (a.char in _FIELD_CHARS or (a.char == ">" and not name)):
                name += a.char
                continue
            raise _Unconvertible("the field name is not spelled out up to its colon (as in ^Subject:.*word)")
        if not anchored:
            raise _Unconvertible("a header pattern that does not start with ^Field: can match anywhere in "
                                 "the header; Sieve tests named fields")
        raise _Unconvertible("the field name is not spelled out up to its colon (as in ^Subject:.*word)")

    for s in alts:
        walk(s, "", False)
    return out


# -- Sieve output --------------------------------------------------------------------------------------


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ql(items: list[str]) -> str:
    return _q(items[0]) if len(items) == 1 else "[" + ", ".join(_q(i) for i in items) + "]"


def _regex_string(ere: str) -> str:
    """A :regex key as a Sieve string: line breaks written with encoded-character."""
    s = _q(ere)
    return s.replace("\r", "${hex:0D}").replace("\n", "${hex:0A}").replace("\t", "${hex:09}")


@dataclass
class _Test:
    text: str
    requires: set[str]
    capture: int = 0


def _comparator(case: bool) -> str:
    return ' :comparator "i;octet"' if case else ""


def _header_test(pattern: str, case: bool) -> _Test:
    alts = _parse_regex(pattern)
    pairs = _fields(alts)
    tests: list[_Test] = []
    by_key: dict[tuple[str | None, int, bool], list[str]] = {}
    for name, rest in pairs:
        key = _value_key(rest, block=False)
        k = (key.ere, key.capture, name == FROM_LINE)
        names = by_key.setdefault(k, [])
        if name not in names:
            names.append(name)
    captures = {k[1] for k in by_key}
    if len(captures) > 1:
        raise _Unconvertible("the \\/ falls in a different group in each spread-out field")
    for (ere, capture, from_line), names in by_key.items():
        if from_line:
            # The mbox From_ line carries the envelope sender.
            if ere is None:
                tests.append(_Test("true", set()))
            else:
                tests.append(_Test(f'envelope :regex{_comparator(case)} "from" {_regex_string(ere)}',
                                   {"envelope", "regex"}, capture))
        elif ere is None:
            tests.append(_Test(f"exists {_ql(names)}", set()) if len(names) == 1 else
                         _Test("anyof(" + ", ".join(f"exists {_q(n)}" for n in names) + ")", set()))
        else:
            tests.append(_Test(f"header :regex{_comparator(case)} {_ql(names)} {_regex_string(ere)}",
                               {"regex"}, capture))
    return _any(tests)


def _any(tests: list[_Test]) -> _Test:
    if len(tests) == 1:
        return tests[0]
    req: set[str] = set()
    for t in tests:
        req |= t.requires
    return _Test("anyof(" + ", ".join(t.text for t in tests) + ")", req, max(t.capture for t in tests))


def _block_key(pattern: str) -> _Key:
    alts = _parse_regex(pattern)
    if len(alts) == 1:
        return _value_key(alts[0], block=True)
    if any(a.kind == "split" for s in alts for a in s):
        raise _Unconvertible("\\/ in a pattern with | at its top level")
    em = _Emitter(True)
    return _Key("|".join(em.seq(s, True, True) for s in alts))


def _body_test(pattern: str, case: bool) -> _Test:
    key = _block_key(pattern)
    ere = key.ere or ""
    if not ere:
        return _Test("true", set())
    return _Test(f"body :raw :regex{_comparator(case)} {_regex_string(ere)}", {"body", "regex"}, key.capture)


# -- the conversion ------------------------------------------------------------------------------------


@dataclass
class _State:
    env: dict[str, _Value]
    root: str | None  # MAILDIR when first set: the folder names are relative to it
    home: str
    skipped: list[Skipped]
    notes: list[Skipped]
    requires: set[str]
    converted: int = 0
    file: str | None = None
    rcdir: str = "."
    include_depth: int = 0
    includes: tuple[str, ...] = ()
    counter: int = 0
    match_set: bool = False
    recorded: set[str] = field(default_factory=set)  # the status variables set so far (flags A, a, E)


_SPACE = re.compile(r"[ \t]+")


class _Converter:
    def __init__(self, state: _State) -> None:
        self.s = state

    def skip(self, line: int, reason: str, text: str) -> None:
        self.s.skipped.append(Skipped(line, _one_line(reason), text[:2000], self.s.file))

    def note(self, line: int, reason: str, text: str) -> None:
        self.s.notes.append(Skipped(line, _one_line(reason), text[:2000], self.s.file))

    def items(self, items: list[_Item], depth: int) -> list[str]:
        out: list[str] = []
        status_var = f"pm_matched{depth}"
        for index, item in enumerate(items):
            if isinstance(item, _Bad):
                self.skip(item.line, item.reason, item.text)
            elif isinstance(item, _Assign):
                out += self.assign(item)
            else:
                following = next((x for x in items[index + 1:] if isinstance(x, _Recipe)), None)
                record = following is not None and any(f in following.flags for f in "AaE")
                try:
                    out += self.recipe(item, depth, status_var, record)
                except _Unconvertible as exc:
                    self.skip(exc.line or item.line, exc.reason, item.text)
        return out

    def assign(self, a: _Assign) -> list[str]:
        env = self.s.env
        if a.name in REFUSED:
            self.skip(a.line, REFUSED[a.name], a.text)
            return []
        if a.name in IGNORED:
            self.note(a.line, f"{a.name} is procmail's own setting: ignored", a.text)
            return []
        if a.value.lstrip().startswith("|"):
            env[a.name] = _Unknown(f"set from a program's output at line {a.line}")
            self.skip(a.line, "the output of a program: Sieve runs no programs", a.text)
            return []
        try:
            value = _expand(a.value.strip(" \t"), env)
        except _Unconvertible as exc:
            env[a.name] = _Unknown(f"line {a.line}: {exc.reason}")
            self.skip(a.line, exc.reason, a.text)
            return []
        if a.name in ("INCLUDERC", "SWITCHRC"):
            return self.include(a, value)
        if a.name == "MAILDIR":
            if value == _DEFAULT:
                env[a.name] = _Unknown("MAILDIR set to the default mailbox")
                self.skip(a.line, "MAILDIR set to the default mailbox", a.text)
                return []
            value = os.path.normpath(os.path.join(self._cwd(), value)) if value else self._cwd()
            if self.s.root is None:
                self.s.root = value
        env[a.name] = value
        return []

    def _cwd(self) -> str:
        v = self.s.env.get("MAILDIR")
        return v if isinstance(v, str) else self.s.home

    def include(self, a: _Assign, value: str) -> list[str]:
        if not value:
            return []
        if "\0" in value:  # no file has such a name; open() would raise ValueError
            self.skip(a.line, f"{a.name}: the file name holds a NUL byte", a.text)
            return []
        path = os.path.join(self._cwd(), value)
        if not os.path.isfile(path) and not os.path.isabs(value):
            path = os.path.join(self.s.rcdir, value)
        path = os.path.normpath(path)
        if self.s.include_depth >= MAX_INCLUDE_DEPTH or path in self.s.includes:
            self.skip(a.line, f"{a.name}={value}: included in itself, or nested too deep", a.text)
            return []
        try:
            with open(path, "rb") as f:
                source = f.read(MAX_FILE + 1)
        except OSError as exc:
            self.skip(a.line, f"{a.name}={value}: cannot read it ({exc.strerror})", a.text)
            return []
        if len(source) > MAX_FILE:
            self.skip(a.line, f"{a.name}={value}: larger than {MAX_FILE} bytes", a.text)
            return []
        outer = (self.s.file, self.s.rcdir)
        self.s.file, self.s.rcdir = path, os.path.dirname(path)
        self.s.include_depth += 1
        self.s.includes += (path,)
        try:
            body = self.items(_parse(_logical_lines(_decode(source))), 0)
        finally:
            self.s.file, self.s.rcdir = outer
            self.s.include_depth -= 1
            self.s.includes = self.s.includes[:-1]
        out = [f"# {a.name}={value} (line {a.line})", *body]
        if a.name == "SWITCHRC":
            out.append("stop;")
        return out

    # -- recipes

    def recipe(self, r: _Recipe, depth: int, status_var: str, record: bool) -> list[str]:
        unknown = set(r.flags) - FLAGS
        if unknown:
            raise _Unconvertible(f"unknown flag {''.join(sorted(unknown))!r}")
        if "\ufffd" in r.text:
            raise _Unconvertible("the recipe is not UTF-8")
        flags = r.flags
        if "e" in flags:
            raise _Unconvertible("flag e (run when the previous recipe's action failed): a Sieve action does not "
                                 "fail while the script runs")
        copy = "c" in flags
        case = "D" in flags
        where_h = "H" in flags or "B" not in flags
        where_b = "B" in flags
        tests: list[_Test] = []
        capture_tests: list[_Test] = []
        for cond in r.conditions:
            try:
                t = self.condition(cond.text[1:].strip(" \t"), where_h, where_b, case)
            except _Unconvertible as exc:
                raise _Unconvertible(f"condition: {exc.reason}", cond.number) from None
            if t is None:
                continue
            (capture_tests if t.capture else tests).append(t)
        if len(capture_tests) > 1:
            raise _Unconvertible("more than one \\/ condition in a recipe")
        tests += capture_tests  # the \/ test last: its groups are the ones the action reads
        prefix: list[_Test] = []
        if "A" in flags or "a" in flags or "E" in flags:
            if "E" in flags and ("A" in flags or "a" in flags):
                raise _Unconvertible("flags E and A together")
            if status_var not in self.s.recorded:
                raise _Unconvertible("flag A, a or E without a recipe before it at the same level")
            want = "0" if "E" in flags else "1"
            prefix.append(_Test(f'string :is "${{{status_var}}}" "{want}"', {"variables"}))
        body: list[str] = []
        if capture_tests:
            body.append(f'set "MATCH" "${{{capture_tests[0].capture}}}";')
            self.s.requires.add("variables")
        requires: set[str] = set()
        for t in prefix + tests:
            requires |= t.requires
        action = r.action
        if isinstance(action, list):
            if copy:
                raise _Unconvertible("flag c on a nesting block (procmail runs the block in a copy of itself)")
            for f in "hbfwWir":
                if f in flags:
                    self.note(r.line, f"flag {f} on a nesting block: no meaning in Sieve", r.text)
            saved = dict(self.s.env)
            inner = self.items(action, depth + 1)
            if tests or prefix:
                # An assignment in a conditional block: its value depends on the message.
                for k in set(saved) | set(self.s.env):
                    if saved.get(k) != self.s.env.get(k):
                        self.s.env[k] = _Unknown(f"assigned inside the conditional block of line {r.line}")
            body += inner
        else:
            assert isinstance(action, _Line)
            body += self.action(action, flags, copy, requires)
        self.s.converted += 1
        out = [f"# line {r.line}: {_one_line(r.text.splitlines()[0])}"]
        if record:
            self.s.recorded.add(status_var)
            requires.add("variables")
            if "E" not in flags and "A" not in flags and "a" not in flags:
                out.append(f'set "{status_var}" "0";')
            body.insert(0, f'set "{status_var}" "1";')
        all_tests = prefix + tests
        if not all_tests:
            lines = out + body
        else:
            test = all_tests[0].text if len(all_tests) == 1 else "allof(" + ", ".join(t.text for t in all_tests) + ")"
            lines = out + [f"if {test} {{"] + ["    " + b for b in body] + ["}"]
        self._check(lines, requires, r)
        self.s.requires |= requires
        return lines

    def _check(self, lines: list[str], requires: set[str], r: _Recipe) -> None:
        from vdeliver.sieve.errors import SieveError
        from vdeliver.sieve.validator import compile_script

        body = "\n".join(lines)
        req = set(requires | self.s.requires)
        if "${hex:" in body:
            req.add("encoded-character")
        if "${" in body.replace("${hex:", ""):
            req.add("variables")
        text = (f"require {_ql(sorted(req))};\n" if req else "") + body + "\n"
        try:
            compile_script(text)
        except SieveError as exc:
            self.s.converted -= 1
            raise _Unconvertible(f"the Sieve for it does not compile: {exc.errors[0].message}") from None

    def condition(self, text: str, h: bool, b: bool, case: bool) -> _Test | None:
        negate = False
        while True:
            if text.startswith("!"):
                negate = not negate
                text = text[1:].lstrip(" \t")
            elif text.startswith("$"):
                text = _expand(text[1:].lstrip(" \t"), self.s.env, shell=False)
            else:
                break
        t = self._condition(text, h, b, case)
        if t is None:
            return None
        if negate:
            if t.capture:
                raise _Unconvertible("\\/ in a negated condition")
            return _Test(f"not {t.text}", t.requires)
        return t

    def _condition(self, text: str, h: bool, b: bool, case: bool) -> _Test | None:
        if not text.strip():
            return None  # an empty condition is always true
        if re.match(r"[-+]?[0-9]*\.?[0-9]+[ \t]*\^[ \t]*[-+]?[0-9]*\.?[0-9]+", text):
            raise _Unconvertible("a weighted (scoring) condition: Sieve has no scores")
        if text.startswith("?"):
            raise _Unconvertible("the exit code of a program: Sieve runs no programs")
        if text[:1] in "<>":
            number = text[1:].strip()
            if not number.isdigit():
                raise _Unconvertible(f"a size condition needs a number of bytes, not {number!r}")
            return _Test(f"size :{'under' if text[0] == '<' else 'over'} {int(number)}", set())
        m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)[ \t]*\?\?[ \t]*(.*)", text, re.S)
        if m:
            return self.variable_condition(m.group(1), m.group(2), case)
        if text.startswith("\\"):
            text = text[1:]
        pattern = _expand_macros(text)
        tests = []
        if h:
            tests.append(_header_test(pattern, case))
        if b:
            tests.append(_body_test(pattern, case))
        return _any(tests)

    def variable_condition(self, name: str, pattern: str, case: bool) -> _Test:
        if name in ("B", "H", "HB", "BH"):
            return self._condition(pattern, "H" in name, "B" in name, case) or _Test("true", set())
        value = self.s.env.get(name)
        if name == "MATCH" and self.s.match_set and not isinstance(value, str):
            subject = "${MATCH}"
        elif isinstance(value, str) and value != _DEFAULT:
            subject = value.replace("${", "${hex:24}{")
        elif isinstance(value, _Unknown):
            raise _Unconvertible(f"{name} ?? ...: ${name} is not known when converting: {value.why}")
        else:
            raise _Unconvertible(f"{name} ?? ...: ${name} is not set in the rcfile")
        key = _block_key(_expand_macros(pattern))
        if key.capture:
            raise _Unconvertible("\\/ in a match against a variable")
        return _Test(f"string :regex{_comparator(case)} {_q(subject)} {_regex_string(key.ere or '')}",
                     {"variables", "regex"})

    def action(self, line: _Line, flags: str, copy: bool, requires: set[str]) -> list[str]:
        text = line.text
        if text.startswith("|"):
            raise _Unconvertible("a pipe to a program: Sieve runs no programs", line.number)
        if "f" in flags:
            raise _Unconvertible("flag f (a filter that changes the message)", line.number)
        if ("h" in flags) != ("b" in flags):
            part = "header" if "h" in flags else "body"
            raise _Unconvertible(f"flag {'h' if 'h' in flags else 'b'}: procmail delivers only the {part}; "
                                 "Sieve stores the whole message", line.number)
        if _ASSIGN.fullmatch(text) and "|" in text.split("=", 1)[1][:2]:
            raise _Unconvertible("a program's output into a variable: Sieve runs no programs", line.number)
        if text.startswith("!"):
            return self.forward(line, copy, requires)
        try:
            words = _expand(text, self.s.env, match_var=True)
        except _Unconvertible as exc:
            raise _Unconvertible(exc.reason, line.number) from None
        if "${MATCH}" in words:
            if not self.s.match_set:
                raise _Unconvertible("$MATCH before any \\/ condition", line.number)
            requires.add("variables")
        folders = [w for w in _SPACE.split(words) if w] if "\0" not in words else [words]
        out: list[str] = []
        stored = False
        for f in folders:
            name = self.folder(f, line.number)
            if name is None:
                if not copy:
                    out.append("discard;")
                continue
            stored = True
            if name == "":
                out.append("keep;")
            else:
                requires.add("fileinto")
                if copy:
                    requires.add("copy")
                out.append(f"fileinto{' :copy' if copy else ''} {_q(name)};")
        if not copy and (stored or out):
            out.append("stop;")
        return out

    def folder(self, f: str, number: int) -> str | None:
        """The Sieve mailbox name of a procmail folder; None for /dev/null; "" for the inbox."""
        if f == "/dev/null":
            return None
        if f == _DEFAULT or (f.startswith(_DEFAULT) and f[len(_DEFAULT):] in ("", "/")):
            return ""
        if "\0" in f:
            raise _Unconvertible("a folder below the default mailbox", number)
        default = self.s.env.get("DEFAULT")
        base = f
        if base.endswith("/."):
            base = base[:-2]
        base = base.rstrip("/") or "/"
        path = os.path.normpath(os.path.join(self._cwd(), base))
        if isinstance(default, str) and default != _DEFAULT \
                and path == os.path.normpath(os.path.join(self._cwd(), default.rstrip("/") or "/")):
            return ""
        root = self.s.root if self.s.root is not None else self.s.home
        rel = os.path.relpath(path, root)
        if rel == ".":
            return ""
        if rel.startswith("..") or os.path.isabs(rel):
            raise _Unconvertible(f"the folder {f} is outside MAILDIR ({root})", number)
        parts = rel.split("/")
        if len(parts) == 1 and parts[0].startswith(".") and len(parts[0]) > 1:
            return parts[0][1:]  # Maildir++: .Lists.dev/ is the folder "Lists.dev"
        return rel

    def forward(self, line: _Line, copy: bool, requires: set[str]) -> list[str]:
        from vdeliver.sieve.headers import redirect_address

        try:
            words = _expand(line.text[1:], self.s.env, match_var=True)
        except _Unconvertible as exc:
            raise _Unconvertible(exc.reason, line.number) from None
        addresses = [w for w in _SPACE.split(words.strip()) if w]
        if not addresses:
            raise _Unconvertible("a forward (!) without an address", line.number)
        out = []
        for a in addresses:
            if a.startswith("-"):
                raise _Unconvertible(f"sendmail option {a} in a forward", line.number)
            if "${MATCH}" not in a:
                _, why = redirect_address(a)
                if why:
                    raise _Unconvertible(f"forward to {a}: {why}", line.number)
            if copy:
                requires.add("copy")
            out.append(f"redirect{' :copy' if copy else ''} {_q(a)};")
        if not copy:
            out.append("stop;")
        return out


def _one_line(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text).strip()


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "replace").replace("\r\n", "\n")


def convert(source: str | bytes, *, home: str = "/home/user", rcfile: str | None = None) -> Result:
    """Convert a procmailrc's text.  `home` is $HOME (folders are named relative to MAILDIR,
    by default $HOME); `rcfile` is where INCLUDERC looks when a relative file is not below
    MAILDIR."""
    text = _decode(source) if isinstance(source, bytes) else source.replace("\r\n", "\n")
    home = os.path.normpath(home)
    env: dict[str, _Value] = {"HOME": home, "MAILDIR": home, "DEFAULT": _DEFAULT, "ORGMAIL": _DEFAULT}
    state = _State(env=env, root=None, home=home, skipped=[], notes=[], requires=set(),
                   rcdir=os.path.dirname(os.path.abspath(rcfile)) if rcfile else home)
    conv = _Converter(state)
    # The flag `match_set` is true once a recipe sets ${MATCH}; recipes convert in order.
    items = _parse(_logical_lines(text))
    _mark_match(items, state)
    body = conv.items(items, 0)
    return _assemble(state, body, rcfile)


def _mark_match(items: list[_Item], state: _State) -> None:
    for item in items:
        if isinstance(item, _Recipe):
            if any("\\/" in c.text for c in item.conditions):
                state.match_set = True
                return
            if isinstance(item.action, list):
                _mark_match(item.action, state)


def _assemble(state: _State, body: list[str], rcfile: str | None) -> Result:
    head = [f"# Sieve converted from {_one_line(rcfile or 'a procmailrc')} by `vmailctl sieve from-procmailrc`."]
    if state.skipped:
        head.append("# Not converted (left out of this script):")
        for s in state.skipped:
            where = f"{_one_line(s.file)} " if s.file else ""
            head.append(f"# {where}line {s.line}: {s.reason}")
    if state.notes:
        head.append("# Ignored:")
        for n in state.notes:
            where = f"{_one_line(n.file)} " if n.file else ""
            head.append(f"# {where}line {n.line}: {n.reason}")
    joined = "\n".join(body)
    if "${hex:" in joined:
        state.requires.add("encoded-character")
    if "${" in joined.replace("${hex:", "") or '"MATCH"' in joined:
        state.requires.add("variables")
    req = sorted(state.requires)
    lines = head + ([f"require {_ql(req)};"] if req else []) + body
    script = "\n".join(lines) + "\n"
    from vdeliver.sieve.errors import SieveError
    from vdeliver.sieve.validator import compile_script

    try:
        compile_script(script)
    except SieveError as exc:  # each recipe compiled alone; together they must too
        raise AssertionError(f"converted script does not compile: {exc}") from None
    return Result(script, state.skipped, state.converted, state.notes)


def convert_file(path: str, *, home: str | None = None) -> Result:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ProcmailrcError(f"{path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise ProcmailrcError(f"{path}: larger than {MAX_FILE} bytes")
    return convert(data, home=home or os.path.dirname(os.path.abspath(path)), rcfile=path)
