"""Turn sendmail's $h / $u arguments into a validated (domain, user, detail).

Real configurations pass the domain as `away.com`, `<away.com>`, `away.com.virtuser`
or `away.com.virtuser.`, and the user as `fred`, `fred@<host name>`, `fred@away.com`
or `<fred@away.com>`.  All of them name (away.com, fred).  Everything here is a pure
function; nothing touches the file system.  Names are validated before any path is
built from them: a name that could escape its directory never reaches `open()`.

A refused name is the configuration's fault, never the sender's, so it is a
temporary failure: the mail waits in the queue until the administrator fixes it.
"""

from vdeliver.errors import DeliveryError, Status

MAX_DOMAIN = 253
MAX_LABEL = 63
MAX_USER = 64
MAX_DETAIL = 64

_LDH = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
# RFC 5322 atext plus '.', minus '/': what a local part may hold on disk.
_ATEXT = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-=?^_`{|}~."
)


# Files vdeliver and Dovecot keep beside (or inside) a mailbox.  A user or domain named like
# one would make its mailbox another mailbox's lock or index: `fred.lock` is fred's dotlock,
# and would be deleted as a stale lock, mail and all.  Shared with vmailctl (accounts/names.py).
RESERVED_SUFFIXES = (".lock", ".vdeliver-journal", ".unresolved", ".untrusted")
RESERVED_PREFIXES = ("dovecot.", "dovecot-")
RESERVED_NAMES = frozenset(("maildirsize", "maildirfolder"))


def reserved(name: str) -> str:
    """Why name may not be a mailbox or domain directory name ("" if it may)."""
    low = name.lower()
    if low in RESERVED_NAMES:
        return f"{name!r} is reserved: the name of a file Dovecot keeps beside mailboxes"
    for suffix in RESERVED_SUFFIXES:
        if low.endswith(suffix):
            return f"names ending in {suffix!r} are reserved (a mailbox named so would be another one's {suffix[1:]})"
    for prefix in RESERVED_PREFIXES:
        if low.startswith(prefix):
            return f"names starting with {prefix!r} are reserved for Dovecot's index files"
    return ""


class RecipientError(DeliveryError):
    """A domain or user argument that cannot name a mailbox."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(Status("4.3.5", reason, detail))


class Recipient:
    __slots__ = ("domain", "user", "detail")

    def __init__(self, domain: str, user: str, detail: str = "") -> None:
        self.domain = domain
        self.user = user
        self.detail = detail

    @property
    def address(self) -> str:
        return f"{self.user}@{self.domain}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipient) and (
            (self.domain, self.user, self.detail) == (other.domain, other.user, other.detail)
        )

    def __hash__(self) -> int:
        return hash((self.domain, self.user, self.detail))

    def __repr__(self) -> str:
        return f"Recipient({self.domain!r}, {self.user!r}, {self.detail!r})"


def _unbracket(text: str) -> str:
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


def normalize_domain(raw: str) -> str:
    """`<Away.COM.virtuser.>` -> `away.com`; IDN -> punycode; refuse anything else."""
    shown = raw[:80]
    d = _unbracket(raw)
    if d.startswith("@"):
        d = d[1:]
    if d.endswith("."):
        d = d[:-1]
    low = d.lower()
    if low.endswith(".virtuser"):
        d = d[: -len(".virtuser")]
    if not d:
        raise RecipientError("bad domain argument", f"empty domain in {shown!r}")
    if not d.isascii():
        d = _to_ascii(d, shown)
    d = d.lower()
    if len(d) > MAX_DOMAIN:
        raise RecipientError("bad domain argument", f"domain longer than {MAX_DOMAIN}")
    for label in d.split("."):
        if not label:
            raise RecipientError("bad domain argument", f"empty label in {shown!r}")
        if len(label) > MAX_LABEL:
            raise RecipientError("bad domain argument", f"label longer than {MAX_LABEL}")
        if not _LDH.issuperset(label.encode()) or label[0] == "-" or label[-1] == "-":
            raise RecipientError("bad domain argument", f"invalid character in domain {shown!r}")
    why = reserved(d)
    if why:
        raise RecipientError("bad domain argument", why)
    return d


def _to_ascii(domain: str, shown: str) -> str:
    """IDNA 2008 with UTS 46 non-transitional mapping, as browsers and registries do:
    `straße.de` is xn--strae-oqa.de, not strasse.de (Python's own codec is IDNA 2003,
    which folds ß to ss: another domain).  The `idna` package is imported only here,
    for non-ASCII domains; ASCII ones never pay for it."""
    try:
        import idna
    except ImportError:
        raise RecipientError("IDN support missing", f"{shown!r} needs the idna package (pip install idna)") from None
    try:
        return str(idna.encode(domain, uts46=True, transitional=False).decode("ascii"))
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise RecipientError("bad domain argument", f"invalid IDN domain {shown!r}: {exc}") from None


def _check_name(name: str, what: str, limit: int, shown: str) -> None:
    if not name:
        raise RecipientError(f"bad {what} argument", f"empty {what} in {shown!r}")
    if len(name) > limit:
        raise RecipientError(f"bad {what} argument", f"{what} longer than {limit}")
    if not name.isascii() or not _ATEXT.issuperset(name.encode()):
        raise RecipientError(f"bad {what} argument", f"invalid character in {what} {shown!r}")
    if name[0] == "." or ".." in name:
        raise RecipientError(f"bad {what} argument", f"{what} may not start with '.' or hold '..'")
    why = reserved(name)
    if why and what == "user":
        raise RecipientError(f"bad {what} argument", why)


def split_user(raw: str) -> "tuple[str, str]":
    """`<fred@away.com>` -> ("fred", "away.com"); `fred` -> ("fred", "")."""
    u = _unbracket(raw)
    if u.startswith('"') and '"@' in u:
        # A quoted local part: keep it only if it is also a plain name inside.
        q = u.rindex('"@')
        return u[1:q], u[q + 2 :]
    local, sep, dom = u.rpartition("@")
    if not sep:
        return u, ""
    return local, dom


def parse(
    domain_arg: "str | None",
    user_arg: str,
    *,
    keep_case: bool = False,
    delimiter: str = "+",
) -> Recipient:
    """Resolve the mailer's arguments to a validated Recipient.

    domain_arg is $h (None in the one-argument `-d user@domain` form, where the
    domain comes from the address).  The domain in user_arg is ignored when $h is
    given: sendmail appends the machine's own name there (always_add_domain).
    """
    shown = user_arg[:80]
    # Printable ASCII (nearly every address) is checked in C; only the others are walked.
    if not (user_arg.isascii() and user_arg.isprintable()):
        for ch in user_arg:
            if ch < " " or ch == "\x7f":
                raise RecipientError("bad user argument", f"control character in {shown!r}")
    if domain_arg is not None and not (domain_arg.isascii() and domain_arg.isprintable()):
        for ch in domain_arg:
            if ch < " " or ch == "\x7f":
                raise RecipientError("bad domain argument", "control character in domain")
    local, addr_domain = split_user(user_arg)
    if domain_arg is None:
        if not addr_domain:
            raise RecipientError("bad user argument", f"no domain in {shown!r}")
        domain_arg = addr_domain
    domain = normalize_domain(domain_arg)
    if "/" in local or "\0" in local:
        raise RecipientError("bad user argument", f"invalid character in user {shown!r}")
    detail = ""
    if delimiter and delimiter in local:
        local, _, detail = local.partition(delimiter)
    _check_name(local, "user", MAX_USER, shown)
    if detail:
        _check_name(detail, "detail", MAX_DETAIL, shown)
    if not keep_case:
        local = local.lower()
    return Recipient(domain, local, detail)
