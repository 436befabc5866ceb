"""One socketmap connection: requests read under deadlines, answered through the cache.

protocol.py frames and parses (no I/O); this module owns the reader and writer of one
connection, the client and idle timeouts, the map-name aliases of its listener and the
FallbackChain that keeps sendmail's virtuser fallbacks from routing around a failure.
The daemon counts connections and refuses past its cap before a Session starts.
"""

from __future__ import annotations

import asyncio
from time import monotonic

from vdeliver.log import Logger
from vdeliver.socketmap import protocol as p
from vdeliver.socketmap.cache import Resolver
from vdeliver.socketmap.settings import Listener, Settings

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdeliver.metrics import Registry


class Session:
    """Serves the requests of one connection on `listener` until it closes or stalls."""

    def __init__(self, settings: Settings, resolver: Resolver, log: Logger, listener: Listener,
                 metrics: Registry | None = None) -> None:
        self.metrics = metrics
        self.settings = settings
        self.resolver = resolver
        self.log = log
        self.listener = listener
        self.aliases = {"access": f"access_{listener.access}"}
        # sendmail names the maps of its AliasFile list Alias0, Alias1, ...: the one that is
        # this socket answers the generated aliases.
        self.aliases.update(dict.fromkeys(settings.aliases_names.split(), "aliases"))

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s, listener, aliases = self.settings, self.listener, self.aliases
        conn = p.Connection(s.max_key)
        chain = FallbackChain()
        while True:
            event = conn.next_event()
            if event is p.NEED_DATA:
                limit = s.client_timeout if conn.pending else (s.idle_timeout or None)
                try:
                    data = await asyncio.wait_for(reader.read(65536), limit)
                except TimeoutError:
                    why = "stalled in the middle of a request" if conn.pending else "idle"
                    self.log.warning(f"{listener.describe()}: closing connection: client {why} for {limit:g}s")
                    return
                conn.receive_data(data)
                continue
            if event is p.CLOSED:
                return
            if isinstance(event, p.ProtocolError):
                self.log.warning(f"{listener.describe()}: closing connection: {event.reason}")
                writer.write(p.perm(event.reason).encode())
                await writer.drain()
                return
            if isinstance(event, p.BadRequest):
                self.log.warning(f"{listener.describe()}: bad request: {event.reason}")
                reply = p.perm(event.reason)
            else:
                assert isinstance(event, p.Request)
                name = aliases.get(event.map, event.map)
                refused = chain.check(name, event.key)
                started = monotonic() if self.metrics is not None else 0.0
                if refused is None:
                    reply = await self.resolver.resolve(name, event.key)
                    chain.record(name, event.key, reply)
                else:
                    reply = refused
                if self.metrics is not None:
                    self.metrics.inc("lookups_total", "Lookups by map and answer.", map=name, status=reply.status)
                    self.metrics.observe("lookup_seconds", "Time to answer a lookup.", monotonic() - started)
                if reply.status == "PERM":
                    self.log.warning(f"{listener.describe()}: map={event.map} key=<{event.key}>: {reply.text}")
            writer.write(reply.encode())
            await writer.drain()


class FallbackChain:
    """Keep sendmail's virtuser fallbacks from routing around a failed lookup.

    For `user+detail@d` sendmail asks `user+detail@d`, `user++@d`, `user+*@d`,
    `user@d`, `++@d`, `+*@d`, `@d` in turn on one connection (for `user@d`:
    `user@d`, `@d`), and a temporary failure of one key does NOT stop it from
    using the answer to a later one (measured: with `fred@home.com` failing and
    `@home.com` cached, the mail went to the catch-all).  A cached `@d
    error:nouser` would then bounce mail for a user who exists.  So once a key
    fails, the keys that can only be its later fallbacks fail too, on that
    connection; any other key (including the failed one again) starts afresh.
    """

    MAPS = frozenset({"virtuser"})

    def __init__(self) -> None:
        self.failed: tuple[str, str, frozenset[str]] | None = None  # (map, domain, later local parts)

    def check(self, map_name: str, key: str) -> p.Reply | None:
        if self.failed is None or map_name not in self.MAPS:
            return None
        fmap, fdomain, later = self.failed
        local, _, domain = key.rpartition("@")
        if map_name == fmap and domain == fdomain and local in later:
            return p.temp("an earlier lookup for this address failed")
        self.failed = None  # another address: a new chain
        return None

    def record(self, map_name: str, key: str, reply: p.Reply) -> None:
        if map_name not in self.MAPS or reply.status not in ("TEMP", "TIMEOUT"):
            return
        local, _, domain = key.rpartition("@")
        later = {""}
        if "+" in local:
            user = local.split("+", 1)[0]
            later |= {f"{user}++", f"{user}+*", user, "++", "+*"}
        later.discard(local)
        self.failed = (map_name, domain, frozenset(later))

