"""A tiny SMTP server on loopback that stands in for "the remote site".

sendmail tests need somewhere for off-site mail (forwards, aliases to other
domains, bounces) to go.  The stdlib's smtpd/asyncore are gone in Python 3.12
and warn in 3.11 (fatal under `pytest -W error`), so this is a small threaded
socket server: it accepts every envelope, answers 250 to everything, and keeps
each message as a Captured record (sender, recipients, raw bytes).  No AUTH,
no STARTTLS, no pipelining tricks: exactly what sendmail's esmtp/relay mailer
needs.  Only binds 127.0.0.1.

    with SmtpCapture() as capture:
        ... point sendmail at capture.port ...
        msgs = capture.wait_for(2, timeout=30)
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Captured:
    sender: str
    recipients: list[str]
    data: bytes
    helo: str = ""

    def header(self, name: str) -> str | None:
        """First value of a header in the captured message (unfolded), or None."""
        head = self.data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode("utf-8", "replace")
        prefix = name.lower() + ":"
        lines = head.replace("\r\n", "\n").split("\n")
        for i, line in enumerate(lines):
            if line.lower().startswith(prefix):
                value = line[len(prefix) :]
                for cont in lines[i + 1 :]:
                    if cont[:1] in (" ", "\t"):
                        value += " " + cont.strip()
                    else:
                        break
                return value.strip()
        return None


@dataclass
class SmtpCapture:
    """Accept-everything SMTP server on 127.0.0.1; use as a context manager."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Captured] = field(default_factory=list)
    greeting: str = "capture.test ESMTP capture"

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> SmtpCapture:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="smtp-capture", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> SmtpCapture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries ---------------------------------------------------------------
    def wait_for(self, count: int, timeout: float = 30) -> list[Captured]:
        """Block until at least `count` messages arrived; return a copy of them all."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.messages) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return list(self.messages)

    def for_recipient(self, address: str) -> list[Captured]:
        with self._lock:
            return [m for m in self.messages if address.lower() in (r.lower() for r in m.recipients)]

    # -- the server ------------------------------------------------------------
    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        reader = conn.makefile("rb")

        def reply(text: str) -> None:
            conn.sendall(text.encode() + b"\r\n")

        sender = ""
        rcpts: list[str] = []
        helo = ""
        try:
            reply(f"220 {self.greeting}")
            while True:
                line = reader.readline(4096)
                if not line:
                    return
                cmd = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("HELO", "EHLO"):
                    helo = cmd[5:].strip()
                    if verb == "EHLO":
                        reply("250-capture.test")
                        reply("250-8BITMIME")
                        reply("250 SIZE 0")
                    else:
                        reply("250 capture.test")
                elif verb == "MAIL":
                    sender = _angle(cmd)
                    rcpts = []
                    reply("250 2.1.0 ok")
                elif verb == "RCPT":
                    rcpts.append(_angle(cmd))
                    reply("250 2.1.5 ok")
                elif verb == "DATA":
                    if not rcpts:
                        reply("503 5.5.1 no recipients")
                        continue
                    reply("354 go ahead")
                    data = _read_data(reader)
                    with self._lock:
                        self.messages.append(Captured(sender, rcpts, data, helo))
                        self._lock.notify_all()
                    reply("250 2.0.0 captured")
                    rcpts = []
                elif verb == "RSET":
                    sender, rcpts = "", []
                    reply("250 2.0.0 ok")
                elif verb == "NOOP":
                    reply("250 2.0.0 ok")
                elif verb == "QUIT":
                    reply("221 2.0.0 bye")
                    return
                else:
                    reply("502 5.5.2 not implemented")
        except OSError:
            return
        finally:
            reader.close()
            conn.close()


def _angle(cmd: str) -> str:
    start, end = cmd.find("<"), cmd.find(">")
    if start < 0 or end < start:
        return cmd.split(":", 1)[-1].strip()
    return cmd[start + 1 : end]


def _read_data(reader: object) -> bytes:
    """Read a DATA body up to the lone dot; undo dot-stuffing."""
    out: list[bytes] = []
    while True:
        line = reader.readline(1 << 20)  # type: ignore[attr-defined]
        if not line or line in (b".\r\n", b".\n"):
            break
        if line.startswith(b".."):
            line = line[1:]
        out.append(line)
    return b"".join(out)
