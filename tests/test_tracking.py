"""vdeliver.tracking: the one atomic insert-if-absent-or-expired, in SQLite and in a real
PostgreSQL; of many processes claiming the same key at once, exactly one wins."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from tests.pg import pg_cluster, pg_schema_conninfo  # noqa: F401 - fixtures
from vdeliver import config
from vdeliver.tracking import TABLE, Tracker, TrackingError


def test_claim_seen_refresh_and_purge(tmp_path: Path) -> None:
    t = Tracker(str(tmp_path / "t.sqlite"))
    assert t.claim("dup", "Fred@Example.org", "<m1@x>", 60, now=1000)
    assert not t.claim("dup", "fred@example.org", "<m1@x>", 60, now=1030)  # mailboxes compare without case
    assert t.seen("dup", "fred@example.org", "<m1@x>", now=1059)
    assert not t.seen("dup", "fred@example.org", "<m1@x>", now=1060)  # expired
    assert t.claim("dup", "fred@example.org", "<m1@x>", 60, now=1061)  # expired: claimed again
    assert not t.claim("dup", "fred@example.org", "<m1@x>", 60, refresh=True, now=1100)
    assert t.seen("dup", "fred@example.org", "<m1@x>", now=1150)  # :last moved it to 1160
    assert t.claim("vacation", "fred@example.org", "<m1@x>", 60, now=1100)  # kinds are apart
    assert t.purge(now=1200) == 2
    assert not t.seen("dup", "fred@example.org", "<m1@x>", now=1100)
    assert stat.S_IMODE(os.stat(tmp_path / "t.sqlite").st_mode) == 0o600


def test_unusable_stores_say_so(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match="missing"):
        Tracker(str(tmp_path / "missing" / "t.sqlite")).claim("dup", "a@b", "k", 1)
    (tmp_path / "real").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(TrackingError):
        Tracker(str(tmp_path / "link")).claim("dup", "a@b", "k", 1)  # never through a symlink
    (tmp_path / "garbage").write_bytes(b"not a database" * 100)
    with pytest.raises(TrackingError):
        Tracker(str(tmp_path / "garbage")).claim("dup", "a@b", "k", 1)


@pytest.mark.parametrize(("table", "message"), [
    ({"database": "relative.sqlite"}, "must be an absolute path"),
    ({"timeout": 0}, "must be more than 0 seconds"),
    ({"bogus": 1}, "unknown key"),
])
def test_settings_are_checked(table: dict[str, object], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        Tracker.from_config(config.build({"tracking": table}))


def _claim(args: tuple[str, str]) -> bool:
    database, dsn = args
    return Tracker(database, dsn).claim("dup", "fred@example.org", "<race@x>", 600)


def _race(database: str, dsn: str = "") -> list[bool]:
    with multiprocessing.get_context("fork").Pool(8) as pool:
        return pool.map(_claim, [(database, dsn)] * 16)


def test_exactly_one_of_many_processes_wins_sqlite(tmp_path: Path) -> None:
    Tracker(str(tmp_path / "t.sqlite")).purge()  # create it
    assert sorted(_race(str(tmp_path / "t.sqlite"))) == [False] * 15 + [True]


@pytest.mark.peers
def test_postgresql_claims_and_races(pg_schema_conninfo: str) -> None:  # noqa: F811
    import psycopg

    with psycopg.connect(pg_schema_conninfo, autocommit=True) as conn:
        conn.execute(TABLE)
    t = Tracker(dsn=pg_schema_conninfo)
    assert t.claim("dup", "fred@example.org", "<m1@x>", 60, now=1000)
    assert not t.claim("dup", "fred@example.org", "<m1@x>", 60, now=1030)
    assert t.claim("dup", "fred@example.org", "<m1@x>", 60, now=1061)
    assert sorted(_race("", pg_schema_conninfo)) == [False] * 15 + [True]
    # keys as senders and headers give them: a NUL, bad bytes (surrogates), 5000 characters
    for odd in ("a\x00b", "caf\udce9", "x" * 5000):
        assert t.claim("dup", "fred@example.org", odd, 60)
        assert not t.claim("dup", "fred@example.org", odd, 60) and t.seen("dup", "fred@example.org", odd)
    assert t.claim("dup", "fred@example.org", "x" * 4999 + "y", 60)  # a long key keeps its digest apart
    t.close()


def test_a_postgresql_that_is_down_is_an_error_not_a_hang() -> None:
    t = Tracker(dsn="host=/nonexistent-socket-dir dbname=x", timeout=2)
    with pytest.raises(TrackingError):
        t.claim("dup", "a@b", "k", 1)


def test_vmailctl_purges_the_expired_rows(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    db = tmp_path / "t.sqlite"
    t = Tracker(str(db))
    t.claim("dup", "a@b", "old", 1, now=1000)
    t.claim("dup", "a@b", "new", 10**9)
    t.close()
    conf = tmp_path / "vdeliver.toml"
    conf.write_text(f'[tracking]\ndatabase = "{db}"\n')
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(conf), "db",
                           "purge-tracking", "--json"], capture_output=True, text=True, cwd=root, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"removed": 1}
    assert Tracker(str(db)).seen("dup", "a@b", "new")
