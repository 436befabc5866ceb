"""Sieve end to end through the real sendmail pair of the paper (the incoming daemon queues one
envelope per recipient, the outgoing queue run hands each to vdeliver as its mailer):

- a user's script files the message into a new folder with flags (which the user then sees
  over IMAP from a real Dovecot), and redirects a copy to
  another virtual user; the redirect goes back into sendmail (a submission program speaking
  SMTP to the incoming daemon, as an MSP does), is queued, and the next queue run delivers
  it, with both Delivered-To lines, to the other user's mailbox;
- a script that does not compile still delivers into the INBOX, and says why in the user's
  `.dovecot.sieve.log`;
- a redirect loop (two users redirecting to each other) ends: each copy is kept once.
"""

from __future__ import annotations

import os
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dovecot_harness import Dovecot, passwd_file_auth
from tests.helpers import Account, MailRoot, mbox_messages
from tests.sendmail_harness import HOSTNAME, IN_MC, OUT_MC, Site, need_sendmail, vdeliver_mailer
from tests.smtp_capture import SmtpCapture

SENDER = "sender@remote.example"
MESSAGE = (b"From: Sender <sender@remote.example>\r\nTo: fred@home.com\r\nSubject: [dev] weekly build\r\n"
           b"Message-ID: <sieve-e2e@remote.example>\r\n\r\nThe build is green.\r\n")

# What /usr/sbin/sendmail's MSP does for a program on the hub: hand the message to the MTA
# over SMTP on loopback.  (Run as the vmail user, a `sendmail -C` of the test site could not
# write its root-owned queue.)
SUBMIT = """#!{python}
import smtplib, sys
args = sys.argv[1:]
sender = args[args.index("-f") + 1] if "-f" in args else ""
rcpts = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-f")]
data = sys.stdin.buffer.read().replace(b"\\r\\n", b"\\n").replace(b"\\n", b"\\r\\n")  # the MSP sends CRLF
with smtplib.SMTP("127.0.0.1", {port}, local_hostname="{host}", timeout=30) as smtp:
    smtp.sendmail("" if sender == "<>" else sender, rcpts, data)
"""


@dataclass
class SieveHub:
    site: Site
    out_cf: Path
    port: int
    root: MailRoot
    capture: SmtpCapture

    def send(self, rcpts: list[str], message: bytes = MESSAGE, sender: str = SENDER) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.remote.example", timeout=30) as smtp:
            assert smtp.sendmail(sender, rcpts, message) == {}

    def deliver_queue(self, expected: int) -> None:
        self.site.wait_queue(expected)
        run = self.site.run_queue(self.out_cf)
        assert run.returncode == 0, run.stderr

    def home(self, domain: str, user: str) -> Path:
        return self.root.home / domain / user

    def script(self, domain: str, user: str, text: bytes) -> Path:
        """Install `text` as the user's active script, as managesieved does, owned by vmail."""
        home = self.home(domain, user)
        (home / "sieve").mkdir(parents=True, exist_ok=True)
        (home / "sieve" / "main.sieve").write_bytes(text)
        link = home / ".dovecot.sieve"
        if not link.is_symlink():
            link.symlink_to("sieve/main.sieve")
        for path in (home, home / "sieve", home / "sieve" / "main.sieve"):
            os.chown(path, self.root.owner.uid, self.root.owner.gid)
        os.lchown(link, self.root.owner.uid, self.root.owner.gid)
        return home


@pytest.fixture
def hub(vmail: Account, mailroot: MailRoot) -> Iterator[SieveHub]:
    need_sendmail()
    for user in ("fred", "wilma"):
        mailroot.add_mbox("home.com", user)
        (mailroot.home / "home.com" / user).mkdir(parents=True, exist_ok=True)
        os.chown(mailroot.home / "home.com" / user, vmail.uid, vmail.gid)
    site = Site.create()
    capture = SmtpCapture()
    try:
        capture.start()
        site.install_maps()
        config = mailroot.write_config(lock_timeout=1, hostname=HOSTNAME)
        out_cf = site.compile(OUT_MC, "out", replace=vdeliver_mailer(config), smart_host_port=capture.port)
        site.newaliases(out_cf)
        _in_cf, port, _ = site.serve(IN_MC, "in")
        state = mailroot.base / "state"  # as /var/lib/vdeliver: the vmail user's
        state.mkdir()
        os.chown(state, vmail.uid, vmail.gid)
        submit = mailroot.base / "submit"
        # Debian's python3: it runs as the vmail user, who cannot enter root's home (the venv's)
        submit.write_text(SUBMIT.format(python="/usr/bin/python3", port=port, host=HOSTNAME))
        submit.chmod(0o755)
        config.write_text(config.read_text() + f'\n[sieve]\nenabled = true\nsendmail = "{submit}"\n'
                          f'\n[tracking]\ndatabase = "{state}/tracking.sqlite"\n')
        yield SieveHub(site, out_cf, port, mailroot, capture)
    finally:
        try:
            site.close()
        finally:
            capture.stop()


def test_a_script_files_flags_and_redirects_through_sendmail(hub: SieveHub) -> None:
    fred = hub.script("home.com", "fred", b'require ["fileinto", "mailbox", "imap4flags", "copy"];\n'
                                          b'if header :contains "subject" "[dev]" {\n'
                                          b'  fileinto :create :flags "\\\\Flagged" "Lists/dev";\n'
                                          b'  redirect :copy "wilma@home.com";\n  stop;\n}')
    hub.send(["fred@home.com"])
    hub.deliver_queue(1)
    # fred: the folder, created under ~/mail with the flag; nothing in the INBOX
    folder = fred / "mail" / "Lists" / "dev"
    [stored] = mbox_messages(folder)
    assert b"Subject: [dev] weekly build" in stored and b"\nX-Status: F\n" in b"\n" + stored
    assert mbox_messages(hub.root.vbox / "home.com" / "fred") == []
    assert (fred / "mail" / ".subscriptions").read_bytes() == b"V\t2\n\nLists\tdev\n"
    # the redirect was queued by the incoming sendmail; the next queue run delivers it to wilma
    hub.deliver_queue(1)
    [copy] = mbox_messages(hub.root.vbox / "home.com" / "wilma")
    assert b"Message-ID: <sieve-e2e@remote.example>" in copy
    delivered_to = [line for line in copy.split(b"\n") if line.startswith(b"Delivered-To:")]
    assert delivered_to == [b"Delivered-To: wilma@home.com", b"Delivered-To: fred@home.com"]
    # and fred sees the folder over IMAP, subscribed, with the flag the script set
    passwd = hub.root.base / "passwd"
    passwd.write_text(f"fred@home.com:s3cret:{hub.root.owner.uid}:{hub.root.owner.gid}::{fred}::\n")
    passwd.chmod(0o644)
    with Dovecot(hub.root, hub.root.owner, auth=passwd_file_auth(passwd)) as dc:
        imap = dc.login("fred@home.com", "s3cret")
        try:
            subscribed = b" ".join(line for line in imap.lsub()[1] if isinstance(line, bytes))
            assert b"Lists/dev" in subscribed, subscribed
            status, data = imap.select('"Lists/dev"', readonly=True)
            assert status == "OK" and data[0] == b"1", data
            status, fetched = imap.fetch("1", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            first = fetched[0]
            assert status == "OK" and isinstance(first, tuple), fetched
            assert b"\\Flagged" in first[0] and b"[dev] weekly build" in first[1]
            status, data = imap.select("INBOX", readonly=True)
            assert status == "OK" and data[0] == b"0", data
        finally:
            imap.logout()


def test_a_broken_script_still_delivers_and_logs(hub: SieveHub) -> None:
    fred = hub.script("home.com", "fred", b'require "fileinto";\nif header :bogus "x" { fileinto "Never"; }')
    hub.send(["fred@home.com"])
    hub.deliver_queue(1)
    assert len(mbox_messages(hub.root.vbox / "home.com" / "fred")) == 1
    log = (fred / ".dovecot.sieve.log").read_text()
    assert "line 2: unknown tag ':bogus'" in log


def test_a_redirect_loop_between_two_users_ends(hub: SieveHub) -> None:
    """fred redirects to wilma, wilma back to fred: wilma's redirect is not sent (the message
    already carries Delivered-To: fred@home.com), so wilma keeps it; nothing bounces."""
    hub.script("home.com", "fred", b'redirect "wilma@home.com";')
    wilma = hub.script("home.com", "wilma", b'redirect "fred@home.com";')
    hub.send(["fred@home.com"])
    hub.deliver_queue(1)
    hub.deliver_queue(1)
    assert mbox_messages(hub.root.vbox / "home.com" / "fred") == []
    assert len(mbox_messages(hub.root.vbox / "home.com" / "wilma")) == 1
    assert "already delivered there" in (wilma / ".dovecot.sieve.log").read_text()
    assert hub.site.queue_files() == []


VACATION = (b'require "vacation";\n'
            b'vacation :days 7 :subject "Away" "I am away until Monday; write to wilma@home.com.";')


def test_a_vacation_reply_goes_out_once_per_sender(hub: SieveHub) -> None:
    """Through sendmail and an SMTP capture standing in for the remote site: the first message
    of a sender gets one reply, from <> with RFC 3834's headers; the second within the period
    none; a list message none; every original is stored."""
    hub.script("home.com", "fred", VACATION)
    hub.send(["fred@home.com"])
    hub.deliver_queue(1)
    hub.deliver_queue(1)  # the reply, queued by the incoming daemon, leaves for the remote site
    [reply] = hub.capture.wait_for(1, timeout=30)
    assert reply.sender == "" and reply.recipients == [SENDER]
    assert reply.header("Auto-Submitted") == "auto-replied" and reply.header("Subject") == "Away"
    assert reply.header("In-Reply-To") == "<sieve-e2e@remote.example>"
    hub.send(["fred@home.com"], MESSAGE.replace(b"sieve-e2e@", b"second@"))
    hub.send(["fred@home.com"], MESSAGE.replace(b"Subject:", b"List-Id: <dev.remote.example>\r\nSubject:")
             .replace(b"sieve-e2e@", b"list@"), sender="dev@remote.example")
    hub.deliver_queue(2)
    assert hub.site.queue_files() == []  # no second reply was queued
    assert len(hub.capture.messages) == 1
    assert len(mbox_messages(hub.root.vbox / "home.com" / "fred")) == 3
