"""The commands and tests of the extensions a script uses less often: include (RFC 6609),
foreverypart / break / extracttext and :mime (RFC 5703), date and currentdate (RFC 5260),
body (RFC 5173), environment (RFC 5183), mailboxexists (RFC 5490), ihave / error (RFC 5463),
spamtest / virustest (RFC 5235), addheader / deleteheader (RFC 5293, editheader), and the
trace of `sieve-test --trace`.

The interpreter imports this module only when a script runs one of them: a delivery with a
webmail's filter of headers, addresses and folders does not pay for loading it.

About 650 lines on purpose: it is the one module loaded lazily for the rarer extensions;
splitting it would add an import to every script that uses two of them.
"""

from vdeliver.sieve import headers, variables
from vdeliver.sieve.errors import Break, Return, SieveError, SieveRuntimeError

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.sieve.compiled import Node
    from vdeliver.sieve.interpreter import Action, Message, _Machine
    from vdeliver.sieve.mime import Part


MAX_PART_VISITS = 100_000  # foreverypart iterations and parts read by :anychild, per run (RFC 5703)


def command(m: "_Machine", node: "Node") -> None:
    name = node.name
    if name == "return":
        raise Return
    if name == "include":
        include(m, node)
    elif name == "global":
        if isinstance(m.variables, variables.Scope):
            m.variables.declare(m.sl(node.args[0]))
    elif name == "foreverypart":
        foreverypart(m, node)
    elif name == "break":
        raise Break(str(node.tags["name"]) if "name" in node.tags else None)
    elif name == "extracttext":
        from vdeliver.sieve import mime

        text = mime.text(m.message.parts()[m.loop_parts[-1]])
        if "first" in node.tags:
            text = text[:int(str(node.tags["first"]))]
        m.variables[m.s(node.args[0]).lower()] = variables.limit(variables.modify(text, node.tags))
    elif name in ("reject", "ereject"):  # RFC 5429
        for done in m.result.actions:
            if done.type in ("reject", "ereject"):
                raise SieveRuntimeError(node.line, "duplicate reject/ereject action not allowed (the first is on "
                                                   f"line {done.line})")
        action = m.action(name, reason=m.s(node.args[0]), line=node.line)
        for done in m.result.actions:
            reject_conflict(m, done, action)
        m.rejected = True
        m._add(action, cancels=True)
    elif name == "vacation":  # RFC 5230, 6131
        vacation(m, node)
    elif name == "notify":  # RFC 5435, 5436
        notify_command(m, node)
    elif name == "error":
        raise SieveRuntimeError(node.line, f"error: {m.s(node.args[0])}")
    elif name == "addheader":
        addheader(m, node)
    elif name == "deleteheader":
        deleteheader(m, node)
    else:
        raise SieveRuntimeError(node.line, f"command '{name}' cannot run")  # the validator lets none through


def test(m: "_Machine", node: "Node") -> bool:
    name = node.name
    if name == "environment":
        value = m.environment.get(m.s(node.args[0]).lower())
        return value is not None and m._match(node, [value], m.sl(node.args[1]))
    if name == "mailboxexists":
        return all(m.mailbox_exists(box) for box in m.sl(node.args[0]))
    if name == "duplicate":  # RFC 7352
        return duplicate(m, node)
    if name == "valid_notify_method":  # RFC 5435 5.1
        from vdeliver.sieve import notify

        try:
            return all(bool(notify.parse(uri)) for uri in m.sl(node.args[0]))
        except ValueError:
            return False
    if name == "notify_method_capability":  # RFC 5435 5.2, RFC 5436 2.2: mailto is "maybe" online
        from vdeliver.sieve import notify

        uri, capability = m.s(node.args[0]), m.s(node.args[1]).lower()
        if notify.scheme(uri) != "mailto" or capability != "online":
            return False
        return m._match(node, ["maybe"], m.sl(node.args[2]))
    if name == "specialuse_exists":  # RFC 8579 section 4
        flags = m.sl(node.args[1])
        if node.args[0] is None:
            return all(m.special_use(flag) is not None for flag in flags)
        box = m.s(node.args[0])
        return m.mailbox_exists(box) and all(_same_mailbox(m.special_use(flag), box) for flag in flags)
    if name in ("date", "currentdate"):
        return date(m, node)
    if name == "body":
        from vdeliver.sieve import body

        transform = "raw" if "raw" in node.tags else "content" if "content" in node.tags else "text"
        types = m.sl(node.tags["content"]) if transform == "content" else ["text"]
        return m._match(node, body.values(m.message.raw, transform, types), m.sl(node.args[0]))
    if name == "ihave":
        from vdeliver.sieve.validator import EXTENSIONS, unusable

        return all(n in EXTENSIONS and unusable(n) is None for n in m.sl(node.args[0]))
    if name in ("spamtest", "virustest"):
        from vdeliver.sieve import spamtest

        first = lambda h: next(iter(m.message.values(h)), None)  # noqa: E731
        spam = m.spam if m.spam is not None else spamtest.SpamConfig()
        config = spam.spamtest if name == "spamtest" else spam.virustest
        try:
            value, tested = spamtest.value(config, first, name, "percent" in node.tags)
        except SieveError as exc:
            raise SieveRuntimeError(node.line, exc.message) from None
        counted = [value] if tested or "count" not in node.tags else []  # RFC 5235 3.1
        return m._match(node, counted, m.sl(node.args[0]))
    raise SieveRuntimeError(node.line, f"test '{name}' cannot run")  # the validator lets none through


def reject_conflict(m: "_Machine", action: "Action", reject: "Action | None" = None) -> None:
    """RFC 5429 section 2.1: reject and ereject cannot stand beside an action that delivers
    the message (keep, fileinto, redirect, with or without :copy) or that answers the sender
    (vacation).  The error is on the reject's line, as Pigeonhole reports it."""
    if reject is None:
        reject = next(a for a in m.result.actions if a.type in ("reject", "ereject"))
    if action.type in ("keep", "fileinto", "redirect"):
        what = "store" if action.type != "redirect" else "redirect"
        raise SieveRuntimeError(reject.line, f"reject/ereject action conflicts with other action: the {what} action "
                                             f"(line {action.line}) tries to deliver the message")
    if action.type == "vacation":
        raise SieveRuntimeError(reject.line, "reject/ereject action conflicts with other action: the vacation "
                                             f"action (line {action.line}) also sends a response to the sender")


def notify_command(m: "_Machine", node: "Node") -> None:
    """The notify action (sent after the message is stored, respond.py).  Its details ride in
    the action's `vacation` record: from, importance (as `seconds`), options (as `addresses`)."""
    from vdeliver.sieve import notify

    uri = m.s(node.args[0])
    try:
        notify.parse(uri)
    except ValueError as exc:
        raise SieveRuntimeError(node.line, f"notify: {exc}") from None
    importance = m.s(node.tags["importance"]) if "importance" in node.tags else "2"
    if importance not in ("1", "2", "3"):
        raise SieveRuntimeError(node.line, f"invalid :importance value for notify command: {importance}")
    from_ = m.s(node.tags["from"]) if "from" in node.tags else ""
    message = m.s(node.tags["message"]) if "message" in node.tags else ""
    options = tuple(m.sl(node.tags["options"])) if "options" in node.tags else ()
    record = m.vacation_record(from_, "", int(importance), "", False, options, node)
    m._add(m.action("notify", address=uri, reason=message, line=node.line, vacation=record), cancels=False)


def vacation(m: "_Machine", node: "Node") -> None:
    """The vacation action: what the reply is made of.  Whether one is sent (RFC 5230's rules,
    once per sender and handle per period) is decided at delivery (vacation.py)."""
    for done in m.result.actions:
        if done.type == "vacation":
            raise SieveRuntimeError(node.line, f"duplicate vacation action not allowed (the first is on line "
                                               f"{done.line})")
    default, least, most = m.vacation_periods
    if "days" in node.tags or "seconds" in node.tags:
        seconds = int(str(node.tags["days"])) * 86400 if "days" in node.tags else int(str(node.tags["seconds"]))
        seconds = max(seconds, least)
        if most:
            seconds = min(seconds, most)
    else:
        seconds = default
    reason = m.s(node.args[0])
    subject = m.s(node.tags["subject"]) if "subject" in node.tags else ""
    from_ = m.s(node.tags["from"]) if "from" in node.tags else ""
    mime = "mime" in node.tags
    if "handle" in node.tags:
        handle = m.s(node.tags["handle"])
    else:  # as Pigeonhole makes it, from the script's text (variables not expanded): a changed reply
        # is a new one, answered again
        raw_subject = str(node.tags["subject"]) if "subject" in node.tags else "<default-subject>"
        raw_from = str(node.tags["from"]) if "from" in node.tags else "<default-from>"
        handle = str(node.args[0]) + raw_subject + raw_from + ("<MIME>" if mime else "<NO-MIME>")
    if from_:
        from vdeliver.sieve.headers import redirect_address

        if redirect_address(from_)[1]:
            raise SieveRuntimeError(node.line, f"specified :from address '{from_}' is invalid for vacation action")
    addresses = tuple(a for a in m.sl(node.tags["addresses"]) if a) if "addresses" in node.tags else ()
    action = m.action("vacation", address=m.envelope.sender, reason=reason, line=node.line,
                      vacation=m.vacation_record(from_, subject, seconds, handle, mime, addresses, node))
    m._add(action, cancels=False)


def duplicate(m: "_Machine", node: "Node") -> bool:
    """RFC 7352: whether a message with this ID (its Message-ID, the field :header names, or
    :uniqueid) was seen within the period; the ID is recorded once the delivery succeeds (the
    caller's `m.duplicate`).  No ID (no such field): false, nothing recorded."""
    if "uniqueid" in node.tags:
        unique = m.s(node.tags["uniqueid"])
    else:
        field = m.s(node.tags["header"]) if "header" in node.tags else "message-id"
        values = m.message.values(field)
        unique = values[0].strip() if values else ""
    if not unique:
        return False
    handle = m.s(node.tags["handle"]) if "handle" in node.tags else ""
    seconds = node.tags.get("seconds")
    return m.duplicate(f"{handle}\x1f{unique}", int(seconds) if isinstance(seconds, int) else None,
                       "last" in node.tags)


def _same_mailbox(found: "str | None", name: str) -> bool:
    if found is None:
        return False
    return found.upper() == "INBOX" == name.upper() or found == name


def include(m: "_Machine", node: "Node") -> None:
    key = ("global" if "global" in node.tags else "personal", str(node.args[0]))
    compiled = m.includes.get(key)
    if compiled is None:
        return  # :optional, and there is no such script
    if "once" in node.tags and key in m.once:
        return
    m.once.add(key)
    saved = (m.variables, m.expand, m.match_vars)
    shared = m.variables.shared if isinstance(m.variables, variables.Scope) else {}
    m.variables, m.expand, m.match_vars = (variables.Scope(shared), "variables" in compiled.extensions,
                                                    [])
    try:
        m.block(compiled.commands)
    except Return:
        pass
    finally:
        m.variables, m.expand, m.match_vars = saved


def foreverypart(m: "_Machine", node: "Node") -> None:
    """RFC 5703 section 3: the block once per part, the message itself first; a loop inside
    another visits the parts below the outer loop's current part."""
    parts = m.message.parts()
    first, end = (m.loop_parts[-1] + 1, parts[m.loop_parts[-1]].end) if m.loop_parts else (0, len(parts))
    for index in range(first, end):
        visit(m, node.line, 1)
        m.loop_parts.append(index)
        try:
            m.block(node.block or ())
        except Break as exc:
            if exc.name is None or exc.name == node.tags.get("name"):
                return
            raise
        finally:
            m.loop_parts.pop()


def visit(m: "_Machine", line: int, count: int) -> None:
    m.part_visits += count
    if m.part_visits > MAX_PART_VISITS:
        raise SieveRuntimeError(line, f"MIME parts visited more than {MAX_PART_VISITS} times")


def mime_parts(m: "_Machine", node: "Node") -> "list[Part] | None":
    """The parts a :mime test reads: the current part of the innermost loop, and with
    :anychild every part below it too; None for the message's own header (outside a loop,
    without :anychild)."""
    if not m.loop_parts and "anychild" not in node.tags:
        return None
    parts = m.message.parts()
    index = m.loop_parts[-1] if m.loop_parts else 0
    scope = parts[index:parts[index].end] if "anychild" in node.tags else parts[index:index + 1]
    visit(m, node.line, len(scope))
    return scope


def date(m: "_Machine", node: "Node") -> bool:
    from vdeliver.sieve import dates

    zone = m.s(node.tags["zone"]) if "zone" in node.tags else None
    if zone is not None and not dates.valid_zone(zone):
        zone = None  # not a zone: ignored (the local zone), as Pigeonhole does with a warning
    date_part = m.s(node.args[-2]).lower()
    if date_part not in dates.PARTS:
        return False
    if node.name == "currentdate":
        moments = [dates.now()]
    else:
        # The whole field is the date (as Pigeonhole reads it: no date out of Received lines).
        moments = [t for v in m._fields(node, m.s(node.args[0])) if (t := dates.parse_header(v))]
    values = [dates.part(dates.in_zone(t, zone, "originalzone" in node.tags), date_part) for t in moments]
    return m._match(node, values, m.sl(node.args[-1]))


def describe(node: "Node", machine: "_Machine") -> str:
    """A command or test as the trace shows it: its name, tags and arguments, expanded."""
    words = [node.name]
    for tag, value in node.tags.items():
        words.append(f":{tag}" if value is True else f":{tag} {_show(value, machine)}")
    words += [_show(a, machine) for a in node.args if a is not None]
    return " ".join(words)


def _show(value: object, machine: "_Machine") -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f'"{machine.s(v)}"' for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return f'"{machine.s(value)}"'


# -- editheader (RFC 5293) ------------------------------------------------------------------------

# Pigeonhole's defaults: these may not be deleted, and X-Sieve-Redirected-From not added either
# (an attempt is ignored, as Pigeonhole ignores it with a warning); Subject always may be.
PROTECTED_DELETE = frozenset({"received", "auto-submitted", "x-sieve-redirected-from"})
PROTECTED_ADD = frozenset({"x-sieve-redirected-from"})
_FOLD_AT = 80  # Pigeonhole folds an added field at the last blank before this many characters
_MIME_LINE = 76 - len("=?utf-8?q??=")  # room for an encoded word's text on a line
_LWSP = b" \t\n"


class Edits:
    """The header of a message being edited: per field its lower-case name, its value as
    Message.fields holds it, its bytes as they are to be stored (LF line ends; an untouched
    field exactly as it came), and for an added field the text the tests see (None: decoded
    from the value as for any field)."""

    __slots__ = ("entries", "prefix", "crlf", "changed")

    def __init__(self, message: "Message") -> None:
        self.changed = False  # a field was added or deleted
        self.entries: list[tuple[str, bytes, bytes, str | None]] = []
        self.prefix = b""  # lines before the first field that are not fields (kept as they came)
        from vdeliver.sieve.headers import header_end

        data = message.raw
        head = data[:header_end(data)]
        self.crlf = b"\r\n" in head
        if not message.fields or not head:
            for name, value in message.fields:  # a Message built without its bytes
                raw = name.title().encode("ascii", "replace") + b": " + value.replace(b"\r\n", b"\n") + b"\n"
                self.entries.append((name, value, raw, None))
            return
        # The same reading as Message.from_bytes, keeping each field's bytes.
        for line in head.replace(b"\r\n", b"\n").split(b"\n"):
            if line[:1] in (b" ", b"\t") and self.entries:
                name, value, raw, _ = self.entries[-1]
                self.entries[-1] = (name, value + b"\r\n" + line, raw + line + b"\n", None)
            elif b":" in line:
                raw_name, _, value = line.partition(b":")
                self.entries.append((raw_name.strip().decode("ascii", "replace").lower(), value.lstrip(b" \t"),
                                     line + b"\n", None))
            elif self.entries:  # not a field: kept with the field before it
                name, value, raw, text = self.entries[-1]
                self.entries[-1] = (name, value, raw + line + b"\n", text)
            else:
                self.prefix += line + b"\n"

    def values(self, name: str, decode: bool) -> list[str]:
        convert = headers.decode_value if decode else headers.unfold
        return [convert(value) if text is None else text for n, value, _, text in self.entries if n == name]

    def header(self) -> bytes:
        return self.prefix + b"".join(raw for _, _, raw, _ in self.entries)

    def size(self, raw: bytes) -> int:
        """What a field's bytes count in the message's size (its line ends as the message has them)."""
        return len(raw) + raw.count(b"\n") if self.crlf else len(raw)


def _editing(m: "_Machine") -> "Edits":
    message = m.message
    if message.edits is None:
        message.edits = Edits(message)
    return message.edits


def _changed(m: "_Machine", edits: "Edits") -> None:
    edits.changed = True
    m.message.fields = [(name, value) for name, value, _, _ in edits.entries]
    m.message._memo.clear()
    m.address_memo.clear()


def addheader(m: "_Machine", node: "Node") -> None:
    name, value = m.s(node.args[0]), m.s(node.args[1])
    why = headers.field_name_error(name)
    if why:
        raise SieveRuntimeError(node.line, f"addheader action: specified field name '{name[:80]}' is {why}")
    if name.lower() in PROTECTED_ADD:
        return  # Pigeonhole: "modification denied", a warning
    if headers.value_too_large(value):
        size = len(value.encode("utf-8", "surrogatepass"))
        raise SieveRuntimeError(node.line, f"addheader action: specified header value '{value[:80]}' is too large "
                                           f"({size} bytes)")
    raw = field_bytes(name, value)
    cut = raw.index(b":") + 1
    entry = (name.lower(), raw[cut:-1].lstrip(b" \t").replace(b"\n", b"\r\n"), raw, test_text(value))
    edits = _editing(m)
    if "last" in node.tags:
        edits.entries.append(entry)
    else:
        edits.entries.insert(0, entry)
    m.message.size += edits.size(raw)
    _changed(m, edits)


def deleteheader(m: "_Machine", node: "Node") -> None:
    name = m.s(node.args[0])
    why = headers.field_name_error(name)
    if why:
        raise SieveRuntimeError(node.line, f"deleteheader action: specified field name '{name[:80]}' is {why}")
    lower = name.lower()
    if lower in PROTECTED_DELETE:
        return  # Pigeonhole: "deleting ... is forbidden; modification denied", a warning
    patterns = m.sl(node.args[1]) if len(node.args) > 1 and node.args[1] is not None else None
    index = node.tags.get("index")
    index = index if isinstance(index, int) else 0  # 0: every field of that name (as Pigeonhole)
    edits = m.message.edits
    entries = edits.entries if edits is not None else None
    if entries is None:
        if not any(n == lower for n, _ in m.message.fields):
            return
        edits = _editing(m)
        entries = edits.entries
    assert edits is not None
    positions = [i for i, entry in enumerate(entries) if entry[0] == lower]
    if "last" in node.tags:
        positions.reverse()
    doomed: list[int] = []
    for pos, i in enumerate(positions, 1):
        if index and pos != index:
            continue
        if patterns is not None:
            entry = entries[i]
            text = headers.decode_value(entry[1]) if entry[3] is None else entry[3]
            if not m._match(node, [text], patterns):
                continue
        doomed.append(i)
    if not doomed:
        return
    for i in sorted(doomed, reverse=True):
        m.message.size -= edits.size(entries[i][2])
        del entries[i]
    _changed(m, edits)


def test_text(value: str) -> str:
    """What header tests see of an added field: the value unfolded (a line break before a blank
    goes; one before anything else becomes a tab, as the stored field unfolds), CRs dropped,
    trailing blanks trimmed (as Pigeonhole reads it; leading blanks stay)."""
    if "\r" in value or "\n" in value:
        value = value.replace("\r", "")
        lines = value.split("\n")
        value = lines[0] + "".join(line if line[:1] in (" ", "\t") else "\t" + line for line in lines[1:])
    return value.rstrip(" \t")


def field_bytes(name: str, value: str) -> bytes:
    """An added field as it is stored: `Name: value\n`, the name in Pigeonhole's case
    (x-my-field -> X-My-Field), the value RFC 2047-encoded where it is not printable ASCII
    and folded (with a tab) at the last blank before 80 characters, as Pigeonhole writes it."""
    return _fold(_sanitize_name(name).encode("ascii"), encode_value(value.encode("utf-8", "surrogatepass")))


def _sanitize_name(name: str) -> str:
    out = []
    upper = True
    for c in name.lower():
        out.append(c.upper() if upper else c)
        upper = c == "-"
    return "".join(out)


def _needs_encoding(data: bytes, i: int) -> bool:
    c = data[i]
    if c == 13:  # CR: only as part of CRLF
        if i + 1 == len(data) or data[i + 1] != 10:
            return True
        i += 1
        c = 10
    if c == 10:  # LF: only as folding (followed by a blank), and not at the end
        return i + 1 == len(data) or data[i + 1] not in (9, 32)
    if c == 9:
        return False
    if c == 61:  # "=?" at the start of a word would read as an encoded word
        return (i == 0 or data[i - 1] in _LWSP) and data[i:i + 2] == b"=?"
    return c >= 0x80 or c < 32


def encode_value(data: bytes) -> bytes:
    """RFC 2047: the words from the first to the last that need it become encoded words
    (utf-8, Q or B whichever is shorter), line by line; as Dovecot encodes a header value."""
    n = len(data)
    i = next((k for k in range(n) if _needs_encoding(data, k)), n)
    if i == n:
        return data
    if data[i] not in (10, 13):
        while i > 0 and data[i - 1] not in _LWSP:
            i -= 1
    out = bytearray(data[:i])
    first_line_len = j = i
    while j > 0 and data[j - 1] != 10:
        j -= 1
    if j:
        first_line_len = j  # (sic: as Dovecot counts it)
    rest = data[i:]
    newline = rest.find(b"\n")
    tail = b""
    if newline >= 0:
        cut = newline - 1 if newline > 0 and rest[newline - 1] == 13 else newline
        rest, tail = rest[:cut], rest[cut:]
    last = count = 0
    for k in range(len(rest)):
        if _needs_encoding(rest, k):
            last = k + 1
            count += 1
    while last < len(rest) and rest[last] not in _LWSP:
        last += 1
    if last:
        base64_len = (last + 2) // 3 * 4
        if (last + count * 3) * 2 // 3 <= base64_len:
            out += _encode_q(rest[:last], first_line_len)
        else:
            out += _encode_b(rest[:last], first_line_len)
    out += rest[last:]
    if tail:
        k = 1 if tail[0] == 13 else 0
        k += 1  # the LF
        if k == len(tail):
            return bytes(out)  # a line break at the end goes
        out += tail[:k]
        if tail[k] in (9, 32):
            out.append(tail[k])
            k += 1
        else:
            out += b"\t"  # a line break must be followed by a blank
        out += encode_value(tail[k:])
    return bytes(out)


def _encode_q(data: bytes, first_line_len: int) -> bytes:
    left = _MIME_LINE
    out = bytearray()
    if first_line_len >= _MIME_LINE - 3:
        out += b"\n\t"
        left -= 1
    else:
        left -= first_line_len
    out += b"=?utf-8?q?"
    i = 0
    while i < len(data):
        c = data[i]
        plain = c != 61 and c not in b"?_" and 32 <= c < 0x80
        if left < (1 if plain else 3):  # the next character does not fit: a new encoded word
            while i > 0 and data[i] & 0xC0 == 0x80:  # not in the middle of a character
                del out[-3:]
                i -= 1
            out += b"?=\n\t=?utf-8?q?"
            left = _MIME_LINE - 1
            c = data[i]
            plain = c != 61 and c not in b"?_" and 32 <= c < 0x80
        if plain:
            out += b"_" if c == 32 else bytes((c,))
            left -= 1
        else:
            out += b"=%02X" % c
            left -= 3
        i += 1
    return bytes(out + b"?=")


def _encode_b(data: bytes, first_line_len: int) -> bytes:
    import binascii

    out = bytearray()
    line_len = first_line_len
    if line_len >= _MIME_LINE:
        out += b"\n\t"
        line_len = 1
    while True:
        left = _MIME_LINE - line_len
        most = left // 4 * 3
        while True:  # as many whole characters as fit
            if most >= len(data):
                most = len(data)
            else:
                while most > 0 and data[most] & 0xC0 == 0x80:
                    most -= 1
            if (most + 2) // 3 * 4 <= left or most == 0:
                break
            most -= 1
        if most > 0:
            out += b"=?utf-8?b?" + binascii.b2a_base64(data[:most], newline=False) + b"?="
        data = data[most:]
        if not data:
            return bytes(out)
        out += b"\n\t"
        line_len = 1


def _fold(name: bytes, body: bytes) -> bytes:
    """`Name: body\n`, folded: a line is broken at its last blank once it reaches 80
    characters, and every line break in the body is kept, with a tab after it."""
    out = bytearray(name + b": ")
    line_len = len(name) + 2
    n = len(body)
    bp = sp = 0
    lines = 0
    while bp < n:
        blank: int | None = None  # where the last run of blanks on this line starts
        newline: int | None = None
        first = True
        while bp < n and (blank is None or line_len < _FOLD_AT):
            c = body[bp]
            if c in (32, 9):
                if first:
                    blank = bp
                first = False
            elif c in (10, 13):
                newline = bp if first or blank is None else blank
                break
            else:
                first = True
            bp += 1
            line_len += 1
        if bp >= n:
            break
        if newline is not None:
            while bp < n and body[bp] in b" \t\r\n":
                bp += 1
            out += body[sp:newline] + b"\n"
            if bp < n:
                out += b"\t"
            sp = bp
        else:
            assert blank is not None
            out += body[sp:blank]
            while blank < n and body[blank] in (32, 9):
                blank += 1
            if blank >= n:  # only blanks left: the line ends here (Pigeonhole would leave "\n\t")
                sp = bp = n
                break
            out += b"\n\t"
            sp = blank
            bp = max(bp, sp)
        lines += 1
        line_len = bp - sp
    if bp != sp or lines == 0:
        out += body[sp:bp] + b"\n"
    elif not out.endswith(b"\n"):
        out += b"\n"
    return bytes(out)
