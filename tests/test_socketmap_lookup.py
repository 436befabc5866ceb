"""One source of truth: every key of the compiled map files gets the same answer
through the socket, on SQLite and on a real PostgreSQL cluster; keys that are in
no file get NOTFOUND; changes made in the database become visible."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import require, world_tmpdir
from tests.pg import pg_cluster, pg_conninfo  # noqa: F401
from tests.socketmap_harness import Client, populate, running_server, server_log, write_config
from vdeliver.accounts.engines import open_store
from vdeliver.accounts.maps import ALIASES, DISABLED, build, local_mailbox
from vdeliver.accounts.settings import load as load_accounts_settings
from vdeliver.config import load as load_config
from vdeliver.socketmap import protocol as p

# socket (flavour) -> [(map name sendmail sends, compiled file, makemap flags)]
COMPILED = {
    "in.sock": [("access", "access.in", []), ("access_in", "access.in", []), ("access_out", "access_out", []),
                ("virtuser", "virtusertable", []), ("aliases", ALIASES, ["-N"])],
    "out.sock": [("access", "access_out", []), ("virtuser", "virtusertable", []), ("Alias1", ALIASES, ["-N"])],
}
ABSENT = ["nobody@away.com", "fred+x@away.com", "fred@nowhere.example", "@nowhere.example", "x@empty.net",
          "To:nowhere.example", "To:com", "To:nobody@away.com", "Connect:10.0.0.1", "From:fred@away.com",
          "vdeliver-0000000000000000", "localhost", "away.com"]


def dump(makemap: str, db: Path, flags: list[str]) -> dict[str, str]:
    out = subprocess.run([makemap, *flags, "-u", "hash", str(db)], capture_output=True, text=True, check=True)
    entries = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition("\t")
        if key != "@":  # the aliases database's "complete" marker, not an entry
            entries[key] = value
    return entries


@pytest.fixture
def base() -> Iterator[Path]:
    path = world_tmpdir("vdeliver-socketmap-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def compare_with_files(base: Path, config: Path) -> int:
    makemap = require("makemap")["makemap"]
    cfg = load_config(str(config))
    settings = load_accounts_settings(cfg)
    with open_store(settings) as store:
        snap = store.snapshot()
    build(snap, settings, cfg.host())
    maps_dir = Path(settings.maps_directory)
    compared = 0
    with running_server(config):
        for sock, maps in COMPILED.items():
            client = Client(str(base / sock))
            try:
                for map_name, file_name, flags in maps:
                    entries = dump(makemap, maps_dir / f"{file_name}.db", flags)
                    assert entries, file_name
                    for key, value in entries.items():
                        assert client.ask(map_name, key) == p.ok(value), (sock, map_name, key)
                        compared += 1
                    for key in ABSENT:
                        if key not in entries:
                            assert client.ask(map_name, key) == p.NOTFOUND, (sock, map_name, key)
                domains = [line for line in (maps_dir / "virtuserdomains").read_text().splitlines()
                           if line and not line.startswith("#")]
                assert domains
                for domain in domains:
                    assert client.ask("virtuserdomains", domain) == p.ok(domain)
                assert client.ask("virtuserdomains", "nowhere.example") == p.NOTFOUND
            finally:
                client.close()
    return compared


def test_same_answers_as_the_compiled_maps_sqlite(base: Path) -> None:
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    populate(config)
    assert compare_with_files(base, config) > 50


@pytest.mark.peers
def test_same_answers_as_the_compiled_maps_postgresql(base: Path, pg_conninfo: str) -> None:  # noqa: F811
    config = write_config(base, f'dsn = "{pg_conninfo}"')
    populate(config)
    assert compare_with_files(base, config) > 50


def test_changes_become_visible_without_waiting_for_the_ttl(base: Path) -> None:
    config = write_config(base, f'database = "{base}/accounts.sqlite"',
                          "ttl = 3600\nnegative_ttl = 3600\npoll_interval = 0.2")
    populate(config)
    settings = load_accounts_settings(load_config(str(config)))
    with running_server(config):
        client = Client(str(base / "in.sock"))
        assert client.ask("virtuser", "newbie@away.com") == p.NOTFOUND
        assert client.ask("access", "To:fred@away.com") == p.ok("RELAY")
        with open_store(settings) as store, store.transaction():
            store.user_add("newbie", "away.com", "{PLAIN}x", "mbox")
            store.user_set_status("fred", "away.com", "disabled")
        deadline = time.monotonic() + 10
        while client.ask("virtuser", "newbie@away.com") == p.NOTFOUND and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.ask("virtuser", "newbie@away.com") == p.ok(local_mailbox("newbie", "away.com"))
        assert client.ask("access", "To:fred@away.com").text.startswith("ERROR:5.2.1")
        client.close()
    assert "database changed (serial" in server_log(config)


def test_sighup_marks_the_cache_stale(base: Path) -> None:
    config = write_config(base, f'database = "{base}/accounts.sqlite"', "ttl = 3600\npoll_interval = 0")
    populate(config)
    settings = load_accounts_settings(load_config(str(config)))
    with running_server(config) as proc:
        client = Client(str(base / "out.sock"))
        assert client.ask("virtuser", "wilma@home.com").status == "OK"
        with open_store(settings) as store, store.transaction():
            store.user_set_status("wilma", "home.com", "disabled")
        assert client.ask("virtuser", "wilma@home.com").status == "OK"  # cached, no polling
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "marked stale" not in server_log(config) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.ask("virtuser", "wilma@home.com") == p.ok(DISABLED)
        client.close()


def test_server_check_mode(base: Path) -> None:
    config = write_config(base, f'database = "{base}/accounts.sqlite"')
    populate(config)
    import sys

    from tests.helpers import ROOT
    ok = subprocess.run([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--check"],
                        cwd=str(ROOT), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    config.write_text(config.read_text().replace("[socketmap]\n", "[socketmap]\nttl = \"x\"\n"))
    bad = subprocess.run([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--check"],
                         cwd=str(ROOT), capture_output=True, text=True)
    assert bad.returncode == 78
    assert "[socketmap] ttl: must be a whole number" in bad.stderr
    config.write_text(config.read_text().replace("ttl = \"x\"\n", ""))
    via_vmailctl = subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(config), "serve",
                                   "socketmap", "--check"], cwd=str(ROOT), capture_output=True, text=True)
    assert via_vmailctl.returncode == 0, via_vmailctl.stderr


@pytest.mark.peers
def test_postgresql_lookup_is_one_prepared_statement(base: Path, pg_conninfo: str) -> None:  # noqa: F811
    """Issue 21: an uncached lookup is one round trip - one server-side prepared statement, no
    BEGIN/SET/COMMIT around it - and gives the same answers as before."""
    from vdeliver.socketmap.lookup import open_backend

    config = write_config(base, f'dsn = "{pg_conninfo}"')
    populate(config)
    backend = open_backend(load_config(str(config)))
    try:
        assert backend.lookup("virtuser", "fred@away.com") == local_mailbox("fred", "away.com")
        assert backend.lookup("virtuser", "team@away.com") is not None
        assert backend.lookup("virtuser", "nobody@away.com") is None
        conn = backend._local.conn  # the lookup thread's connection (this thread here)
        prepared = conn.execute("SELECT statement FROM pg_prepared_statements").fetchall()
        assert any("FROM mailboxes" in row[0] for row in prepared), "the lookup statement is not prepared"
        # Round trips: what the client sends that the server answers at once - a Sync (extended
        # protocol) or a Query (simple protocol) - in libpq's own trace of the connection.
        trace = base / "libpq.trace"
        with open(trace, "w") as out:
            conn.pgconn.trace(out.fileno())
            for _ in range(20):
                assert backend.lookup("virtuser", "wilma@home.com") == local_mailbox("wilma", "home.com")
            conn.pgconn.untrace()
        sent = [line.split("\t")[3] for line in trace.read_text().splitlines() if line.split("\t")[1] == "F"]
        assert sent.count("Sync") + sent.count("Query") == 20, sent[:12]
        assert "Parse" not in sent  # prepared once, before; only Bind/Execute since
    finally:
        backend.close()


@pytest.mark.peers
def test_pure_python_psycopg_is_named_at_start(base: Path, pg_conninfo: str) -> None:  # noqa: F811
    """Issue 21: with psycopg's pure-Python implementation (Debian's python3-psycopg) an uncached
    lookup costs about three times the CPU (measured: 16 connections at 2,100/s against 5,400/s):
    the server says so when it starts, and how to fix it."""
    import os
    import sys

    from tests.helpers import ROOT

    config = write_config(base, f'dsn = "{pg_conninfo}"')
    populate(config)
    env = {**os.environ, "PSYCOPG_IMPL": "python"}
    out = subprocess.run([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--check",
                          "--log", "stderr"], cwd=str(ROOT), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "psycopg runs its pure-Python implementation" in out.stderr
    assert "psycopg[binary]" in out.stderr
    env["PSYCOPG_IMPL"] = "binary"
    out = subprocess.run([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--check",
                          "--log", "stderr"], cwd=str(ROOT), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "pure-Python" not in out.stderr, out.stderr
