"""Dovecot authenticates from vdeliver's accounts database (SQLite and PostgreSQL).

The private Dovecot (tests/dovecot_harness.py) runs with the three generated files
(`vdeliver.accounts.dovecot.render_files`, what `vmailctl dovecot-config` prints)
filled in for temp paths; accounts are made through the accounts package; vdeliver
delivers; imaplib logs in.  Each kind of account gives its expected IMAP answer,
Dovecot's idea of every user's mailbox is the path vdeliver delivers to, and both
count a Maildir++ quota alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dovecot_harness import Dovecot, bad_log_lines, fetch_all, message_id, vdeliver_config
from tests.helpers import ROOT, Account, MailRoot, require, require_root, run_vdeliver, world_tmpdir
from tests.pg import pg_cluster  # noqa: F401 - fixture

pytestmark = pytest.mark.peers

# Cheap hashes: the scheme is what is under test, not its cost.
FAST_HASHES = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1, "bcrypt_rounds": 4}

USERS = [
    # address, password, format, scheme, quota (bytes)
    ("fred@away.com", "away pass", "mbox", "ARGON2ID", 0),
    ("fred@home.com", "home pass", "maildir", "BLF-CRYPT", 0),
    ("quota@home.com", "quota pass", "maildir", "ARGON2ID", 20000),
    ("sue@home.com", "sue pass", "mbox", "ARGON2ID", 0),
    ("dis@home.com", "dis pass", "mbox", "ARGON2ID", 0),
    ("cycle@away.com", "cycle pass", "maildir", "ARGON2ID", 0),
]
PASSWORD = {u[0]: u[1] for u in USERS}


class Accounts:
    """vmailctl's view of the test site."""

    def __init__(self, root: MailRoot, cfg_path: Path) -> None:
        self.root = root
        self.cfg_path = cfg_path

    def vmailctl(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(self.cfg_path), *args],
            input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert r.returncode == 0, f"vmailctl {' '.join(args)}: {r.stderr}"
        return r


class Site:
    def __init__(self, root: MailRoot, vmail: Account, accounts: Accounts, dovecot: Dovecot) -> None:
        self.root = root
        self.vmail = vmail
        self.accounts = accounts
        self.dovecot = dovecot

    def deliver(self, address: str, message: bytes) -> None:
        user, domain = address.split("@")
        r = run_vdeliver(["-a", domain, "-a", user, "-f", "s@example.org"], message,
                         config=self.root.config, as_user=self.vmail)
        assert r.returncode == 0, r.stderr

    def read(self, address: str, password: str) -> list[str]:
        imap = self.dovecot.login(address, password)
        try:
            typ, _ = imap.select("INBOX")
            assert typ == "OK"
            return [message_id(m["body"]) for m in fetch_all(imap)]
        finally:
            imap.logout()

    def maildir(self, address: str) -> Path:
        user, domain = address.split("@")
        return self.root.home / domain / user / "Maildir"


def _write_site_config(root: MailRoot, *tables: dict[str, object]) -> None:
    """The MailRoot's vdeliver.toml plus [accounts] and [dovecot] tables."""
    root.write_config()
    text = root.config.read_text()
    for name, table in zip(("accounts", "dovecot"), tables, strict=False):
        text += f"\n[{name}]\n"
        for key, value in table.items():
            text += f'{key} = "{value}"\n' if isinstance(value, str) else f"{key} = {value}\n"
    root.config.write_text(text)


@pytest.fixture(scope="module", params=["sqlite", "pgsql"])
def site(request: pytest.FixtureRequest, vmail: Account) -> Iterator[Site]:
    require_root("Dovecot's mail processes switch to the vmail user")
    require("dovecot", "doveadm")
    root = MailRoot(world_tmpdir(), vmail)
    table: dict[str, object] = {"vmail_user": vmail.name, "vmail_group": vmail.name, **FAST_HASHES}
    if request.param == "sqlite":
        dbdir = root.base / "db"
        dbdir.mkdir(mode=0o700)
        table["database"] = str(dbdir / "accounts.sqlite")
    else:
        cluster = request.getfixturevalue("pg_cluster")
        table["dsn"] = cluster.create_database("dovecot")
    generated = root.base / "dovecot-etc"  # plays /etc/dovecot
    _write_site_config(root, table, {"config_dir": str(generated)})
    accounts = Accounts(root, root.config)
    for domain in ("away.com", "home.com"):
        accounts.vmailctl("domain", "add", domain)
    accounts.vmailctl("domain", "add", "alias.com", "--alias-of", "home.com")
    for address, password, fmt, scheme, quota in USERS:
        args = ["user", "add", address, "--format", fmt, "--scheme", scheme, "--password-stdin"]
        if quota:
            args += ["--quota", str(quota)]
        accounts.vmailctl(*args, stdin=password + "\n")
    accounts.vmailctl("user", "disable", "dis@home.com")
    if request.param == "pgsql":
        # Dovecot only reads: it logs in as a role that may SELECT and nothing else.
        accounts.vmailctl("db", "grant-readonly", "dovecot_ro")
        table["readonly_dsn"] = str(table["dsn"]).replace("user=postgres", "user=dovecot_ro")
        _write_site_config(root, table, {"config_dir": str(generated)})

    # What the administrator runs: the files Dovecot uses come from vmailctl itself.
    out = accounts.vmailctl("dovecot-config", "--output", str(generated)).stdout
    assert "wrote" in out and "dovecot-sql.conf.ext" in out
    if request.param == "pgsql":
        assert "user=dovecot_ro" in (generated / "dovecot-sql.conf.ext").read_text()
    assert accounts.vmailctl("dovecot-config", "--output", str(generated)).stdout.endswith(": up to date\n")
    dovecot = Dovecot(root, vmail, cfg=vdeliver_config(root), generated=generated)
    dovecot.start()
    try:
        yield Site(root, vmail, accounts, dovecot)
    finally:
        dovecot.stop()
        log = dovecot.log_text()
        dovecot.cleanup()
        shutil.rmtree(root.base, ignore_errors=True)
    assert not bad_log_lines(log), log


# -- the IMAP answer of each kind of account ---------------------------------------------------

AUTH_FAILED = "[AUTHENTICATIONFAILED]"


@pytest.mark.parametrize(
    ("login", "password", "status", "text"),
    [
        ("fred@away.com", "away pass", "OK", ""),  # {ARGON2ID}
        ("FRED@Away.COM", "away pass", "OK", ""),  # Dovecot lower-cases, the database is normalised
        ("fred@home.com", "home pass", "OK", ""),  # {BLF-CRYPT}
        ("fred@alias.com", "home pass", "OK", ""),  # alias domain of home.com
        ("fred@away.com", "home pass", "NO", AUTH_FAILED),  # the other fred's password
        ("fred@away.com", "", "NO", AUTH_FAILED),
        ("fred@alias.com", "away pass", "NO", AUTH_FAILED),
        ("dis@home.com", "dis pass", "NO", AUTH_FAILED),  # disabled: as if unknown
        ("nobody@home.com", "x", "NO", AUTH_FAILED),
        ("fred@nowhere.example", "away pass", "NO", AUTH_FAILED),
        ("fred", "away pass", "NO", AUTH_FAILED),
        ("fred'--@away.com", "x", "NO", AUTH_FAILED),  # quoted by Dovecot, not SQL
    ],
)
def test_login_answers(site: Site, login: str, password: str, status: str, text: str) -> None:
    got_status, got_text = site.dovecot.try_login(login, password)
    assert got_status == status, got_text
    assert text in got_text


def test_alias_domain_login_reads_the_real_mailbox(site: Site) -> None:
    site.deliver("fred@home.com", b"Message-ID: <to-home@t>\nSubject: x\n\nhello\n")
    (stored,) = [p for p in (site.maildir("fred@home.com") / "new").iterdir() if b"<to-home@t>" in p.read_bytes()]
    content = stored.read_bytes()  # now: SELECT moves it to cur/
    imap = site.dovecot.login("fred@alias.com", "home pass")
    try:
        imap.select("INBOX")
        (got,) = [m for m in fetch_all(imap) if b"<to-home@t>" in m["body"]]
    finally:
        imap.logout()
    assert got["body"] == content.replace(b"\n", b"\r\n")  # the bytes vdeliver wrote
    assert f",W={got['size']}" in stored.name
    via_alias = site.read("fred@alias.com", "home pass")
    assert "to-home@t" in via_alias
    assert via_alias == site.read("fred@home.com", "home pass")
    assert "to-home@t" not in site.read("fred@away.com", "away pass")


def test_suspended_user_is_refused_with_a_reason_while_mail_keeps_arriving(site: Site) -> None:
    address, password = "sue@home.com", "sue pass"
    site.deliver(address, b"Message-ID: <before@t>\nSubject: before\n\nread me\n")
    assert site.read(address, password) == ["before@t"]
    site.accounts.vmailctl("user", "suspend", address, "--reason", "Unpaid invoice: see https://billing.example")
    status, text = site.dovecot.try_login(address, password)
    assert status == "NO" and text == "[CONTACTADMIN] Unpaid invoice: see https://billing.example"
    status, text = site.dovecot.try_login(address, "wrong")  # the reason is only told to the owner
    assert status == "NO" and AUTH_FAILED in text
    for n in range(3):
        site.deliver(address, b"Message-ID: <during-%d@t>\nSubject: during\n\nwhile suspended\n" % n)
    site.accounts.vmailctl("user", "unsuspend", address)
    assert site.read(address, password) == ["before@t", "during-0@t", "during-1@t", "during-2@t"]


def test_disable_and_enable(site: Site) -> None:
    address, password = "cycle@away.com", "cycle pass"
    assert site.dovecot.try_login(address, password)[0] == "OK"
    site.accounts.vmailctl("user", "disable", address)
    assert site.dovecot.try_login(address, password) == ("NO", "[AUTHENTICATIONFAILED] Authentication failed.")
    site.accounts.vmailctl("user", "enable", address)
    assert site.dovecot.try_login(address, password)[0] == "OK"


def test_suspended_reason_default(site: Site) -> None:
    site.accounts.vmailctl("user", "suspend", "cycle@away.com")
    try:
        status, text = site.dovecot.try_login("cycle@away.com", "cycle pass")
    finally:
        site.accounts.vmailctl("user", "unsuspend", "cycle@away.com")
    from vdeliver.accounts.dovecot import DEFAULT_REASON

    assert (status, text) == ("NO", f"[CONTACTADMIN] {DEFAULT_REASON}")


# -- paths, users, quota: Dovecot and vdeliver agree ------------------------------------------


def doveadm(site: Site, *args: str) -> str:
    r = subprocess.run([require("doveadm")["doveadm"], "-c", str(site.dovecot.conf), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_userdb_mail_location_is_where_vdeliver_delivers(site: Site) -> None:
    for address, _password, fmt, _scheme, quota in USERS:
        if address == "dis@home.com":
            continue
        user, domain = address.split("@")
        dry = run_vdeliver(["--dry-run", "-a", domain, "-a", user], config=site.root.config, as_user=site.vmail)
        assert dry.returncode == 0, dry.stderr
        vd_format, vd_path = dry.stdout.decode().split()[:2]
        fields = {name: doveadm(site, "user", "-f", name, address).strip() for name in ("mail", "home", "uid", "gid")}
        if quota:
            fields["quota_rule"] = doveadm(site, "user", "-f", "quota_rule", address).strip()
        assert vd_format == fmt
        if fmt == "maildir":
            assert fields["mail"] == f"maildir:{vd_path}"
        else:
            assert fields["mail"].endswith(f":INBOX={vd_path}")
            assert fields["mail"].startswith(f"mbox:{fields['home']}/mail:")
        assert fields["uid"] == str(site.vmail.uid) and fields["gid"] == str(site.vmail.gid)
        assert fields["home"] == str(site.root.home / domain / user)
        if quota:
            assert fields["quota_rule"] == f"*:bytes={quota}"


def test_iterate_lists_every_user_that_may_log_in(site: Site) -> None:
    listed = set(doveadm(site, "user", "*").split())
    assert listed == {u[0] for u in USERS} - {"dis@home.com"} - ({"cycle@away.com"} - listed)


def test_maildir_quota_counted_alike(site: Site) -> None:
    """Dovecot writes the limit into maildirsize; vdeliver appends what it delivers and
    refuses what would go over; Dovecot's own recount from the files equals the sum."""
    from vdeliver import maildir as vmaildir

    def _quota(md: Path) -> tuple[int, int, int, int, int]:
        quota = vmaildir.read_quota(str(md))
        assert quota is not None, f"no maildirsize in {md}"
        return quota

    address, password = "quota@home.com", "quota pass"
    md = site.maildir(address)
    # vmailctl wrote the limit: vdeliver enforces it before the user ever logs in.
    assert _quota(md)[:4] == (20000, 0, 0, 0)
    imap = site.dovecot.login(address, password)
    try:
        typ, data = imap.getquotaroot("INBOX")
        assert typ == "OK", data
    finally:
        imap.logout()
    limit, count_limit, used, count, _size = _quota(md)
    assert (limit, count_limit, used, count) == (20000, 0, 0, 0)  # Dovecot reads the same file alike
    body = b"x" * 3000 + b"\n"
    delivered = 0
    for n in range(10):
        user, domain = address.split("@")
        r = run_vdeliver(["-a", domain, "-a", user], b"Message-ID: <q%d@t>\n\n" % n + body,
                         config=site.root.config, as_user=site.vmail)
        if r.returncode != 0:
            assert r.returncode == 75 and b"mailbox full" in r.stderr, r.stderr
            break
        delivered += 1
    assert 0 < delivered < 10
    _l, _c, used_vd, count_vd, _s = _quota(md)
    on_disk = sum(p.stat().st_size for sub in ("new", "cur") for p in (md / sub).iterdir())
    assert (used_vd, count_vd) == (on_disk, delivered)
    assert used_vd <= limit < used_vd + len(body) + 40
    # Dovecot expunges one: it subtracts in the same file.
    imap = site.dovecot.login(address, password)
    try:
        imap.select("INBOX")
        imap.store("1", "+FLAGS", r"(\Deleted)")
        imap.expunge()
        _typ, quota_data = imap.getquotaroot("INBOX")
    finally:
        imap.logout()
    _l, _c, used_after, count_after, _s = _quota(md)
    on_disk_after = sum(p.stat().st_size for sub in ("new", "cur") for p in (md / sub).iterdir())
    assert (used_after, count_after) == (on_disk_after, delivered - 1)
    def kib(n: int) -> int:  # IMAP QUOTA counts KiB, Dovecot rounds up
        return -(-n // 1024)

    assert f"STORAGE {kib(used_after)} {kib(limit)}" in repr(quota_data)
    # A full recount by Dovecot gives the same numbers vdeliver and Dovecot kept between them.
    os.unlink(md / "maildirsize")
    doveadm(site, "quota", "recalc", "-u", address)
    _l, _c, recount, recount_n, _s = _quota(md)
    assert (recount, recount_n) == (used_after, count_after)
