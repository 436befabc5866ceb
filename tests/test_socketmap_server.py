"""The real daemon on unix sockets and loopback TCP: bad input, stalled clients,
hundreds of connections, a slow database that holds up only its own lookups,
configuration errors.  Every bad input gets PERM or a closed connection, a log
line, and the server keeps answering."""

from __future__ import annotations

import select
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port, world_tmpdir
from tests.pg import pg_cluster, pg_conninfo  # noqa: F401
from tests.socketmap_harness import Client, populate, running_server, server_log, write_config
from vdeliver.accounts.maps import local_mailbox
from vdeliver.config import ConfigError, build
from vdeliver.socketmap import protocol as p
from vdeliver.socketmap.settings import load_settings


@pytest.fixture
def base() -> Iterator[Path]:
    path = world_tmpdir("vdeliver-socketmap-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sqlite_config(base: Path) -> Path:
    port = free_port()
    config = write_config(base, f'database = "{base}/accounts.sqlite"',
                          f'client_timeout = 0.5\nmax_key = 100\ntcp = "127.0.0.1:{port}"\ntcp_access = "out"')
    populate(config)
    return config



def _tcp(config: Path) -> tuple[str, int]:
    line = next(line for line in config.read_text().splitlines() if line.startswith("tcp ="))
    host, port = line.split('"')[1].rsplit(":", 1)
    return host, int(port)


def test_bad_input_gets_perm_and_the_server_goes_on(base: Path, sqlite_config: Path) -> None:
    with running_server(sqlite_config):
        c = Client(str(base / "in.sock"))
        assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
        # Framed but unusable: PERM, and the same connection keeps working.
        assert c.ask("nosuchmap", "x") == p.perm("unknown map nosuchmap")
        assert c.ask("virtuser", "k" * 101) == p.perm("key too long (101 > 100 bytes)")
        c.send_raw(p.netstring("virtuser fr\xe9d@away.com".encode()))
        assert c.read_reply() == p.perm("non-ASCII in key")
        c.send_raw(p.netstring(b"virtuser"))
        assert c.read_reply() == p.perm("no key in request (expected '<map> <key>')")
        assert c.ask("virtuser", "fred@away.com").status == "OK"
        c.close()
        # Framing lost: one PERM, then the server closes.
        for garbage in (b"hello\r\n", b"99999999:", b"3:abc;", b"5000:" + b"x" * 10):
            g = Client(str(base / "in.sock"))
            g.send_raw(garbage)
            reply = g.read_reply()
            assert isinstance(reply, p.Reply) and reply.status == "PERM", garbage
            assert g.closed_by_peer()
            g.close()
        # Half a request, then silence: closed after client_timeout.
        s = Client(str(base / "in.sock"))
        s.send_raw(b"25:virtuser fred@")
        assert s.closed_by_peer()
        s.close()
        # An idle connection between requests is fine (sendmail keeps one open).
        idle = Client(str(base / "out.sock"))
        assert not select.select([idle.sock], [], [], 1.0)[0]
        assert idle.ask("virtuser", "wilma@home.com").status == "OK"
        idle.close()
    log = server_log(sqlite_config)
    for text in ("unknown map nosuchmap", "key too long", "non-ASCII in key", "not a netstring",
                 "request too long", "client stalled in the middle of a request"):
        assert text in log, text
    assert "Traceback" not in log


def test_tcp_listener_and_its_access_flavour(base: Path, sqlite_config: Path) -> None:
    with running_server(sqlite_config):
        tcp = Client(_tcp(sqlite_config))
        assert tcp.ask("access", "To:fred@away.com") == p.NOTFOUND  # outgoing flavour on TCP here
        assert tcp.ask("access_in", "To:fred@away.com") == p.ok("RELAY")
        tcp.close()
        unix_in = Client(str(base / "in.sock"))
        assert unix_in.ask("access", "To:fred@away.com") == p.ok("RELAY")
        unix_in.close()


def test_hundreds_of_connections_at_once(base: Path, sqlite_config: Path) -> None:
    with running_server(sqlite_config):
        clients = [Client(str(base / ("in.sock" if i % 2 else "out.sock"))) for i in range(300)]
        try:
            for i, c in enumerate(clients):  # all open at once, each asks in turn, twice
                c.send_raw(p.encode_request("virtuser", "fred@away.com" if i % 3 else f"u{i}@home.com"))
            for i, c in enumerate(clients):
                assert c.read_reply() == (p.ok(local_mailbox("fred", "away.com")) if i % 3 else p.NOTFOUND)
            for c in clients:
                assert c.ask("virtuser", "@home.com") == p.ok("wilma@home.com")
        finally:
            for c in clients:
                c.close()


@pytest.mark.peers
def test_slow_database_holds_up_only_its_own_lookups(base: Path, pg_conninfo: str) -> None:  # noqa: F811
    import psycopg

    config = write_config(base, f'dsn = "{pg_conninfo}"', "db_timeout = 5\nttl = 3600")
    populate(config)
    with running_server(config):
        fast = Client(str(base / "in.sock"))
        assert fast.ask("virtuser", "fred@away.com").status == "OK"  # now cached
        with psycopg.connect(pg_conninfo) as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")  # every uncached query now blocks
            slow = Client(str(base / "out.sock"))
            slow.send_raw(p.encode_request("virtuser", "wilma@home.com"))
            # While that lookup waits on the lock, other connections are answered.
            others = [Client(str(base / "in.sock")) for _ in range(5)]
            for c in others:
                assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
                c.close()
            assert not select.select([slow.sock], [], [], 0)[0], "the blocked lookup answered early"
            reply = slow.read_reply()  # after db_timeout: TIMEOUT (sendmail queues), never NOTFOUND
            assert isinstance(reply, p.Reply) and reply.status == "TIMEOUT", reply
            locker.execute("ROLLBACK")
        assert slow.ask("virtuser", "wilma@home.com") == p.ok(local_mailbox("wilma", "home.com"))
        slow.close()
        fast.close()
    assert "timed out" in server_log(config)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"ttl": "x"}, "[socketmap] ttl: must be a whole number"),
        ({"db_timeout": -1}, "[socketmap] db_timeout: must not be negative"),
        ({"bogus": 1}, "[socketmap] bogus: unknown key"),
        ({"socket_in": "relative.sock"}, "[socketmap] socket_in: must be an absolute path"),
        ({"socket_in": "/a", "socket_out": "/a"}, "[socketmap] socket_out: must differ from socket_in"),
        ({"tcp": "0.0.0.0:9999"}, "[socketmap] tcp: must be a loopback address"),
        ({"tcp": "127.0.0.1"}, "[socketmap] tcp: must be \"127.0.0.1:PORT\""),
        ({"tcp_access": "sideways"}, "[socketmap] tcp_access: must be one of in, out"),
        ({"socket_mode": "rw"}, "[socketmap] socket_mode: must be an octal mode"),
        ({"socket_in": "", "socket_out": ""}, "no listener"),
        ({"workers": 0}, "[socketmap] workers: must be at least 1"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, object], message: str) -> None:
    cfg = build({"socketmap": table}, "/etc/vdeliver.toml")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert message in f"{err.value.where}: {err.value.message}"


def test_second_server_on_the_same_socket_refuses(base: Path, sqlite_config: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT

    with running_server(sqlite_config):
        second = subprocess.run([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(sqlite_config),
                                 "--log", "none"], cwd=str(ROOT), capture_output=True, text=True, timeout=30)
        assert second.returncode == 71
        assert "another server is listening" in second.stderr
        c = Client(str(base / "in.sock"))
        assert c.ask("virtuser", "fred@away.com").status == "OK"
        c.close()


def test_fallback_chain_fails_the_rest_of_a_failed_address_only() -> None:
    from vdeliver.socketmap.session import FallbackChain

    chain = FallbackChain()
    assert chain.check("virtuser", "fred+x@d") is None
    chain.record("virtuser", "fred+x@d", p.temp("db down"))
    for later in ("fred++@d", "fred+*@d", "fred@d", "++@d", "+*@d", "@d"):
        reply = chain.check("virtuser", later)
        assert reply is not None and reply.status == "TEMP", later
    assert chain.check("virtuser", "wilma@d") is None  # the next address starts afresh
    assert chain.check("virtuser", "@d") is None
    chain.record("virtuser", "fred@d", p.timeout("slow"))
    assert chain.check("access_in", "to:x@d") is None  # other maps are not affected...
    assert chain.check("virtuser", "@d") is not None  # ...and do not end the chain
    chain.record("virtuser", "fred@d", p.temp("x"))
    assert chain.check("virtuser", "fred@d") is None  # the same key again is a new address
    chain.record("virtuser", "fred@d", p.ok("v"))
    assert chain.check("virtuser", "@e") is None


def test_connection_flood_cannot_exhaust_descriptors(base: Path) -> None:
    """idle_timeout = 0 and max_connections = 1000 with a 128-descriptor limit: the cap comes
    from RLIMIT_NOFILE, connections past it get TEMP and are closed, a client inside the cap
    still gets database answers, the refusal is logged a bounded number of times, and once the
    flood ends a fresh client is served."""
    import socket

    port = free_port()
    config = write_config(base, f'database = "{base}/accounts.sqlite"',
                          f'tcp = "127.0.0.1:{port}"\nidle_timeout = 0\nmax_connections = 1000\nworkers = 8')
    populate(config)
    with running_server(config, open_files=128):
        inside = Client(("127.0.0.1", port))
        assert inside.ask("virtuser", "fred@away.com").status == "OK"
        flood: list[socket.socket] = []
        refused = 0
        try:
            for _ in range(400):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                flood.append(s)
            for s in flood:  # every one is either kept (idle) or answered TEMP and closed
                s.settimeout(0.05)
                try:
                    data = s.recv(200)
                except (TimeoutError, BlockingIOError):
                    continue
                if data.startswith(b"2") or b"TEMP" in data:
                    refused += 1
            assert refused > 0
            # Inside the cap, lookups that need the database still work.
            assert inside.ask("virtuser", "wilma@home.com").status == "OK"
        finally:
            for s in flood:
                s.close()
        time.sleep(0.5)
        fresh = Client(("127.0.0.1", port))
        assert fresh.ask("virtuser", "fred@home.com").status == "OK"
        fresh.close()
        inside.close()
    log = server_log(config)
    assert "max_connections 1000 lowered to" in log
    assert log.count("connection refused") <= 3, log.count("connection refused")
    assert "Too many open files" not in log
    assert "Traceback" not in log


def test_pipelined_requests_around_a_database_lookup_are_answered_in_order(base: Path, sqlite_config: Path) -> None:
    """Cached answers go out at once, lookups wait for the database: replies still come back in
    the order of the requests, whatever mix arrives in one write."""
    fred = p.ok(local_mailbox("fred", "away.com"))
    with running_server(sqlite_config):
        c = Client(str(base / "in.sock"))
        assert c.ask("virtuser", "fred@away.com") == fred  # cached from now on
        asked = [("virtuser", "fred@away.com"), ("virtuser", "wilma@home.com"), ("virtuser", "fred@away.com"),
                 ("nosuchmap", "x"), ("virtuser", "@home.com"), ("virtuser", "nobody@away.com"),
                 ("virtuser", "fred@away.com")]
        for _ in range(3):  # cold, then cached, then cached again
            c.send_raw(b"".join(p.encode_request(m, k) for m, k in asked))
            assert [c.read_reply() for _ in asked] == [
                fred, p.ok(local_mailbox("wilma", "home.com")), fred, p.perm("unknown map nosuchmap"),
                p.ok("wilma@home.com"), p.NOTFOUND, fred]
        c.close()
    assert "Traceback" not in server_log(sqlite_config)


def test_client_that_never_reads_its_replies_is_closed_after_client_timeout(base: Path, sqlite_config: Path) -> None:
    """A client that writes requests and never reads the replies fills the socket buffers: the
    server stops reading it, serves the others, and closes it after client_timeout (0.5 s here)
    - every wait has a deadline, writing a reply too."""
    import socket

    with running_server(sqlite_config):
        hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hog.connect(str(base / "in.sock"))
        hog.settimeout(10)
        burst = p.encode_request("virtuser", "fred@away.com") * 2000
        sent = 0
        hog.setblocking(False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the server stops reading (buffers full)
            try:
                sent += hog.send(burst)
            except BlockingIOError:
                break
            except (BrokenPipeError, ConnectionResetError):
                break
        other = Client(str(base / "in.sock"))
        assert other.ask("virtuser", "fred@away.com").status == "OK"
        other.close()
        # The server gives up on it (0.5 s, checked every 1/8 s): what it did write can be
        # read, then end of file.
        time.sleep(2)
        hog.setblocking(True)
        hog.settimeout(15)
        got = b""
        try:
            while chunk := hog.recv(1 << 20):
                got += chunk
        except ConnectionResetError:
            pass
        assert got.startswith(p.ok(local_mailbox("fred", "away.com")).encode())
        hog.close()
        assert sent > 100_000
    assert "client not reading its replies for 0.5s" in server_log(sqlite_config)


@pytest.mark.peers
def test_client_gone_during_a_slow_lookup_costs_nothing_but_its_connection(base: Path, pg_conninfo: str) -> None:  # noqa: F811
    """Clients that hang up while their lookup waits on the database (and one that asks the same
    key and stays): the waiting one gets the answer once the database does, the server goes on."""
    import psycopg

    config = write_config(base, f'dsn = "{pg_conninfo}"', "db_timeout = 5\nttl = 3600")
    populate(config)
    with running_server(config):
        with psycopg.connect(pg_conninfo) as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE domains IN ACCESS EXCLUSIVE MODE")
            gone = [Client(str(base / "in.sock")) for _ in range(3)]
            for g in gone:
                g.send_raw(p.encode_request("virtuser", "wilma@home.com"))
            stays = Client(str(base / "in.sock"))
            stays.send_raw(p.encode_request("virtuser", "wilma@home.com"))
            time.sleep(0.3)
            for g in gone:
                g.close()
            time.sleep(0.3)
            locker.execute("ROLLBACK")
        assert stays.read_reply() == p.ok(local_mailbox("wilma", "home.com"))
        assert stays.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
        stays.close()
    log = server_log(config)
    assert "Traceback" not in log and "internal error" not in log
