"""The accounts store: schema, migrations, constraints and transactions, on SQLite and PostgreSQL.

The constraints are the database's own (foreign keys, primary keys, CHECKs), so
they are tested with raw SQL that bypasses every Python check.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.test_accounts_env are redefined as arguments)

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.pg import pg_cluster, pg_schema_conninfo  # noqa: F401  (fixtures)
from tests.test_accounts_env import CHEAP_ARGON2, Acct, acct  # noqa: F401
from vdeliver.accounts import names, passwords, schema
from vdeliver.accounts.errors import Conflict, InvalidName, TemporaryError
from vdeliver.accounts.settings import Settings


def integrity_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import psycopg

    return (sqlite3.IntegrityError, psycopg.errors.IntegrityError)


def test_migrations_are_recorded_and_applied_once(acct: Acct) -> None:
    with contextlib.closing(acct.store()) as s:
        rows = s.rows("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [v for v, _, _ in schema.MIGRATIONS]
        assert s.schema_version() == schema.LATEST
        assert s.migrate() == []  # nothing left to do
    with contextlib.closing(acct.store()) as s:
        assert s.schema_version() == schema.LATEST


def test_a_failing_migration_leaves_no_trace(acct: Acct, monkeypatch: pytest.MonkeyPatch) -> None:
    acct.ok("domain", "add", "away.com")
    before = acct.dump()
    bad = (schema.LATEST + 1, "broken", ["CREATE TABLE half_done (x INTEGER)", "CREATE TABLE oops (syntax error"])
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, bad])
    from vdeliver.accounts import store as store_mod

    monkeypatch.setattr(store_mod, "MIGRATIONS", schema.MIGRATIONS)
    monkeypatch.setattr(store_mod, "LATEST", bad[0])
    with pytest.raises(Exception):  # noqa: B017, PT011 - a syntax error: each engine raises its own class
        acct.store()
    monkeypatch.undo()
    with contextlib.closing(acct.store()) as s:
        assert s.schema_version() == schema.LATEST
        assert not s._has_table("half_done")
    assert acct.dump() == before


def test_a_newer_database_is_refused(acct: Acct, monkeypatch: pytest.MonkeyPatch) -> None:
    from vdeliver.accounts import store as store_mod

    acct.ok("domain", "list")
    monkeypatch.setattr(store_mod, "LATEST", 1)
    with pytest.raises(TemporaryError, match="newer than this vmailctl"):
        acct.store()
    r = acct.run("domain", "list")
    assert r.rc == 75


RAW_VIOLATIONS = [
    ("INSERT INTO domains (name, created_at) VALUES ('Away.COM', 'x')", "domain not lower case"),
    ("INSERT INTO domains (name, created_at) VALUES ('', 'x')", "empty domain"),
    ("INSERT INTO domains (name, alias_of, created_at) VALUES ('b.example', 'nowhere.example', 'x')", "alias_of FK"),
    ("INSERT INTO domains (name, created_at) VALUES ('away.com', 'x')", "duplicate domain"),
    ("INSERT INTO mailboxes (username, domain, format, created_at) VALUES ('fred', 'away.com', 'maildir', 'x')",
     "duplicate (user, domain)"),
    ("INSERT INTO mailboxes (username, domain, format, created_at) VALUES ('Wilma', 'away.com', 'mbox', 'x')",
     "user not lower case"),
    ("INSERT INTO mailboxes (username, domain, format, created_at) VALUES ('x', 'nowhere.example', 'mbox', 'x')",
     "mailbox domain FK"),
    (("INSERT INTO mailboxes (username, domain, format, status, created_at)"
     " VALUES ('x', 'away.com', 'mbox', 'frozen', 'x')"),
     "status check"),
    ("INSERT INTO mailboxes (username, domain, format, created_at) VALUES ('x', 'away.com', 'mh', 'x')",
     "format check"),
    (("INSERT INTO mailboxes (username, domain, format, quota_bytes, created_at)"
     " VALUES ('x', 'away.com', 'mbox', -1, 'x')"),
     "quota check"),
    ("INSERT INTO mailboxes (username, domain, format, keep_copy, created_at) VALUES ('x', 'away.com', 'mbox', 2, 'x')",
     "boolean check"),
    ("INSERT INTO forwards (username, domain, target) VALUES ('ghost', 'away.com', 'a@b.example')", "forward FK"),
    ("INSERT INTO aliases (username, domain, target) VALUES ('a', 'away.com', 'no-at-sign')", "target check"),
    ("DELETE FROM domains WHERE name = 'away.com'", "domain with mailboxes (RESTRICT)"),
]


@pytest.mark.parametrize(("sql", "why"), RAW_VIOLATIONS, ids=[w for _, w in RAW_VIOLATIONS])
def test_schema_constraints_hold_without_python(acct: Acct, sql: str, why: str) -> None:
    acct.ok("domain", "add", "away.com")
    acct.ok("user", "add", "fred@away.com", "--no-password", "--no-mailbox")
    before = acct.dump()
    with contextlib.closing(acct.store()) as s, pytest.raises(integrity_errors()):
        s.execute("BEGIN")
        try:
            s.execute(sql)
        finally:
            s.execute("ROLLBACK")
    assert acct.dump() == before


def test_one_transaction_per_command(acct: Acct) -> None:
    acct.ok("domain", "add", "away.com")
    before = acct.dump()
    with contextlib.closing(acct.store()) as s:
        with pytest.raises(Conflict), s.transaction():
            s.domain_add("home.com")
            s.user_add("fred", "home.com", "", "mbox")
            s.user_add("fred", "home.com", "", "mbox")  # refused: the whole command rolls back
        with pytest.raises(RuntimeError), s.transaction():
            s.domain_add("other.example")
            raise RuntimeError("crash in the middle")
    assert acct.dump() == before


def test_serial_counts_changes(acct: Acct) -> None:
    with contextlib.closing(acct.store()) as s:
        assert s.meta()[0] == 0
    acct.ok("domain", "add", "away.com")
    acct.ok("domain", "add", "home.com")
    acct.run("domain", "add", "home.com")  # refused: no change
    with contextlib.closing(acct.store()) as s:
        serial, changed = s.meta()
        assert serial == 2 and changed.startswith("20")


def test_password_hashes_verify() -> None:
    s = Settings(**CHEAP_ARGON2)  # type: ignore[arg-type]
    h = passwords.hash_password("pässword", s)
    assert h.startswith("{ARGON2ID}$argon2id$v=19$m=8,t=1,p=1$")
    assert passwords.verify("pässword", h) and not passwords.verify("password", h)
    b = passwords.hash_password("x" * 72, Settings(bcrypt_rounds=4), "BLF-CRYPT")
    assert b.startswith("{BLF-CRYPT}$2b$04$") and passwords.verify("x" * 72, b)
    with pytest.raises(passwords.PasswordError, match="72 bytes"):
        passwords.hash_password("x" * 73, Settings(bcrypt_rounds=4), "BLF-CRYPT")
    assert passwords.check_imported("{SHA512-CRYPT}$6$abc$def") == "{SHA512-CRYPT}$6$abc$def"
    with pytest.raises(InvalidName):
        passwords.check_imported("$6$abc$def")
    assert passwords.scheme_of("{PLAIN}x") == "PLAIN"


@given(st.text(min_size=1, max_size=80))
def test_user_names_are_safe_and_normalised(raw: str) -> None:
    try:
        name = names.user(raw)
    except InvalidName:
        return
    assert name == name.lower() and names.user(name) == name
    assert not set(name) & set("/+@:,|\"\\ \t\n%#") and ".." not in name and not name.startswith(".")


@given(st.text(alphabet=st.sampled_from("abcXYZ019-._ü."), min_size=1, max_size=40))
def test_domain_names_are_safe_and_normalised(raw: str) -> None:
    try:
        name = names.domain(raw)
    except InvalidName:
        return
    assert names.domain(name) == name and name == name.lower() and name.isascii()
    assert all(label and not label.startswith("-") for label in name.split("."))


@given(st.text(max_size=60))
def test_targets_never_run_programs_or_write_files(raw: str) -> None:
    try:
        t = names.target(raw)
    except InvalidName:
        return
    assert "@" in t and not t.startswith(("|", "/", ":include:")) and not set(t) & set(" \t\n,:\"\\|/")


def test_settings_defaults_are_the_documented_ones() -> None:
    from vdeliver.accounts import settings
    from vdeliver.config import Config

    s: Any = settings.load(Config())
    assert (s.database, s.maps_directory, s.makemap, s.password_scheme, s.reject_unknown) == (
        "/var/lib/vdeliver/accounts.sqlite", "/etc/mail", "/usr/sbin/makemap", "ARGON2ID", True)
    assert s.backend == "sqlite"
