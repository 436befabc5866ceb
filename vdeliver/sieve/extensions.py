"""The commands and tests of the extensions a script uses less often: include (RFC 6609),
foreverypart / break / extracttext and :mime (RFC 5703), date and currentdate (RFC 5260),
body (RFC 5173), environment (RFC 5183), mailboxexists (RFC 5490), ihave / error (RFC 5463),
spamtest / virustest (RFC 5235), and the trace of `sieve-test --trace`.

The interpreter imports this module only when a script runs one of them: a delivery with a
webmail's filter of headers, addresses and folders does not pay for loading it.
"""

from vdeliver.sieve import variables
from vdeliver.sieve.errors import Break, Return, SieveError, SieveRuntimeError

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.sieve.compiled import Node
    from vdeliver.sieve.interpreter import _Machine
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
    elif name == "error":
        raise SieveRuntimeError(node.line, f"error: {m.s(node.args[0])}")
    else:
        raise SieveRuntimeError(node.line, f"command '{name}' cannot run")  # the validator lets none through


def test(m: "_Machine", node: "Node") -> bool:
    name = node.name
    if name == "environment":
        value = m.environment.get(m.s(node.args[0]).lower())
        return value is not None and m._match(node, [value], m.sl(node.args[1]))
    if name == "mailboxexists":
        return all(m.mailbox_exists(box) for box in m.sl(node.args[0]))
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
