"""The Sender Rewriting Scheme (SRS0), for a redirect whose receiver checks SPF.

A message a user's script redirects keeps its original envelope sender by default (as
Pigeonhole does): the receiving site's SPF check may then refuse it.  With `[sieve]
srs_domain` and `srs_secret_file` set, the sender becomes

    SRS0=HHHH=TT=original.domain=original-local@srs_domain

where TT is the day (days since the epoch, modulo 1024, in two base32 characters) and HHHH
the first four base64 characters of HMAC-SHA1(secret, TT + domain + local), lower-cased
first.  A bounce to that address comes back to the hub; the socketmap server's virtuser map
answers it with the original address (reverse()), so sendmail sends it on, and an address
whose hash is wrong or whose day is more than MAX_AGE days old is unknown (forged, or
stale).  A null sender stays null; an address that is already SRS0 of another hub is
wrapped again (SRS0 of the whole address, which reverse() unwraps one step at a time).
"""

import os

MAX_AGE = 21  # days a bounce address stays valid (the usual choice)
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


class SrsError(Exception):
    """The secret cannot be read, or an address is not one of ours."""


def read_secret(path: str) -> bytes:
    """The secret's first line; a regular file (not a link) nobody else can write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SrsError(f"{path}: {exc.strerror}") from None
    try:
        import stat

        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022:
            raise SrsError(f"{path}: must be a regular file nobody but its owner can write")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    secret = data.split(b"\n", 1)[0].strip()
    if len(secret) < 16:
        raise SrsError(f"{path}: the secret must be at least 16 characters")
    return secret


def _day(now: float) -> str:
    day = int(now // 86400) % 1024
    return _BASE32[day >> 5] + _BASE32[day & 31]


def _hash(secret: bytes, day: str, domain: str, local: str) -> str:
    import base64
    import hashlib
    import hmac

    digest = hmac.new(secret, (day + domain + local).lower().encode("utf-8", "surrogateescape"), hashlib.sha1)
    return base64.b64encode(digest.digest()).decode("ascii")[:4]


def forward(sender: str, srs_domain: str, secret: bytes, now: float | None = None) -> str:
    """The SRS0 envelope sender for a redirected message ("" stays "")."""
    import time

    if not sender or "@" not in sender:
        return sender
    local, _, domain = sender.rpartition("@")
    if "=" in domain or not domain or not local:
        return sender  # not a domain an SRS0 address can carry back: sent as it is
    day = _day(time.time() if now is None else now)
    return f"SRS0={_hash(secret, day, domain, local)}={day}={domain}={local}@{srs_domain}"


def reverse(address: str, srs_domain: str, secret: bytes, now: float | None = None) -> str | None:
    """The original address of one of our SRS0 addresses; None when it is not ours, its hash
    is wrong (forged) or its day is more than MAX_AGE days old."""
    import hmac
    import time

    local, _, domain = address.rpartition("@")
    if domain.lower() != srs_domain.lower() or local[:5].upper() != "SRS0=":
        return None
    parts = local[5:].split("=", 3)
    if len(parts) != 4:
        return None
    given, day, orig_domain, orig_local = parts
    if len(day) != 2 or not all(c in _BASE32 for c in day.upper()) or not orig_domain or not orig_local:
        return None
    if not hmac.compare_digest(given.lower(), _hash(secret, day.upper(), orig_domain, orig_local).lower()):
        return None
    today = int((time.time() if now is None else now) // 86400) % 1024
    then = _BASE32.index(day.upper()[0]) * 32 + _BASE32.index(day.upper()[1])
    if (today - then) % 1024 > MAX_AGE:
        return None
    return f"{orig_local}@{orig_domain}"
