"""vdeliver-socketmapd's answer loop (loop.py) and server (daemon.py) run inside the test process.

The other socketmap tests start the real server as a process, as sendmail meets it; these run the
same Server on a thread of the test, so the loop's paths (cached answers, misses through the
lookup threads, pipelined requests, protocol errors, deadlines, the connection cap, metrics) are
exercised where a debugger and coverage see them.  SQLite accounts; no timing assertion.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.pg import pg_cluster, pg_conninfo  # noqa: F401
from tests.socketmap_harness import Client, populate, write_config
from vdeliver import config as config_module
from vdeliver.accounts.maps import local_mailbox
from vdeliver.log import Logger
from vdeliver.socketmap import protocol as p
from vdeliver.socketmap.daemon import Server
from vdeliver.socketmap.lookup import open_backend
from vdeliver.socketmap.settings import load_settings


@contextmanager
def in_process(base: Path, socketmap: str = "", accounts: str = "") -> Iterator[Server]:
    """The server of `base`'s configuration, serving on a thread of this process until the end
    (SQLite accounts unless `accounts` says otherwise)."""
    config = write_config(base, accounts or f'database = "{base}/accounts.sqlite"', socketmap)
    populate(config)
    cfg = config_module.load(str(config))
    settings = load_settings(cfg)
    log = Logger("vdeliver-socketmapd", cfg.syslog_facility, str(base / "server.log"))
    server = Server(settings, open_backend(cfg, log), log)
    loop = asyncio.new_event_loop()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            loop.run_until_complete(server.run(install_signals=False))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failed.append(exc)

    thread = threading.Thread(target=serve, name="test-socketmapd", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.ready and not failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.ready, failed
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(server.stop)
        thread.join(20)
        assert not thread.is_alive(), "the server did not stop"
        loop.close()
        assert not failed, failed


@pytest.fixture
def base(tmp_path: Path) -> Path:
    tmp_path.chmod(0o755)
    return tmp_path


def test_answers_cached_and_uncached_keys_in_order_on_one_connection(base: Path) -> None:
    with in_process(base) as server:
        c = Client(str(base / "out.sock"))
        try:
            first = c.ask("virtuser", "fred@away.com")  # a miss: through a lookup thread
            assert first == p.ok(local_mailbox("fred", "away.com"))
            assert c.ask("virtuser", "fred@away.com") == first  # a cached answer, from the loop itself
            assert c.ask("virtuser", "nobody@away.com") == p.NOTFOUND
            # Several requests in one write: the replies come back in the order asked.
            keys = ["fred@home.com", "nobody@away.com", "fred@away.com", "wilma@home.com"]
            c.send_raw(b"".join(p.encode_request("virtuser", k) for k in keys))
            replies = [c.read_reply() for _ in keys]
            assert replies[0] == p.ok(local_mailbox("fred", "home.com"))
            assert replies[1] == p.NOTFOUND
            assert replies[2] == first
            assert replies[3] == p.ok(local_mailbox("wilma", "home.com"))
            assert server.resolver.stats["hit"] >= 2 and server.resolver.stats["miss"] >= 3
        finally:
            c.close()


def test_an_unknown_map_is_a_permanent_error_and_the_connection_goes_on(base: Path) -> None:
    with in_process(base):
        c = Client(str(base / "out.sock"))
        try:
            reply = c.ask("no-such-map", "x")
            assert reply.status == "PERM"
            assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
        finally:
            c.close()


@pytest.mark.parametrize("garbage", [b"x:abc,", b"999999999999:", b"3:a b;"],
                         ids=["no-length", "huge-length", "bad-terminator"])
def test_a_broken_netstring_ends_that_connection_only(base: Path, garbage: bytes) -> None:
    with in_process(base):
        bad = Client(str(base / "out.sock"), timeout=5)
        good = Client(str(base / "out.sock"))
        try:
            bad.send_raw(garbage)
            assert bad.closed_by_peer() or bad.read_reply() is not None
            assert good.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
        finally:
            bad.close()
            good.close()


def test_a_client_silent_mid_request_is_closed_after_client_timeout(base: Path) -> None:
    with in_process(base, "client_timeout = 0.3\nidle_timeout = 30"):
        c = Client(str(base / "out.sock"), timeout=10)
        try:
            c.send_raw(b"20:virtuser fr")  # half a request, then nothing
            assert c.closed_by_peer()
        finally:
            c.close()


def test_an_idle_client_is_closed_after_idle_timeout(base: Path) -> None:
    with in_process(base, "idle_timeout = 1"):
        c = Client(str(base / "out.sock"), timeout=10)
        try:
            assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
            assert c.closed_by_peer()
        finally:
            c.close()


def test_connections_over_the_cap_are_refused_and_the_others_served(base: Path) -> None:
    with in_process(base, "max_connections = 2") as server:
        assert server.max_connections == 2
        kept = [Client(str(base / "out.sock")) for _ in range(2)]
        try:
            for c in kept:
                assert c.ask("virtuser", "fred@away.com").status == "OK"
            extra = Client(str(base / "out.sock"), timeout=5)
            try:
                refusal = extra.read_reply()  # a TEMP, then the connection is closed
                assert isinstance(refusal, p.Reply) and refusal.status == "TEMP", refusal
                assert extra.closed_by_peer()
            finally:
                extra.close()
            assert kept[0].ask("virtuser", "wilma@home.com").status == "OK"
        finally:
            for c in kept:
                c.close()


def test_metrics_count_lookups_when_an_endpoint_is_set(base: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with in_process(base, f'metrics = "127.0.0.1:{port}"'):
        c = Client(str(base / "out.sock"))
        try:
            for _ in range(3):
                c.ask("virtuser", "fred@away.com")
            c.ask("virtuser", "nobody@away.com")
        finally:
            c.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
    lookups = [line for line in text.splitlines() if line.startswith("vdeliver_socketmap_lookups_total")]
    assert lookups and sum(float(line.rsplit(" ", 1)[1]) for line in lookups) >= 4, text
    assert "vdeliver_socketmap_database_up" in text


# -- one connection alone: its next request awaited in a blocking recv() (loop._solo) -------------


def test_a_new_connection_is_served_while_a_lone_one_keeps_asking_cached_keys(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The lone connection's recv() waits 1 s here, not 1 ms (any pause of the asker longer than
    # that would let the loop back to epoll): only the loop's own return to epoll every
    # _SOLO_SLICE can let the second connection in.
    from vdeliver.socketmap import loop

    monkeypatch.setattr(loop, "_RCVTIMEO", struct.pack("ll", 1, 0))
    with in_process(base) as server:
        busy = Client(str(base / "out.sock"))
        stop = threading.Event()
        answered = [0]

        def ask_forever() -> None:
            while not stop.is_set():
                assert busy.ask("virtuser", "fred@away.com").status == "OK"
                answered[0] += 1

        asker = threading.Thread(target=ask_forever, daemon=True)
        try:
            busy.ask("virtuser", "fred@away.com")  # cached from now on
            asker.start()
            deadline = time.monotonic() + 10
            while answered[0] < 100 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert answered[0] >= 100 and asker.is_alive()  # the lone connection is in its tight loop
            late = Client(str(base / "out.sock"), timeout=5)  # must not wait for the other one to stop
            try:
                assert late.ask("virtuser", "wilma@home.com") == p.ok(local_mailbox("wilma", "home.com"))
                assert server.connections == 2 and asker.is_alive()
            finally:
                late.close()
        finally:
            stop.set()
            asker.join(10)
            busy.close()


def test_a_lone_client_answered_from_the_cache_is_still_closed_when_idle(base: Path) -> None:
    with in_process(base, "idle_timeout = 1"):
        c = Client(str(base / "out.sock"), timeout=10)
        try:
            for _ in range(3):  # a miss, then cached answers: the connection waits in recv()
                assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
            assert c.closed_by_peer()
        finally:
            c.close()


def test_a_lone_client_closing_after_cached_answers_frees_its_slot(base: Path) -> None:
    with in_process(base) as server:
        c = Client(str(base / "out.sock"))
        for _ in range(3):
            assert c.ask("virtuser", "fred@away.com").status == "OK"
        c.close()
        deadline = time.monotonic() + 10
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections == 0


# -- requests remembered parsed (loop: Conn.known) ---------------------------------------------


def test_a_known_request_completing_a_partial_one_is_a_protocol_error(base: Path) -> None:
    with in_process(base):
        c = Client(str(base / "out.sock"), timeout=10)
        try:
            for _ in range(2):  # parsed once, then remembered by its bytes
                assert c.ask("virtuser", "fred@away.com").status == "OK"
            c.send_raw(b"1:")  # the start of a request ...
            time.sleep(0.2)  # ... read on its own (no assertion on time: only the order matters)
            c.send_raw(p.encode_request("virtuser", "fred@away.com"))  # ... and bytes met before
            reply = c.read_reply()  # "1:2" then "2:" where "," was due: the framing is lost
            assert isinstance(reply, p.Reply) and reply.status == "PERM", reply
            assert c.closed_by_peer()
        finally:
            c.close()


def test_a_failed_lookup_fails_its_cached_fallback_even_for_a_known_request(base: Path) -> None:
    with in_process(base) as server:
        c = Client(str(base / "out.sock"))
        try:
            for _ in range(2):  # the catch-all, cached and remembered by its bytes
                assert c.ask("virtuser", "@home.com") == p.ok("wilma@home.com")

            class Down:
                maps = server.resolver.backend.maps

                def lookup(self, map_name: str, key: str) -> str | None:
                    raise OSError("database down (test)")

            server.resolver.backend = Down()
            assert c.ask("virtuser", "fred@home.com").status == "TEMP"
            # sendmail's next fallback for fred@home.com: its cached answer would route the mail
            # to the catch-all, so this connection must say TEMP (session.FallbackChain).
            assert c.ask("virtuser", "@home.com").status == "TEMP"
        finally:
            c.close()


# -- misses on the loop's own PostgreSQL connections (pglink.py) -------------------------------

PG_KEYS = [("virtuser", "fred@away.com"), ("virtuser", "fred@alias.org"), ("virtuser", "anyone@home.com"),
           ("virtuser", "team@away.com"), ("virtuser", "multi@away.com"), ("virtuser", "dino@away.com"),
           ("virtuser", "nobody@away.com"), ("virtuser", "@home.com"), ("virtuserdomains", "alias.org"),
           ("access", "To:fred@away.com"), ("access", "To:dino@away.com"), ("access", "To:away.com"),
           ("access", "Connect:10.0.0.1"), ("Alias1", "nobody"), ("VirtHost", "x")]


@pytest.mark.peers
def test_postgresql_misses_are_sent_by_the_answer_loop_and_answer_as_the_backend_does(
        base: Path, pg_conninfo: str) -> None:  # noqa: F811
    with in_process(base, "workers = 2", accounts=f'dsn = "{pg_conninfo}"') as server:
        backend = server.resolver.backend
        expected = {k: backend.lookup(k[0] if k[0] != "access" else "access_out",
                                      k[1]) for k in PG_KEYS if k[0] not in ("Alias1",)}
        clients = [Client(str(base / "out.sock")) for _ in range(3)]
        try:
            # All at once from three connections (queued for the links), then one at a time.
            for c in clients:
                c.send_raw(b"".join(p.encode_request(m, k) for m, k in PG_KEYS))
            for c in clients:
                replies = [c.read_reply() for _ in PG_KEYS]
                for (m, k), reply in zip(PG_KEYS, replies, strict=True):
                    if (m, k) in expected:
                        value = expected[(m, k)]
                        assert reply == (p.NOTFOUND if value is None else p.ok(value)), (m, k, reply)
            answers = server.answers
            assert answers is not None and answers.links and len(answers.links) <= 2
            assert not answers.link_queue and not answers.inflight
        finally:
            for c in clients:
                c.close()


@pytest.mark.peers
def test_a_loop_database_connection_lost_mid_statement_asks_again_the_thread_way(
        base: Path, pg_conninfo: str) -> None:  # noqa: F811
    import psycopg

    with in_process(base, "ttl = 0\nnegative_ttl = 0\nworkers = 1\ndb_timeout = 8",
                    accounts=f'dsn = "{pg_conninfo}"') as server:
        c = Client(str(base / "out.sock"), timeout=30)
        try:
            assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
            answers = server.answers
            assert answers is not None and len(answers.links) == 1
            pid = next(iter(answers.links.values())).pg.backend_pid
            with psycopg.connect(pg_conninfo) as locker, psycopg.connect(pg_conninfo, autocommit=True) as admin:
                locker.execute("LOCK TABLE mailboxes IN ACCESS EXCLUSIVE MODE")  # held until commit
                c.send_raw(p.encode_request("virtuser", "wilma@home.com"))  # its statement waits
                deadline = time.monotonic() + 20
                while not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = "
                                        "'Lock'", (pid,)).fetchone():
                    assert time.monotonic() < deadline, "the loop's statement never waited for the lock"
                    time.sleep(0.02)
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # lost with its statement out
                deadline = time.monotonic() + 20
                while pid in [lk.pg.backend_pid for lk in list(answers.links.values())]:
                    assert time.monotonic() < deadline, "the lost connection was not noticed"
                    time.sleep(0.02)
                locker.commit()
            # Asked again the thread way (a fresh connection there), answered, not TEMP.
            assert c.read_reply() == p.ok(local_mailbox("wilma", "home.com"))
            assert c.ask("virtuser", "nobody@away.com") == p.NOTFOUND
        finally:
            c.close()


def test_each_cached_answer_counts_one_hit_on_a_lone_connection_with_metrics(base: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with in_process(base, f'metrics = "127.0.0.1:{port}"') as server:
        c = Client(str(base / "out.sock"))
        try:
            for _ in range(21):  # a miss, then 20 cached answers (the lone connection's tight loop)
                assert c.ask("virtuser", "fred@away.com").status == "OK"
        finally:
            c.close()
        assert server.resolver.stats["miss"] == 1
        assert server.resolver.stats["hit"] == 20


@pytest.mark.peers
def test_an_idle_loop_database_connection_closed_by_the_server_is_replaced(
        base: Path, pg_conninfo: str) -> None:  # noqa: F811
    import psycopg

    with in_process(base, "ttl = 0\nnegative_ttl = 0\nworkers = 1", accounts=f'dsn = "{pg_conninfo}"') as server:
        c = Client(str(base / "out.sock"))
        try:
            assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
            answers = server.answers
            assert answers is not None and len(answers.links) == 1
            pid = next(iter(answers.links.values())).pg.backend_pid
            with psycopg.connect(pg_conninfo, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # as idle_session_timeout would
            deadline = time.monotonic() + 20
            while pid in [lk.pg.backend_pid for lk in list(answers.links.values())]:
                assert time.monotonic() < deadline, "the closed connection was not noticed"
                time.sleep(0.02)
            assert c.ask("virtuser", "wilma@home.com") == p.ok(local_mailbox("wilma", "home.com"))
            assert [lk.pg.backend_pid for lk in list(answers.links.values())] not in ([], [pid])
        finally:
            c.close()


@pytest.mark.peers
def test_a_statement_not_written_at_once_is_finished_when_the_socket_is_writable(
        base: Path, pg_conninfo: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # libpq in non-blocking mode may keep part of a statement when the socket buffer is full;
    # the loop then waits for EPOLLOUT and flushes.  A statement always fits here, so the link
    # says it did not (the rest of the path is real).
    from vdeliver.socketmap import pglink

    send = pglink.Link.send
    monkeypatch.setattr(pglink.Link, "send", lambda self, params: send(self, params) and False)
    with in_process(base, "ttl = 0\nnegative_ttl = 0\nworkers = 1", accounts=f'dsn = "{pg_conninfo}"'):
        c = Client(str(base / "out.sock"))
        try:
            for _ in range(3):
                assert c.ask("virtuser", "fred@away.com") == p.ok(local_mailbox("fred", "away.com"))
                assert c.ask("virtuser", "nobody@away.com") == p.NOTFOUND
        finally:
            c.close()
