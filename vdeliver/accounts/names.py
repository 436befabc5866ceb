"""Normalised names: domains (lower case, punycode), users and target addresses.

Everything stored is normalised first, so the database, the maps and the paths on
disk all spell a name the same way.  User names are restricted to what is safe in
a path, a sendmail map key and an aliases entry: lower-case letters, digits and
`.`, `_`, `-`, `=` (no `+`: that separates a detail at delivery time).  Targets
of aliases and forwards are plain addresses: never `|program`, `/file` or
`:include:`, which sendmail would run or write as root's choice.
"""

from __future__ import annotations

from vdeliver.accounts.errors import InvalidName
from vdeliver.recipient import MAX_USER, RecipientError, normalize_domain, reserved

_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-=")
# atext minus the characters sendmail maps or aliases give a meaning to.
_TARGET_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&'*+-=?^_`{}~.")
MAX_ADDRESS = 320


def domain(raw: str) -> str:
    """`Example.COM` -> `example.com`; IDN -> punycode; refuses anything else."""
    text = raw.strip()
    if not text or text != raw or "@" in text or text.endswith(".") or text.startswith("."):
        raise InvalidName(f"invalid domain name {raw[:80]!r}")
    try:
        name = normalize_domain(text)
    except RecipientError as exc:
        raise InvalidName(f"invalid domain name {raw[:80]!r}: {exc.status.detail}") from None
    if "_" in name:
        raise InvalidName(f"invalid domain name {raw[:80]!r}: '_' is not allowed in a host name")
    if "." not in name:
        raise InvalidName(f"invalid domain name {raw[:80]!r}: needs at least two labels")
    if name.endswith(".virtuser"):
        raise InvalidName(f"invalid domain name {raw[:80]!r}: .virtuser is reserved for routing")
    return name


def user(raw: str) -> str:
    """A mailbox or alias name: lower-cased, checked."""
    name = raw.lower()
    if not name:
        raise InvalidName("empty user name")
    if len(name) > MAX_USER:
        raise InvalidName(f"user name longer than {MAX_USER} characters: {raw[:80]!r}")
    if not _USER_CHARS.issuperset(name):
        bad = sorted(set(name) - _USER_CHARS)[0]
        raise InvalidName(f"invalid character {bad!r} in user name {raw[:80]!r} (allowed: a-z 0-9 . _ - =)")
    if name[0] in ".-" or name[-1] == "." or ".." in name:
        raise InvalidName(f"invalid user name {raw[:80]!r}: no leading '.' or '-', trailing '.', or '..'")
    why = reserved(name)
    if why:
        raise InvalidName(f"invalid user name {raw[:80]!r}: {why}")
    return name


def address(raw: str) -> tuple[str, str]:
    """`Fred@Away.COM` -> ("fred", "away.com"): an address in a (possibly hosted) domain."""
    local, sep, dom = raw.strip().rpartition("@")
    if not sep or not local:
        raise InvalidName(f"not an address (user@domain): {raw[:80]!r}")
    return user(local), domain(dom)


def target(raw: str) -> str:
    """An alias or forward target: `local@domain`, domain normalised, local part kept."""
    text = raw.strip()
    local, sep, dom = text.rpartition("@")
    if not sep or not local or len(text) > MAX_ADDRESS:
        raise InvalidName(f"not a target address (user@domain): {raw[:80]!r}")
    if not _TARGET_LOCAL.issuperset(local) or local[0] == "." or local[-1] == "." or ".." in local:
        raise InvalidName(f"invalid local part in target {raw[:80]!r} (no program, file or :include: targets)")
    return f"{local}@{domain(dom)}"


def split(addr: str) -> tuple[str, str]:
    local, _, dom = addr.rpartition("@")
    return local, dom
