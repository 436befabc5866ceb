"""Private PostgreSQL clusters for tests: initdb + pg_ctl under a temporary directory.

The tests never touch the machine's own PostgreSQL.  Each cluster lives in a
world-traversable temp dir (`helpers.world_tmpdir`), listens on a unix socket
there (and, when asked, on 127.0.0.1 with a free port), trusts local connections
and runs with fsync off: it is a throw-away test server.  PostgreSQL refuses to
run as root, so when the tests run as root initdb/pg_ctl run as the `postgres`
system user created by Debian's postgresql package.

Use from a test module (pytest finds fixtures imported into the module):

    from tests.pg import pg_cluster, pg_conninfo, pg_clusters, pg_schema_conninfo  # noqa: F401

    def test_x(pg_conninfo: str) -> None:      # a fresh database per test
        with psycopg.connect(pg_conninfo) as conn: ...

`pg_schema_conninfo` is a fresh schema instead (a search_path in one shared
database): milliseconds instead of about a second per test.

`pg_cluster` is one session-wide cluster; `pg_clusters` is a pair of further
clusters (for failover tests) whose `stop()` / `start()` may be called by a
test; `Cluster.multi_host_conninfo(a, b)` gives a libpq multi-host string.
Missing binaries skip the tests, or fail them under VDELIVER_REQUIRE_PEERS=1.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT, RunAs, free_port, require, run_as, world_tmpdir

_ENV = {"PATH": "/usr/lib/postgresql/15/bin:/usr/bin:/bin", "LANG": "C", "LC_ALL": "C"}
_counter = itertools.count(1)



class Cluster:
    """One private PostgreSQL server; superuser `postgres`, trust authentication."""

    def __init__(self, name: str = "pg", *, tcp: bool = False) -> None:
        bins = require("initdb", "pg_ctl")
        # Resolve symlinks (/usr/local/bin/pg_ctl -> .../15/bin/pg_ctl) to find psql beside them.
        self.initdb = os.path.realpath(bins["initdb"])
        self.pg_ctl = os.path.realpath(bins["pg_ctl"])
        self.psql_bin = str(Path(self.pg_ctl).with_name("psql"))
        if not os.path.exists(self.psql_bin):
            self.psql_bin = require("psql")["psql"]
        self.base = world_tmpdir(f"vdeliver-{name}-")
        self.data = self.base / "data"
        self.run = self.base / "run"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.tcp = tcp
        self.running = False
        self._run_as: RunAs = {}
        if IS_ROOT:
            pw = pwd.getpwnam("postgres")
            self._run_as = run_as(pw.pw_uid, pw.pw_gid)
            owner = (pw.pw_uid, pw.pw_gid)
        else:
            owner = (os.geteuid(), os.getegid())
        self.run.mkdir(mode=0o755)
        self.log.touch()
        for path in (self.run, self.log):
            os.chown(path, *owner)
        os.chown(self.base, *owner)  # initdb creates data/ inside
        self._pg(
            [self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            timeout=120,
        )
        listen = "127.0.0.1" if tcp else ""
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nlisten_addresses = '{listen}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.run}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 50\nshared_buffers = 16MB\n"
            )
        atexit.register(self.destroy)

    def _pg(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=_ENV, cwd=str(self.base), timeout=timeout,
            **self._run_as,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
                               f"\n{self.log.read_text(errors='replace')[-2000:]}")
        return proc

    def start(self) -> None:
        if not self.running:
            self._pg([self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"],
                     timeout=90)
            self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._pg([self.pg_ctl, "-D", str(self.data), "-w", "-t", "60", "-m", mode, "stop"], timeout=90)
            self.running = False

    def destroy(self) -> None:
        try:
            if self.data.exists():
                self.running = True  # a crashed test may have left it up: try to stop anyway
                try:
                    self.stop("immediate")
                except (RuntimeError, subprocess.SubprocessError):
                    pass
        finally:
            self.running = False
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.tcp else str(self.run)

    def conninfo(self, dbname: str = "postgres", user: str = "postgres") -> str:
        """A libpq key=value conninfo string (unix socket, or 127.0.0.1 when tcp=True)."""
        return f"host={self.host} port={self.port} dbname={dbname} user={user} connect_timeout=5"

    @staticmethod
    def multi_host_conninfo(clusters: list[Cluster], dbname: str = "postgres", user: str = "postgres") -> str:
        """One conninfo naming several servers: libpq tries them in order."""
        hosts = ",".join(c.host for c in clusters)
        ports = ",".join(str(c.port) for c in clusters)
        return f"host={hosts} port={ports} dbname={dbname} user={user} connect_timeout=5"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL through the server's own psql client (no psycopg needed)."""
        proc = subprocess.run(
            [self.psql_bin, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.run), "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql],
            capture_output=True, text=True, env=_ENV, timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed: {proc.stderr.strip()}")
        return proc.stdout

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its conninfo."""
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.conninfo(name)

    def create_schema(self, prefix: str = "s") -> str:
        """A new empty schema in one shared database (much cheaper than CREATE DATABASE):
        returns a conninfo whose search_path is that schema."""
        if not getattr(self, "_schema_db", ""):
            self._schema_db = f"schemas_{os.getpid()}"
            self.psql(f'CREATE DATABASE "{self._schema_db}"')
        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        self.psql(f'CREATE SCHEMA "{name}"', dbname=self._schema_db)
        return self.conninfo(self._schema_db) + f" options=-csearch_path={name}"

    def drop_schema(self, conninfo: str) -> None:
        name = conninfo.rsplit("search_path=", 1)[1]
        if self.running:
            self.psql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE', dbname=self._schema_db)

    def drop_database(self, conninfo: str) -> None:
        name = dict(part.split("=", 1) for part in conninfo.split())["dbname"]
        if self.running:
            self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_cluster(name: str = "pg", *, tcp: bool = False) -> Cluster:
    cluster = Cluster(name, tcp=tcp)
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One running private cluster for the whole session."""
    cluster = start_cluster("pg")
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_conninfo(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh database on the session cluster, dropped afterwards."""
    conninfo = pg_cluster.create_database()
    try:
        yield conninfo
    finally:
        try:
            pg_cluster.drop_database(conninfo)
        except RuntimeError:
            pass


@pytest.fixture
def pg_schema_conninfo(pg_cluster: Cluster) -> Iterator[str]:
    """A fresh schema (search_path) on the session cluster, dropped afterwards: for tests
    that only need empty tables, this costs milliseconds where a database costs a second."""
    conninfo = pg_cluster.create_schema()
    try:
        yield conninfo
    finally:
        try:
            pg_cluster.drop_schema(conninfo)
        except RuntimeError:
            pass


@pytest.fixture(scope="session")
def pg_clusters() -> Iterator[tuple[Cluster, Cluster]]:
    """Two running private clusters (primary, secondary) for failover tests.

    A test that stops one must start it again (or accept that later tests see it down:
    call `.start()`; it is a no-op when running).
    """
    first = start_cluster("pga")
    try:
        second = start_cluster("pgb")
    except BaseException:
        first.destroy()
        raise
    try:
        yield first, second
    finally:
        first.destroy()
        second.destroy()


def wait_for_socket(cluster: Cluster, timeout: float = 10) -> None:
    """Wait until the cluster's unix socket exists (after a restart)."""
    path = cluster.run / f".s.PGSQL.{cluster.port}"
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
