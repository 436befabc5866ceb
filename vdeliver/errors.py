"""Delivery status: what went wrong, whose problem it is, and what sendmail must do.

Every failure in vdeliver becomes a Status: an enhanced status code (RFC 3463), a
reason the sender may read, and a detail for the administrator's log.  The one table
below turns a status into the sysexits(3) code sendmail acts on.  sendmail requeues
only on 75/74/71 and bounces everything else, so the rule is Postfix's: anything
that is not known to be the recipient's or the message's fault is temporary.

This module is imported on every delivery: it imports nothing.
"""

EX_OK = 0
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77

# The only place a status becomes an exit code.  Keys are enhanced status codes;
# a code that is not listed falls back on its class: 2 -> 0, 5 -> 69, else 75.
_EXIT_BY_DSN = {
    "5.1.1": EX_NOUSER,  # no such user
    "5.1.2": EX_NOUSER,  # no such domain (sendmail's DSN says "user unknown" too)
    "5.2.2": EX_CANTCREAT,  # mailbox full (only when over_quota = "bounce")
    "5.3.4": EX_UNAVAILABLE,  # message too big for the configured limit
    "5.4.6": EX_UNAVAILABLE,  # mail loop (Delivered-To already present)
    "5.7.1": EX_NOPERM,  # refused by the user's Sieve reject (RFC 5429)
}


class Status:
    """An outcome: dsn like "4.3.0", a reason for the sender, a detail for the log."""

    __slots__ = ("dsn", "reason", "detail")

    def __init__(self, dsn: str, reason: str, detail: str = "") -> None:
        self.dsn = dsn
        self.reason = reason
        self.detail = detail

    @property
    def temporary(self) -> bool:
        return not self.dsn.startswith(("2.", "5."))

    @property
    def permanent(self) -> bool:
        return self.dsn.startswith("5.")

    @property
    def ok(self) -> bool:
        return self.dsn.startswith("2.")

    @property
    def word(self) -> str:
        """Postfix's status word: sent, deferred or bounced."""
        if self.ok:
            return "sent"
        return "bounced" if self.permanent else "deferred"

    def exit_code(self) -> int:
        return exit_code(self.dsn)

    def text(self) -> str:
        """The one line for stderr (sendmail copies it into the DSN)."""
        if self.detail and not self.permanent:
            return f"{self.dsn} {self.reason}: {self.detail}"
        return f"{self.dsn} {self.reason}"

    def __repr__(self) -> str:
        return f"Status({self.dsn!r}, {self.reason!r}, {self.detail!r})"


def exit_code(dsn: str) -> int:
    """Map an enhanced status code to the sysexits code sendmail acts on."""
    code = _EXIT_BY_DSN.get(dsn)
    if code is not None:
        return code
    if dsn.startswith("2."):
        return EX_OK
    if dsn.startswith("5."):
        return EX_UNAVAILABLE
    return EX_TEMPFAIL


class DeliveryError(Exception):
    """Raised anywhere in delivery; carries the Status that ends it."""

    def __init__(self, status: Status) -> None:
        super().__init__(status.text())
        self.status = status


def fail(reason: str, detail: str = "", dsn: str = "4.3.0") -> DeliveryError:
    """The one way delivery code makes a failure: `raise fail("cannot open mailbox", path)`.
    Temporary (4.3.0) unless told otherwise: only what is known to be the recipient's or
    the message's fault may be permanent."""
    return DeliveryError(Status(dsn, reason, detail))


# errno -> (temporary dsn, permanent dsn or None).  Used after a failed write:
# a full disk always defers; a quota or file-size limit may bounce when the
# administrator asked for it (over_quota = "bounce").
def status_for_errno(err: int, what: str, over_quota_bounce: bool = False) -> Status:
    import errno as _e
    import posix

    text = posix.strerror(err)
    if err in (_e.EDQUOT, _e.EFBIG):
        if over_quota_bounce:
            return Status("5.2.2", "mailbox full", f"{what}: {text}")
        return Status("4.2.2", "mailbox full", f"{what}: {text}")
    if err == _e.ENOSPC:
        return Status("4.3.1", "mail system full", f"{what}: {text}")
    return Status("4.3.0", "cannot write mailbox", f"{what}: {text}")
