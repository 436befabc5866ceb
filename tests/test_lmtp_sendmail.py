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
