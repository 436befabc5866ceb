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

About 575 lines on purpose: the core commands and tests and the action rules they obey
are read together; the rarer extensions live in extensions.py, loaded only when used.
"""


from vdeliver.sieve import headers, match, variables
from vdeliver.sieve.errors import Return, Stop
from vdeliver.sieve.errors import SieveRuntimeError as SieveRuntimeError  # callers find it here

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable, MutableMapping

    from vdeliver.sieve.compiled import Compiled, Node
    from vdeliver.sieve.extensions import Edits
    from vdeliver.sieve.mime import Part
    from vdeliver.sieve.spamtest import SpamConfig

MAX_ACTIONS = 32
MAX_REDIRECTS = 4
MAX_CPU_TIME = 30.0  # seconds of CPU for one message (Pigeonhole's sieve_max_cpu_time)


class Envelope:
    __slots__ = ("sender", "recipient", "original_recipient")

    def __init__(self, sender: str, recipient: str, original_recipient: str = "") -> None:
        self.sender = sender  # "" for the null sender <>
        self.recipient = recipient  # the final recipient, user@domain
        self.original_recipient = original_recipient


class Message:
    """What the tests see of a message: its header fields in order and its size.  Once
    editheader changes the header, `edits` (extensions.Edits) holds each field's raw bytes
    too, and answers values() and unfolded(); `fields` then follows the edited header."""

    __slots__ = ("fields", "size", "raw", "mime_parts", "_memo", "edits")

    def __init__(self, fields: list[tuple[str, bytes]], size: int, raw: bytes = b"",
                 mime_parts: "list[Part] | None" = None) -> None:
        self.fields = fields  # (lower-case name, raw value with its folding)
        self.size = size
        self.raw = raw  # the whole message, for the body test (empty: no body to test)
        self.mime_parts = mime_parts  # parsed when first asked
        self._memo: "dict[tuple[str, str], list[str]]" = {}  # (how, name) -> values, each read once
        self.edits: "Edits | None" = None  # editheader changed the header (extensions.py)

    def parts(self) -> "list[Part]":
        """The MIME parts, the message itself first (vdeliver.sieve.mime), read once."""
        if self.mime_parts is None:
            from vdeliver.sieve import mime

            self.mime_parts = mime.parse(self.raw)
        return self.mime_parts

    @classmethod
    def from_bytes(cls, data: bytes) -> "Message":
        """The header of an RFC 5322 message (CRLF or LF line ends) and its whole size."""
        return cls(headers.split_fields(data[:headers.header_end(data)]), len(data), data)

    def values(self, name: str) -> list[str]:
        """Every field of that name, unfolded and with RFC 2047 encoded words decoded."""
        name = name.lower()
        found = self._memo.get(("decoded", name))
        if found is None and self.edits is not None:
            found = self._memo["decoded", name] = self.edits.values(name, True)
        if found is None:
            found = self._memo["decoded", name] = [headers.decode_value(raw) for field_name, raw in self.fields
                                                   if field_name == name]
        return found

    def unfolded(self, name: str) -> list[str]:
        """Every field of that name, unfolded but with its encoded words as written: what an
        address list is parsed from (a decoded display name can hold a comma)."""
        name = name.lower()
        found = self._memo.get(("unfolded", name))
        if found is None and self.edits is not None:
            found = self._memo["unfolded", name] = self.edits.values(name, False)
        if found is None:
            found = self._memo["unfolded", name] = [headers.unfold(raw) for field_name, raw in self.fields
                                                    if field_name == name]
        return found


class Action:
    """One action, as sieve-test --json shows it; two are the same action when all but their
    line are equal (RFC 5228 2.10.3: the second is not done again)."""

    __slots__ = ("type", "mailbox", "address", "copy", "flags", "create", "line", "specialuse", "reason",
                 "vacation")

    def __init__(self, type: str, mailbox: str = "", address: str = "", copy: bool = False,
                 flags: tuple[str, ...] = (), create: bool = False, line: int = 0, specialuse: str = "",
                 reason: str = "", vacation: "Vacation | None" = None) -> None:
        self.type = type  # keep, fileinto, redirect, discard
        self.mailbox = mailbox
        self.address = address
        self.copy = copy
        self.flags = flags
        self.create = create
        self.line = line
        self.specialuse = specialuse  # RFC 8579: the folder with this special-use flag, if there is one
        self.reason = reason  # reject / ereject (RFC 5429), vacation (RFC 5230)
        self.vacation = vacation  # vacation: what the reply is made of

    def _key(self) -> tuple[object, ...]:
        return (self.type, self.mailbox, self.address, self.copy, self.flags, self.create, self.specialuse,
                self.reason, self.vacation._key() if self.vacation is not None else None)

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
            out: dict[str, object] = {"type": "fileinto", "mailbox": self.mailbox, "flags": list(self.flags),
                                      "copy": self.copy, "create": self.create}
            if self.specialuse:
                out["specialuse"] = self.specialuse
            return out
        if self.type == "redirect":
            return {"type": "redirect", "address": self.address, "copy": self.copy}
        if self.type in ("reject", "ereject"):
            return {"type": "reject", "reason": self.reason, "ereject": self.type == "ereject"}
        if self.type == "notify" and self.vacation is not None:
            n = self.vacation
            out = {"type": "notify", "method": self.address, "from": n.from_, "importance": n.seconds,
                   "message": self.reason, "options": list(n.addresses)}
            if n.fcc is not None:
                out["fcc"] = n.fcc.mailbox
            return out
        if self.type == "vacation" and self.vacation is not None:
            v = self.vacation
            out = {"type": "vacation", "to": self.address, "from": v.from_, "subject": v.subject,
                   "reason": self.reason, "seconds": v.seconds, "handle": v.handle, "mime": v.mime}
            if v.fcc is not None:
                out["fcc"] = v.fcc.mailbox
            return out
        return {"type": self.type}


class Vacation:
    """A vacation action's reply (RFC 5230, 6131): `from_` and `subject` as the script gave
    them ("" for the defaults), the period, the handle (the script's, or made from the reason,
    subject, from and :mime as Pigeonhole makes it), the extra addresses of the user."""

    __slots__ = ("from_", "subject", "seconds", "handle", "mime", "addresses", "fcc")

    def __init__(self, from_: str, subject: str, seconds: int, handle: str, mime: bool,
                 addresses: tuple[str, ...], fcc: "Fcc | None" = None) -> None:
        self.from_ = from_
        self.subject = subject
        self.seconds = seconds
        self.handle = handle
        self.mime = mime
        self.addresses = addresses
        self.fcc = fcc  # RFC 8580: where a copy of what is sent is stored

    def _key(self) -> tuple[object, ...]:
        return (self.from_, self.subject, self.seconds, self.handle, self.mime, self.addresses,
                self.fcc._key() if self.fcc is not None else None)


class Fcc:
    """`:fcc "Sent" [:create] [:flags ...] [:specialuse ...]` (RFC 8580)."""

    __slots__ = ("mailbox", "create", "flags", "specialuse")

    def __init__(self, mailbox: str, create: bool, flags: tuple[str, ...], specialuse: str) -> None:
        self.mailbox = mailbox
        self.create = create
        self.flags = flags
        self.specialuse = specialuse

    def _key(self) -> tuple[object, ...]:
        return (self.mailbox, self.create, self.flags, self.specialuse)


class Result:
    """The actions in execution order, the implicit keep and its flags, and `header`: None
    when no editheader command changed the header, else the whole new header block as it
    is to be stored (LF line ends, no empty line at its end; see extensions.Edits)."""

    __slots__ = ("actions", "implicit_keep", "implicit_flags", "header")

    def __init__(self, actions: "list[Action] | None" = None, implicit_keep: bool = True,
                 implicit_flags: tuple[str, ...] = (), header: bytes | None = None) -> None:
        self.actions: "list[Action]" = actions if actions is not None else []
        self.implicit_keep = implicit_keep
        self.implicit_flags = implicit_flags  # imap4flags: the flags the implicit keep stores with
        self.header = header  # editheader (RFC 5293): the edited header block, or None

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


def default_environment() -> dict[str, str]:
    """RFC 5183's items as vdeliver answers them; the caller adds remote-host and remote-ip."""
    import os

    from vdeliver import __version__

    host = os.uname().nodename
    return {"domain": host.partition(".")[2] or host, "host": host, "location": "MDA", "name": "vdeliver",
            "phase": "during", "version": __version__}


def _never_seen(key: str, seconds: "int | None", last: bool) -> bool:
    return False  # no tracking store (sieve-test): nothing was seen before


def _no_special_use(flag: str) -> "str | None":
    return None


def _inbox_only(name: str) -> bool:
    return name.upper() == "INBOX"


def run(compiled: "Compiled", message: "Message", envelope: "Envelope", *, max_actions: int = MAX_ACTIONS,
        max_redirects: int = MAX_REDIRECTS, environment: dict[str, str] | None = None,
        mailbox_exists: "Callable[[str], bool]" = _inbox_only,
        special_use: "Callable[[str], str | None] | None" = None,
        duplicate: "Callable[[str, int | None, bool], bool] | None" = None,
        vacation_periods: "tuple[int, int, int]" = (7 * 86400, 86400, 0),
        trace: "Callable[[int, str], None] | None" = None, max_cpu_time: float = MAX_CPU_TIME,
        result: "Result | None" = None, spam: "SpamConfig | None" = None) -> "Result":
    """Run the script; SieveRuntimeError when it breaks a limit (the caller keeps the message).
    `environment` answers the environment test (RFC 5183); `mailbox_exists` the mailboxexists
    test (RFC 5490), by default only the INBOX exists; `special_use` the folder that has a
    special-use flag (RFC 8579), None when none has it (the default); `duplicate(key, seconds,
    last)` answers RFC 7352's test (by default nothing was seen); `vacation_periods` (default,
    least, most seconds; 0: no most) bound a vacation's period, as Pigeonhole's settings;
    `trace` hears (line, what happened) for
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
    machine.special_use = special_use if special_use is not None else _no_special_use
    machine.duplicate = duplicate if duplicate is not None else _never_seen
    machine.vacation_periods = vacation_periods
    machine.includes = compiled.includes
    machine.max_cpu_time = max_cpu_time
    machine.deadline = time.process_time() + max_cpu_time
    if compiled.includes or "include" in compiled.extensions:
        machine.variables = variables.Scope({})
    machine.spam = spam
    try:
        machine.block(compiled.commands)
    except (Stop, Return):
        pass
    if machine.result.implicit_keep:
        machine.result.implicit_flags = variables.flags_of(machine.variables.get(variables.FLAGS, ""))
    if message.edits is not None and message.edits.changed:
        machine.result.header = message.edits.header()
    return machine.result


def run_sequence(scripts: "list[Compiled]", message: "Message", envelope: "Envelope", **options: object) -> "Result":
    """Run scripts one after another on one result, by Pigeonhole's rule for sieve_before and
    sieve_after: the next script runs only when the one before ended with a keep in effect,
    implicit or explicit; a keep of a script that is not the last to run only means "go on"
    (it stores nothing).  `options` are run()'s.  A SieveRuntimeError says in `.script`
    which script (its index) failed."""
    result: "Result | None" = None
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
    def __init__(self, message: "Message", envelope: "Envelope", max_actions: int, max_redirects: int,
                 expand: bool) -> None:
        self.message = message
        self.envelope = envelope
        self.max_actions = max_actions
        self.max_redirects = max_redirects
        self.result = Result()
        self.expand = expand  # "variables" was required: ${...} in strings are replaced
        self.variables: "MutableMapping[str, str]" = {}
        self.match_vars: list[str] = []
        self.includes: "dict[tuple[str, str], Compiled]" = {}
        self.once: set[tuple[str, str]] = set()
        self.rejected = False  # a reject or ereject action is in the result (RFC 5429)
        self.address_memo: dict[str, list[headers.Address]] = {}  # an address list is parsed once
        self.steps = 0
        self.deadline = 0.0
        self.max_cpu_time = MAX_CPU_TIME
        self.environment: dict[str, str] = {}
        self.mailbox_exists: "Callable[[str], bool]" = _inbox_only
        self.special_use: "Callable[[str], str | None]" = _no_special_use
        self.duplicate: "Callable[[str, int | None, bool], bool]" = _never_seen
        self.vacation_periods = (7 * 86400, 86400, 0)  # vacation: default, least, most (0: none)
        self.trace: "Callable[[int, str], None] | None" = None
        self.loop_parts: list[int] = []  # foreverypart: the current part of each loop, innermost last
        self.part_visits = 0
        self.spam: "SpamConfig | None" = None  # None: the defaults, built when a spamtest runs

    def s(self, value: object) -> str:
        """One string argument, its variables expanded."""
        text = str(value)
        return variables.expand(text, self.variables, self.match_vars) if self.expand and "${" in text else text

    def sl(self, value: object) -> list[str]:
        return [self.s(v) for v in _strings(value)]

    def flags(self, node: "Node") -> tuple[str, ...]:
        if "flags" in node.tags:
            return variables.flags_of(" ".join(self.sl(node.tags["flags"])))
        return variables.flags_of(self.variables.get(variables.FLAGS, ""))

    # -- commands ------------------------------------------------------------------------------

    def block(self, nodes: "tuple[Node, ...]") -> None:
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

    def command(self, node: "Node") -> None:
        name = node.name
        self._tick(node.line)
        if self.trace is not None:
            from vdeliver.sieve.extensions import describe

            self.trace(node.line, describe(node, self))
        if name == "stop":
            raise Stop
        if name == "keep":
            self._add(Action("keep", flags=self.flags(node), line=node.line), cancels=True)
        elif name == "discard":
            self._add(Action("discard", line=node.line), cancels=True)
        elif name == "fileinto":
            copy = bool(node.tags.get("copy"))
            self._add(Action("fileinto", mailbox=self.s(node.args[0]), copy=copy, flags=self.flags(node),
                             create=bool(node.tags.get("create")), line=node.line,
                             specialuse=self.s(node.tags["specialuse"]) if "specialuse" in node.tags else ""),
                      cancels=not copy)
        elif name == "set":
            value = variables.modify(self.s(node.args[1]), node.tags)
            self.variables[self.s(node.args[0]).lower()] = variables.limit(value)
        elif name in ("setflag", "addflag", "removeflag"):
            target = variables.FLAGS if node.args[0] is None else self.s(node.args[0]).lower()
            current = self.variables.get(target, "")
            self.variables[target] = variables.change_flags(name, current, self.sl(node.args[1]))
        elif name == "redirect":
            copy = bool(node.tags.get("copy"))
            address, why = headers.redirect_address(self.s(node.args[0]))
            if why:
                raise SieveRuntimeError(node.line, f"redirect address '{self.s(node.args[0])}' is invalid: {why}")
            if sum(a.type == "redirect" for a in self.result.actions) >= self.max_redirects:
                raise SieveRuntimeError(node.line, f"more than {self.max_redirects} redirects")
            self._add(Action("redirect", address=address, copy=copy, line=node.line), cancels=not copy)
        else:  # include, foreverypart and the others of extensions.py
            from vdeliver.sieve import extensions

            extensions.command(self, node)

    def action(self, type: str, **fields: object) -> "Action":
        """A new Action (for extensions.py, which cannot import this module)."""
        return Action(type, **fields)  # type: ignore[arg-type]

    def vacation_record(self, from_: str, subject: str, seconds: int, handle: str, mime: bool,
                        addresses: tuple[str, ...], node: "Node | None" = None) -> "Vacation":
        fcc = None
        if node is not None and "fcc" in node.tags:
            fcc = Fcc(self.s(node.tags["fcc"]), bool(node.tags.get("create")),
                      self.flags(node) if "flags" in node.tags else (),
                      self.s(node.tags["specialuse"]) if "specialuse" in node.tags else "")
        return Vacation(from_, subject, seconds, handle, mime, addresses, fcc)

    def _add(self, action: "Action", cancels: bool) -> None:
        if action.type in ("keep", "fileinto", "redirect", "vacation") and self.rejected:
            from vdeliver.sieve.extensions import reject_conflict

            reject_conflict(self, action)
        if cancels:
            self.result.implicit_keep = False
        if action in self.result.actions:
            return  # the same action twice is one
        if len(self.result.actions) >= self.max_actions:
            raise SieveRuntimeError(action.line, f"more than {self.max_actions} actions")
        self.result.actions.append(action)

    # -- tests --------------------------------------------------------------------------------------

    def test(self, node: "Node") -> bool:
        self._tick(node.line)
        result = self._test(node)
        if self.trace is not None and node.name not in ("not", "allof", "anyof", "true", "false"):
            from vdeliver.sieve.extensions import describe

            self.trace(node.line, f"{describe(node, self)}: {'true' if result else 'false'}")
        return result

    def _test(self, node: "Node") -> bool:
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
                     for v in self._fields(node, h, decode=False) for a in self._addresses(v)]
            return self._match(node, [p for p in parts if p is not None], self.sl(node.args[1]))
        if name == "envelope":
            parts = []
            for which in self.sl(node.args[0]):
                raw = {"from": self.envelope.sender, "to": self.envelope.recipient}.get(which.lower())
                if raw is not None:
                    parts.append(self._part(node, headers.envelope_address(raw)))
            return self._match(node, [p for p in parts if p is not None], self.sl(node.args[1]))
        from vdeliver.sieve import extensions  # date, body, spamtest and the others

        return extensions.test(self, node)

    def _addresses(self, value: str) -> "list[headers.Address]":
        found = self.address_memo.get(value)
        if found is None:
            found = self.address_memo[value] = headers.addresses(value)
        return found

    def _mime_parts(self, node: "Node") -> "list[Part] | None":
        from vdeliver.sieve import extensions

        return extensions.mime_parts(self, node)

    def _fields(self, node: "Node", name: str, *, decode: bool = True) -> list[str]:
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

    def _part(self, node: "Node", address: headers.Address) -> str | None:
        for part in ("localpart", "domain", "user", "detail"):
            if part in node.tags:
                return address.part(part)
        return address.part("all")

    def _match(self, node: "Node", values: list[str], keys: list[str]) -> bool:
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


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]
