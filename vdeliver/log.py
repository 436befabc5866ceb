"""One log line per delivery, in Postfix's style, to syslog (stderr without one).

    vdeliver[1234]: to=<fred@away.com>, sender=<a@b.org>, size=3810, delay=0.004,
        dsn=2.0.0, status=sent (mbox /var/spool/vbox/away.com/fred)

Log lines are for the administrator and may name paths; what the sender sees is
only the status reason written to stderr.  Uses the C syslog module (no sockets
are imported on the delivery path).
"""

import os
import sys

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
        self._syslog = None
        if mode == "syslog":
            if os.path.exists("/dev/log"):
                import syslog

                syslog.openlog(ident, syslog.LOG_PID, _FACILITIES.get(facility, 2 << 3))
                self._syslog = syslog
            else:
                self.mode = "stderr"

    def log(self, priority: int, text: str) -> None:
        text = text.replace("\n", " ").replace("\r", " ")
        if self._syslog is not None:
            self._syslog.syslog(priority, text)
        elif self.mode == "stderr":
            try:
                sys.stderr.write(f"{self.ident}[{os.getpid()}]: {text}\n")
                sys.stderr.flush()
            except OSError:
                pass

    def info(self, text: str) -> None:
        self.log(LOG_INFO, text)

    def warning(self, text: str) -> None:
        self.log(LOG_WARNING, text)

    def error(self, text: str) -> None:
        self.log(LOG_ERR, text)


def delivery_line(to: str, sender: "str | None", size: int, delay: float, dsn: str, word: str, why: str) -> str:
    shown = "" if sender is None else sender
    return (
        f"to=<{to}>, sender=<{shown}>, size={size}, delay={delay:.3f}, dsn={dsn}, status={word} ({why})"
    )
