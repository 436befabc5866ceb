"""End to end through the real sendmail: examples/sendmail_out-lmtp.mc -> vdeliver-lmtpd.

One message for three hosted users, one of them over quota: sendmail speaks LMTP over
the unix socket (one transaction, one reply per recipient), delivers two and requeues
exactly the third; after the quota is raised the next queue run delivers only that one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import MailRoot, mbox_messages
from tests.sendmail_harness import EXAMPLES, MAPS, Site, compile_mc, need_m4, need_sendmail, read_qf
from tests.test_lmtp_server import Lmtpd

pytestmark = pytest.mark.peers

LMTP_MC = EXAMPLES / "sendmail_out-lmtp.mc"
PRODUCTION_SOCKET = "/run/vdeliver/lmtp.sock"

MSG = b"""From: Sender <sender@remote.example>
To: fred@away.com, fred@home.com, wilma@home.com
Subject: three users, one over quota

Hello all.
.a line that starts with a dot
From the body
"""


def test_mc_compiles_with_an_lmtp_mailer() -> None:
    need_m4()
    cf, warnings = compile_mc(LMTP_MC)
    assert warnings == []
    (mailer,) = [line for line in cf.splitlines() if line.startswith("Mvdlmtp,")]
    assert "P=[IPC]" in mailer and f"A=FILE {PRODUCTION_SOCKET}" in mailer
    flags = mailer.split("F=")[1].split(",")[0]
    assert {"z", "m", "X", "n"} <= set(flags)  # LMTP, many recipients, dot-stuffing, no From_ line
    assert "\nR$* < @ $* .virtuser. > $*\t$#vdlmtp $@ vdeliver $: $1 < @ $2 >\n" in cf
    assert "Mprocmail" not in cf
    assert "r=1" not in next(line for line in cf.splitlines() if line.startswith("Qmqueue"))


@pytest.fixture
def site() -> Iterator[Site]:
    need_sendmail()
    with Site.create() as s:
        s.install_maps(MAPS)
        yield s



def test_one_status_per_recipient_and_only_the_failed_one_requeued(site: Site, mailroot: MailRoot) -> None:
    fred_away = mailroot.add_mbox("away.com", "fred")
    fred_home = mailroot.add_maildir("home.com", "fred")
    wilma = mailroot.add_maildir("home.com", "wilma")
    quota = fred_home / "maildirsize"
    quota.write_bytes(b"50S\n")  # Maildir++: a 50-byte quota; the message is bigger
    os.chown(quota, mailroot.owner.uid, mailroot.owner.gid)
    # sendmail refuses a unix socket below a world-writable directory (/tmp): use the site's.
    server = Lmtpd(mailroot, rundir=site.base / "lmtpd").start()
    try:
        cf = site.compile(LMTP_MC, "out-lmtp", replace={PRODUCTION_SOCKET: str(server.socket)})
        # Queue only, then one queue run: the delivery happens in the queue runner, as in production.
        sent = site.sendmail(cf, "-odq", "-f", "sender@remote.example", "fred@away.com", "fred@home.com",
                             "wilma@home.com", input=MSG)
        assert sent.returncode == 0, sent.stderr
        (qf,) = site.queue_files()
        assert len(read_qf(qf)["recipients"]) == 3
        site.run_queue(cf)

        (left,) = site.queue_files()  # the same queue file, now holding only the failed recipient
        rcpts = read_qf(left)["recipients"]
        assert len(rcpts) == 1 and "fred@home.com" in rcpts[0]
        assert b"452 4.2.2 <fred@home.com> mailbox full" in left.read_bytes()
        (msg,) = mbox_messages(fred_away)
        assert b"Return-Path: <sender@remote.example>\nDelivered-To: fred@away.com\n" in msg
        assert b"\n.a line that starts with a dot\n" in msg and b"\n>From the body\n" in msg
        assert len(os.listdir(wilma / "new")) == 1
        assert os.listdir(fred_home / "new") == []
        # All three recipients were one LMTP transaction (one session name in the log).
        lines = [line for line in server.log().splitlines() if "to=<" in line]
        assert len(lines) == 3 and len({line.split(":")[0] for line in lines}) == 1
        assert any("to=<fred@home.com>" in line and "dsn=4.2.2, status=deferred" in line for line in lines)

        # Raise the quota: the next run delivers fred@home.com, and nobody else again.
        quota.write_bytes(b"1000000S\n")
        site.run_queue(cf)
        assert site.queue_files() == []
        assert len(os.listdir(fred_home / "new")) == 1
        assert len(mbox_messages(fred_away)) == 1 and len(os.listdir(wilma / "new")) == 1
    finally:
        server.stop()


class _Recorder:
    """A minimal LMTP server on a unix socket that records each read as it arrived, so a test
    can see which commands the client sent together (its pipelining), and answers 250/354."""

    def __init__(self, path: str) -> None:
        import socket
        import threading

        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o666)
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.reads: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(60)
        with conn:
            conn.sendall(b"220 recorder LMTP\r\n")
            buf, in_data, rcpts = b"", False, 0
            while chunk := conn.recv(65536):
                self.reads.append(chunk)
                buf += chunk
                while True:
                    if in_data:
                        end = buf.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        buf, in_data = buf[end + 5:], False
                        conn.sendall(b"250 2.0.0 ok\r\n" * rcpts)
                        rcpts = 0
                        continue
                    end = buf.find(b"\r\n")
                    if end < 0:
                        break
                    line, buf = buf[:end].upper(), buf[end + 2:]
                    if line.startswith(b"LHLO"):
                        conn.sendall(b"250-recorder\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 8BITMIME\r\n")
                    elif line.startswith(b"RCPT"):
                        rcpts += 1
                        conn.sendall(b"250 2.1.5 ok\r\n")
                    elif line.startswith(b"DATA"):
                        in_data, buf = True, b"\r\n" + buf  # the dot line may end the message at once
                        conn.sendall(b"354 go ahead\r\n")
                    elif line.startswith(b"QUIT"):
                        conn.sendall(b"221 bye\r\n")
                        return
                    else:
                        conn.sendall(b"250 2.0.0 ok\r\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_sendmail_pipelines_rcpt_and_data_but_not_mail(site: Site) -> None:
    """What the LMTP benchmarks' client imitates (benchmarks/agents.py LmtpClient): the real
    sendmail sends MAIL FROM alone, then every RCPT TO and DATA in one write."""
    rundir = site.base / "recorder"
    rundir.mkdir()
    os.chmod(rundir, 0o755)
    recorder = _Recorder(str(rundir / "lmtp.sock"))
    try:
        cf = site.compile(LMTP_MC, "out-lmtp", replace={PRODUCTION_SOCKET: str(rundir / "lmtp.sock")})
        sent = site.sendmail(cf, "-odq", "-f", "sender@remote.example", "fred@away.com", "wilma@home.com",
                             input=b"Subject: pipelining\n\nhello\n")
        assert sent.returncode == 0, sent.stderr
        site.run_queue(cf)
        recorder.thread.join(60)
    finally:
        recorder.close()
    commands = [r for r in recorder.reads if r[:4].upper() in (b"LHLO", b"MAIL", b"RCPT", b"QUIT")]
    assert [c[:4].upper() for c in commands] == [b"LHLO", b"MAIL", b"RCPT", b"QUIT"], recorder.reads
    mail, rcpts = commands[1], commands[2]
    assert mail.count(b"\r\n") == 1  # MAIL FROM waits for its reply
    lines = rcpts.upper().split(b"\r\n")
    assert sorted(lines[:2]) == [b"RCPT TO:<FRED@AWAY.COM>", b"RCPT TO:<WILMA@HOME.COM>"]
    assert lines[2:] == [b"DATA", b""]  # both RCPTs and DATA in one write
