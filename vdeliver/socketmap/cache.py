"""Answers with a memory: positive/negative TTLs, stale answers on database trouble.

The rule that matters (sendmail bounces on NOTFOUND and PERM, queues on TEMP):

    fresh cached answer          -> that answer
    database answers in time     -> that answer (and cache it)
    database fails or times out  -> the last known POSITIVE answer, stale, if
                                    younger than stale_max_age (logged), else
                                    TEMP / TIMEOUT

A failure never becomes NOTFOUND, not even a cached one: a key that was unknown a
minute ago may be the account created since, and a stale NOTFOUND would bounce
its mail (5.1.1) for as long as the outage lasts.  So only positive answers are
ever served stale; a cached negative answer lives `negative_ttl` seconds at most
and is dropped, not kept, when the database reports a change.  Lookups run in a thread pool (database
drivers block) under a timeout, so a slow database holds up only the sendmail
connections that wait on it; concurrent lookups of one key share one query.
Changes reach sendmail within `ttl` (positive) / `negative_ttl` seconds, or at
once after `invalidate()` (the server calls it on SIGHUP).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol

from vdeliver.socketmap import protocol as p

if TYPE_CHECKING:
    from vdeliver.hooks import Log


class Backend(Protocol):
    """What the cache asks: a value, None for "no such key", or an exception on trouble.

    A backend that answers some keys without its database (lookup.Backend: `Connect:`
    access keys) also has `lookup_asked(map_name, key) -> (value, asked)`: only an answer
    the database gave ends a period of trouble."""

    maps: frozenset[str]

    def lookup(self, map_name: str, key: str) -> str | None: ...


class _Entry:
    __slots__ = ("value", "stored", "reply", "wire")

    def __init__(self, value: str | None, stored: float) -> None:
        self.value = value
        self.stored = stored
        self.reply = _reply(value)
        self.wire = self.reply.encode()  # encoded once: a hit sends these bytes as they are


class Resolver:
    def __init__(
        self,
        backend: Backend,
        executor: Executor | None,
        log: Log,
        *,
        ttl: float = 60,
        negative_ttl: float = 30,
        stale_max_age: float = 86400,
        db_timeout: float = 3,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend, self.executor, self.log = backend, executor, log
        # How long an answer is fresh (found / not found), and how long a found one may be
        # served stale while the database is in trouble.
        self.ttl, self.negative_ttl, self.stale_max_age = ttl, negative_ttl, stale_max_age
        self.db_timeout, self.max_entries, self.clock = db_timeout, max_entries, clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[p.Reply]] = {}
        self.stats = {"hit": 0, "miss": 0, "stale": 0, "temp": 0}
        self._trouble = ""  # last database error logged, to log changes of state once
        self._valid_after = float("-inf")
        # Writers (lookup threads, the server's loop) take the lock; cached() reads without it.
        self._lock = threading.Lock()

    @property
    def trouble(self) -> str:
        """Why the database did not answer the last lookup ("" while it answers)."""
        return self._trouble

    def invalidate(self) -> None:
        """Make every cached answer stale: asked again; a positive one is still served if the
        database then fails.  Negative answers are dropped: they are never served stale."""
        with self._lock:
            self._valid_after = self.clock()
            for k in [k for k, e in self._entries.items() if e.value is None]:
                del self._entries[k]

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self, map_name: str, key: str) -> _Entry | None:
        """The fresh cached answer, or None (then fetch() it, or resolve()).  Called from the
        answer loop's thread without the lock: it only reads (a dict read is atomic) and counts
        hits, which only that thread counts."""
        entry = self._entries.get((map_name, key))
        if entry is None or entry.stored <= self._valid_after:
            return None
        if self.clock() - entry.stored >= (self.ttl if entry.value is not None else self.negative_ttl):
            return None
        self.stats["hit"] += 1
        return entry

    async def resolve(self, map_name: str, key: str) -> p.Reply:
        unknown = self.unknown(map_name)
        if unknown is not None:
            return unknown
        k = (map_name, key)
        entry = self._entries.get(k)
        if entry is not None and entry.stored > self._valid_after:
            age = self.clock() - entry.stored
            if age < (self.ttl if entry.value is not None else self.negative_ttl):
                self.stats["hit"] += 1
                return entry.reply
        # One query per key at a time: later askers wait for the first one's answer.
        pending = self._inflight.get(k)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[p.Reply] = asyncio.get_running_loop().create_future()
        self._inflight[k] = future
        try:
            reply = await self._fetch(map_name, key)
            future.set_result(reply)
            return reply
        except BaseException:  # cancelled: wake the waiters with a TEMP, never hang them
            future.set_result(p.temp("lookup cancelled"))
            raise
        finally:
            del self._inflight[k]

    async def _fetch(self, map_name: str, key: str) -> p.Reply:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.executor, self.fetch, map_name, key),
                                          self.db_timeout)
        except TimeoutError:
            return self.timed_out(map_name, key)

    def unknown(self, map_name: str) -> p.Reply | None:
        """PERM for a map this backend does not answer, else None."""
        return None if map_name in self.backend.maps else p.perm(f"unknown map {map_name}")

    def fetch(self, map_name: str, key: str) -> p.Reply:
        """Ask the database and cache its answer; on trouble, the stale answer or TEMP.  Blocks:
        runs in a lookup thread (the answer loop, or resolve(), bounds the wait by db_timeout
        and answers timed_out() when it is over; a late answer is still cached)."""
        self.count_miss()
        ask = getattr(self.backend, "lookup_asked", None)
        try:
            if ask is not None:
                value, asked = ask(map_name, key)
            else:
                value, asked = self.backend.lookup(map_name, key), True
        except Exception as exc:  # noqa: BLE001 - any driver error is "database trouble", never an answer
            return self._failed(map_name, key, _describe(exc), False)
        return self.answered(map_name, key, value, asked)

    def count_miss(self) -> None:
        with self._lock:
            self.stats["miss"] += 1

    def answered(self, map_name: str, key: str, value: str | None, asked: bool = True) -> p.Reply:
        """An answer to a miss (fetch(), or the answer loop's own statement): cache it."""
        # An answer made without a query (a `Connect:` key during an outage) says nothing
        # about the database: the trouble (log, database_up gauge) lasts until one answers.
        if self._trouble and asked:
            with self._lock:
                was, self._trouble = self._trouble, ""
            if was:
                self.log.info(f"database answers again (was: {was})")
        with self._lock:
            return self._store((map_name, key), value).reply

    def failed(self, map_name: str, key: str, exc: BaseException) -> p.Reply:
        """The database could not answer a miss (`exc`): the stale answer, or TEMP."""
        return self._failed(map_name, key, _describe(exc), False)

    def timed_out(self, map_name: str, key: str) -> p.Reply:
        return self._failed(map_name, key, f"database lookup timed out after {self.db_timeout:g}s", True)

    def _store(self, k: tuple[str, str], value: str | None) -> _Entry:
        """(Under the lock.)"""
        entries = self._entries
        entries.pop(k, None)  # re-insert at the end: dict order is age order
        if len(entries) >= self.max_entries:
            self._evict()
        entry = entries[k] = _Entry(value, self.clock())
        return entry

    def _evict(self) -> None:
        """Drop everything too old to serve even stale, then the oldest tenth if still full."""
        now = self.clock()
        entries = self._entries
        for k in [k for k, e in entries.items() if now - e.stored >= self.stale_max_age]:
            del entries[k]
        if len(entries) >= self.max_entries:
            for k in list(entries)[: max(1, self.max_entries // 10)]:
                del entries[k]

    def _failed(self, map_name: str, key: str, why: str, timed_out: bool) -> p.Reply:
        with self._lock:
            changed = why != self._trouble
            self._trouble = why
            entry = self._entries.get((map_name, key))
            if entry is not None and entry.value is None:
                # Never a stale NOTFOUND: the key may exist by now; sendmail must queue, not bounce.
                del self._entries[(map_name, key)]
                entry = None
            age = self.clock() - entry.stored if entry is not None else 0.0
            stale = entry is not None and age < self.stale_max_age
            self.stats["stale" if stale else "temp"] += 1
        if changed:
            self.log.error(f"database trouble: {why}")
        if stale:
            assert entry is not None
            self.log.warning(f"map={map_name} key=<{key}>: serving cached answer ({age:.0f}s old): {why}")
            return entry.reply
        self.log.warning(f"map={map_name} key=<{key}>: no cached answer, deferring: {why}")
        return p.timeout(why) if timed_out else p.temp(why)


def _reply(value: str | None) -> p.Reply:
    return p.NOTFOUND if value is None else p.ok(value)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if getattr(exc, "bad_row", False):  # a row vmailctl never wrote: TEMP until someone fixes it
        return text[:300]
    return f"database unavailable: {text[:200]}"
