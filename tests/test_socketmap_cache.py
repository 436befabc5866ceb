"""The cache rules with an in-memory backend (the only place a fake database is used).

What matters: fresh answers from memory; failures never become NOTFOUND; stale
positive answers served (and logged) while the database is in trouble, never a
stale negative one; TEMP/TIMEOUT for
keys never seen; invalidation keeps stale answers for bad times.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest

from vdeliver.socketmap import protocol as p
from vdeliver.socketmap.cache import Resolver


class FakeBackend:
    maps = frozenset({"virtuser", "access_in"})

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}
        self.calls = 0
        self.broken: Exception | None = None
        self.delay = 0.0
        self.gate: threading.Event | None = None

    def lookup(self, map_name: str, key: str) -> str | None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        if self.broken is not None:
            raise self.broken
        return self.data.get((map_name, key))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, text: str) -> None:
        self.lines.append("info " + text)

    def warning(self, text: str) -> None:
        self.lines.append("warning " + text)

    def error(self, text: str) -> None:
        self.lines.append("error " + text)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as ex:
        yield ex


def make(pool: ThreadPoolExecutor, **kw: float) -> tuple[Resolver, FakeBackend, Clock, Log]:
    backend, clock, log = FakeBackend(), Clock(), Log()
    options = {"ttl": 60, "negative_ttl": 10, "stale_max_age": 600, "db_timeout": 0.5, **kw}
    return Resolver(backend, pool, log, clock=clock, **options), backend, clock, log  # type: ignore[arg-type]


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_hit_miss_and_ttls(pool: ThreadPoolExecutor) -> None:
    r, b, clock, _ = make(pool)
    b.data[("virtuser", "a@d")] = "a@d.virtuser."

    async def go() -> None:
        assert await r.resolve("virtuser", "a@d") == p.ok("a@d.virtuser.")
        assert await r.resolve("virtuser", "x@d") == p.NOTFOUND
        assert b.calls == 2
        b.data[("virtuser", "x@d")] = "new"
        assert await r.resolve("virtuser", "x@d") == p.NOTFOUND  # negative entry still fresh
        clock.now += 11
        assert await r.resolve("virtuser", "x@d") == p.ok("new")  # negative TTL over
        assert await r.resolve("virtuser", "a@d") == p.ok("a@d.virtuser.")  # positive still fresh
        assert b.calls == 3
        clock.now += 60
        await r.resolve("virtuser", "a@d")
        assert b.calls == 4

    run(go())


def test_unknown_map_is_perm(pool: ThreadPoolExecutor) -> None:
    r, b, _, _ = make(pool)
    assert run(r.resolve("passwd", "root")) == p.perm("unknown map passwd")
    assert b.calls == 0


def test_failure_serves_stale_then_temp(pool: ThreadPoolExecutor) -> None:
    r, b, clock, log = make(pool)
    b.data[("virtuser", "a@d")] = "a@d.virtuser."

    async def go() -> None:
        await r.resolve("virtuser", "a@d")
        await r.resolve("virtuser", "gone@d")  # a cached negative answer
        clock.now += 100  # both expired, within stale_max_age
        b.broken = RuntimeError("connection refused")
        assert await r.resolve("virtuser", "a@d") == p.ok("a@d.virtuser.")
        assert (await r.resolve("virtuser", "gone@d")).status == "TEMP"  # never a stale NOTFOUND
        never = await r.resolve("virtuser", "new@d")
        assert never.status == "TEMP" and "connection refused" in never.text
        clock.now += 600  # too old even for stale
        assert (await r.resolve("virtuser", "a@d")).status == "TEMP"
        b.broken = None
        assert await r.resolve("virtuser", "a@d") == p.ok("a@d.virtuser.")

    run(go())
    assert any("serving cached answer" in line for line in log.lines)
    assert any("no cached answer, deferring" in line for line in log.lines)
    assert sum("error database trouble" in line for line in log.lines) == 1  # logged once per state
    assert any("database answers again" in line for line in log.lines)


def test_slow_database_times_out_without_blocking_others(pool: ThreadPoolExecutor) -> None:
    r, b, clock, _ = make(pool, db_timeout=0.2)
    b.data[("virtuser", "a@d")] = "v"

    async def go() -> None:
        await r.resolve("virtuser", "a@d")
        b.gate = threading.Event()  # every database call now hangs
        slow = asyncio.create_task(r.resolve("virtuser", "other@d"))
        await asyncio.sleep(0.05)
        assert not slow.done()
        assert await r.resolve("virtuser", "a@d") == p.ok("v")  # cached: answered meanwhile
        reply = await slow
        assert reply.status == "TIMEOUT"
        clock.now += 100
        assert await r.resolve("virtuser", "a@d") == p.ok("v")  # stale on timeout too
        b.gate.set()

    run(go())


def test_concurrent_lookups_of_one_key_share_one_query(pool: ThreadPoolExecutor) -> None:
    r, b, _, _ = make(pool)
    b.data[("virtuser", "a@d")] = "v"
    b.delay = 0.1

    async def go() -> list[p.Reply]:
        return await asyncio.gather(*(r.resolve("virtuser", "a@d") for _ in range(20)))

    assert run(go()) == [p.ok("v")] * 20
    assert b.calls == 1


def test_invalidate_asks_again_but_keeps_stale(pool: ThreadPoolExecutor) -> None:
    r, b, clock, _ = make(pool)
    b.data[("virtuser", "a@d")] = "old"

    async def go() -> None:
        await r.resolve("virtuser", "a@d")
        b.data[("virtuser", "a@d")] = "new"
        clock.now += 1
        r.invalidate()
        clock.now += 1
        assert await r.resolve("virtuser", "a@d") == p.ok("new")
        r.invalidate()
        clock.now += 1
        b.broken = OSError("down")
        assert await r.resolve("virtuser", "a@d") == p.ok("new")

    run(go())


def test_size_bound(pool: ThreadPoolExecutor) -> None:
    r, _b, _, _ = make(pool, max_entries=50)

    async def go() -> None:
        for i in range(200):
            await r.resolve("virtuser", f"u{i}@d")

    run(go())
    assert len(r) <= 50


def test_socketmap_never_serves_a_stale_notfound(pool: ThreadPoolExecutor) -> None:
    """A key unknown before an outage may be the account created since: TEMP, not NOTFOUND."""
    r, b, clock, _ = make(pool, negative_ttl=30)

    async def go() -> None:
        assert await r.resolve("virtuser", "new@d") == p.NOTFOUND
        b.data[("virtuser", "new@d")] = "new@d.virtuser."  # vmailctl user add, then the outage
        b.broken = RuntimeError("server closed the connection unexpectedly")
        clock.now += 31  # past negative_ttl: the cached NOTFOUND is no longer fresh
        for _ in range(3):
            assert (await r.resolve("virtuser", "new@d")).status == "TEMP"
        b.broken = None
        assert await r.resolve("virtuser", "new@d") == p.ok("new@d.virtuser.")

    run(go())


def test_change_notification_drops_negative_answers(pool: ThreadPoolExecutor) -> None:
    r, b, clock, _ = make(pool, negative_ttl=3600)

    async def go() -> None:
        assert await r.resolve("virtuser", "new@d") == p.NOTFOUND
        b.data[("virtuser", "new@d")] = "v"
        clock.now += 1
        r.invalidate()  # the serial changed (or SIGHUP)
        b.broken = RuntimeError("down")
        assert (await r.resolve("virtuser", "new@d")).status == "TEMP"
        b.broken = None
        assert await r.resolve("virtuser", "new@d") == p.ok("v")

    run(go())
    assert len(r) == 1
