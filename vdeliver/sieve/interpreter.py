"""The interpreter: a compiled script, a message and its envelope -> the actions (no I/O).

It only decides.  It never opens a mailbox or sends mail: it returns a Result whose actions,
in execution order, the delivery step carries out together (Pigeonhole's sieve-result, and
RFC 5228 section 4's rules for the implicit keep):

- `keep`, `fileinto` and `redirect` cancel the implicit keep, unless given `:copy`;
  `discard` cancels it too, and nothing else;
- an action repeated with the same target is one action (RFC 5228 section 2.10.3);
- `stop` ends the script; the implicit keep stands unless cancelled.

Limits a hostile script cannot pass: actions per message (`max_actions`) and redirects
(`max_redirects`); past them the run fails with a SieveRuntimeError, and the caller keeps
the message in the INBOX (a failing script never loses mail).
"""

from __future__ import annotations

from vdeliver.sieve import headers, match, variables
from vdeliver.sieve.errors import SieveError

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable, MutableMapping

    from vdeliver.sieve.compiled import Compiled, Node
    from vdeliver.sieve.mime import Part
    from vdeliver.sieve.spamtest import SpamConfig

MAX_ACTIONS = 32
MAX_REDIRECTS = 4
MAX_CPU_TIME = 30.0  # seconds of CPU for one message (Pigeonhole's sieve_max_cpu_time)
MAX_PART_VISITS = 100_000  # foreverypart iterations and parts read by :anychild, per run (RFC 5703)


class SieveRuntimeError(SieveError):
    """The script failed while it ran: the message goes to the INBOX, the error to the log."""

    script = 0  # in a sequence (run_sequence), which script failed


class Envelope:
    __slots__ = ("sender", "recipient", "original_recipient")

    def __init__(self, sender: str, recipient: str, original_recipient: str = "") -> None:
        self.sender = sender  # "" for the null sender <>
        self.recipient = recipient  # the final recipient, user@domain
        self.original_recipient = original_recipient


class Message:
    """What the tests see of a message: its header fields in order and its size."""

    __slots__ = ("fields", "size", "raw", "mime_parts")

    def __init__(self, fields: list[tuple[str, bytes]], size: int, raw: bytes = b"",
                 mime_parts: list[Part] | None = None) -> None:
        self.fields = fields  # (lower-case name, raw value with its folding)
        self.size = size
        self.raw = raw  # the whole message, for the body test (empty: no body to test)
        self.mime_parts = mime_parts  # parsed when first asked

    def parts(self) -> list[Part]:
        """The MIME parts, the message itself first (vdeliver.sieve.mime), read once."""
        if self.mime_parts is None:
            from vdeliver.sieve import mime

            self.mime_parts = mime.parse(self.raw)
        return self.mime_parts

    @classmethod
    def from_bytes(cls, data: bytes) -> Message:
        """The header of an RFC 5322 message (CRLF or LF line ends) and its whole size."""
        end = len(data)
        for sep in (b"\r\n\r\n", b"\n\n"):
            at = data.find(sep)
            if 0 <= at < end:
                end = at
        if data.startswith((b"\r\n", b"\n")):
            end = 0
        fields: list[tuple[str, bytes]] = []
        for line in data[:end].replace(b"\r\n", b"\n").split(b"\n"):
            if line[:1] in (b" ", b"\t") and fields:
                last_name, last_value = fields[-1]
                fields[-1] = (last_name, last_value + b"\r\n" + line)
            elif b":" in line:
                raw_name, _, value = line.partition(b":")
                fields.append((raw_name.strip().decode("ascii", "replace").lower(), value.lstrip(b" \t")))
        return cls(fields, len(data), data)

    def values(self, name: str) -> list[str]:
        """Every field of that name, unfolded and with RFC 2047 encoded words decoded."""
        name = name.lower()
        return [headers.decode_value(raw) for field_name, raw in self.fields if field_name == name]

    def unfolded(self, name: str) -> list[str]:
        """Every field of that name, unfolded but with its encoded words as written: what an
        address list is parsed from (a decoded display name can hold a comma)."""
        name = name.lower()
        return [headers.unfold(raw) for field_name, raw in self.fields if field_name == name]


class Action:
    """One action, as sieve-test --json shows it; two are the same action when all but their
    line are equal (RFC 5228 2.10.3: the second is not done again)."""

    __slots__ = ("type", "mailbox", "address", "copy", "flags", "create", "line")

    def __init__(self, type: str, mailbox: str = "", address: str = "", copy: bool = False,
                 flags: tuple[str, ...] = (), create: bool = False, line: int = 0) -> None:
        self.type = type  # keep, fileinto, redirect, discard
        self.mailbox = mailbox
        self.address = address
        self.copy = copy
        self.flags = flags
        self.create = create
        self.line = line

    def _key(self) -> tuple[object, ...]:
        return (self.type, self.mailbox, self.address, self.copy, self.flags, self.create)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Action) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"Action{self._key()!r}"

    def to_json(self) -> dict[str, object]:
        if self.type == "keep":
            return {"type": "keep", "flags": list(self.flags)}
        if self.type == "fileinto":
            return {"type": "fileinto", "mailbox": self.mailbox, "flags": list(self.flags), "copy": self.copy,
                    "create": self.create}
        if self.type == "redirect":
            return {"type": "redirect", "address": self.address, "copy": self.copy}
        return {"type": self.type}


class Result:
    __slots__ = ("actions", "implicit_keep", "implicit_flags")

    def __init__(self, actions: list[Action] | None = None, implicit_keep: bool = True,
                 implicit_flags: tuple[str, ...] = ()) -> None:
        self.actions: list[Action] = actions if actions is not None else []
        self.implicit_keep = implicit_keep
        self.implicit_flags = implicit_flags  # imap4flags: the flags the implicit keep stores with

    def __repr__(self) -> str:
        return f"Result({self.actions!r}, implicit_keep={self.implicit_keep}, {self.implicit_flags!r})"

    def stores(self, inbox: str = "INBOX") -> list[str]:
        """The folders the message goes into, each once, in order (the implicit keep last)."""
        folders: list[str] = []
        for action in self.actions:
            folder = inbox if action.type == "keep" else action.mailbox if action.type == "fileinto" else None
            if folder is not None and folder not in folders:
                folders.append(folder)
        if self.implicit_keep and inbox not in folders:
            folders.append(inbox)
        return folders


class _Stop(Exception):
    pass


class _Return(Exception):
    """`return` (RFC 6609): back to the script that included this one."""
class _Break(Exception):
    def __init__(self, name: str | None) -> None:
        self.name = name  # None: the innermost loop


def default_environment() -> dict[str, str]:
    """RFC 5183's items as vdeliver answers them; the caller adds remote-host and remote-ip."""
    import os

    from vdeliver import __version__

    host = os.uname().nodename
    return {"domain": host.partition(".")[2] or host, "host": host, "location": "MDA", "name": "vdeliver",
            "phase": "during", "version": __version__}


def _inbox_only(name: str) -> bool:
    return name.upper() == "INBOX"


def run(compiled: Compiled, message: Message, envelope: Envelope, *, max_actions: int = MAX_ACTIONS,
        max_redirects: int = MAX_REDIRECTS, environment: dict[str, str] | None = None,
        mailbox_exists: Callable[[str], bool] = _inbox_only,
        trace: Callable[[int, str], None] | None = None, max_cpu_time: float = MAX_CPU_TIME,
        result: Result | None = None, spam: SpamConfig | None = None) -> Result:
    """Run the script; SieveRuntimeError when it breaks a limit (the caller keeps the message).
    `environment` answers the environment test (RFC 5183); `mailbox_exists` the mailboxexists
    test (RFC 5490), by default only the INBOX exists; `trace` hears (line, what happened) for
    each test and command, for `sieve-test --trace`; `result` goes on from an earlier
    script's (a sequence of global and personal scripts); `spam` where spamtest and virustest
    find the scanners' verdicts (by default SpamAssassin's and clamav-milter's headers)."""
    import time

    machine = _Machine(message, envelope, max_actions, max_redirects, "variables" in compiled.extensions)
    if result is not None:
        machine.result = result
        result.implicit_keep = True
    machine.trace = trace
    machine.environment = environment if environment is not None else default_environment()
    machine.mailbox_exists = mailbox_exists
    machine.includes = compiled.includes
    machine.max_cpu_time = max_cpu_time
    machine.deadline = time.process_time() + max_cpu_time
    if compiled.includes or "include" in compiled.extensions:
        machine.variables = variables.Scope({})
    machine.spam = spam
    try:
        machine.block(compiled.commands)
    except (_Stop, _Return):
        pass
    if machine.result.implicit_keep:
        machine.result.implicit_flags = variables.flags_of(machine.variables.get(variables.FLAGS, ""))
    return machine.result


def run_sequence(scripts: list[Compiled], message: Message, envelope: Envelope, **options: object) -> Result:
    """Run scripts one after another on one result, by Pigeonhole's rule for sieve_before and
    sieve_after: the next script runs only when the one before ended with a keep in effect,
    implicit or explicit; a keep of a script that is not the last to run only means "go on"
    (it stores nothing).  `options` are run()'s.  A SieveRuntimeError says in `.script`
    which script (its index) failed."""
    result: Result | None = None
    for index, compiled in enumerate(scripts):
        if result is not None:
            result.actions = [a for a in result.actions if a.type != "keep"]  # the one before kept: go on
        start = len(result.actions) if result is not None else 0
        try:
            result = run(compiled, message, envelope, result=result, **options)  # type: ignore[arg-type]
        except SieveRuntimeError as exc:
            exc.script = index
            raise
        if not (result.implicit_keep or any(a.type == "keep" for a in result.actions[start:])):
            break
    return result if result is not None else Result()


class _Machine:
    def __init__(self, message: Message, envelope: Envelope, max_actions: int, max_redirects: int,
                 expand: bool) -> None:
        self.message = message
        self.envelope = envelope
        self.max_actions = max_actions
        self.max_redirects = max_redirects
        self.result = Result()
        self.expand = expand  # "variables" was required: ${...} in strings are replaced
        self.variables: MutableMapping[str, str] = {}
        self.match_vars: list[str] = []
        self.includes: dict[tuple[str, str], Compiled] = {}
        self.once: set[tuple[str, str]] = set()
        self.steps = 0
        self.deadline = 0.0
        self.max_cpu_time = MAX_CPU_TIME
        self.environment: dict[str, str] = {}
        self.mailbox_exists: Callable[[str], bool] = _inbox_only
        self.trace: Callable[[int, str], None] | None = None
        self.loop_parts: list[int] = []  # foreverypart: the current part of each loop, innermost last
        self.part_visits = 0
        self.spam: SpamConfig | None = None  # None: the defaults, built when a spamtest runs

    def s(self, value: object) -> str:
        """One string argument, its variables expanded."""
        text = str(value)
        return variables.expand(text, self.variables, self.match_vars) if self.expand and "${" in text else text

    def sl(self, value: object) -> list[str]:
        return [self.s(v) for v in _strings(value)]

    def flags(self, node: Node) -> tuple[str, ...]:
        if "flags" in node.tags:
            return variables.flags_of(" ".join(self.sl(node.tags["flags"])))
        return variables.flags_of(self.variables.get(variables.FLAGS, ""))

    # -- commands ------------------------------------------------------------------------------

    def block(self, nodes: tuple[Node, ...]) -> None:
        taken = False  # in an if/elsif/else chain: a branch already ran
        for node in nodes:
            if node.name == "if":
                taken = self.test(node.tests[0])
                if taken:
                    self.block(node.block or ())
            elif node.name == "elsif":
                if not taken and self.test(node.tests[0]):
                    taken = True
                    self.block(node.block or ())
            elif node.name == "else":
                if not taken:
                    self.block(node.block or ())
            else:
                self.command(node)

    def _tick(self, line: int) -> None:
        """Every 256 commands and tests: the CPU time limit."""
        self.steps += 1
        if not self.steps & 255:
            import time

            if time.process_time() > self.deadline:
                raise SieveRuntimeError(line, f"more than {self.max_cpu_time:g} s of CPU time")

    def command(self, node: Node) -> None:
        name = node.name
        self._tick(node.line)
        if self.trace is not None:
            self.trace(node.line, _describe(node, self))
        if name == "stop":
            raise _Stop
        if name == "return":
            raise _Return
        if name == "include":
            self._include(node)
            return
        if name == "global":
            if isinstance(self.variables, variables.Scope):
                self.variables.declare(self.sl(node.args[0]))
            return
        if name == "keep":
            self._add(Action("keep", flags=self.flags(node), line=node.line), cancels=True)
        elif name == "discard":
            self._add(Action("discard", line=node.line), cancels=True)
        elif name == "fileinto":
            copy = bool(node.tags.get("copy"))
            self._add(Action("fileinto", mailbox=self.s(node.args[0]), copy=copy, flags=self.flags(node),
                             create=bool(node.tags.get("create")), line=node.line), cancels=not copy)
        elif name == "set":
            value = variables.modify(self.s(node.args[1]), node.tags)
            self.variables[self.s(node.args[0]).lower()] = variables.limit(value)
        elif name in ("setflag", "addflag", "removeflag"):
            target = variables.FLAGS if node.args[0] is None else self.s(node.args[0]).lower()
            current = self.variables.get(target, "")
            self.variables[target] = variables.change_flags(name, current, self.sl(node.args[1]))
        elif name == "foreverypart":
            self._foreverypart(node)
        elif name == "break":
            raise _Break(str(node.tags["name"]) if "name" in node.tags else None)
        elif name == "extracttext":
            from vdeliver.sieve import mime

            text = mime.text(self.message.parts()[self.loop_parts[-1]])
            if "first" in node.tags:
                text = text[:int(str(node.tags["first"]))]
            self.variables[self.s(node.args[0]).lower()] = variables.limit(variables.modify(text, node.tags))
        elif name == "error":
            raise SieveRuntimeError(node.line, f"error: {self.s(node.args[0])}")
        elif name == "redirect":
            copy = bool(node.tags.get("copy"))
            address, why = headers.redirect_address(self.s(node.args[0]))
            if why:
                raise SieveRuntimeError(node.line, f"redirect address '{self.s(node.args[0])}' is invalid: {why}")
            if sum(a.type == "redirect" for a in self.result.actions) >= self.max_redirects:
                raise SieveRuntimeError(node.line, f"more than {self.max_redirects} redirects")
            self._add(Action("redirect", address=address, copy=copy, line=node.line), cancels=not copy)

    def _include(self, node: Node) -> None:
        key = ("global" if "global" in node.tags else "personal", str(node.args[0]))
        compiled = self.includes.get(key)
        if compiled is None:
            return  # :optional, and there is no such script
        if "once" in node.tags and key in self.once:
            return
        self.once.add(key)
        saved = (self.variables, self.expand, self.match_vars)
        shared = self.variables.shared if isinstance(self.variables, variables.Scope) else {}
        self.variables, self.expand, self.match_vars = (variables.Scope(shared), "variables" in compiled.extensions,
                                                        [])
        try:
            self.block(compiled.commands)
        except _Return:
            pass
        finally:
            self.variables, self.expand, self.match_vars = saved
    def _foreverypart(self, node: Node) -> None:
        """RFC 5703 section 3: the block once per part, the message itself first; a loop inside
        another visits the parts below the outer loop's current part."""
        parts = self.message.parts()
        first, end = (self.loop_parts[-1] + 1, parts[self.loop_parts[-1]].end) if self.loop_parts else (0, len(parts))
        for index in range(first, end):
            self._visit(node.line, 1)
            self.loop_parts.append(index)
            try:
                self.block(node.block or ())
            except _Break as exc:
                if exc.name is None or exc.name == node.tags.get("name"):
                    return
                raise
            finally:
                self.loop_parts.pop()

    def _visit(self, line: int, count: int) -> None:
        self.part_visits += count
        if self.part_visits > MAX_PART_VISITS:
            raise SieveRuntimeError(line, f"MIME parts visited more than {MAX_PART_VISITS} times")

    def _mime_parts(self, node: Node) -> list[Part] | None:
        """The parts a :mime test reads: the current part of the innermost loop, and with
        :anychild every part below it too; None for the message's own header (outside a loop,
        without :anychild)."""
        if not self.loop_parts and "anychild" not in node.tags:
            return None
        parts = self.message.parts()
        index = self.loop_parts[-1] if self.loop_parts else 0
        scope = parts[index:parts[index].end] if "anychild" in node.tags else parts[index:index + 1]
        self._visit(node.line, len(scope))
        return scope

    def _add(self, action: Action, cancels: bool) -> None:
        if cancels:
            self.result.implicit_keep = False
        if action in self.result.actions:
            return  # the same action twice is one
        if len(self.result.actions) >= self.max_actions:
            raise SieveRuntimeError(action.line, f"more than {self.max_actions} actions")
        self.result.actions.append(action)

    # -- tests --------------------------------------------------------------------------------------

    def test(self, node: Node) -> bool:
        self._tick(node.line)
        result = self._test(node)
        if self.trace is not None and node.name not in ("not", "allof", "anyof", "true", "false"):
            self.trace(node.line, f"{_describe(node, self)}: {'true' if result else 'false'}")
        return result

    def _test(self, node: Node) -> bool:
        name = node.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            return not self.test(node.tests[0])
        if name == "allof":
            return all(self.test(t) for t in node.tests)
        if name == "anyof":
            return any(self.test(t) for t in node.tests)
        if name == "exists":
            scope = self._mime_parts(node) if "mime" in node.tags else None
            if scope is not None:
                return all(any(p.values(h) for p in scope) for h in self.sl(node.args[0]))
            return all(self.message.values(h) for h in self.sl(node.args[0]))
        if name == "size":
            limit = int(str(node.args[0]))
            return self.message.size > limit if "over" in node.tags else self.message.size < limit
        if name == "header":
            values = [v for h in self.sl(node.args[0]) for v in self._fields(node, h)]
            return self._match(node, values, self.sl(node.args[1]))
        if name == "environment":
            value = self.environment.get(self.s(node.args[0]).lower())
            return value is not None and self._match(node, [value], self.sl(node.args[1]))
        if name == "mailboxexists":
            return all(self.mailbox_exists(m) for m in self.sl(node.args[0]))
        if name in ("date", "currentdate"):
            return self._date(node)
        if name == "body":
            from vdeliver.sieve import body

            transform = "raw" if "raw" in node.tags else "content" if "content" in node.tags else "text"
            types = self.sl(node.tags["content"]) if transform == "content" else ["text"]
            return self._match(node, body.values(self.message.raw, transform, types), self.sl(node.args[0]))
        if name == "ihave":
            from vdeliver.sieve.validator import EXTENSIONS, unusable

            return all(n in EXTENSIONS and unusable(n) is None for n in self.sl(node.args[0]))
        if name in ("spamtest", "virustest"):
            from vdeliver.sieve import spamtest

            first = lambda h: next(iter(self.message.values(h)), None)  # noqa: E731
            spam = self.spam if self.spam is not None else spamtest.SpamConfig()
            config = spam.spamtest if name == "spamtest" else spam.virustest
            try:
                value, tested = spamtest.value(config, first, name, "percent" in node.tags)
            except SieveError as exc:
                raise SieveRuntimeError(node.line, exc.message) from None
            counted = [value] if tested or "count" not in node.tags else []  # RFC 5235 3.1
            return self._match(node, counted, self.sl(node.args[0]))
        if name == "string":
            values = self.sl(node.args[0])
            if "count" in node.tags:
                values = [v for v in values if v]  # RFC 5229 section 5: empty strings are not counted
            return self._match(node, values, self.sl(node.args[1]))
        if name == "hasflag":
            names = [variables.FLAGS] if node.args[0] is None else [n.lower() for n in self.sl(node.args[0])]
            values = [f for n in names for f in variables.flags_of(self.variables.get(n, ""))]
            return self._match(node, values, self.sl(node.args[1]))
        if name == "address":
            parts = [self._part(node, a) for h in self.sl(node.args[0])
                     for v in self._fields(node, h, decode=False) for a in headers.addresses(v)]
            return self._match(node, [p for p in parts if p is not None], self.sl(node.args[1]))
        if name == "envelope":
            parts = []
            for which in self.sl(node.args[0]):
                raw = {"from": self.envelope.sender, "to": self.envelope.recipient}.get(which.lower())
                if raw is not None:
                    parts.append(self._part(node, headers.envelope_address(raw)))
            return self._match(node, [p for p in parts if p is not None], self.sl(node.args[1]))
        raise SieveRuntimeError(node.line, f"test '{name}' cannot run")  # the validator lets none through

    def _date(self, node: Node) -> bool:
        from vdeliver.sieve import dates

        zone = self.s(node.tags["zone"]) if "zone" in node.tags else None
        if zone is not None and not dates.valid_zone(zone):
            zone = None  # not a zone: ignored (the local zone), as Pigeonhole does with a warning
        date_part = self.s(node.args[-2]).lower()
        if date_part not in dates.PARTS:
            return False
        if node.name == "currentdate":
            moments = [dates.now()]
        else:
            # The whole field is the date (as Pigeonhole reads it: no date out of Received lines).
            moments = [m for v in self._fields(node, self.s(node.args[0])) if (m := dates.parse_header(v))]
        values = [dates.part(dates.in_zone(m, zone, "originalzone" in node.tags), date_part) for m in moments]
        return self._match(node, values, self.sl(node.args[-1]))

    def _fields(self, node: Node, name: str, *, decode: bool = True) -> list[str]:
        """The values of a header field; with :index N only the Nth (from the end with :last)."""
        scope = self._mime_parts(node) if "mime" in node.tags else None
        if scope is not None:
            values = [v for p in scope for v in p.values(name, decode)]
        else:
            values = self.message.values(name) if decode else self.message.unfolded(name)
        if "mime" in node.tags:
            option = next((o for o in ("type", "subtype", "contenttype", "param") if o in node.tags), None)
            if option is not None:
                from vdeliver.sieve import mime

                params = self.sl(node.tags["param"]) if option == "param" else []
                values = [o for v in values for o in mime.option_values(v, name, option, params)]
        index = node.tags.get("index")
        if not isinstance(index, int):
            return values
        if index > len(values):
            return []
        return [values[-index] if "last" in node.tags else values[index - 1]]

    def _part(self, node: Node, address: headers.Address) -> str | None:
        for part in ("localpart", "domain", "user", "detail"):
            if part in node.tags:
                return address.part(part)
        return address.part("all")

    def _match(self, node: Node, values: list[str], keys: list[str]) -> bool:
        comparator = str(node.tags.get("comparator", "i;ascii-casemap"))
        if "count" in node.tags:
            return match.matches_any("value", comparator, [str(len(values))], keys, str(node.tags["count"]))
        if "value" in node.tags:
            return match.matches_any("value", comparator, values, keys, str(node.tags["value"]))
        kind = next((m for m in ("is", "contains", "matches", "regex") if m in node.tags), "is")
        if kind == "regex":
            from vdeliver.sieve import regex

            groups = regex.match_any(comparator, values, keys, capture=self.expand)
            if groups is not None and self.expand:
                self.match_vars = groups
            return groups is not None
        if kind != "matches" or not self.expand:
            return match.matches_any(kind, comparator, values, keys)
        for value in values:  # the first value and key that match set ${0}, ${1}, ...
            for key in keys:
                groups = match.glob_groups(comparator, value, key)
                if groups is not None:
                    self.match_vars = [value, *groups]
                    return True
        return False


def _describe(node: Node, machine: _Machine) -> str:
    """A command or test as the trace shows it: its name, tags and arguments, expanded."""
    words = [node.name]
    for tag, value in node.tags.items():
        words.append(f":{tag}" if value is True else f":{tag} {_show(value, machine)}")
    words += [_show(a, machine) for a in node.args if a is not None]
    return " ".join(words)


def _show(value: object, machine: _Machine) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f'"{machine.s(v)}"' for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return f'"{machine.s(value)}"'


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]
