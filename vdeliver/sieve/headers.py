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

from __future__ import annotations

import re
from dataclasses import dataclass

SEPARATOR = "+"
# Codecs Python has that are not MIME charsets: they read backslash escapes or domain names.
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "punycode", "idna"})
_SURROGATE = re.compile("[\ud800-\udfff]")
_DOT_ATOM = re.compile(r"[^\s\x00-\x1f\x7f()<>\[\]:;@\\,.\"]+(?:\.[^\s\x00-\x1f\x7f()<>\[\]:;@\\,.\"]+)*")
_ENCODED = re.compile(r"=\?([^?\s]+)\?([BbQq])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")


@dataclass(frozen=True, slots=True)
class Address:
    localpart: str
    domain: str  # "" when the address has none
    valid: bool = True  # False: only :all sees it (no domain, or not an address at all)

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
        if not _DOT_ATOM.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"


# -- header values ------------------------------------------------------------------------------


def unfold(raw: bytes) -> str:
    """A header field's value unfolded, trimmed and taken as UTF-8, encoded words left as they
    are: what an address list is parsed from."""
    return re.sub(rb"\r?\n(?=[ \t])", b"", raw).decode("utf-8", "replace").strip(" \t\r\n")


def decode_value(raw: bytes) -> str:
    """A header field's value as a test compares it."""
    text = unfold(raw)
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub(r"\1\2", text)  # blanks between two encoded words are not text
    return _ENCODED.sub(_decode_word, text)


def _decode_word(m: re.Match[str]) -> str:
    charset, encoding, payload = m.group(1).split("*", 1)[0], m.group(2).upper(), m.group(3)
    try:
        import codecs

        if codecs.lookup(charset).name in _NOT_CHARSETS:
            return m.group(0)
        if encoding == "B":
            import base64

            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        else:
            import quopri

            data = quopri.decodestring(payload.replace("_", " ").encode("ascii"), header=True)
        return _SURROGATE.sub("\ufffd", data.decode(charset, "replace"))
    except (ValueError, LookupError, UnicodeError):
        return m.group(0)


# -- address lists -----------------------------------------------------------------------------------


def addresses(value: str) -> list[Address]:
    """The mailboxes of an address-list header value."""
    return [_mailbox(entry) for entry in _entries(_without_comments(value))]


def envelope_address(raw: str) -> Address:
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


def _mailbox(entry: str) -> Address:
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


def _addr_spec(text: str) -> Address:
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
