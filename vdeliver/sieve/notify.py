"""enotify (RFC 5435) with the mailto method (RFC 5436): the URI, and the notification.

- parse(): a `mailto:` URI (RFC 6068) -> its recipients (To and Cc, with the URI's `to=`
  and `cc=` fields), and its Subject and body; ValueError for anything else (another
  method, a recipient that is not an address).  Other fields are ignored: RFC 5436 2.3 keeps
  `From`, `Auto-Submitted` and the like out of a script's reach, and Pigeonhole ignores the
  rest the same way.
- compose(): the notification, from `<>` at the envelope, `From:` the script's `:from` or
  the user, `Auto-Submitted: auto-notified`, the subject (the URI's, else the `:message`,
  else "[SIEVE] New mail notification"), `Importance`/`X-Priority` from `:importance`, and a
  body that says what arrived (the URI's body, else the message's sender and subject).
  Header text is one line, RFC 2047-encoded when not ASCII (vacation's helpers).

Imported only when a script requires "enotify"; standard library only.
"""

from vdeliver.sieve import headers

DEFAULT_SUBJECT = "[SIEVE] New mail notification"


class Uri:
    __slots__ = ("to", "subject", "body")

    def __init__(self, to: list[str], subject: str, body: str) -> None:
        self.to = to  # the recipients (To and Cc of the URI), addr-specs
        self.subject = subject
        self.body = body


def scheme(uri: str) -> str:
    return uri.partition(":")[0].lower() if ":" in uri else ""


def parse(uri: str) -> Uri:
    """A mailto URI; ValueError with the reason when it is not one Sieve may use."""
    from urllib.parse import unquote

    if scheme(uri) != "mailto":
        raise ValueError(f"invalid method '{scheme(uri) or uri}'")
    rest = uri.partition(":")[2]
    path, _, query = rest.partition("?")
    to: list[str] = []
    subject = body = ""

    def add(addresses: str) -> None:
        for part in unquote(addresses).split(","):
            if not part.strip():
                continue
            address, why = headers.redirect_address(part.strip())
            if why:
                raise ValueError(f"mailto URI: invalid recipient '{part.strip()}'")
            to.append(address)

    add(path)
    for field in query.split("&") if query else []:
        name, eq, value = field.partition("=")
        name = unquote(name).lower()
        if not eq or not name:
            raise ValueError(f"mailto URI: invalid header field '{field}'")
        if name in ("to", "cc", "bcc"):
            add(value)
        elif name == "subject":
            subject = unquote(value)
        elif name == "body":
            body = unquote(value)
        # Any other field, those of _FORBIDDEN included (RFC 5436 2.3), is ignored, as in Pigeonhole.
    return Uri(to, subject, body)


def valid_option(option: str) -> bool:
    """RFC 5435 section 3.5: an option is `name=value`, the name alphanumeric and `-`."""
    name, eq, _value = option.partition("=")
    return bool(eq) and bool(name) and name[0].isalnum() and all(c.isalnum() or c in "-." for c in name)


def compose(*, uri: Uri, sender_of_message: str, subject_of_message: str, recipient: str, from_: str,
            message: str, importance: int, hostname: str, now: "float | None" = None) -> bytes:
    """The notification (LF line ends)."""
    from vdeliver.sieve.vacation import _clean, _field, head

    subject = uri.subject or message or DEFAULT_SUBJECT
    about = (f"A message arrived for {recipient}\nFrom: {_clean(sender_of_message)}\n"
             f"Subject: {_clean(subject_of_message)}\n")
    body = uri.body or (message + "\n\n" if message else "") + about
    lines = head(from_=from_, recipient=recipient, to=", ".join(f"<{a}>" for a in uri.to), subject=subject,
                 hostname=hostname, auto="auto-notified", now=now)
    if importance != 2:
        lines.append(_field("Importance", "high" if importance == 1 else "low"))
        lines.append(_field("X-Priority", "1 (Highest)" if importance == 1 else "5 (Lowest)"))
    lines += ["MIME-Version: 1.0\n", "Content-Type: text/plain; charset=utf-8\n",
              f"Content-Transfer-Encoding: {'7bit' if body.isascii() else '8bit'}\n"]
    body = body.replace("\r\n", "\n")
    return ("".join(lines) + "\n" + body + ("" if body.endswith("\n") else "\n")).encode("utf-8", "replace")


def encode_url(value: str) -> str:
    """`set :encodeurl` (RFC 5435 section 4.1): percent-encoding of all but RFC 3986's
    unreserved characters."""
    from urllib.parse import quote

    return quote(value, safe="-._~")
