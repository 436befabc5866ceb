"""The vacation reply (RFC 5230, RFC 3834): whether one may be sent, and the reply itself.

Pure functions, no I/O: respond.py reads the user's addresses, takes the tracking claim and
sends.  Imported at delivery only for a message whose script ran `vacation`.

- refusal(): "" when a reply is allowed, else why not.  Never to a bounce, a sender the
  site lists (`noreply`, `owner-*`, ...), oneself, an automatic message (Auto-Submitted other
  than `no`, RFC 3834), a list message (List-* fields, Precedence bulk/list/junk), a message
  marked as spam, or one whose To/Cc/Bcc/Resent-* name none of the user's addresses (RFC
  5230 section 4.5).
- compose(): From the user (or `:from`), To the sender, `Subject` (`:subject`, else `Auto: `
  and the original subject), In-Reply-To and References, `Auto-Submitted: auto-replied`, a
  Date and a Message-ID.  Header text that is not ASCII is RFC 2047-encoded; nothing from the
  sender or the script can add a header line (line breaks and control characters go).  With
  `:mime` the reason is a MIME entity: its Content-* fields and body become the reply's; any
  other field in it is dropped.
"""

from vdeliver.sieve import headers

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Iterable

NEVER_REPLY = ("mailer-daemon", "postmaster", "noreply", "no-reply", "no_reply", "donotreply", "do-not-reply",
               "do_not_reply", "bounce", "bounces", "bounce-*", "bounces-*", "*-bounces", "*-bounce", "owner-*",
               "*-owner", "*-request", "listserv", "majordomo")
LIST_FIELDS = ("list-id", "list-post", "list-unsubscribe", "list-help", "list-subscribe", "list-owner",
               "list-archive")
ADDRESS_FIELDS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")
MAX_LINE = 78


class Rules:
    __slots__ = ("never_reply", "spam_header", "check_recipient")

    def __init__(self, never_reply: "tuple[str, ...]" = NEVER_REPLY, spam_header: str = "X-Spam-Flag: YES",
                 check_recipient: bool = True) -> None:
        self.never_reply = never_reply  # local parts (fnmatch patterns, any case) never answered
        self.spam_header = spam_header  # "Field: value prefix" that marks spam; "" for none
        self.check_recipient = check_recipient  # only a message addressed to the user is answered


def _values(fields: "list[tuple[str, bytes]]", name: str) -> list[str]:
    return [headers.unfold(raw) for field, raw in fields if field == name]


def refusal(fields: "list[tuple[str, bytes]]", sender: str, own: "set[str]", rules: Rules) -> str:
    """"" when a reply may be sent; else why not (for the log)."""
    from fnmatch import fnmatchcase

    if not sender or sender.lower() in ("<>", "mailer-daemon"):
        return "the sender is <>"
    local, _, _domain = sender.rpartition("@")
    local = (local or sender).lower()
    # A VERP or subaddressed sender (noreply+1234@, dev-request+x@) is its part before the '+' too.
    names = {local, local.split("+", 1)[0]}
    if any(fnmatchcase(name, pattern.lower()) for pattern in rules.never_reply for name in names):
        return f"<{sender}> is never answered"
    if sender.lower() in own:
        return "the sender is the user"
    for value in _values(fields, "auto-submitted"):
        if value.split(";", 1)[0].strip().lower() != "no":
            return f"Auto-Submitted: {value[:60]}"
    for name in LIST_FIELDS:
        if _values(fields, name):
            return f"a list message ({name})"
    if any(v.strip().lower() in ("bulk", "list", "junk") for v in _values(fields, "precedence")):
        return "Precedence: bulk, list or junk"
    for value in _values(fields, "x-auto-response-suppress"):
        if {w.strip().lower() for w in value.split(",")} & {"oof", "all"}:
            return "X-Auto-Response-Suppress"
    if rules.spam_header:
        name, _, prefix = rules.spam_header.partition(":")
        prefix = prefix.strip().lower()
        if any(v.lower().startswith(prefix) for v in _values(fields, name.strip().lower())):
            return f"marked as spam ({name.strip()})"
    if rules.check_recipient:
        named = {f"{a.localpart}@{a.domain}".lower() for n in ADDRESS_FIELDS for v in _values(fields, n)
                 for a in headers.addresses(v) if a.valid}
        named |= {"@" + a.rpartition("@")[2] for a in named}  # "@domain" in own: a catch-all's domain
        if not named & own:
            return "not addressed to the user (To, Cc, Bcc, Resent-*)"
    return ""


# -- the reply ---------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """One line: breaks and control characters become blanks."""
    return " ".join("".join(c if c.isprintable() or c == " " else " " for c in text).split())


def _encode(text: str) -> str:
    """Header text as RFC 2047 encoded words (UTF-8, base64) when it is not ASCII."""
    text = _clean(text)
    if text.isascii():
        return text
    import base64

    words: list[str] = []
    chunk = ""
    for ch in text:  # whole characters per word: at most 45 bytes of UTF-8 each (60 of base64)
        if len((chunk + ch).encode("utf-8")) > 45:
            words.append(chunk)
            chunk = ""
        chunk += ch
    words.append(chunk)
    return " ".join(f"=?utf-8?b?{base64.b64encode(w.encode('utf-8')).decode('ascii')}?=" for w in words if w)


def _field(name: str, value: str) -> str:
    """`Name: value`, folded at blanks so that lines stay near 78 characters."""
    line = f"{name}: "
    out: list[str] = []
    for word in value.split(" "):
        if len(line) + len(word) > MAX_LINE and line.strip() and not line.endswith(": "):
            out.append(line.rstrip())
            line = " "
        line += word + " "
    out.append(line.rstrip())
    return "\n".join(out) + "\n"


def _ids(values: "Iterable[str]") -> list[str]:
    """The message IDs (`<...>`) in header values, in order."""
    found: list[str] = []
    for value in values:
        start = value.find("<")
        while start >= 0:
            end = value.find(">", start)
            if end < 0:
                break
            mid = value[start:end + 1]
            if "@" in mid and " " not in mid and mid.isprintable():
                found.append(mid)
            start = value.find("<", end)
    return found


def head(*, from_: str, recipient: str, to: str, subject: str, hostname: str, auto: str,
         now: "float | None" = None) -> list[str]:
    """The header lines every message vdeliver sends on a user's behalf begins with: From (the
    script's address if it is one, else the user), To, Subject (encoded), Date, Message-ID and
    Auto-Submitted (RFC 3834: `auto-replied` or `auto-notified`)."""
    import os
    import time
    from email.utils import formatdate

    when = time.time() if now is None else now
    author = recipient
    if from_:
        address, why = headers.redirect_address(from_)
        author = _clean(from_) if not why and address else recipient
    return [
        _field("From", _encode(author)),
        _field("To", to),
        _field("Subject", _encode(subject)),
        _field("Date", formatdate(when, localtime=True)),
        _field("Message-ID", f"<{int(when * 1000)}.{os.getpid()}.{os.urandom(4).hex()}@"
                             f"{_clean(hostname) or 'localhost'}>"),
        _field("Auto-Submitted", auto),
    ]


def compose(*, original: "list[tuple[str, bytes]]", sender: str, recipient: str, from_: str, subject: "str | None",
            reason: str, mime: bool, hostname: str, now: "float | None" = None) -> bytes:
    """The reply (LF line ends)."""
    if subject is None:
        originals = [headers.decode_value(raw) for name, raw in original if name == "subject"]
        # RFC 5230 4.3: "Auto: " and the original subject; none to prefix: "Automated reply",
        # as Pigeonhole says it.
        first = _clean(originals[0]) if originals else ""
        subject = "Auto: " + first if first else "Automated reply"
    message_id = _ids(_values(original, "message-id"))[:1]
    references = _ids(_values(original, "references")) + message_id
    if len(references) > 20:  # RFC 5322 3.6.4: keep the first and the last ones
        references = references[:1] + references[-19:]
    lines = head(from_=from_, recipient=recipient, to=f"<{_clean(sender)}>", subject=subject, hostname=hostname,
                 auto="auto-replied", now=now)
    if message_id:
        lines.append(_field("In-Reply-To", message_id[0]))
    if references:
        lines.append(_field("References", " ".join(references)))
    lines.append("MIME-Version: 1.0\n")
    body = reason.replace("\r\n", "\n").replace("\r", "\n")
    if mime:
        entity, _, body = body.partition("\n\n")
        for name, raw in headers.split_fields(entity.encode("utf-8", "replace")):
            if name.startswith("content-"):
                lines.append(_field(name.title(), _clean(headers.unfold(raw))))
    else:
        encoding = "7bit" if body.isascii() else "8bit"
        lines.append("Content-Type: text/plain; charset=utf-8\n")
        lines.append(f"Content-Transfer-Encoding: {encoding}\n")
    if not body.endswith("\n"):
        body += "\n"
    return ("".join(lines) + "\n" + body).encode("utf-8", "replace")
