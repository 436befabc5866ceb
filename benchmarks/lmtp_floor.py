"""The runtime floor of an LMTP server: a bare Python LMTP responder that stores with the same syncs.

The fsync floors of benchmarks.agents (FsyncFloor, JournalFloor) measure what storing a message
costs in the harness's own process, with no protocol at all.  A server also answers three
pipelined round trips a message (sendmail's: MAIL FROM; RCPT TO + DATA; the message), frames the
lines and undoes the dot-stuffing.  This agent is that and nothing else, in the interpreter
vdeliver-lmtpd runs on (/usr/bin/python3, one thread per connection, the vmail user): no
configuration, no recipient lookup, no locks, no headers added, no escaping, no log line, no
spool file.  It stores the message as the floors do: mbox, the journalled append (a 512-byte
busy record and its fdatasync, the append and its fsync, the idle record); Maildir, tmp/ write
and fsync, link into new/, fsync of new/, unlink.  So, as the bare netstring echo server is to
the socketmap server (benchmarks/socketmap_bench.py), it is the least an LMTP server written in
this runtime can cost on this machine: the time vdeliver-lmtpd spends above it is its own work.

The server program is SERVER below, run with `python3 -I -c` (no file of this checkout needs to
be readable by the vmail user).  Used by benchmarks/lmtp_grid.py in the one-client cells.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

from benchmarks.agents import Context, ResidentAgent, proc_usage, session_pids

SERVER = r'''
import os, socket, sys, threading, time
path, fmt, vbox, home = sys.argv[1:5]
BUSY = b"busy".ljust(511) + b"\n"
IDLE = b"idle".ljust(511) + b"\n"
STAMP = b"  Wed Nov 25 02:56:49 2026\n"
counter = [0]

def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

def store_mbox(user, domain, sender, data):
    box = os.path.join(vbox, domain, user)
    journal = os.path.join(vbox, domain, "." + user + ".bare-journal")
    try:
        jfd = os.open(journal, os.O_WRONLY)
    except FileNotFoundError:
        jfd = os.open(journal, os.O_WRONLY | os.O_CREAT, 0o600)
        os.pwrite(jfd, bytes(4096), 0)
        os.fsync(jfd)
    fd = os.open(box, os.O_WRONLY | os.O_APPEND)
    try:
        os.pwrite(jfd, BUSY, 0)
        os.fdatasync(jfd)
        write_all(fd, b"From " + sender + STAMP + data + b"\n")
        os.fsync(fd)
        os.pwrite(jfd, IDLE, 0)
    finally:
        os.close(fd)
        os.close(jfd)

def store_maildir(user, domain, data):
    md = os.path.join(home, domain, user, "Maildir")
    counter[0] += 1
    name = "%d.P%dQ%d.bare" % (int(time.time()), os.getpid(), counter[0])
    tmp = os.path.join(md, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, os.path.join(md, "new", name))
    dfd = os.open(os.path.join(md, "new"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    os.unlink(tmp)

def session(conn):
    # Block reads, no per-line loop over the message: the least framing LMTP allows.
    conn.sendall(b"220 bare LMTP\r\n")
    buf = b""
    sender, rcpts = b"", []
    while True:
        nl = buf.find(b"\n")
        while nl < 0:
            got = conn.recv(65536)
            if not got:
                conn.close()
                return
            buf += got
            nl = buf.find(b"\n")
        line, buf = buf[:nl + 1], buf[nl + 1:]
        verb = line[:4].upper()
        if verb == b"LHLO":
            conn.sendall(b"250-bare\r\n250 PIPELINING\r\n")
        elif verb == b"MAIL":
            sender, rcpts = line[line.find(b"<") + 1:line.rfind(b">")] or b"MAILER-DAEMON", []
            conn.sendall(b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT":
            rcpts.append(line[line.find(b"<") + 1:line.rfind(b">")])
            if buf[:4].upper() != b"DATA" or buf.find(b"\n") < 0:
                conn.sendall(b"250 2.1.5 ok\r\n")
            else:  # pipelined, the next line DATA: both answers in one write
                buf = buf[buf.find(b"\n") + 1:]
                conn.sendall(b"250 2.1.5 ok\r\n354 go ahead\r\n")
                buf = data_phase(conn, buf, sender, rcpts)
        elif verb == b"DATA":
            conn.sendall(b"354 go ahead\r\n")
            buf = data_phase(conn, buf, sender, rcpts)
        elif verb == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            break
        else:
            conn.sendall(b"250 2.0.0 ok\r\n")
        if buf is None:  # the client went away inside DATA
            break
    conn.close()

def data_phase(conn, buf, sender, rcpts):
    data = b"\r\n" + buf
    end = data.find(b"\r\n.\r\n")
    while end < 0:
        got = conn.recv(65536)
        if not got:
            return None  # no end of data: nothing stored
        data += got
        end = data.find(b"\r\n.\r\n", len(data) - 65536 - 5 if len(data) > 65541 else 0)
    rest = data[end + 5:]
    body = data[2:end + 2].replace(b"\r\n..", b"\r\n.").replace(b"\r\n", b"\n")
    if body.startswith(b".."):
        body = body[1:]
    for rcpt in rcpts:
        user, _at, domain = rcpt.decode().partition("@")
        if fmt == "mbox":
            store_mbox(user, domain, sender, body)
        else:
            store_maildir(user, domain, body)
        conn.sendall(b"250 2.0.0 ok\r\n")
    return rest

listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(64)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=session, args=(conn,), daemon=True).start()
'''


class BareLmtp(ResidentAgent):
    """The bare LMTP responder as an agent of this harness (one server per format)."""

    key = "bare-lmtp"
    label = "floor: a bare Python LMTP responder with the same syncs"
    fsync = "mbox: the journal (fdatasync), the file (fsync); Maildir: file, new/"

    def missing(self) -> str | None:
        return None if os.path.exists("/usr/bin/python3") else "/usr/bin/python3 not installed"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def socket_path(self, fmt: str) -> str:
        return self.ctx.path("bare-lmtp", f"{fmt}.sock")

    def start(self, fmt: str) -> None:
        if fmt in self.procs:
            return
        path = self.socket_path(fmt)
        run = {} if self.ctx.creds is None else {"user": self.ctx.creds[0], "group": self.ctx.creds[1],
                                                  "extra_groups": []}
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        self.ctx.own(os.path.dirname(path))  # the server, as the vmail user, binds its socket there
        layout = self.ctx.layout
        proc = subprocess.Popen(["/usr/bin/python3", "-I", "-c", SERVER, path, fmt, layout.vbox, layout.home],
                                stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                                cwd="/", start_new_session=True, **run)  # type: ignore[call-overload]
        self.procs[fmt] = proc
        deadline = time.monotonic() + 15
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bare LMTP responder did not start (see {self.ctx.path('logs')})")
            time.sleep(0.02)

    def usage(self, fmt: str) -> tuple[float, int] | None:
        proc = self.procs.get(fmt)
        return None if proc is None else proc_usage(session_pids(proc.pid))

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # nothing in flight between batches
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        for fmt in self.procs:
            try:
                os.unlink(self.socket_path(fmt))
            except OSError:
                pass
        self.procs.clear()
