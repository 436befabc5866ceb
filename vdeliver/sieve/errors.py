"""The errors of a Sieve script, each with the line it is on, as the user will be shown it
(`sieve-test`, `<script>.log`, webmail) and as Pigeonhole words the same cases."""



class SieveError(ValueError):
    """A script that cannot be run: `line` (1-based; 0 when the whole script is at fault) and
    a one-line message."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.message = message
        self.errors: "list[SieveError]" = [self]  # every error found, when a stage collects them


class SieveSyntaxError(SieveError):
    """The script does not follow the grammar of RFC 5228 section 8."""


class SieveRuntimeError(SieveError):
    """The script failed while it ran: the message goes to the INBOX, the error to the log."""

    script = 0  # in a sequence (run_sequence), which script failed


# The signals of the commands that end a script or a loop early (never seen outside the
# interpreter and extensions.py).


class Stop(Exception):
    """`stop`: the script ends; the implicit keep stands unless cancelled."""


class Return(Exception):
    """`return` (RFC 6609): back to the script that included this one."""


class Break(Exception):
    """`break` (RFC 5703): out of the innermost foreverypart loop, or the one of that name."""

    def __init__(self, name: str | None) -> None:
        super().__init__(name)
        self.name = name  # None: the innermost loop
