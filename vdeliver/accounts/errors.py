"""The failures of account management, each with the exit code vmailctl reports.

A script driving vmailctl needs to tell "you asked for something wrong" (1) from
"try again later" (75, like sendmail's EX_TEMPFAIL: the database is locked or
unreachable).  Usage errors (2) are argparse's business in vmailctl.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75


class UsageError(Exception):
    """A command line vmailctl cannot run (unknown command, bad option).  Exit 2."""


class AccountsError(Exception):
    """A refused request: bad input, a missing or duplicate object.  Exit 1."""

    exit_code = EXIT_ERROR


class InvalidName(AccountsError):
    """A domain, user or address that cannot be stored."""


class NotFound(AccountsError):
    """The named domain, mailbox, alias or forward does not exist."""


class Conflict(AccountsError):
    """The request clashes with what exists (duplicate, loop, dependent rows)."""


class BadRow(AccountsError):
    """A row read back from the database that vmailctl could never have written (edited by
    hand, by another tool or by an intruder): it never becomes a map line or an answer."""

    bad_row = True


class ConfigurationError(AccountsError):
    """A bad [accounts] or [maps] setting; the message names the key."""


class TemporaryError(AccountsError):
    """The database is locked or unreachable, or a file system hiccup: retry later.  Exit 75."""

    exit_code = EXIT_TEMPFAIL
