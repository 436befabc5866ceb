"""Issue 14, items 13 and 14: the database password kept from other users, and the readers
(Dovecot, the socketmap server) on a PostgreSQL role that can only read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, world_tmpdir
from tests.pg import Cluster, pg_cluster  # noqa: F401 - fixture
from tests.socketmap_harness import Client, populate, running_server, server_log, write_config
from vdeliver.accounts.maps import local_mailbox
from vdeliver.socketmap import protocol as p

pytestmark = pytest.mark.peers


@pytest.fixture
def base() -> Iterator[Path]:
    path = world_tmpdir("vdeliver-ro-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vmailctl(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(config), *args], input=stdin,
                          capture_output=True, text=True, cwd=str(ROOT), timeout=60)


def _database(cluster: Cluster, base: Path) -> str:
    return cluster.create_database("ro")


def test_readonly_role_reads_but_cannot_write(base: Path, pg_cluster: Cluster) -> None:  # noqa: F811
    dsn = _database(pg_cluster, base)
    config = write_config(base, f'dsn = "{dsn}"')
    populate(config)
    out = vmailctl(config, "db", "grant-readonly", "vdeliver_ro")
    assert out.returncode == 0, out.stderr
    assert "vdeliver_ro" in out.stdout
    assert vmailctl(config, "db", "grant-readonly", "vdeliver_ro").returncode == 0  # idempotent
    import psycopg

    ro = dsn.replace("user=postgres", "user=vdeliver_ro")
    with psycopg.connect(ro, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM mailboxes").fetchone()
        assert row is not None and row[0] > 0
        for sql in ("INSERT INTO domains (name, created_at) VALUES ('evil.com', 'x')",
                    "UPDATE mailboxes SET password = '{PLAIN}x'",
                    "DELETE FROM forwards",
                    "UPDATE meta SET value = '0'",
                    "SELECT * FROM schema_migrations"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)


def test_tracking_role_claims_but_reads_no_accounts(base: Path, pg_cluster: Cluster) -> None:  # noqa: F811
    """`vmailctl db grant-tracking vmail`: deliveries on [tracking] dsn claim and purge rows of
    the tracking table (migration 3), and cannot read or touch the accounts."""
    from vdeliver.tracking import Tracker

    dsn = _database(pg_cluster, base)
    config = write_config(base, f'dsn = "{dsn}"')
    populate(config)
    out = vmailctl(config, "db", "grant-tracking", "vdeliver_track")
    assert out.returncode == 0, out.stderr
    assert "read and write access to the tracking table: vdeliver_track" in out.stdout
    import psycopg

    role = dsn.replace("user=postgres", "user=vdeliver_track")
    t = Tracker(dsn=role)
    assert t.claim("vacation", "fred@example.org", "alice@example.org", 60)
    assert not t.claim("vacation", "fred@example.org", "alice@example.org", 60)
    assert t.purge() == 0
    t.close()
    with psycopg.connect(role, autocommit=True) as conn:
        for sql in ("SELECT * FROM mailboxes", "UPDATE mailboxes SET password = '{PLAIN}x'", "SELECT * FROM meta"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)


def test_grant_readonly_refuses_bad_role_names_and_prints_sql(base: Path) -> None:
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    for bad in ("Robert'); DROP TABLE mailboxes;--", "a b", "", "x" * 64, "Upper"):
        out = vmailctl(config, "db", "grant-readonly", bad)
        assert out.returncode != 0 and "invalid role name" in out.stderr, (bad, out.stderr)
    out = vmailctl(config, "db", "grant-readonly", "dovecot", "--sql")
    assert out.returncode == 0
    assert 'GRANT SELECT ON domains, mailboxes, aliases, forwards, meta TO "dovecot";' in out.stdout
    out = vmailctl(config, "db", "grant-readonly", "dovecot")
    assert out.returncode != 0 and "needs PostgreSQL" in out.stderr


def test_socketmap_serves_under_the_readonly_role(base: Path, pg_cluster: Cluster) -> None:  # noqa: F811
    dsn = _database(pg_cluster, base)
    config = write_config(base, f'dsn = "{dsn}"')
    populate(config)
    assert vmailctl(config, "db", "grant-readonly", "smap_ro").returncode == 0
    ro = dsn.replace("user=postgres", "user=smap_ro")
    config = write_config(base, f'dsn = "{dsn}"\nreadonly_dsn = "{ro}"')
    with running_server(config):
        c = Client(str(base / "in.sock"))
        assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
        assert c.ask("virtuser", "nobody@away.com") == p.NOTFOUND
        c.close()
        sessions = pg_cluster.psql("SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name <> 'psql' "
                                   "AND usename IN ('smap_ro', 'postgres') AND backend_type = 'client backend' "
                                   f"AND datname = '{dsn.split('dbname=')[1].split()[0]}'")
        assert sessions.split() == ["smap_ro"], sessions
    assert "Traceback" not in server_log(config)


def test_password_file_supplies_the_password(base: Path, pg_cluster: Cluster) -> None:  # noqa: F811
    """A role that must give a password (scram over the unix socket): the password comes from
    [accounts] password_file, never from the configuration file."""
    hba = pg_cluster.data / "pg_hba.conf"
    original = hba.read_text()
    pg_cluster.psql("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pwuser') "
                    "THEN CREATE ROLE pwuser LOGIN SUPERUSER; END IF; END $$")
    pg_cluster.psql("ALTER ROLE pwuser PASSWORD 's3cret''quote'")
    hba.write_text("local all pwuser scram-sha-256\n" + original)
    subprocess.run([pg_cluster.pg_ctl, "reload", "-D", str(pg_cluster.data)], check=True, capture_output=True,
                   user="postgres" if os.geteuid() == 0 else None)
    try:
        dsn = _database(pg_cluster, base).replace("user=postgres", "user=pwuser")
        secret = base / "db-password"
        secret.write_text("wrong\n")
        secret.chmod(0o600)
        config = write_config(base, f'dsn = "{dsn}"\npassword_file = "{secret}"')
        config.chmod(0o640)
        bad = vmailctl(config, "domain", "list")
        assert bad.returncode == 75 and "password authentication failed" in bad.stderr, bad.stderr
        secret.write_text("s3cret'quote\n")
        good = vmailctl(config, "domain", "add", "away.com")
        assert good.returncode == 0, good.stderr
        assert "warning" not in good.stderr
        assert "s3cret" not in config.read_text()
    finally:
        hba.write_text(original)
        subprocess.run([pg_cluster.pg_ctl, "reload", "-D", str(pg_cluster.data)], capture_output=True,
                       user="postgres" if os.geteuid() == 0 else None)


def test_world_readable_password_is_warned_about(base: Path) -> None:
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    config.chmod(0o644)
    quiet = vmailctl(config, "domain", "list")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr  # no password: nothing to hide
    # A dsn with a password in a file every user can read (the dsn is not reached: `--sql`).
    text = config.read_text().replace(f'database = "{base}/accounts.sqlite"',
                                      'dsn = "host=/nonexistent dbname=x user=u password=hunter2"')
    config.write_text(text)
    config.chmod(0o644)
    out = vmailctl(config, "db", "grant-readonly", "r", "--sql")
    assert out.returncode == 0
    assert f"warning: {config} holds a database password (in dsn) and every user can read it" in out.stderr
    assert f"chmod 0640 {config}" in out.stderr
    config.chmod(0o640)
    assert "warning" not in vmailctl(config, "db", "grant-readonly", "r", "--sql").stderr
    # The same rule for a password file.
    secret = base / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    config.write_text(text.replace(" password=hunter2\"", f"\"\npassword_file = \"{secret}\""))
    config.chmod(0o640)
    out = vmailctl(config, "db", "grant-readonly", "r", "--sql")
    assert f"warning: {secret} holds the database password and every user can read it" in out.stderr
    secret.chmod(0o600)
    assert "warning" not in vmailctl(config, "db", "grant-readonly", "r", "--sql").stderr
    # A password file that is not a regular file: a configuration error naming it.
    secret.unlink()
    os.mkfifo(secret)
    out = vmailctl(config, "domain", "list")
    assert out.returncode != 0 and "password_file" in out.stderr and "not a regular file" in out.stderr
