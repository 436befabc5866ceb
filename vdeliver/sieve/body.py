"""What the body test (RFC 5173) compares: the body raw, or the content of MIME parts.

    :raw              the body as it came, one value (bytes that are not UTF-8 become U+FFFD)
    :content TYPES    each leaf part whose type matches one of TYPES ("text" matches text/*,
                      "text/html" only that, "" every part), its transfer encoding undone and,
                      for text, its charset decoded
    :text             the same as :content "text" (the default)

The MIME structure is read with the standard library's email parser, imported only when a
script uses this test.
"""

from __future__ import annotations


def _body(raw: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = raw.find(sep)
        if at >= 0:
            return raw[at + len(sep):]
    return b""


def _wanted(ctype: str, types: list[str]) -> bool:
    main = ctype.split("/", 1)[0]
    for t in types:
        t = t.lower().strip()
        if t == "" or t == ctype or ("/" not in t and t == main):
            return True
    return False


def values(raw: bytes, transform: str, types: list[str]) -> list[str]:
    if transform == "raw":
        return [_body(raw).decode("utf-8", "replace")]
    from email import message_from_bytes

    out: list[str] = []
    for part in message_from_bytes(raw).walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if not _wanted(ctype, types):
            continue
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        charset = part.get_content_charset() or "us-ascii"
        try:
            out.append(data.decode(charset, "replace"))
        except LookupError:
            out.append(data.decode("utf-8", "replace"))
    return out
