"""The answer loop: one thread, one epoll, every socketmap connection.

Most lookups are fresh cached answers (sendmail asks the same few keys again and
again), and such an answer is one dict lookup: the rest of its cost is the loop
around it.  An asyncio iteration costs more than the answer itself (measured with
benchmarks/socketmap_load.py: a bare asyncio echo server answers one connection at
about half the rate of a bare blocking one), so the connections are served by a
plain level-triggered epoll loop in a thread of its own:

    readable -> recv -> protocol events -> cached answer -> send      (no allocation
                                                                      beyond the bytes)

Two short cuts keep a cached answer near the cost of a bare echo server's reply
(benchmarks/socketmap_load.py measures both with the same client):
- request bytes met before are remembered parsed, per listener (Conn.known, bounded):
  the same bytes on a connection with nothing buffered parse the same way, so the
  next time they cost one dict lookup, not a netstring parse (about 1 us).
- while one connection alone is open and keeps asking cached keys, its next request is
  awaited in a blocking recv() (SO_RCVTIMEO _LINGER; sends and other reads pass
  MSG_DONTWAIT) instead of epoll_wait: two system calls a request instead of three,
  as a thread per connection makes.  The loop still goes back to epoll every
  _SOLO_SLICE and after _LINGER of silence, so a new connection, the deadline scan
  and stop() wait a few milliseconds at most.

Anything else - a key not cached or stale - is asked of the database, one query per
key at a time: with PostgreSQL, a key that is one slice statement (nearly all) by
this loop itself, on connections of its own in its epoll (pglink.py: no thread
hand-off); the rest in a lookup thread (the server's pool: one database connection
each) as Resolver.fetch(), back through a wake-up pipe.  After db_timeout the askers
get Resolver.timed_out() (TIMEOUT, or a stale positive answer) and a late answer only
fills the cache.  Meanwhile the connection is not read: its replies keep the order
of its requests.  (A miss in a lookup thread: two thread hand-offs; through the asyncio
loop it was four, and about 100 us more of CPU a lookup.)

Deadlines (client_timeout mid-request or while a reply cannot be written,
idle_timeout between requests) are checked by a scan every `tick` seconds; the
connection cap is applied at accept(); an accept() that fails for lack of
descriptors pauses that listener for a second (logged at most once per interval).

One file of about 700 lines on purpose: the loop's states (reading, waiting on a lookup,
writing, closing), its database connections and their deadlines share every field of a
connection and of the loop; split across modules, each step would have to pass the whole
loop around.  (pglink.py holds what a database connection does by itself.)
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING

from vdeliver.socketmap import protocol as p
from vdeliver.socketmap.session import FallbackChain

if TYPE_CHECKING:
    from vdeliver.socketmap.daemon import Server
    from vdeliver.socketmap.pglink import Link
    from vdeliver.socketmap.settings import Listener

_IN, _OUT, _HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLHUP | select.EPOLLERR
_OUT_LIMIT = 64 * 1024  # replies queued for a client that does not read: stop reading it
_ACCEPT_PAUSE = 1.0
# One connection alone (see _serve): wait for its next request in recv() itself for this long
# (SO_RCVTIMEO; the kernel rounds it up to its clock tick, up to 10 ms), and go back to epoll
# at least this often, so that a new connection waits a few milliseconds at most.
_LINGER = 0.001
_SOLO_SLICE = 0.005
_NOWAIT = socket.MSG_DONTWAIT
_KNOWN_MAX = 4096  # requests remembered parsed, per listener (a few hundred bytes each)
_KNOWN_LEN = 1024
_RCVTIMEO = struct.pack("ll", 0, int(_LINGER * 1e6))  # struct timeval
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Conn:
    """One client connection: its protocol state, fallback chain and unsent replies."""

    __slots__ = ("sock", "fd", "listener", "aliases", "known", "proto", "chain", "out", "busy", "eof", "last", "events",
                 "closed")

    def __init__(self, sock: socket.socket, listener: Listener, aliases: dict[str, str],
                 known: dict[bytes, tuple[str, str]], max_key: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.aliases = aliases
        self.known = known  # the listener's: request bytes already parsed -> (resolver's map name, key)
        self.proto = p.Connection(max_key)
        self.chain = FallbackChain()
        self.out = b""
        self.busy = False  # a lookup is out at the resolver: read nothing more until it is back
        self.eof = False
        self.last = now  # last progress (read, reply): the deadlines count from it
        self.events = _IN
        self.closed = False


def aliases_for(listener: Listener, aliases_names: str) -> dict[str, str]:
    """Map names as this listener's clients send them -> the names the resolver answers."""
    aliases = {"access": f"access_{listener.access}"}
    # sendmail names the maps of its AliasFile list Alias0, Alias1, ...: the one that is
    # this socket answers the generated aliases.
    aliases.update(dict.fromkeys(aliases_names.split(), "aliases"))
    return aliases


class AnswerLoop:
    def __init__(self, server: Server, listeners: list[tuple[socket.socket, Listener]],
                 aloop: asyncio.AbstractEventLoop) -> None:
        # aloop: the server's asyncio loop, told to stop if this one dies
        self.server = server
        self.settings = server.settings
        self.resolver = server.resolver
        self.log = server.log
        # Per-lookup counting only when someone reads it: it costs about a tenth of the cached rate.
        self.metrics = server.metrics if server.settings.metrics_endpoint is not None else None
        self.aloop = aloop
        self.ep = select.epoll()
        # fd -> (socket, listener, its map name aliases, its requests remembered parsed: Conn.known)
        self.listeners: dict[int, tuple[socket.socket, Listener, dict[str, str], dict[bytes, tuple[str, str]]]] = {
            s.fileno(): (s, lst, aliases_for(lst, self.settings.aliases_names), {}) for s, lst in listeners}
        self.conns: dict[int, Conn] = {}
        # Lookups out at the lookup threads: askers by key, their deadlines, finished ones.
        self.inflight: dict[tuple[str, str], list[tuple[Conn, p.Request, float]]] = {}
        self.deadlines: dict[tuple[str, str], float] = {}
        self.next_deadline = float("inf")
        self.done: deque[tuple[tuple[str, str], Future[p.Reply]]] = deque()
        self.pending: set[Future[p.Reply]] = set()
        self.paused: dict[int, float] = {}
        self.solo: Conn | None = None  # the one open connection, while it keeps asking cached keys
        # PostgreSQL connections of the loop's own (pglink.py): all of them by descriptor, the
        # idle ones, misses waiting for one, and those being opened by a lookup thread.
        backend = self.resolver.backend
        self.plan = getattr(backend, "slice_plan", None) if getattr(backend, "kind", "") == "postgresql" else None
        self.links: dict[int, Link] = {}
        self.idle_links: list[Link] = []
        self.link_queue: deque[tuple[tuple[str, str], tuple[str, str, str]]] = deque()
        self.links_max = self.settings.workers if self.plan is not None else 0
        self.opening = 0
        self.open_after = 0.0  # after a failed connect: not again before then
        self.opened: deque[Future[object]] = deque()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stopping = False
        limits = [t for t in (self.settings.client_timeout, self.settings.idle_timeout) if t > 0]
        self.tick = max(0.05, min([0.5] + [t / 4 for t in limits]))
        self.thread = threading.Thread(target=self._run, name="socketmap-answers", daemon=True)

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        for fd, (sock, _, _, _) in self.listeners.items():
            sock.setblocking(False)
            self.ep.register(fd, _IN)
        self.ep.register(self.wake_r, _IN)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop answering, close every connection, and cancel the lookups still out."""
        self.stopping = True
        self._wake()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)
        for fut in list(self.pending):
            fut.cancel()
        for c in list(self.conns.values()):
            self._close(c)
        for link in list(self.links.values()):
            link.close()
        for opened in self.opened:  # opened after the loop stopped reading them
            if not opened.cancelled() and opened.exception() is None:
                opened.result().close()  # type: ignore[attr-defined]
        self.ep.close()
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - a server that cannot answer must not look alive
            if not self.stopping:
                self.log.error(f"answer loop stopped: internal error: {exc!r}")
                self.aloop.call_soon_threadsafe(self.server.stop)

    def _serve(self) -> None:
        poll, conns, listeners, tick = self.ep.poll, self.conns, self.listeners, self.tick
        monotonic = time.monotonic
        now = monotonic()
        next_scan = now + tick
        poll_by = now
        while not self.stopping:
            c = self.solo
            if c is not None and now < poll_by:
                # The one open connection, just answered from the cache: its next request is
                # likely on its way, so wait for it in a blocking recv() - two system calls a
                # request (recv, send), as a thread per connection makes, where epoll_wait
                # would add a third.  Back to epoll after _LINGER of silence.
                self.solo = None
                try:
                    self._solo(c, min(poll_by, next_scan))
                except Exception as exc:  # noqa: BLE001 - a bug costs one connection, never the server
                    self.log.error(f"connection on {c.listener.describe()}: internal error: {exc!r}")
                    self._close(c)
                now = monotonic()
                if now >= self.next_deadline:
                    self._expire(now)
                if now >= next_scan:
                    self._scan(now)
                    next_scan = now + tick
                continue
            self.solo = None
            timeout = tick
            if self.deadlines:
                timeout = max(0.0, min(tick, self.next_deadline - monotonic()))
            for fd, ev in poll(timeout):
                c = conns.get(fd)
                if c is not None:
                    try:
                        if ev & _OUT:
                            self._flush(c)
                        if ev & _IN:
                            self._readable(c)
                        elif ev & _HUP and not c.closed:
                            self._close(c)  # gone while we were not reading it
                    except Exception as exc:  # noqa: BLE001 - a bug costs one connection, never the server
                        self.log.error(f"connection on {c.listener.describe()}: internal error: {exc!r}")
                        self._close(c)
                elif fd == self.wake_r:
                    self._completions()
                elif fd in listeners:
                    self._accept(fd)
                elif (link := self.links.get(fd)) is not None:
                    try:
                        self._link_event(link, ev)
                    except Exception as exc:  # noqa: BLE001 - a bug costs one database connection
                        self.log.error(f"database connection: internal error: {exc!r}")
                        self._drop_link(link)
            now = monotonic()
            poll_by = now + _SOLO_SLICE
            if now >= self.next_deadline:
                self._expire(now)
            if now >= next_scan:
                self._scan(now)
                next_scan = now + tick

    def _solo(self, c: Conn, until: float) -> None:
        """Serve the lone connection `c` from blocking recv() calls until `until`: known requests
        with fresh cached answers in this tight loop (_received()'s first case, written out: a
        call costs here), anything else as _received() does, then back to the main loop."""
        recv, send, known, cached, monotonic = c.sock.recv, c.sock.send, c.known, self.resolver.cached, time.monotonic
        while not c.closed and c.events == _IN:
            try:
                data = recv(65536)  # blocking, for _LINGER at most (SO_RCVTIMEO)
            except BlockingIOError:
                return  # quiet: back to epoll
            except OSError:
                self._close(c)
                return
            k = known.get(data) if len(data) <= _KNOWN_LEN and self.metrics is None else None
            entry = cached(*k) if k is not None and c.chain.failed is None and c.proto.idle else None
            if entry is None:  # (with metrics, every request: _received() counts it)
                self._received(c, data)
                return
            now = c.last = monotonic()
            wire = entry.wire
            try:
                sent = send(wire, _NOWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(c)
                return
            if sent < len(wire):
                c.out = wire[sent:]
                self._rearm(c)
                return
            if now >= until or self.stopping:
                return  # one epoll pass (accept, scan, stop); its next request brings it back here

    def _wake(self) -> None:
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway
        except OSError:
            pass  # closed: stopping

    # -- connections ---------------------------------------------------------------------

    def _accept(self, fd: int) -> None:
        lsock, listener, aliases, known = self.listeners[fd]
        server = self.server
        for _ in range(64):
            try:
                sock, _addr = lsock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _NO_DESCRIPTORS:
                    server._accept_errors.error(f"{listener.describe()}: accept failed ({exc.strerror}): "
                                                f"not accepting for {_ACCEPT_PAUSE:g}s")
                    self.ep.unregister(fd)
                    self.paused[fd] = time.monotonic() + _ACCEPT_PAUSE
                return  # ECONNABORTED and the like: the client is gone
            if server.connections >= server.max_connections:
                server._refusals.warning(f"{listener.describe()}: connection refused: {server.connections} already "
                                         f"open (max_connections {server.max_connections})")
                try:
                    sock.setblocking(False)
                    sock.send(p.temp("too many connections").encode())
                except OSError:
                    pass
                sock.close()
                continue
            # The socket stays blocking for _solo(); every other recv and send passes
            # MSG_DONTWAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
            c = Conn(sock, listener, aliases, known, self.settings.max_key, time.monotonic())
            self.conns[c.fd] = c
            self.ep.register(c.fd, _IN)
            server.connections += 1

    def _close(self, c: Conn) -> None:
        if c.closed:
            return
        c.closed = True
        del self.conns[c.fd]
        if self.solo is c:
            self.solo = None
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()
        self.server.connections -= 1

    def _rearm(self, c: Conn) -> None:
        """Read while there is nothing to send and no lookup out; write while there is."""
        events = _OUT if c.out else (0 if c.busy or c.eof else _IN)
        if events != c.events and not c.closed:
            c.events = events
            self.ep.modify(c.fd, events)

    def _readable(self, c: Conn) -> None:
        try:
            data = c.sock.recv(65536, _NOWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        self._received(c, data)

    def _received(self, c: Conn, data: bytes) -> None:
        c.last = time.monotonic()
        # The common case first: a request met before (the same bytes parse the same way),
        # its fresh answer cached, nothing else going on on the connection.
        known = c.known.get(data) if len(data) <= _KNOWN_LEN else None  # hashing 64 KB would cost more
        if known is not None and c.chain.failed is None and not c.out and c.proto.idle:
            entry = self.resolver.cached(*known)
            if entry is not None:
                if self.metrics is not None:
                    self._count(known[0], entry.reply, c.last)
                self._send(c, entry.wire)
                if len(self.conns) == 1 and not c.out:
                    self.solo = c
                return
        if not data:
            c.proto.receive_data(b"")
            c.eof = True
            self._pump(c)
            return
        # Next: one whole request, a fresh cached answer, nothing else going on.
        event = c.proto.one_request(data)
        if event is None:
            c.proto.receive_data(data)
        elif type(event) is p.Request and c.chain.failed is None and not c.out:
            name = c.aliases.get(event.map, event.map)
            entry = self.resolver.cached(name, event.key)
            if entry is not None:
                if len(c.known) >= _KNOWN_MAX:
                    c.known.clear()  # bounded: the keys asked now come back at once
                if len(data) <= _KNOWN_LEN:
                    c.known[data] = (name, event.key)
                if self.metrics is not None:
                    self._count(name, entry.reply, c.last)
                self._send(c, entry.wire)
                if len(self.conns) == 1 and not c.out:
                    self.solo = c
                return
        self._pump(c, event)

    def _pump(self, c: Conn, first: p.Event | None = None) -> None:
        """Answer every complete request buffered on `c` (`first`: one read already), until one
        needs the resolver."""
        proto, cached, metrics = c.proto, self.resolver.cached, self.metrics
        replies: list[bytes] = []
        close = False
        while True:
            if first is not None:
                event, first = first, None
            else:
                event = proto.next_event()
            if event is p.NEED_DATA:
                break
            if type(event) is p.Request:
                name = c.aliases.get(event.map, event.map)
                refused = c.chain.check(name, event.key) if c.chain.failed is not None else None
                if refused is None:
                    entry = cached(name, event.key)
                    if entry is not None:
                        replies.append(entry.wire)
                        if metrics is not None:
                            self._count(name, entry.reply, c.last)
                        continue
                    refused = self.resolver.unknown(name)
                    if refused is None:
                        if replies:  # the answers so far go first
                            self._send(c, replies[0] if len(replies) == 1 else b"".join(replies))
                            replies = []
                        c.busy = True
                        self._ask(c, name, event)
                        break
                replies.append(self._answered(c, name, event, refused, c.last))
            elif event is p.CLOSED:
                close = True
                break
            elif isinstance(event, p.BadRequest):
                self.log.warning(f"{c.listener.describe()}: bad request: {event.reason}")
                replies.append(p.perm(event.reason).encode())
            else:
                assert isinstance(event, p.ProtocolError)
                self.log.warning(f"{c.listener.describe()}: closing connection: {event.reason}")
                replies.append(p.perm(event.reason).encode())
                close = True
                break
        if replies:
            self._send(c, replies[0] if len(replies) == 1 else b"".join(replies))
        if close:
            if c.out and not c.closed:  # the last reply first; closed once it is written
                self._drain_and_close(c)
            else:
                self._close(c)
            return
        self._rearm(c)

    def _answered(self, c: Conn, name: str, event: p.Request, reply: p.Reply, started: float) -> bytes:
        c.chain.record(name, event.key, reply)
        if self.metrics is not None:
            self._count(name, reply, started)
        if reply.status == "PERM":
            self.log.warning(f"{c.listener.describe()}: map={event.map} key=<{event.key}>: {reply.text}")
        return reply.encode()

    def _count(self, name: str, reply: p.Reply, started: float) -> None:
        assert self.metrics is not None
        self.metrics.inc("lookups_total", "Lookups by map and answer.", map=name, status=reply.status)
        self.metrics.observe("lookup_seconds", "Time to answer a lookup.",
                             time.monotonic() - started if started else 0.0)

    def _send(self, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            sent = c.sock.send(data, _NOWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(c)
            return
        if sent < len(data):
            c.out = data[sent:]
            self._rearm(c)

    def _flush(self, c: Conn) -> None:
        try:
            sent = c.sock.send(c.out, _NOWAIT)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[sent:]
        c.last = time.monotonic()
        if not c.out:
            if c.eof and not c.busy and not c.proto.pending:
                self._close(c)
                return
            self._pump(c)  # what it sent while we waited for it to read

    def _drain_and_close(self, c: Conn) -> None:
        # Rare (a protocol error whose reply did not fit the socket buffer): mark end of input,
        # and let _flush() close once the reply is out; the scan closes it if it never is.
        c.eof = True
        c.proto.receive_data(b"")
        self._rearm(c)

    # -- lookups the cache could not answer ------------------------------------------------

    def _ask(self, c: Conn, name: str, event: p.Request) -> None:
        """A lookup the cache could not answer: to a lookup thread, under db_timeout.  One
        query per key at a time: later askers wait for the first one's answer."""
        now = time.monotonic()
        k = (name, event.key)
        waiting = self.inflight.get(k)
        if waiting is not None:
            waiting.append((c, event, now))
            return
        self.inflight[k] = [(c, event, now)]
        deadline = now + self.resolver.db_timeout
        self.deadlines[k] = deadline
        self.next_deadline = min(self.next_deadline, deadline)
        plan = self.plan(name, event.key) if self.plan is not None else None
        if plan is None or not self._link_ask(k, plan):
            self._submit(k)

    def _submit(self, k: tuple[str, str]) -> None:
        """The thread way: Resolver.fetch() in a lookup thread, back through the wake-up pipe."""
        done, wake = self.done, self._wake

        def back(f: Future[p.Reply]) -> None:  # in the lookup thread
            done.append((k, f))
            wake()

        fut = self.server.executor.submit(self.resolver.fetch, *k)
        self.pending.add(fut)
        fut.add_done_callback(back)

    def _completions(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.opened:
            self._link_opened(self.opened.popleft())
        done = self.done
        while done:
            k, fut = done.popleft()
            self.pending.discard(fut)
            if k not in self.inflight:
                continue  # answered TIMEOUT already; the late answer is in the cache now
            if fut.cancelled():
                reply = p.temp("lookup cancelled")
            elif (exc := fut.exception()) is not None:
                self.log.error(f"map={k[0]} key=<{k[1]}>: internal error: {exc!r}")
                reply = p.temp("internal error")
            else:
                reply = fut.result()
            self._finish(k, reply)

    def _finish(self, k: tuple[str, str], reply: p.Reply) -> None:
        """The answer to a lookup that was out: to everyone waiting for it."""
        waiting = self.inflight.pop(k, None)
        if waiting is None:
            return  # answered TIMEOUT already; the answer is in the cache now
        self.deadlines.pop(k, None)
        for c, event, started in waiting:
            self._answer(c, k[0], event, reply, started)

    # -- the loop's own PostgreSQL connections (pglink.py) -----------------------------------

    def _link_ask(self, k: tuple[str, str], plan: tuple[str, str, str]) -> bool:
        """Send the slice statement for `k` on an idle link, or queue it for the next one;
        False when no link is coming (then the thread way)."""
        while self.idle_links:
            if self._link_send(self.idle_links.pop(), k, plan):
                return True
        if len(self.links) + self.opening < self.links_max and time.monotonic() >= self.open_after:
            self._open_link()
        if not self.links and not self.opening:
            return False
        self.link_queue.append((k, plan))
        return True

    def _link_send(self, link: Link, k: tuple[str, str], plan: tuple[str, str, str]) -> bool:
        from vdeliver.accounts.snapshot import slice_params
        from vdeliver.socketmap.pglink import LinkError

        domain, local, file_name = plan
        try:
            flushed = link.send(slice_params(domain, local))
        except LinkError:
            self._drop_link(link)
            return False
        link.job, link.since = (k, domain, file_name), time.monotonic()
        self.resolver.count_miss()
        if not flushed:
            self.ep.modify(link.fd, _IN | _OUT)
        return True

    def _link_event(self, link: Link, ev: int) -> None:
        from vdeliver.socketmap.pglink import LinkError

        try:
            if ev & _OUT and link.flush():
                self.ep.modify(link.fd, _IN)
            rows = link.read()
        except LinkError as exc:
            job = link.job
            self._drop_link(link)
            if job is not None:
                self.log.warning(f"map={job[0][0]} key=<{job[0][1]}>: database connection: {exc}; asking again")
                self._submit(job[0])  # the thread way: a fresh connection, and trouble is tracked
            return
        if rows is None or link.job is None:
            return
        (k, domain, file_name), link.job = link.job, None
        resolver = self.resolver
        try:
            reply = resolver.answered(k[0], k[1], resolver.backend.slice_answer(  # type: ignore[attr-defined]
                k[0], k[1], domain, file_name, rows))
        except Exception as exc:  # noqa: BLE001 - a row vmailctl never wrote: as the thread way says
            reply = resolver.failed(k[0], k[1], exc)
        self._link_idle(link)
        self._finish(k, reply)

    def _link_idle(self, link: Link) -> None:
        while self.link_queue:
            k, plan = self.link_queue.popleft()
            if self._link_send(link, k, plan):
                return
            self._submit(k)
            return  # the link is gone
        self.idle_links.append(link)

    def _open_link(self) -> None:
        self.opening += 1
        opened, wake = self.opened, self._wake

        def back(f: Future[object]) -> None:  # in the lookup thread
            opened.append(f)
            wake()

        fut: Future[object] = self.server.executor.submit(self.resolver.backend.open_link)  # type: ignore[attr-defined]
        fut.add_done_callback(back)

    def _link_opened(self, fut: Future[object]) -> None:
        from vdeliver.socketmap.pglink import Link

        self.opening -= 1
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self.open_after = time.monotonic() + 1.0
            if not self.links and not self.opening:
                while self.link_queue:  # no link is coming: the thread way says what is wrong
                    self._submit(self.link_queue.popleft()[0])
            return
        link = Link(fut.result())
        self.links[link.fd] = link
        self.ep.register(link.fd, _IN)
        self._link_idle(link)

    def _drop_link(self, link: Link) -> None:
        self.links.pop(link.fd, None)
        if link in self.idle_links:
            self.idle_links.remove(link)
        try:
            self.ep.unregister(link.fd)
        except (OSError, ValueError):
            pass
        link.close()
        if not self.links and not self.opening:
            while self.link_queue:
                self._submit(self.link_queue.popleft()[0])

    def _answer(self, c: Conn, name: str, event: p.Request, reply: p.Reply, started: float) -> None:
        """The resolver's reply to the request `c` waits for; then what it sent meanwhile."""
        if c.closed:
            return
        c.busy = False
        c.last = time.monotonic()
        try:
            self._send(c, self._answered(c, name, event, reply, started))
            if not c.closed:
                self._pump(c)
        except Exception as exc:  # noqa: BLE001 - a bug costs one connection, never the server
            self.log.error(f"connection on {c.listener.describe()}: internal error: {exc!r}")
            self._close(c)

    def _expire(self, now: float) -> None:
        """Lookups out longer than db_timeout: TIMEOUT (or the stale answer) to their askers."""
        for k, deadline in list(self.deadlines.items()):
            if deadline <= now:
                del self.deadlines[k]
                waiting = self.inflight.pop(k, [])
                reply = self.resolver.timed_out(*k)
                for c, event, started in waiting:
                    self._answer(c, k[0], event, reply, started)
        self.next_deadline = min(self.deadlines.values(), default=float("inf"))

    # -- deadlines -------------------------------------------------------------------------

    def _scan(self, now: float) -> None:
        stuck = 2 * self.resolver.db_timeout + 1  # its askers had TIMEOUT long ago; statement_timeout failed
        for link in [lk for lk in self.links.values() if lk.job is not None and now - lk.since > stuck]:
            self.log.warning(f"database connection: no answer for {now - link.since:.0f}s: closed")
            self._drop_link(link)
        for fd, when in list(self.paused.items()):
            if now >= when:
                del self.paused[fd]
                self.ep.register(fd, _IN)
        client_timeout, idle_timeout = self.settings.client_timeout, self.settings.idle_timeout
        for c in list(self.conns.values()):
            if c.busy:
                continue  # the resolver's db_timeout bounds it
            stalled = bool(c.out) or c.proto.pending
            limit = client_timeout if stalled else idle_timeout
            if limit and now - c.last > limit:
                why = ("not reading its replies" if c.out else "stalled in the middle of a request") if stalled \
                    else "idle"
                self.log.warning(f"{c.listener.describe()}: closing connection: client {why} for {limit:g}s")
                self._close(c)
