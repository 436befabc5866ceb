"""One log line per delivery, in Postfix's style, to syslog (stderr without one).

    vdeliver[1234]: to=<fred@away.com>, sender=<a@b.org>, size=3810, delay=0.004,
        dsn=2.0.0, status=sent (mbox /var/spool/vbox/away.com/fred)

Log lines are for the administrator and may name paths; what the sender sees is
only the status reason written to stderr.  Uses the C syslog module (no sockets
are imported on the delivery path).

Remote senders choose the envelope sender and much of what a line quotes, so a
line is never encoded strictly and never trusted to be one line: `escape()` turns
control characters and 8-bit bytes (also those kept as surrogates from undecodable
input) into `\\xNN`, as Postfix does, and the address fields are escaped harder
(`field()`: also backslash, space, comma, `<`, `>`), so a sender such as
`a>, status=sent (x` cannot forge a field.  Logging never raises: a line that
cannot be written is dropped (a delivered message must not become a failure).
"""

import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py
import sys
import time

from vdeliver.fileio import exists

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.hooks import Log

_FACILITIES = {
    "mail": 2 << 3,
    "user": 1 << 3,
    "daemon": 3 << 3,
    **{f"local{i}": (16 + i) << 3 for i in range(8)},
}
LOG_ERR = 3
LOG_WARNING = 4
LOG_INFO = 6


class Logger:
    def __init__(self, ident: str = "vdeliver", facility: str = "mail", mode: str = "syslog") -> None:
        self.ident = ident
        self.mode = mode
        self.enabled = mode != "none"  # a caller may skip building a line nobody reads
        self._syslog = None
        if mode == "syslog":
            if exists("/dev/log"):
                import syslog

                syslog.openlog(ident, syslog.LOG_PID, _FACILITIES.get(facility, 2 << 3))
                self._syslog = syslog
            else:
                self.mode = "stderr"

    def log(self, priority: int, text: str) -> None:
        try:
            text = escape(text)
            if self._syslog is not None:
                self._syslog.syslog(priority, text)
            elif self.mode == "stderr":
                sys.stderr.write(f"{self.ident}[{os.getpid()}]: {text}\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a log line is never worth a failed delivery
            pass

    def info(self, text: str) -> None:
        self.log(LOG_INFO, text)

    def warning(self, text: str) -> None:
        self.log(LOG_WARNING, text)

    def error(self, text: str) -> None:
        self.log(LOG_ERR, text)


def _escaped(text: str, extra: str) -> str:
    if text.isascii() and text.isprintable() and not any(ch in text for ch in extra):
        return text  # nothing to escape (nearly every line): no loop over its characters
    out = []
    for ch in text:
        o = ord(ch)
        if 0x20 <= o < 0x7F and ch not in extra:
            out.append(ch)
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x80:
            out.append(f"\\x{o:02x}")
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def tell(log: "Log | None", text: str, info: bool = False) -> None:
    """One line to the caller's logger, if it has one; never raises: a log line never changes
    a delivery (the message may be stored already)."""
    if log is None:
        return
    try:
        (log.info if info else log.warning)(text)
    except Exception:  # noqa: BLE001 - see above
        pass


def escape(text: str) -> str:
    """One printable ASCII line: control characters and 8-bit bytes as `\\xNN` (idempotent)."""
    if text.isascii() and text.isprintable():
        return text
    return _escaped(text, "")


def field(text: str) -> str:
    """An address field's value: also `\\`, space, `,`, `<` and `>` escaped, so it cannot end
    its field or pass for an escape."""
    return _escaped(text, "\\ ,<>")


def delivery_line(to: str, sender: "str | None", size: int, delay: float, dsn: str, word: str, why: str) -> str:
    shown = "" if sender is None else sender
    return (
        f"to=<{field(to)}>, sender=<{field(shown)}>, size={size}, delay={delay:.3f}, dsn={dsn}, "
        f"status={word} ({escape(why)})"
    )


# The phase timer of one CLI delivery (VDELIVER_PHASES=1 in the environment): wall and process
# CPU time at each step, one line to stderr at the end.  Off, phase() is one global lookup.
_phases: "list[tuple[str, float, float]] | None" = None


def start_phases() -> None:
    global _phases
    _phases = []
    phase("main")


def phase(name: str) -> None:
    """Mark the end of a step of the delivery (for the phase timer; nothing when it is off)."""
    if _phases is not None:
        _phases.append((name, time.perf_counter(), time.process_time()))


def phases_line() -> str:
    """`phases: main cpu=7.10ms, config +0.12ms cpu +0.10ms, ...`: the process CPU used
    before main() (interpreter start-up and the first imports), then each step's wall and CPU."""
    if not _phases:
        return ""
    from itertools import pairwise

    parts = [f"main cpu={_phases[0][2] * 1000:.2f}ms"]
    for (_n, w0, c0), (name, w1, c1) in pairwise(_phases):
        parts.append(f"{name} +{(w1 - w0) * 1000:.2f}ms cpu +{(c1 - c0) * 1000:.2f}ms")
    total_w = _phases[-1][1] - _phases[0][1]
    parts.append(f"total after main +{total_w * 1000:.2f}ms cpu={_phases[-1][2] * 1000:.2f}ms")
    return "phases: " + ", ".join(parts)


class RateLimited:
    """A log line that may repeat fast (a flood of refused connections): the first one at
    once, then at most one per `interval` seconds, saying how many were left out."""

    def __init__(self, log: Logger, interval: float) -> None:
        self.log = log
        self.interval = interval
        self.last = float("-inf")
        self.dropped = 0

    def _emit(self, level: str, text: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.dropped += 1
            return
        if self.dropped:
            text += f" ({self.dropped} more like it in the last {now - self.last:.0f}s)"
        self.last = now
        self.dropped = 0
        getattr(self.log, level)(text)

    def warning(self, text: str) -> None:
        self._emit("warning", text)

    def error(self, text: str) -> None:
        self._emit("error", text)

