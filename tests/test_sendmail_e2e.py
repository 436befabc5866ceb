"""The whole path through the real sendmail: SMTP in, queue split, vdeliver out.

The incoming sendmail (examples/sendmail_in.mc) runs as a daemon on a loopback
port; an smtplib client sends it one message for several recipients; the
outgoing sendmail (examples/sendmail_out.mc) runs that queue in the foreground
and hands each hosted recipient to the test copy of vdeliver, run as vmail.
Off-site mail (forwards, aliases, bounces) goes to tests/smtp_capture.py, a
loopback SMTP server standing in for the remote site.  Everything lives in a
private Site (tests/sendmail_harness.py) and every daemon is stopped in teardown.
"""

from __future__ import annotations

import mailbox
import re
import smtplib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import Account, MailRoot
from tests.sendmail_harness import (
    HOSTNAME,
    IN_MC,
    MAILSCANNER_MC,
    OUT_MC,
    Site,
    need_sendmail,
    read_qf,
    vdeliver_mailer,
)
from tests.smtp_capture import SmtpCapture
from vdeliver.locking import DotLock

pytestmark = pytest.mark.peers

SENDER = "sender@remote.example"
FROM_LINE = re.compile(r"^From sender@remote\.example  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$")
MESSAGE = (
    b"From: Sender <sender@remote.example>\r\n"
    b"To: undisclosed-recipients:;\r\n"
    b"Subject: one envelope, many recipients\r\n"
    b"Message-ID: <e2e-1@remote.example>\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b"From here on the body must stay one message.\r\n"
)


@dataclass
class Hub:
    site: Site
    in_cf: Path
    out_cf: Path
    port: int
    capture: SmtpCapture
    root: MailRoot

    def send(self, rcpts: list[str], message: bytes = MESSAGE, sender: str = SENDER) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.remote.example", timeout=30) as smtp:
            return smtp.sendmail(sender, rcpts, message)

    def mbox(self, domain: str, user: str) -> list[mailbox.mboxMessage]:
        box = mailbox.mbox(str(self.root.vbox / domain / user), create=False)
        try:
            return list(box)
        finally:
            box.close()

    def raw(self, domain: str, user: str) -> bytes:
        return (self.root.vbox / domain / user).read_bytes()


@pytest.fixture
def hub(vmail: Account, mailroot: MailRoot) -> Iterator[Hub]:
    need_sendmail()
    for domain, user in (("away.com", "fred"), ("home.com", "fred"), ("home.com", "wilma")):
        mailroot.add_mbox(domain, user)
    mailroot.write_config(lock_timeout=1, hostname=HOSTNAME)
    site = Site.create()
    capture = SmtpCapture()
    try:
        capture.start()
        site.install_maps()
        out_cf = site.compile(OUT_MC, "out", replace=vdeliver_mailer(mailroot.config), smart_host_port=capture.port)
        site.newaliases(out_cf)
        in_cf, port, _ = site.serve(IN_MC, "in")
        yield Hub(site, in_cf, out_cf, port, capture, mailroot)
    finally:
        try:
            site.close()
        finally:
            capture.stop()


def _envelopes(site: Site) -> dict[str, str]:
    """recipient -> qf name, asserting one recipient per queue file."""
    found: dict[str, str] = {}
    for qf in site.queue_files():
        env = read_qf(qf)
        rcpts = env["recipients"]
        assert isinstance(rcpts, list) and len(rcpts) == 1, f"{qf.name} holds {rcpts}"
        assert env["sender"] == f"<{SENDER}>"
        found[rcpts[0].strip("<>")] = qf.name
    return found


def test_one_envelope_to_every_kind_of_recipient(hub: Hub) -> None:
    accepted = ["fred@away.com", "fred@home.com", "info@away.com", "sales@away.com", "barney@home.com"]
    refused = hub.send([*accepted[:2], "dino@away.com", *accepted[2:]])

    # the disabled account is refused at RCPT time, the others accepted
    assert list(refused) == ["dino@away.com"]
    code, text = refused["dino@away.com"]
    assert code == 550 and b"disabled" in text.lower()

    # the incoming process only queued: one queue file per recipient (r=1)
    hub.site.wait_queue(len(accepted))
    assert sorted(_envelopes(hub.site)) == sorted(accepted)

    # the outgoing process runs that queue
    run = hub.site.run_queue(hub.out_cf)
    assert run.returncode == 0, run.stderr
    assert hub.site.queue_files() == []

    # each mailbox got exactly its own copy: no name folding between the two freds
    for domain, user, delivered_to in (
        ("away.com", "fred", "fred@away.com"),
        ("home.com", "fred", "fred@home.com"),
        ("home.com", "wilma", "wilma@home.com"),  # via the local alias info@away.com
    ):
        msgs = hub.mbox(domain, user)
        assert len(msgs) == 1, f"{user}@{domain} has {len(msgs)} messages"
        msg = msgs[0]
        assert msg["Return-Path"] == f"<{SENDER}>"
        assert msg.get_all("Delivered-To") == [delivered_to]
        assert msg["Message-ID"] == "<e2e-1@remote.example>"
        raw = hub.raw(domain, user)
        first = raw.split(b"\n", 1)[0].decode()
        assert FROM_LINE.match(first), first
        assert raw.count(b"\nFrom ") == 0, "a body From line was not escaped"
        assert b"\n>From here on the body" in raw

    # the forward and the off-site alias left through SMTP to the remote site
    captured = hub.capture.wait_for(2, timeout=30)
    by_rcpt = {tuple(m.recipients): m for m in captured}
    assert set(by_rcpt) == {("orders@partner.example",), ("barney@bedrock.example",)}
    for m in captured:
        assert m.sender == SENDER
        assert m.header("Message-ID") == "<e2e-1@remote.example>"
    # and no bounce was sent
    assert len(hub.capture.messages) == 2


def test_locked_mailbox_defers_then_delivers(hub: Hub) -> None:
    """vdeliver exits 75 while the mbox is locked: the message stays queued and
    the next queue run delivers it once the lock is gone."""
    box = str(hub.root.vbox / "away.com" / "fred")
    lock = DotLock(box, HOSTNAME, timeout=5)
    lock.acquire()
    try:
        assert hub.send(["fred@away.com"]) == {}
        hub.site.wait_queue(1)
        run = hub.site.run_queue(hub.out_cf, "-v")
        out = run.stdout.decode(errors="replace")
        assert "Deferred" in out and "EX_TEMPFAIL" in out, out
        queued = hub.site.queue_files()
        assert len(queued) == 1
        # sendmail records the deferral in the queue file (the M line)
        assert "\nMDeferred: procmail mailer" in queued[0].read_text(errors="replace")
        assert hub.mbox("away.com", "fred") == []
        assert hub.capture.messages == [], "a deferral must not bounce"
    finally:
        lock.release()
    run = hub.site.run_queue(hub.out_cf)
    assert run.returncode == 0
    assert hub.site.queue_files() == []
    msgs = hub.mbox("away.com", "fred")
    assert len(msgs) == 1 and msgs[0].get_all("Delivered-To") == ["fred@away.com"]
    assert hub.capture.messages == []


def test_direct_launcher_whose_interpreter_is_gone_defers(vmail: Account, mailroot: MailRoot) -> None:
    """Issue 21: `python -m vdeliver.launcher --direct` writes a `#!python -IS` script (no
    /bin/sh).  When a Python upgrade removes its interpreter, execve() fails inside sendmail;
    with the `l` flag of the examples' procmail mailer (F=DFMl0) sendmail calls that EX_OSERR
    and keeps the message queued: no bounce, nothing delivered."""
    need_sendmail()
    from tests.helpers import world_tmpdir
    from tests.sendmail_harness import PRODUCTION_ARGS, PRODUCTION_PYTHON
    from vdeliver import launcher

    mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(lock_timeout=1, hostname=HOSTNAME)
    script = world_tmpdir() / "vdeliver"
    launcher.write(str(script), python="/usr/bin/python3.9-removed-by-an-upgrade", libdir="/nonexistent", direct=True)
    site = Site.create()
    capture = SmtpCapture()
    try:
        capture.start()
        site.install_maps()
        out_cf = site.compile(OUT_MC, "out", replace={PRODUCTION_PYTHON: str(script), PRODUCTION_ARGS:
                                                      f"vdeliver -c {mailroot.config} -t -Y -a $h -a $u"},
                              smart_host_port=capture.port)
        assert re.search(r"^Mprocmail,.*F=[A-Za-z0-9]*l", out_cf.read_text(), re.M), "the mailer lost its l flag"
        site.newaliases(out_cf)
        _in_cf, port, _ = site.serve(IN_MC, "in")
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.remote.example", timeout=30) as smtp:
            smtp.sendmail(SENDER, ["fred@away.com"], MESSAGE)
        site.wait_queue(1)
        run = site.run_queue(out_cf, "-v")
        assert "Operating system error" in run.stdout.decode(errors="replace")
        queued = site.queue_files()
        assert len(queued) == 1 and "\nMOperating system error" in queued[0].read_text(errors="replace")
        assert capture.messages == [], "a missing interpreter must not bounce"
        assert (mailroot.vbox / "away.com" / "fred").read_bytes() == b""
    finally:
        try:
            site.close()
        finally:
            capture.stop()


def test_unknown_users_bounce(hub: Hub) -> None:
    """Two kinds of unknown: refused by the table's catch-all (sendmail's error
    mailer), and a table entry without a mailbox (vdeliver exits 67)."""
    (hub.root.vbox / "home.com" / "wilma").unlink()
    assert hub.send(["nobody@away.com"]) == {}
    assert hub.send(["wilma@home.com"]) == {}
    hub.site.wait_queue(2)
    run = hub.site.run_queue(hub.out_cf)
    assert run.returncode == 0
    assert hub.site.queue_files() == [], "a permanent failure must not stay queued"
    bounces = hub.capture.wait_for(2, timeout=30)
    assert len(bounces) == 2
    texts = []
    for b in bounces:
        assert b.sender == "", "a bounce has the null sender"
        assert b.recipients == [SENDER]
        texts.append(b.data.decode(errors="replace"))
    joined = "\n".join(texts)
    assert "nobody@away.com" in joined and "wilma@home.com" in joined
    assert joined.count("5.1.1") >= 2
    assert "vdeliver: 5.1.1 user unknown" in joined, "vdeliver's reason reaches the DSN"


def test_production_start_commands(hub: Hub) -> None:
    """The start-up commands of docs/sendmail.md: the incoming daemon with -bd, the
    outgoing one as a detached queue runner with -q2m, which runs the queue at once."""
    hub.site.close_daemons()
    hub.site.start_background(hub.in_cf, "-L", "sm-mta-in", "-bd")
    assert hub.send(["fred@away.com", "fred@home.com"]) == {}
    hub.site.wait_queue(2)
    hub.site.start_background(hub.out_cf, "-L", "sm-mta-out", "-q2m")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and hub.site.queue_files():
        time.sleep(0.1)
    assert hub.site.queue_files() == []
    assert len(hub.mbox("away.com", "fred")) == 1
    assert len(hub.mbox("home.com", "fred")) == 1


def test_m_flag_would_fold_names_and_vdeliver_refuses(hub: Hub) -> None:
    """Why the mailer must never get the m flag: with one envelope holding
    fred@away.com and fred@home.com (no r=1 split), sendmail then makes ONE run
    with one $h for both.  vdeliver refuses the extra argument (exit 75), so the
    mail waits instead of landing in the wrong mailbox; without m, the same
    envelope gets two runs and is delivered right."""
    mc = OUT_MC.read_text().replace("F=f, r=1, R=8", "F=f, R=8")
    replace = vdeliver_mailer(hub.root.config)
    folding = hub.site.compile(
        mc.replace("`PROCMAIL_MAILER_FLAGS', `l0'", "`PROCMAIL_MAILER_FLAGS', `l0m'"), "out-m", replace=replace
    )
    submit = hub.site.sendmail(
        folding, "-odq", "-f", SENDER, "fred@away.com", "fred@home.com", input=b"Subject: fold\n\nhi\n", check=True
    )
    assert submit.returncode == 0
    [qf] = hub.site.queue_files()
    assert len(read_qf(qf)["recipients"]) == 2
    run = hub.site.run_queue(folding, "-v")
    out = run.stdout.decode(errors="replace")
    assert out.count("Connecting to away.com via procmail") == 1 and "home.com via procmail" not in out, out
    assert "EX_TEMPFAIL" in out
    assert hub.mbox("away.com", "fred") == [] and hub.mbox("home.com", "fred") == []
    # the same queue file, run by the shipped mailer (no m): two runs, two right mailboxes
    plain = hub.site.compile(mc, "out-plain", replace=replace, smart_host_port=hub.capture.port)
    run = hub.site.run_queue(plain)
    assert hub.site.queue_files() == []
    for domain in ("away.com", "home.com"):
        msgs = hub.mbox(domain, "fred")
        assert len(msgs) == 1 and msgs[0].get_all("Delivered-To") == [f"fred@{domain}"]


def test_mailscanner_style_incoming_queue(hub: Hub) -> None:
    """sendmail_in-mailscanner.mc queues into its own mqueue.in, split per recipient;
    MailScanner moves each clean message into the outgoing process's queue."""
    incoming = hub.site.add_queue("mqueue.in")
    _, port, _ = hub.site.serve(MAILSCANNER_MC, "in-ms", replace={"/var/spool/mqueue.in": str(incoming)})
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        assert smtp.sendmail(SENDER, ["fred@away.com", "fred@home.com"], MESSAGE) == {}
    files = hub.site.wait_queue(2, queue=incoming)
    assert len(files) == 2 and hub.site.queue_files() == []
    assert sorted(len(read_qf(f)["recipients"]) for f in files) == [1, 1]
    # what MailScanner does after scanning: data file first, then the control file
    for qf in files:
        df = incoming / ("df" + qf.name[2:])
        df.rename(hub.site.queue / df.name)
        qf.rename(hub.site.queue / qf.name)
    run = hub.site.run_queue(hub.out_cf)
    assert run.returncode == 0 and hub.site.queue_files() == []
    for domain in ("away.com", "home.com"):
        msgs = hub.mbox(domain, "fred")
        assert len(msgs) == 1 and msgs[0].get_all("Delivered-To") == [f"fred@{domain}"]
