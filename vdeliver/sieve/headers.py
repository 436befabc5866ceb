"""What Sieve's header, address and envelope tests see of a message.

- A header value is unfolded (a line break before a blank goes), trimmed, taken as UTF-8
  (bytes that are not become U+FFFD) and its RFC 2047 encoded words decoded; a word in an
  unknown charset or a broken encoding stays as it was written.  Never raises.  Bytes that
  are not valid in a known charset become U+FFFD, as Pigeonhole's do, and so do lone
  surrogates (UTF-7 can encode them): the text is always valid Unicode.  Pigeonhole differs
  on the rest: it decodes an unknown charset's bytes as UTF-8 and keeps what base64 it can
  read, where we keep the word as written.
- An address list (RFC 5322 section 3.4) is read as the address test reads it: comments
  dropped, display names and groups skipped down to their mailboxes, quoted local parts
  unquoted, an obsolete route (`<@relay:user@domain>`) dropped.  Garbage gives what could
  be read, never an exception; an unparsable entry, or one without a domain
  (`MAILER-DAEMON`), is taken whole as a local part and marked not valid: RFC 5228 section
  5.1 and Pigeonhole match it only with `:all`, never with `:localpart`, `:domain`, `:user`
  or `:detail`.  An empty group (`undisclosed-recipients:;`) has no addresses (Pigeonhole
  instead gives the whole value, invalid, to `:all`).  `:all` quotes a local part that is not
  a dot-atom (`"john doe"@example.org`), as Pigeonhole prints it.
- Parse addresses from `unfold()`, not `decode_value()`: a display name such as
  `=?utf-8?Q?Doe=2C_John?=` decodes to a comma that would split the list.
- Subaddresses (RFC 5233): `user+detail`, with "+" as the separator.

Standard library only, imported when a script runs.
"""


TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    import re

SEPARATOR = "+"
# Codecs Python has that are not MIME charsets: they read backslash escapes or domain names.
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "punycode", "idna"})
_NOT_ATEXT = frozenset('()<>[]:;@\\,."') | {chr(c) for c in range(33)} | {"\x7f"}
# `re` is imported only where a value needs it (an encoded word): importing it costs more than
# a 30-rule script takes to run.
_ENCODED = r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?="
_BETWEEN_WORDS = r"(\?=)\s+(=\?)"
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def _dot_atom(text: str) -> bool:
    """RFC 5322's dot-atom: atoms of atext (any character but specials, blanks and controls)
    joined by single dots."""
    return all(atom and not any(c in _NOT_ATEXT or c.isspace() for c in atom) for atom in text.split("."))


class Address:
    __slots__ = ("localpart", "domain", "valid")

    def __init__(self, localpart: str, domain: str, valid: bool = True) -> None:
        self.localpart = localpart
        self.domain = domain  # "" when the address has none
        self.valid = valid  # False: only :all sees it (no domain, or not an address at all)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and (self.localpart, self.domain, self.valid) == (
            other.localpart, other.domain, other.valid)

    def __hash__(self) -> int:
        return hash((self.localpart, self.domain, self.valid))

    def __repr__(self) -> str:
        return f"Address(localpart={self.localpart!r}, domain={self.domain!r}, valid={self.valid})"

    def part(self, name: str, separator: str = SEPARATOR) -> str | None:
        """The address part a test asked for; None when there is no such part (RFC 5233: a
        :detail of an address without a separator matches nothing; RFC 5228 section 5.1: an
        address that is not valid has only :all).  The null address `<>` is "" whatever the
        part (RFC 5228 section 5.4)."""
        if not self.localpart and not self.domain:
            return ""
        if not self.valid and name != "all":
            return None
        if name == "localpart":
            return self.localpart
        if name == "domain":
            return self.domain
        if name in ("user", "detail"):
            user, sep, detail = self.localpart.partition(separator)
            if name == "user":
                return user
            return detail if sep else None
        if not self.domain:
            return self.localpart
        local = self.localpart
        if not _dot_atom(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"


# -- header values ------------------------------------------------------------------------------


def header_end(data: bytes) -> int:
    """Where a message's header ends: the index of the empty line's break (CRLF or LF line
    ends), len(data) when there is none, 0 when the message starts with it."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    end = len(data)
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if 0 <= at < end:
            end = at
    return end


def split_fields(block: bytes) -> list[tuple[str, bytes]]:
    """A header block's fields: (lower-case name, raw value with its folding as CRLF + the
    continuation line).  A line that is neither a field nor a continuation is skipped."""
    fields: list[tuple[str, bytes]] = []
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            last_name, last_value = fields[-1]
            fields[-1] = (last_name, last_value + b"\r\n" + line)
        elif b":" in line:
            raw_name, _, value = line.partition(b":")
            fields.append((raw_name.strip().decode("ascii", "replace").lower(), value.lstrip(b" \t")))
    return fields


def unfold(raw: bytes) -> str:
    """A header field's value unfolded, trimmed and taken as UTF-8, encoded words left as they
    are: what an address list is parsed from."""
    if b"\n" in raw:  # a line break before a blank goes (with its CR)
        lines = raw.split(b"\n")
        out = [lines[0]]
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                if out[-1].endswith(b"\r"):
                    out[-1] = out[-1][:-1]
                out.append(line)
            else:
                out.append(b"\n" + line)
        raw = b"".join(out)
    return raw.decode("utf-8", "replace").strip(" \t\r\n")


def decode_value(raw: bytes) -> str:
    """A header field's value as a test compares it."""
    text = unfold(raw)
    if "=?" not in text:
        return text
    import re

    text = re.sub(_BETWEEN_WORDS, r"\1\2", text)  # blanks between two encoded words are not text
    return re.sub(_ENCODED, _decode_word, text)


def _decode_word(m: "re.Match[str]") -> str:
    charset, encoding, payload = m.group(1).split("*", 1)[0], m.group(2).upper(), m.group(3)
    try:
        import codecs

        if codecs.lookup(charset).name in _NOT_CHARSETS:
            return m.group(0)
        if encoding == "B":
            import binascii

            if not set(payload) <= _BASE64:
                raise ValueError("not base64")  # as base64.b64decode(validate=True) refuses it
            data = binascii.a2b_base64(payload + "=" * (-len(payload) % 4))
        else:
            import quopri

            data = quopri.decodestring(payload.replace("_", " ").encode("ascii"), header=True)
        text = data.decode(charset, "replace")
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    except (ValueError, LookupError, UnicodeError):
        return m.group(0)


# -- address lists -----------------------------------------------------------------------------------


def addresses(value: str) -> "list[Address]":
    """The mailboxes of an address-list header value."""
    return [_mailbox(entry) for entry in _entries(_without_comments(value))]


def envelope_address(raw: str) -> "Address":
    """An envelope address (`user@domain`, `<user@domain>`, `<>` for the null sender)."""
    text = raw.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return _addr_spec(_strip_route(text)) if text else Address("", "")


def _without_comments(text: str) -> str:
    out: list[str] = []
    depth = 0
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and (quoted or depth):
            if not depth:
                out.append(text[i:i + 2])
            i += 2
            continue
        if quoted:
            quoted = ch != '"'
            out.append(ch)
        elif ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            quoted = ch == '"'
            out.append(ch)
        i += 1
    return "".join(out)


def _entries(text: str) -> list[str]:
    """Split at top-level commas; a group `name: a, b;` gives its members."""
    entries: list[str] = []
    current: list[str] = []
    quoted = angle = False
    i = 0
    while i < len(text):
        ch = text[i]
        if quoted:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            current.append(ch)
        elif ch == "<":
            angle = True
            current.append(ch)
        elif ch == ">":
            angle = False
            current.append(ch)
        elif not angle and ch == ":":
            current = []  # a group's display name: its members follow
        elif not angle and ch in ",;":
            entries.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    entries.append("".join(current))
    return [e.strip() for e in entries if e.strip()]


def _mailbox(entry: str) -> "Address":
    start = entry.rfind("<")
    if start >= 0:
        end = entry.find(">", start)
        inner = entry[start + 1:end if end >= 0 else len(entry)].strip()
        addr = _addr_spec(_strip_route(inner))
    else:
        addr = _addr_spec(entry)
    if not (addr.localpart and addr.domain):  # `<>`, `Name <>`, `MAILER-DAEMON`, `@x`, ...
        return Address(entry, "", valid=False)  # :all sees the entry as it was written
    return addr


def _strip_route(text: str) -> str:
    if text.startswith("@") and ":" in text:
        return text.split(":", 1)[1]
    return text


def _addr_spec(text: str) -> "Address":
    text = text.strip()
    at = _last_unquoted_at(text)
    local, domain = (text[:at], text[at + 1:]) if at >= 0 else (text, "")
    return Address(_unquote(local.strip()), domain.strip())


def _last_unquoted_at(text: str) -> int:
    quoted = False
    found = -1
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted:
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == "@" and not quoted:
            found = i
        i += 1
    return found


def _unquote(local: str) -> str:
    if '"' not in local:
        return local
    out: list[str] = []
    i = 0
    while i < len(local):
        ch = local[i]
        if ch == "\\" and i + 1 < len(local):
            out.append(local[i + 1])
            i += 2
            continue
        if ch != '"':
            out.append(ch)
        i += 1
    return "".join(out)


def redirect_address(text: str) -> tuple[str, str]:
    """The address `redirect` sends to, from its argument (`a@b`, `<a@b>` or `Name <a@b>`):
    (the address, "") or ("", why it is not one)."""
    if not text.strip():
        return "", "empty address"
    found = addresses(unfold(text.encode("utf-8", "surrogateescape")))
    if len(found) != 1:
        return "", "not a single address"
    address = found[0]
    if not address.valid or not address.localpart or not address.domain:
        return "", "not an address of the form local-part@domain"
    return str(address.part("all")), ""


# -- editheader (RFC 5293) -------------------------------------------------------------------------

MAX_HEADER_SIZE = 2048  # bytes of an added value (Pigeonhole's sieve_editheader_max_header_size)


def field_name_error(name: str) -> str:
    """Why `name` is not a header field name (RFC 5322: 1*ftext, printable ASCII but ':'), or ""."""
    if not name:
        return "empty"
    if any(not ("!" <= c <= "~") or c == ":" for c in name):
        return "invalid"
    return ""


def value_too_large(value: str) -> bool:
    return len(value.encode("utf-8", "surrogatepass")) > MAX_HEADER_SIZE
