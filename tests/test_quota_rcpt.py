"""Quota at RCPT (issue 20): a full Maildir++ mailbox is refused while the client is still
talking, never accepted and bounced later.  The LMTP server answers RCPT `452 4.2.2` (or `552
5.2.2` with over_quota = "bounce"), as Dovecot's lmtp_rcpt_check_quota; the SIZE the client
declared counts; a mailbox without a quota, or one whose quota cannot be read, is accepted
(DATA checks again)."""

from __future__ import annotations

import os
import shutil
import smtplib
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT, MailRoot
from tests.sendmail_harness import Site
from tests.test_lmtp_server import Lmtpd
from tests.test_socketmap_sendmail import PROD_IN, SOCK_IN_MC

MSG = b"Subject: q\r\n\r\nhello\r\n"


@pytest.fixture
def full(mailroot: MailRoot) -> MailRoot:
    """fred@example.org: 900 of 1000 bytes used; wilma@example.org: no quota."""
    if not IS_ROOT:
        pytest.skip("the server tests start vdeliver-lmtpd as root serving as vmail")
    md = mailroot.add_maildir("example.org", "fred")
    (md / "maildirsize").write_text("1000S\n900 1\n")
    os.chown(md / "maildirsize", mailroot.owner.uid, mailroot.owner.gid)
    mailroot.add_maildir("example.org", "wilma")
    return mailroot


def rcpt(server: Lmtpd, address: str, size: int = 0) -> tuple[int, bytes]:
    c = server.client()
    try:
        code, text = c.mail("s@example.org", [f"SIZE={size}"] if size else [])
        assert code == 250, text
        return c.rcpt(address)
    finally:
        c.quit()


@pytest.mark.parametrize(("over_quota", "code", "dsn"), [("defer", 452, b"4.2.2"), ("bounce", 552, b"5.2.2")])
def test_a_full_mailbox_is_refused_at_rcpt(full: MailRoot, over_quota: str, code: int, dsn: bytes) -> None:
    full.write_config(over_quota=over_quota)
    server = Lmtpd(full, metrics=str(full.base / "run" / "m.sock")).start()
    try:
        got = rcpt(server, "fred@example.org", size=200)
        assert got[0] == code and got[1].startswith(dsn) and b"mailbox full" in got[1], got
        assert rcpt(server, "fred@example.org", size=50)[0] == 250  # it fits
        assert rcpt(server, "wilma@example.org", size=10**6)[0] == 250  # no quota
        assert "mailbox full" in server.log()
    finally:
        server.stop()


def test_with_the_check_off_data_refuses_instead(full: MailRoot) -> None:
    server = Lmtpd(full, rcpt_check_quota=False).start()
    try:
        c = server.client()
        try:
            assert c.mail("s@example.org", ["SIZE=200"])[0] == 250
            assert c.rcpt("fred@example.org")[0] == 250
            code, text = c.data(MSG + b"x" * 200 + b"\r\n")
            assert code == 452 and text.startswith(b"4.2.2"), text
        finally:
            c.quit()
    finally:
        server.stop()


def test_a_quota_that_cannot_be_read_refuses_nothing_at_rcpt(full: MailRoot) -> None:
    md = full.home / "example.org" / "fred" / "Maildir"
    (md / "maildirsize").unlink()
    (md / "maildirsize").mkdir()  # not a regular file: DATA reports it, RCPT lets it through
    server = Lmtpd(full).start()
    try:
        assert rcpt(server, "fred@example.org", size=200)[0] == 250
    finally:
        server.stop()


def test_the_bad_value_is_one_line(full: MailRoot) -> None:
    from vdeliver.config import ConfigError, build
    from vdeliver.lmtp.settings import settings

    with pytest.raises(ConfigError, match="rcpt_check_quota"):
        settings(build({"lmtp": {"rcpt_check_quota": "yes"}}))


def test_smtplib_is_what_sendmail_would_see(full: MailRoot) -> None:
    """The whole transaction: the full mailbox refused at RCPT, the other recipient delivered."""
    server = Lmtpd(full).start()
    try:
        c = server.client()
        try:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                c.sendmail("s@example.org", ["fred@example.org"], MSG + b"y" * 200 + b"\r\n")
            refused = c.sendmail("s@example.org", ["fred@example.org", "wilma@example.org"], MSG + b"y" * 200 + b"\r\n")
            assert refused == {"fred@example.org": (452, b"4.2.2 <fred@example.org> mailbox full")}
        finally:
            c.quit()
    finally:
        server.stop()


# -- the incoming sendmail asks the socketmap server (examples/sendmail_in-socketmap.mc) ----------


def quota_site(base: Path, over_quota: str = "defer") -> Path:
    """The socketmap fixtures' accounts, with the Maildirs under base/home: fred@home.com full
    (900 of 900 bytes), wilma@home.com with room, fred@away.com an mbox user."""
    from tests.socketmap_harness import populate, write_config

    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    config.write_text(f'maildir_path = "{base}/home/{{domain}}/{{user}}/Maildir"\nover_quota = "{over_quota}"\n'
                      + config.read_text())
    populate(config)
    for user, line in (("fred", "900S\n900 1\n"), ("wilma", "900S\n100 1\n")):
        md = base / "home" / "home.com" / user / "Maildir"
        md.mkdir(parents=True)
        (md / "maildirsize").write_text(line)
    for path in [base / "home", *(base / "home").rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)  # the server reads them as vmail
    return config


@pytest.mark.parametrize("over_quota", ["defer", "bounce"])
def test_the_quota_map(over_quota: str) -> None:
    from tests.helpers import world_tmpdir
    from tests.socketmap_harness import Client, running_server
    from vdeliver.socketmap import protocol as p

    base = world_tmpdir("vdeliver-quota-")
    try:
        config = quota_site(base, over_quota)
        full = "552 5.2.2 mailbox full" if over_quota == "bounce" else "452 4.2.2 mailbox full"
        with running_server(config):
            c = Client(str(base / "in.sock"))
            try:
                assert c.ask("quota", "fred@home.com") == p.ok(full)
                assert c.ask("quota", "<Fred+news@Home.COM>") == p.ok(full)  # case, detail, brackets
                for key in ("wilma@home.com", "fred@away.com", "nobody@home.com", "info@away.com", "junk", "@"):
                    assert c.ask("quota", key) == p.NOTFOUND, key
            finally:
                c.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.peers
def test_sendmail_refuses_a_full_mailbox_at_rcpt(site: Site) -> None:
    from tests.sendmail_harness import HOSTNAME
    from tests.socketmap_harness import running_server

    base = site.base / "socketmap"
    base.mkdir(mode=0o755)
    config = quota_site(base)
    sock_in = site.compile(SOCK_IN_MC, "in-sock", replace={PROD_IN: str(base / "in.sock")})
    with running_server(config):
        script = "".join(f"Local_check_rcpt <{a}>\n" for a in ("fred@home.com", "wilma@home.com", "fred@away.com"))
        out = site.sendmail(sock_in, "-bt", input=script.encode(), check=True).stdout.decode(errors="replace")
        results = [line.split("returns:", 1)[1].strip() for line in out.splitlines()
                   if "Local_check_rcpt" in line and "returns:" in line]
        assert results == ['$# error $@ 4 . 2 . 2 $: "452 4.2.2 Mailbox full"', "OKAY", "OKAY"], out
        _in_cf, port, _ = site.serve(SOCK_IN_MC, "in", replace={PROD_IN: str(base / "in.sock")})
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as smtp:
            smtp.mail("someone@remote.example")
            code, text = smtp.rcpt("fred@home.com")
            assert code == 452 and b"4.2.2 Mailbox full" in text, (code, text)
            assert smtp.rcpt("wilma@home.com")[0] == 250
            assert smtp.rcpt("nobody@away.com")[0] == 550  # unknown users are still refused by access
        assert HOSTNAME
