"""The MIME structure of a message, for RFC 5703's `foreverypart`, `:mime` and `extracttext`.

`parse()` reads a message once into a flat list of parts in the order `foreverypart` visits
them: the message itself first, then every part depth-first, in the order they are written
(RFC 5703 section 3, and Pigeonhole's order).  A part's descendants are the parts right after
it, up to `Part.end`, so a nested loop or `:anychild` takes a slice.

- A multipart is split at its boundary lines (`--BOUNDARY`, `--BOUNDARY--` for the last,
  blanks after them allowed); the preamble and the epilogue are not parts.  Dovecot also
  takes a line that only starts with a boundary (`--BOUNDARYjunk`) for one; vdeliver does not.  A multipart without a
  boundary parameter, or whose boundary never appears, has no children.  A part of a
  multipart/digest without a Content-Type is message/rfc822.
- A message/rfc822 part has one child: the message it holds, with that message's header.
- Limits against hostile messages, Dovecot's defaults (message_max_nested_mime_parts,
  message_max_total_mime_parts) with the same effect as in Pigeonhole: a part more than
  MAX_DEPTH levels below the message is a leaf (its body is not split further), and the
  message has at most MAX_PARTS parts, itself included (the parts past that are not read:
  no loop, :anychild or extracttext sees them).
- Header values are read as Message reads the top-level header (`headers.decode_value`).
- Content-Type and Content-Disposition parameters follow RFC 2045 and RFC 2231 (continuations
  `name*0`, `name*1` joined; `name*=charset'lang'%XX` decoded to Unicode).
- `text()` is what extracttext stores: a leaf's body with its transfer encoding undone
  (base64, quoted-printable; broken input is read as far as it goes), its charset decoded
  (unknown charsets and bad bytes give U+FFFD), and HTML reduced to its text; a part with
  children gives "".

Standard library only; imported only when a script requires mime, foreverypart or extracttext.
Never raises on any input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vdeliver.sieve import headers

MAX_PARTS = 10_000
MAX_DEPTH = 100
_BLANK = re.compile(rb"\r?\n\r?\n")
_TSPECIALS = set('()<>@,;:\\"/[]?=')
_NOT_CHARSETS = frozenset({"unicode-escape", "raw-unicode-escape", "punycode", "idna"})
_SECTION = re.compile(r"^(.*?)\*(\d+)\*?$")


@dataclass(slots=True)
class Part:
    raw: bytes = field(repr=False)  # the whole message: a part is a range of it
    fields: list[tuple[str, bytes]]  # (lower-case name, raw value with its folding)
    body_start: int
    body_end: int
    content_type: str  # lower case type/subtype; text/plain when missing or invalid
    depth: int = 0
    end: int = 0  # index past the last of its descendants
    children: bool = False
    params: dict[str, str] = field(default_factory=dict)  # of its Content-Type

    @property
    def body(self) -> bytes:
        """As written: the transfer encoding not undone."""
        return self.raw[self.body_start:self.body_end]

    def values(self, name: str, decode: bool = True) -> list[str]:
        name = name.lower()
        return [headers.decode_value(raw) if decode else headers.unfold(raw)
                for field_name, raw in self.fields if field_name == name]


# -- structure ----------------------------------------------------------------------------------


def split_header(data: bytes, start: int = 0, end: int | None = None) -> tuple[list[tuple[str, bytes]], int]:
    """The fields of the header of the entity data[start:end] (CRLF or LF line ends) and where
    its body starts."""
    end = len(data) if end is None else end
    if data.startswith(b"\r\n", start, end):
        return [], start + 2
    if data.startswith(b"\n", start, end):
        return [], start + 1
    m = _BLANK.search(data, start, end)
    head_end, body_start = (m.start(), m.end()) if m else (end, end)
    return headers.split_fields(data[start:head_end]), body_start


def parse(raw: bytes) -> list[Part]:
    """Every part of the message, the message itself first (see the module's docstring)."""
    parts: list[Part] = []
    parents: list[int] = []
    # (start, end, depth, default type, parent index): popped depth-first, in document order
    stack: list[tuple[int, int, int, str, int]] = [(0, len(raw), 0, "text/plain", -1)]
    while stack:
        start, end, depth, default, parent = stack.pop()
        fields, body_start = split_header(raw, start, end)
        ctype = default
        params: dict[str, str] = {}
        ctype_values = [headers.decode_value(v) for n, v in fields if n == "content-type"]
        parsed = content_type(ctype_values[0]) if ctype_values else None
        if parsed is not None:
            ctype = parsed[0]
            for name, value in parsed[1]:
                params.setdefault(name, value)
        part = Part(raw, fields, body_start, end, ctype.lower(), depth, params=params)
        parts.append(part)
        parents.append(parent)
        index = len(parts) - 1
        children: list[tuple[int, int, int, str, int]] = []
        room = MAX_PARTS - len(parts) - len(stack)
        if depth <= MAX_DEPTH and room > 0:
            if part.content_type.startswith("multipart/") and params.get("boundary"):
                child_default = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
                ranges = _split(raw, body_start, end, params["boundary"].encode("utf-8", "replace"))
                children = [(s, e, depth + 1, child_default, index) for s, e in ranges[:room]]
            elif part.content_type == "message/rfc822":
                children = [(body_start, end, depth + 1, "text/plain", index)]
        part.children = bool(children)
        stack.extend(reversed(children))
    # a part's descendants follow it: its end is past the last of them
    for i, part in enumerate(parts):
        part.end = i + 1
    for i in range(len(parts) - 1, 0, -1):
        parts[parents[i]].end = max(parts[parents[i]].end, parts[i].end)
    return parts


def _split(raw: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """The ranges between the delimiter lines of the multipart body raw[start:end] (RFC 2046
    section 5.1.1: the line end before a delimiter belongs to it): a line that is --BOUNDARY,
    and --BOUNDARY-- the last, blanks after them allowed."""
    delimiter = re.compile(rb"^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?(?:\n|\Z)", re.MULTILINE)
    out: list[tuple[int, int]] = []
    begin = -1
    for m in delimiter.finditer(raw, start, end):
        if begin >= 0:
            stop = m.start()
            if stop > begin and raw[stop - 1] == 0x0A:
                stop -= 2 if stop - 1 > begin and raw[stop - 2] == 0x0D else 1
            out.append((begin, stop))
        if m.group(1):  # the close delimiter: the epilogue follows
            return out
        begin = m.end()
    if begin >= 0:
        out.append((begin, end))  # never closed: the last part runs to the end
    return out


# -- header values: RFC 2045 content types, RFC 2231 parameters ------------------------------------


def _tokens(value: str) -> list[str]:
    """The value as tokens, quoted strings (kept with their quotes) and single specials,
    comments and blanks dropped."""
    out: list[str] = []
    i, n = 0, len(value)
    while i < n:
        ch = value[i]
        if ch in " \t\r\n":
            i += 1
        elif ch == "(":
            depth = 0
            while i < n:
                if value[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(value[i], 0)
                i += 1
                if depth == 0:
                    break
        elif ch == '"':
            j = i + 1
            chars: list[str] = []
            while j < n and value[j] != '"':
                if value[j] == "\\" and j + 1 < n:
                    j += 1
                chars.append(value[j])
                j += 1
            out.append('"' + "".join(chars))
            i = j + 1
        elif ch in _TSPECIALS:
            out.append(ch)
            i += 1
        else:
            j = i
            while j < n and value[j] not in _TSPECIALS and value[j] not in " \t\r\n(\"":
                j += 1
            out.append(value[i:j])
            i = j
    return out


def _leading(value: str, content_type_header: bool) -> tuple[str, list[str]] | None:
    """A Content-Type's type/subtype (a Content-Disposition's token) and the tokens after it;
    None when the value does not start with one."""
    tokens = _tokens(value)
    if not tokens or tokens[0] in _TSPECIALS or tokens[0].startswith('"'):
        return None
    if not content_type_header:
        rest = tokens[1:]
        return (tokens[0], rest) if not rest or rest[0] == ";" else None
    if len(tokens) < 3 or tokens[1] != "/" or tokens[2] in _TSPECIALS or tokens[2].startswith('"'):
        return None
    rest = tokens[3:]
    return (f"{tokens[0]}/{tokens[2]}", rest) if not rest or rest[0] == ";" else None


def content_type(value: str) -> tuple[str, list[tuple[str, str]]] | None:
    """type/subtype and the parameters of a Content-Type value; None when it is not valid."""
    lead = _leading(value, True)
    return None if lead is None else (lead[0], _parameters(lead[1]))


def _parameters(tokens: list[str]) -> list[tuple[str, str]]:
    """`; name=value` pairs, names in lower case, RFC 2231 sections joined and decoded."""
    raw: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        if tokens[i] == ";" and i + 3 < len(tokens) and tokens[i + 2] == "=" and tokens[i + 1] not in _TSPECIALS:
            value = tokens[i + 3]
            if value in _TSPECIALS:
                i += 3
                continue
            raw.append((tokens[i + 1].lower(), value))
            i += 4
        else:
            i += 1
    # RFC 2231: name*N[*] sections, in order of N; name* one encoded value
    out: list[tuple[str, str]] = []
    sections: dict[str, list[tuple[int, bool, str]]] = {}
    for name, value in raw:
        m = _SECTION.match(name)
        if m:
            base = m.group(1)
            if base not in sections:
                sections[base] = []
                out.append((base, ""))
            sections[base].append((int(m.group(2)), name.endswith("*"), value))
        elif name.endswith("*"):
            out.append((name[:-1], _decode_2231([(0, True, value)])))
        else:
            out.append((name, value[1:] if value.startswith('"') else value))
    return [(name, _decode_2231(sections[name]) if name in sections and not value else value)
            for name, value in out]


def _decode_2231(sections: list[tuple[int, bool, str]]) -> str:
    sections = sorted(sections, key=lambda s: s[0])
    charset = ""
    data = bytearray()
    for number, encoded, value in sections:
        quoted = value.startswith('"')
        text = value[1:] if quoted else value
        if encoded and not quoted:
            if number == 0 and text.count("'") >= 2:
                charset, _lang, text = text.split("'", 2)
            data += _percent_decode(text)
        else:
            data += text.encode("utf-8")
    return _decode_bytes(bytes(data), charset or "utf-8")


def _percent_decode(text: str) -> bytes:
    out = bytearray()
    i = 0
    raw = text.encode("utf-8", "replace")
    while i < len(raw):
        if raw[i:i + 1] == b"%" and re.fullmatch(rb"[0-9A-Fa-f]{2}", raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def _decode_bytes(data: bytes, charset: str) -> str:
    try:
        import codecs

        if codecs.lookup(charset).name not in _NOT_CHARSETS:
            text = data.decode(charset, "replace")
            return re.sub("[\ud800-\udfff]", "\ufffd", text)
    except (LookupError, ValueError, UnicodeError):
        pass
    return data.decode("utf-8", "replace")


def option_values(value: str, header: str, option: str, params: list[str]) -> list[str]:
    """What `header :mime :type/:subtype/:contenttype/:param` compares for one header value
    (RFC 5703 section 4.1): "" for a header other than Content-Type and Content-Disposition
    or a value that is not valid; for :param each named parameter present, or "" if none is."""
    header = header.lower()
    if header not in ("content-type", "content-disposition"):
        return [""]
    lead = _leading(value, header == "content-type")
    if lead is None:
        return [""]
    kind, rest = lead
    if option == "type":
        return [kind.partition("/")[0]]
    if option == "subtype":
        return [kind.partition("/")[2]]
    if option == "contenttype":
        return [kind]
    wanted = [p.lower() for p in params]
    found = [v for n, v in _parameters(rest) if n in wanted]
    return found or [""]


# -- extracttext ---------------------------------------------------------------------------------


def decoded_body(part: Part) -> bytes:
    """The body with its Content-Transfer-Encoding undone."""
    encodings = part.values("content-transfer-encoding")
    encoding = encodings[0].strip().lower() if encodings else ""
    if encoding == "base64":
        return _base64(part.body)
    if encoding == "quoted-printable":
        import quopri

        return quopri.decodestring(part.body)
    return part.body


def _base64(data: bytes) -> bytes:
    import binascii

    clean = re.sub(rb"[^A-Za-z0-9+/]", b"", data.split(b"=", 1)[0])
    clean = clean[:len(clean) - (len(clean) % 4 == 1)]
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except binascii.Error:
        return b""


def text(part: Part) -> str:
    """What extracttext stores for the part (see the module's docstring)."""
    if part.children:
        return ""
    data = decoded_body(part)
    main = part.content_type.partition("/")[0]
    charset = part.params.get("charset", "") if main == "text" else ""
    content = _decode_bytes(data, charset.strip() or "utf-8")
    if part.content_type in ("text/html", "application/xhtml+xml"):
        return html_text(content)
    return content


def html_text(html: str) -> str:
    """The text of an HTML document: tags dropped (a block element leaves a blank), script
    and style skipped, entities decoded, runs of blanks made one, one blank at the end."""
    from html.parser import HTMLParser

    pieces: list[str] = []
    skip = [0]
    blocks = {"p", "br", "div", "tr", "td", "th", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6",
              "blockquote", "pre", "hr", "title", "body", "head", "html"}

    class _Text(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag in ("script", "style"):
                skip[0] += 1
            elif tag in blocks:
                pieces.append(" ")

        def handle_endtag(self, tag: str) -> None:
            if tag in ("script", "style"):
                skip[0] = max(0, skip[0] - 1)
            elif tag in blocks:
                pieces.append(" ")

        def handle_data(self, data: str) -> None:
            if not skip[0]:
                pieces.append(data)

    parser = _Text(convert_charrefs=True)
    try:
        parser.feed(html)
        parser.close()
    except (AssertionError, ValueError):  # html.parser on a broken declaration
        pass
    words = re.sub(r"\s+", " ", "".join(pieces)).strip()
    return words + " " if words else ""  # ends with a blank, as Pigeonhole's (Dovecot's html2text)
