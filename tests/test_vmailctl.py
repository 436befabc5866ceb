"""vmailctl, every command, on SQLite and on a real PostgreSQL cluster (the `acct` fixture).

Bad input gets one clear line, a documented exit code and an unchanged database.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.test_accounts_env are redefined as arguments)

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_vdeliver
from tests.pg import pg_cluster, pg_schema_conninfo  # noqa: F401  (fixtures)
from tests.test_accounts_env import Acct, acct, pg_acct, sqlite_acct  # noqa: F401


def mode(path: object) -> int:
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def test_domain_commands(acct: Acct) -> None:
    assert acct.ok("domain", "add", "Away.COM").out.strip() == "added domain away.com"
    acct.ok("domain", "add", "bücher.example")
    acct.ok("domain", "add", "alias.example", "--alias-of", "away.com")
    listing = acct.ok("domain", "list", "--json").json()
    assert [d["name"] for d in listing] == ["alias.example", "away.com", "xn--bcher-kva.example"]
    assert listing[0]["alias_of"] == "away.com"
    text = acct.ok("domain", "list").out
    assert text.splitlines()[0].split()[:2] == ["NAME", "ALIAS_OF"]
    show = acct.ok("domain", "show", "away.com", "--json").json()
    assert show["alias_domains"] == ["alias.example"] and show["mailboxes"] == []
    # away.com has an alias domain: it cannot go first
    before = acct.dump()
    r = acct.run("domain", "remove", "away.com")
    assert r.rc == 1 and "alias domains" in r.err and acct.dump() == before
    acct.ok("domain", "remove", "alias.example")
    acct.ok("domain", "remove", "away.com")
    assert [d["name"] for d in acct.ok("domain", "list", "--json").json()] == ["xn--bcher-kva.example"]
    r = acct.run("domain", "show", "away.com")
    assert r.rc == 1 and r.err == "vmailctl: error: domain away.com does not exist\n"


def test_user_add_creates_mailboxes(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "Fred@Away.com", "--format", "maildir", "--password-stdin", stdin="s3cret\n")
    acct.ok("user", "add", "wilma@away.com", "--format", "mbox", "--no-password")
    md = acct.root.home / "away.com" / "fred" / "Maildir"
    dom_dir = acct.root.home / "away.com"
    for d in (dom_dir, dom_dir / "fred", md, md / "new", md / "cur", md / "tmp"):
        st = os.stat(d)
        assert stat.S_ISDIR(st.st_mode) and mode(d) == 0o700 and st.st_uid == acct.root.owner.uid, d
    mbox = acct.root.vbox / "away.com" / "wilma"
    st = os.stat(mbox)
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and mode(mbox) == 0o600 and st.st_uid == acct.root.owner.uid
    assert mode(acct.root.vbox / "away.com") == 0o700
    users = acct.ok("user", "list", "--json").json()
    assert [(u["username"], u["format"], u["status"]) for u in users] == [("fred", "maildir", "active"),
                                                                          ("wilma", "mbox", "active")]
    assert all("password" not in u for u in users)
    show = acct.ok("user", "show", "fred@away.com", "--json").json()
    assert show["password_scheme"] == "ARGON2ID" and show["path"] == str(md)
    from vdeliver.accounts.passwords import verify

    stored = acct.user_row("fred@away.com")["password"]
    assert stored.startswith("{ARGON2ID}$argon2id$") and verify("s3cret", stored) and not verify("other", stored)
    # delivery finds both mailboxes where vmailctl made them
    msg = b"From: a@b.example\nSubject: hi\n\nbody\n"
    for user in ("fred", "wilma"):
        r = run_vdeliver(["-d", f"{user}@away.com", "-f", "a@b.example"], msg, config=acct.config,
                         as_user=acct.root.owner)
        assert r.returncode == 0, r.stderr
    assert len(os.listdir(md / "new")) == 1
    assert b"Subject: hi" in mbox.read_bytes()
    # a duplicate is refused and changes nothing
    before = acct.dump()
    dup = acct.run("user", "add", "FRED@away.com", "--no-password")
    assert dup.rc == 1 and "already exists" in dup.err and acct.dump() == before


def test_passwords(acct: Acct) -> None:
    from vdeliver.accounts.passwords import verify

    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    assert acct.user_row("fred@away.com")["password"] == ""
    acct.ok("user", "passwd", "fred@away.com", "--password-stdin", stdin="new one\n")
    assert verify("new one", acct.user_row("fred@away.com")["password"])
    acct.ok("user", "passwd", "fred@away.com", "--password-stdin", "--scheme", "BLF-CRYPT", stdin="x" * 72)
    stored = acct.user_row("fred@away.com")["password"]
    assert stored.startswith("{BLF-CRYPT}$2b$") and verify("x" * 72, stored)
    before = acct.dump()
    cases = [
        (["--scheme", "BLF-CRYPT"], "x" * 73, "longer than 72 bytes"),
        ([], "", "empty password"),
        ([], "two\nlines\n", "one line"),
        ([], "y" * 2000, "longer than 1024"),
    ]
    for extra, secret, message in cases:
        r = acct.run("user", "passwd", "fred@away.com", "--password-stdin", *extra, stdin=secret)
        assert r.rc == 1 and message in r.err, (extra, r.err)
    r = acct.run("user", "passwd", "fred@away.com")  # stdin is no terminal
    assert r.rc == 1 and "--password-stdin" in r.err
    r = acct.run("user", "passwd", "nobody@away.com", "--password-stdin", stdin="pw")
    assert r.rc == 1 and "does not exist" in r.err
    r = acct.run("user", "add", "new@away.com", "--password-stdin", "--scheme", "BLF-CRYPT", stdin="é" * 40)
    assert r.rc == 1 and "72 bytes" in r.err
    assert acct.dump() == before


def test_status_transitions(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    acct.ok("user", "suspend", "fred@away.com", "--reason", "unpaid bill")
    row = acct.user_row("fred@away.com")
    assert (row["status"], row["reason"]) == ("suspended", "unpaid bill")
    before = acct.dump()
    for args, message in ((("enable",), "is suspended, not disabled"), (("suspend",), "already suspended")):
        r = acct.run("user", *args, "fred@away.com")
        assert r.rc == 1 and message in r.err
    assert acct.dump() == before
    acct.ok("user", "unsuspend", "fred@away.com")
    acct.ok("user", "disable", "fred@away.com")
    assert acct.user_row("fred@away.com")["status"] == "disabled"
    acct.ok("user", "enable", "fred@away.com")
    row = acct.user_row("fred@away.com")
    assert (row["status"], row["reason"]) == ("active", "")


def test_quota_writes_maildirsize_that_delivery_enforces(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--format", "maildir", "--no-password")
    acct.ok("user", "add", "wilma@away.com", "--format", "mbox", "--no-password")
    md = acct.root.home / "away.com" / "fred" / "Maildir"
    assert not (md / "maildirsize").exists()
    acct.ok("user", "quota", "fred@away.com", "1K")
    size_file = md / "maildirsize"
    assert size_file.read_text().splitlines()[0] == "1024S"
    assert os.stat(size_file).st_uid == acct.root.owner.uid and mode(size_file) == 0o600
    assert acct.user_row("fred@away.com")["quota_bytes"] == 1024
    big = b"Subject: big\n\n" + b"x" * 4000 + b"\n"
    r = run_vdeliver(["-d", "fred@away.com", "-f", "a@b.example"], big, config=acct.config, as_user=acct.root.owner)
    assert r.returncode == 75 and b"4.2.2" in r.stderr  # over quota: deferred
    acct.ok("user", "quota", "fred@away.com", "0")
    assert not size_file.exists()
    r = run_vdeliver(["-d", "fred@away.com", "-f", "a@b.example"], big, config=acct.config, as_user=acct.root.owner)
    assert r.returncode == 0, r.stderr
    out = acct.ok("user", "quota", "wilma@away.com", "5M").out
    assert "not enforced" in out and acct.user_row("wilma@away.com")["quota_bytes"] == 5 << 20
    assert acct.run("user", "quota", "fred@away.com", "lots").rc == 2


def test_aliases_forwards_catchall(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    for u in ("fred", "wilma"):
        acct.ok("user", "add", f"{u}@away.com", "--no-password", "--no-mailbox")
    acct.ok("alias", "add", "info@away.com", "fred@away.com", "Wilma@AWAY.com")
    acct.ok("alias", "add", "sales@away.com", "Orders@Partner.Example")
    listing = acct.ok("alias", "list", "--json").json()
    assert {a["address"]: a["targets"] for a in listing} == {
        "info@away.com": ["fred@away.com", "wilma@away.com"], "sales@away.com": ["Orders@partner.example"]}
    acct.ok("alias", "remove", "info@away.com", "wilma@away.com")
    assert acct.ok("alias", "list", "away.com", "--json").json()[0]["targets"] == ["fred@away.com"]
    acct.ok("forward", "set", "wilma@away.com", "w@else.example", "x@else.example", "--keep-copy")
    row = acct.user_row("wilma@away.com")
    assert row["forwards"] == ["w@else.example", "x@else.example"] and row["keep_copy"] == 1
    acct.ok("catchall", "set", "away.com", "fred@away.com")
    assert acct.ok("domain", "show", "away.com", "--json").json()["catchall"] == "fred@away.com"
    before = acct.dump()
    bad = [
        (("alias", "add", "fred@away.com", "x@else.example"), "is a mailbox"),
        (("alias", "add", "info@away.com", "fred@away.com"), "already points at"),
        (("alias", "add", "me@away.com", "me@away.com"), "cannot point at itself"),
        (("alias", "add", "a@away.com", "|/bin/sh"), "not a target"),
        (("alias", "add", "a@away.com", "/etc/passwd@x.example"), "invalid local part"),
        (("alias", "add", "a@away.com", "x@away.com:include:"), "invalid domain"),
        (("alias", "add", "a@nowhere.example", "fred@away.com"), "does not exist"),
        (("alias", "remove", "ghost@away.com"), "does not exist"),
        (("forward", "set", "fred@away.com", "FRED@away.com"), "cannot forward to itself"),
        (("forward", "set", "fred@away.com", "fred+box@away.com"), "cannot forward to itself"),
        (("forward", "set", "nobody@away.com", "x@else.example"), "does not exist"),
        (("forward", "clear", "fred@away.com"), "has no forward"),
        (("user", "add", "info@away.com", "--no-password"), "is an alias"),
        (("catchall", "clear", "nowhere.example"), "does not exist"),
    ]
    for args, message in bad:
        r = acct.run(*args)
        assert r.rc == 1 and message in r.err and r.err.count("\n") == 1, (args, r.err)
    assert acct.dump() == before
    acct.ok("forward", "clear", "wilma@away.com")
    acct.ok("catchall", "clear", "away.com")
    r = acct.run("catchall", "clear", "away.com")
    assert r.rc == 1 and "no catch-all" in r.err
    acct.ok("alias", "remove", "info@away.com")
    assert [a["address"] for a in acct.ok("alias", "list", "--json").json()] == ["sales@away.com"]


def test_loops_are_refused(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("domain", "add", "home.com")
    acct.ok("domain", "add", "mirror.com", "--alias-of", "home.com")
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    acct.ok("alias", "add", "a@away.com", "b@away.com")
    acct.ok("alias", "add", "b@away.com", "c@home.com")
    acct.ok("alias", "add", "x@home.com", "b@away.com")
    acct.ok("forward", "set", "fred@away.com", "a@away.com")  # fred -> a -> b -> c (unknown): no loop
    before = acct.dump()
    loops = [
        (("alias", "add", "c@home.com", "a@away.com"), "a@away.com -> b@away.com -> c@home.com -> a@away.com"),
        (("alias", "add", "c@home.com", "x@mirror.com"), "x@mirror.com -> x@home.com"),  # via the alias domain
        (("alias", "add", "c@home.com", "fred+tag@away.com"), "fred@away.com"),          # through a forward
        (("catchall", "set", "home.com", "nobody@home.com"), "nobody@home.com"),        # catch-all into itself
        (("forward", "set", "fred@away.com", "x@mirror.com", "--keep-copy"), "x@home.com"),
    ]
    for args, path in loops[:4]:
        r = acct.run(*args)
        assert r.rc == 1 and r.err.startswith("vmailctl: error: mail loop: ") and path in r.err, (args, r.err)
    assert acct.dump() == before
    acct.ok("alias", "add", "c@home.com", "fred@else.example")  # c leaves the host: the chain ends
    acct.ok("catchall", "set", "home.com", "c@home.com")
    r = acct.run(*loops[4][0])
    assert r.rc == 0  # fred -> x@mirror -> x@home -> b -> c -> off-site: fine


def test_user_remove_keeps_mail_unless_asked(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    for u, fmt in (("fred", "maildir"), ("wilma", "mbox"), ("dino", "maildir")):
        acct.ok("user", "add", f"{u}@away.com", "--format", fmt, "--no-password")
    acct.ok("forward", "set", "fred@away.com", "f@else.example")
    out = acct.ok("user", "remove", "fred@away.com").out
    assert "still at" in out and (acct.root.home / "away.com" / "fred" / "Maildir" / "new").is_dir()
    assert acct.dump()["forwards"] == []
    acct.ok("user", "remove", "wilma@away.com", "--remove-mail")
    moved = [n for n in os.listdir(acct.root.vbox / "away.com") if n.startswith(".removed-wilma-")]
    assert len(moved) == 1 and not (acct.root.vbox / "away.com" / "wilma").exists()
    assert acct.run("user", "remove", "dino@away.com", "--unlink").rc == 2
    acct.ok("user", "remove", "dino@away.com", "--remove-mail", "--unlink")
    assert not (acct.root.home / "away.com" / "dino").exists()
    r = acct.run("user", "remove", "dino@away.com")
    assert r.rc == 1 and "does not exist" in r.err
    # a domain with mailboxes needs --force; the mail stays
    acct.ok("user", "add", "barney@away.com", "--no-password")
    r = acct.run("domain", "remove", "away.com")
    assert r.rc == 1 and "--force" in r.err
    acct.ok("domain", "remove", "away.com", "--force")
    assert acct.ok("user", "list", "--json").json() == []
    assert (acct.root.vbox / "away.com" / "barney").exists()


@pytest.mark.parametrize("args", [
    ("domain", "add", "nodot"),
    ("domain", "add", "bad_under.example"),
    ("domain", "add", "--", "-lead.example"),
    ("domain", "add", "a..b.example"),
    ("domain", "add", "x" * 64 + ".example"),
    ("domain", "add", "sp ace.example"),
    ("domain", "add", "away.com.virtuser"),
    ("domain", "add", "user@away.com"),
    ("user", "add", "a/b@away.com", "--no-password"),
    ("user", "add", "a+b@away.com", "--no-password"),
    ("user", "add", ".dot@away.com", "--no-password"),
    ("user", "add", "a..b@away.com", "--no-password"),
    ("user", "add", "x" * 65 + "@away.com", "--no-password"),
    ("user", "add", "fred@", "--no-password"),
    ("user", "add", "@away.com", "--no-password"),
    ("user", "add", "fred", "--no-password"),
    ("user", "add", "f\u00e9d@away.com", "--no-password"),
    ("user", "add", "fred@unknown.example", "--no-password"),
    ("alias", "add", "fred@away.com", "not-an-address"),
])
def test_invalid_names(acct: Acct, args: tuple[str, ...]) -> None:
    acct.ok("domain", "add", "away.com")
    before = acct.dump()
    r = acct.run(*args)
    assert r.rc == 1, r
    assert r.err.startswith("vmailctl: error: ") and r.err.count("\n") == 1 and "Traceback" not in r.err
    assert acct.dump() == before


def test_usage_errors_exit_2_with_one_clear_message(sqlite_acct: Acct) -> None:
    for args in (["frob"], ["user"], ["user", "add"], ["domain", "add", "a.example", "--bogus"],
                 ["user", "quota", "a@b.example", "-1"], []):
        r = sqlite_acct.run(*args)
        assert r.rc == 2 and r.err.startswith("vmailctl: usage error: ") and "Traceback" not in r.err, (args, r)
    r = sqlite_acct.run("--help")
    assert r.rc == 0 and "75  temporary failure" in r.out and "exit codes" in r.out


def test_locked_sqlite_database_is_temporary(sqlite_acct: Acct) -> None:
    import sqlite3

    acct = sqlite_acct
    acct.accounts["busy_timeout"] = 0
    acct.write()
    acct.ok("domain", "add", "away.com")
    before = acct.dump()
    holder = sqlite3.connect(str(acct.accounts["database"]), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        r = acct.run("domain", "add", "home.com")
        assert r.rc == 75 and "locked" in r.err and r.err.count("\n") == 1
        r = acct.run("user", "add", "fred@away.com", "--no-password")
        assert r.rc == 75
        assert acct.run("domain", "list").rc == 0  # readers are not blocked
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert acct.dump() == before
    assert not (acct.root.home / "away.com" / "fred").exists()


def test_unreachable_or_locked_postgresql_is_temporary(pg_acct: Acct) -> None:
    import psycopg

    acct = pg_acct

    acct.ok("domain", "add", "away.com")
    before = acct.dump()
    dsn = str(acct.accounts["dsn"])
    acct.accounts["busy_timeout"] = 1
    acct.write()
    with psycopg.connect(dsn) as holder:
        holder.execute("UPDATE meta SET value = value WHERE key = 'serial'")  # row lock held until rollback
        r = acct.run("domain", "add", "home.com")
        assert r.rc == 75 and "locked" in r.err, r
        holder.rollback()
    assert acct.dump() == before
    acct.accounts["dsn"] = "host=/nonexistent-vdeliver-socket-dir port=5999 dbname=x user=postgres"
    acct.write()
    r = acct.run("domain", "list")
    assert r.rc == 75 and r.err.startswith("vmailctl: error: database unreachable") and r.err.count("\n") == 1


def test_config_errors_name_the_key(sqlite_acct: Acct) -> None:
    acct = sqlite_acct
    for table, key, value, message in (
        ("accounts", "password_scheme", "MD5", "[accounts] password_scheme: must be one of"),
        ("accounts", "database", "relative.sqlite", "[accounts] database: must be an absolute path"),
        ("accounts", "argon2_time_cost", "x", "[accounts] argon2_time_cost: must be a whole number"),
        ("accounts", "frobnicate", 1, "[accounts] frobnicate: unknown key"),
        ("maps", "reject_unknown", "yes", "[maps] reject_unknown: must be true or false"),
    ):
        saved = (dict(acct.accounts), dict(acct.maps_table))
        (acct.accounts if table == "accounts" else acct.maps_table)[key] = value
        acct.write()
        r = acct.run("domain", "list")
        assert r.rc == 1 and message in r.err and str(acct.config) in r.err, r.err
        acct.accounts, acct.maps_table = saved
    acct.write()
    assert acct.run("domain", "list").rc == 0
    acct.accounts["database"] = "/nonexistent-vdeliver-dir/accounts.sqlite"
    acct.write()
    r = acct.run("domain", "list")
    assert r.rc == 1 and "directory /nonexistent-vdeliver-dir does not exist" in r.err


def test_check_reports_every_mismatch(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--format", "maildir", "--no-password", "--quota", "2M")
    acct.ok("user", "add", "wilma@away.com", "--format", "mbox", "--no-password")
    r = acct.run("check")
    assert r.rc == 1 and "never built" in r.out
    acct.ok("maps", "build")
    assert acct.ok("check").out.strip() == "no mismatch found"
    assert acct.ok("check", "--json").json() == {"ok": True, "problems": []}
    # a user without a mailbox, a mailbox without a user, stale maps, a hand-edited map
    acct.ok("user", "add", "ghost@away.com", "--no-password", "--no-mailbox")
    acct.root.add_mbox("away.com", "stray")
    (acct.root.home / "away.com" / "fred" / "Maildir" / "maildirsize").write_text("1S\n0 0\n")
    r = acct.run("check", "--json")
    problems = r.json()["problems"]
    assert r.rc == 1
    text = "\n".join(problems)
    assert "ghost@away.com: user without a mailbox" in text
    assert "stray@away.com: mailbox without a user" in text
    assert "maps are older than the database" in text
    assert "maildirsize says '1S'" in text
    acct.ok("user", "quota", "fred@away.com", "2M")
    acct.ok("alias", "add", "info@away.com", "nobody@away.com", "x@else.example")
    problems = acct.run("check", "--json").json()["problems"]
    assert "info@away.com -> nobody@away.com: no such address (mail to it is refused as unknown)" in problems
    acct.ok("alias", "remove", "info@away.com")
    acct.ok("maps", "build")
    with open(acct.maps / "virtusertable", "a") as f:
        f.write("evil@away.com root\n")
    problems = acct.run("check", "--json").json()["problems"]
    assert any("virtusertable differs" in p for p in problems)
    assert not any("older than the database" in p for p in problems)


def test_maps_build_on_both_stores(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    first = acct.ok("maps", "build", "--json").json()
    assert "virtusertable" in first["written"] and "virtusertable.db" in first["compiled"]
    again = acct.ok("maps", "build", "--json").json()
    assert again["written"] == [] and again["compiled"] == []
    text = (acct.maps / "virtusertable").read_text()
    assert "fred@away.com                   fred%3@away.com.virtuser.\n" in text
    assert text.rstrip().endswith("@away.com                       error:nouser 550 5.1.1 User unknown")


def test_import_paper_users_table(acct: Acct, tmp_path: object) -> None:
    import csv
    import sqlite3
    from pathlib import Path

    from vdeliver.accounts.passwords import verify

    rows = [
        {"username": "user1@somedomain.example", "password": "$6$salt$abcdefghijkl", "userpart": "user1",
         "domain": "somedomain.example", "forward": "", "alias_for": ""},
        {"username": "user2@somedomain.example", "password": "plain-pw", "userpart": "user2",
         "domain": "somedomain.example", "forward": "away@else.example", "alias_for": ""},
        {"username": "info@somedomain.example", "password": "", "userpart": "info",
         "domain": "somedomain.example", "forward": "",
         "alias_for": "user1@somedomain.example,user2@somedomain.example"},
        {"username": "bad/name@somedomain.example", "password": "x", "userpart": "bad/name",
         "domain": "somedomain.example", "forward": "", "alias_for": ""},
    ]
    path = Path(str(tmp_path)) / "users.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    before = acct.dump()
    dry = acct.ok("import", "users", "--csv", str(path), "--dry-run", "--json").json()
    assert dry["dry_run"] and len(dry["mailboxes"]) == 2 and acct.dump() == before
    rep = acct.ok("import", "users", "--csv", str(path), "--format", "mbox", "--json").json()
    assert rep["domains"] == ["somedomain.example"] and rep["aliases"] == 1 and rep["forwards"] == 1
    assert any("row 4" in u and "invalid character '/'" in u for u in rep["unmapped"])
    assert any("user2@somedomain.example" in u and "--plain-passwords" in u for u in rep["unmapped"])
    assert acct.user_row("user1@somedomain.example")["password"] == "{SHA512-CRYPT}$6$salt$abcdefghijkl"
    assert acct.user_row("user2@somedomain.example")["forwards"] == ["away@else.example"]
    assert (acct.root.vbox / "somedomain.example" / "user1").is_file()
    # the same table from SQLite, plain passwords hashed on request
    db = Path(str(tmp_path)) / "paper.sqlite"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE users (username varchar(60) primary key, password varchar(32), "
                 "userpart varchar(60), domain varchar(60), forward varchar(128), alias_for varchar(128))")
    conn.execute("INSERT INTO users VALUES ('u9@other.example', 'pw9', 'u9', 'other.example', NULL, NULL)")
    conn.commit()
    conn.close()
    acct.ok("import", "users", "--sqlite", str(db), "--plain-passwords", "--no-mailbox")
    assert verify("pw9", acct.user_row("u9@other.example")["password"])
    r = acct.run("import", "users", "--sqlite", str(db), "--table", "users; DROP TABLE x")
    assert r.rc == 1 and "invalid table name" in r.err
    if acct.backend == "postgresql":  # the paper's own PostgreSQL table, read with --dsn
        import psycopg

        dsn = str(acct.accounts["dsn"])
        with psycopg.connect(dsn) as pg:
            pg.execute("CREATE TABLE paper_users (username varchar(60) primary key, password varchar(32), "
                         "userpart varchar(60), domain varchar(60), forward varchar(128), alias_for varchar(128))")
            pg.execute("INSERT INTO paper_users VALUES ('pg1@other.example', '{PLAIN}x', 'pg1', 'other.example', "
                         "'pg1@offsite.example', NULL)")
        rep = acct.ok("import", "users", "--dsn", dsn, "--table", "paper_users", "--no-mailbox", "--json").json()
        assert rep["mailboxes"] == ["pg1@other.example"] and rep["forwards"] == 1 and rep["unmapped"] == []
        assert acct.user_row("pg1@other.example")["password"] == "{PLAIN}x"


def test_import_sendmail_files(acct: Acct, tmp_path: object) -> None:
    from pathlib import Path

    vut = Path(str(tmp_path)) / "virtusertable"
    vut.write_text(
        "# the paper's hand-written file\n"
        "user1@somedomain.example      user1@somedomain.example.virtuser.\n"
        "user2@somedomain.example      user2@somedomain.example.virtuser.\n"
        "alias@somedomain.example      user1@offsite.example\n"
        "anotheralias@somedomain.example user2@somedomain.example.virtuser.\n"
        "user2@somedomain.example      user2@elsewhere.example\n"
        "@somedomain.example           error:nouser 550 5.1.1 User unknown\n"
        "@mirror.example               %1@somedomain.example\n"
        "weird@somedomain.example      localalias\n"
        "@strange.example              %2@x.example\n"
    )
    acc = Path(str(tmp_path)) / "access"
    acc.write_text("somedomain.example   RELAY\nTo:user1@somedomain.example  550 Mailbox not available\n"
                   "Connect:10.0.0.1 RELAY\nghost@somedomain.example REJECT\n")
    rep = acct.ok("import", "virtusertable", str(vut), "--json", "--no-mailbox").json()
    assert sorted(rep["mailboxes"]) == ["user1@somedomain.example", "user2@somedomain.example"]
    assert rep["aliases"] == 2 and rep["forwards"] == 1
    assert len(rep["unmapped"]) == 2 and any("localalias" in u for u in rep["unmapped"])
    assert acct.ok("domain", "show", "mirror.example", "--json").json()["alias_of"] == "somedomain.example"
    assert acct.user_row("user2@somedomain.example")["forwards"] == ["user2@elsewhere.example"]
    rep = acct.ok("import", "access", str(acc), "--json").json()
    assert rep["disabled"] == 1 and len(rep["unmapped"]) == 2
    assert acct.user_row("user1@somedomain.example")["status"] == "disabled"


def test_serve_and_dovecot_dispatch(sqlite_acct: Acct, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vdeliver.socketmap.daemon", None)
    r = sqlite_acct.run("serve", "socketmap", "--check")
    assert r.rc == 1 and "socketmap server is not installed" in r.err
    monkeypatch.setitem(sys.modules, "vdeliver.accounts.dovecot", None)
    r = sqlite_acct.run("dovecot-config")
    assert r.rc == 1 and "Dovecot configuration generator is not installed" in r.err
    r = sqlite_acct.run("serve", "smtp")
    assert r.rc == 2
    seen: list[list[str]] = []

    class Fake:
        @staticmethod
        def main(argv: list[str]) -> int:
            seen.append(argv)
            return 0

    monkeypatch.setitem(sys.modules, "vdeliver.lmtp.daemon", Fake)
    assert sqlite_acct.run("serve", "lmtp", "--foreground", "-x").rc == 0
    assert seen == [["-c", str(sqlite_acct.config), "--foreground", "-x"]]
    rendered: list[object] = []

    class FakeDovecot:
        @staticmethod
        def render(cfg: object, args: list[str]) -> str:
            rendered.append((getattr(cfg, "path", None), args))
            return "# generated"

    monkeypatch.setitem(sys.modules, "vdeliver.accounts.dovecot", FakeDovecot)
    r = sqlite_acct.run("dovecot-config", "--output", "/x", "--file", "y")  # options reach the generator untouched
    assert r.rc == 0 and r.out == "# generated\n"
    assert rendered == [(str(sqlite_acct.config), ["--output", "/x", "--file", "y"])]


def test_console_script_and_hot_path() -> None:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C"}
    r = subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "--help"], capture_output=True, text=True,
                       cwd=str(ROOT), env=env, timeout=60)
    assert r.returncode == 0 and "vmailctl" in r.stdout
    code = "import sys, vdeliver.cli; print(sorted(m for m in sys.modules if m.startswith('vdeliver.accounts')))"
    r = subprocess.run([sys.executable, "-c", ("import sys, vdeliver.accounts.vmailctl as v; v.build_parser(); "
                        "print(sorted(m for m in sys.modules if m.startswith('vdeliver.accounts.') and "
                        "m.rsplit('.', 1)[1] in ('dovecot', 'store', 'maps')))")],
                       capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr  # commands import what they need when they run
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), env=env, timeout=60)
    assert r.stdout.strip() == "[]", r.stderr


def test_maps_build_says_to_restart_sendmail_when_a_start_up_class_changed(acct: Acct) -> None:
    # issue 15: a new domain's virtuserdomains is read only at start-up; the next message bounced.
    acct.ok("domain", "add", "away.com")
    r = acct.ok("maps", "build")
    assert "virtuserdomains" in r.out.splitlines()[1] and "sendmail reads these only at start-up" in r.out
    assert "kill -HUP $(head -1 /run/sendmail/mta/sendmail_out.pid)" in r.out
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    r = acct.ok("maps", "build", "--json")
    assert r.json()["restart_needed"] == []
    acct.ok("domain", "add", "home.com")
    assert "virtuserdomains" in acct.ok("maps", "build", "--json").json()["restart_needed"]


def test_maps_build_reload_without_a_running_sendmail_defers(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    r = acct.run("maps", "build", "--reload")
    assert r.rc == 75 and "cannot reload sendmail" in r.err


def test_alias_add_of_a_new_alias_says_added_then_updated(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    assert acct.ok("alias", "add", "info@away.com", "x@else.example").out.strip() == "alias info@away.com added"
    assert acct.ok("alias", "add", "info@away.com", "y@else.example").out.strip() == "alias info@away.com updated"


def test_user_list_shows_keep_copy(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    acct.ok("forward", "set", "--keep-copy", "fred@away.com", "x@else.example")
    out = acct.ok("user", "list").out
    assert "KEEP_COPY" in out.splitlines()[0] and out.splitlines()[1].rstrip().endswith("True")


def _journal_beside(box: Path, data: bytes, kind: str = "") -> Path:
    from vdeliver import recovery

    path = Path(recovery.aside_path(str(box), kind) if kind else recovery.journal_path(str(box)))
    path.write_bytes(data)
    return path


def test_user_remove_takes_the_mbox_journal_along(acct: Acct) -> None:
    """The persistent crash journal lives beside the mbox: `user remove --remove-mail` moves it
    with the mbox (under the journal name of the moved mbox, where recovery looks), --unlink
    deletes it; neither leaves it behind for a later mailbox of the same name."""
    from vdeliver import recovery

    idle = recovery.IDLE + bytes(recovery.SIZE - recovery.RECLEN)
    acct.ok("domain", "add", "away.com")
    for u in ("wilma", "dino"):
        acct.ok("user", "add", f"{u}@away.com", "--format", "mbox", "--no-password")
        box = acct.root.vbox / "away.com" / u
        _journal_beside(box, idle)
        _journal_beside(box, b"vdeliver-journal 2 ...\n", recovery.UNRESOLVED)
    acct.ok("user", "remove", "wilma@away.com", "--remove-mail")
    names = sorted(os.listdir(acct.root.vbox / "away.com"))
    moved = next(n for n in names if n.startswith(".removed-wilma-"))
    assert f".{moved}.vdeliver-journal.lock" in names and f".{moved}.vdeliver-journal.unresolved.lock" in names
    assert recovery.state(str(acct.root.vbox / "away.com" / moved)) == "idle"
    assert not any(n.startswith(".wilma.") for n in names)
    acct.ok("user", "remove", "dino@away.com", "--remove-mail", "--unlink")
    assert not any("dino" in n for n in os.listdir(acct.root.vbox / "away.com"))


def test_check_reports_mbox_journals_that_need_a_look(acct: Acct) -> None:
    """`vmailctl check` never takes a crash journal for a mailbox, and reports one that records
    an interrupted delivery, one set aside, and one whose mbox was removed by hand."""
    from vdeliver import recovery

    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--format", "mbox", "--no-password")
    acct.ok("maps", "build")
    box = acct.root.vbox / "away.com" / "fred"
    _journal_beside(box, recovery.IDLE + bytes(recovery.SIZE - recovery.RECLEN))
    assert acct.run("check", "--json").json()["problems"] == []
    st = os.stat(box)
    busy = recovery.Record(st.st_dev, st.st_ino, 0, 100, 4242, b"From x").block()
    _journal_beside(box, busy + bytes(recovery.SIZE - recovery.RECLEN))
    _journal_beside(box, b"x\n", recovery.UNTRUSTED_SUFFIX)
    _journal_beside(acct.root.vbox / "away.com" / "gone", b"")
    problems = "\n".join(acct.run("check", "--json").json()["problems"])
    assert "records a delivery in progress or interrupted" in problems and f"--repair {box}" in problems
    assert ".fred.vdeliver-journal.untrusted.lock: a journal vdeliver did not write was set aside" in problems
    assert ".gone.vdeliver-journal.lock: crash journal without a mailbox" in problems
    assert "mailbox without a user" not in problems


def test_check_reports_busy_and_torn_slots_of_the_lmtp_group_journal(acct: Acct) -> None:
    """A busy slot of vdeliver-lmtpd's group journal (a server killed mid-append) is reported
    with the mbox it names and how to recover it; an idle group journal is not a problem, and
    never taken for a domain or a mailbox."""
    from vdeliver import recovery
    from vdeliver.config import GROUP_JOURNAL

    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--format", "mbox", "--no-password")
    acct.ok("maps", "build")
    box = acct.root.vbox / "away.com" / "fred"
    journal = acct.root.vbox / GROUP_JOURNAL
    journal.write_bytes(recovery.SLOT_IDLE * recovery.GROUP_SLOTS)
    assert acct.run("check", "--json").json()["problems"] == []
    st = os.stat(box)
    busy = recovery.slot_block(recovery.Record(st.st_dev, st.st_ino, 0, 100, 4242, b"From x"), str(box))
    torn = recovery.GROUP_BUSY + b"x" * (recovery.GROUP_SLOT - len(recovery.GROUP_BUSY))
    journal.write_bytes(recovery.SLOT_IDLE * 3 + busy + torn + recovery.SLOT_IDLE * (recovery.GROUP_SLOTS - 5))
    problems = acct.run("check", "--json").json()["problems"]
    assert [p for p in problems if "slot 3 records a delivery into" in p and f"--repair {box}" in p
            and "pid 4242" in p], problems
    assert [p for p in problems if "slot 4 is torn" in p], problems
    assert len(problems) == 2, problems
