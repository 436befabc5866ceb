"""vdeliver-socketmapd: sendmail's socket maps answered from the accounts database.

    vdeliver-socketmapd [-c /etc/vdeliver.toml] [--log stderr] [--check]
    vmailctl serve socketmap [...]           (the same entry point)

Shape: protocol.py frames and parses (no I/O), settings.py validates [socketmap],
loop.py serves the connections, cache.py and lookup.py answer; this module binds the
listeners, sizes the connection cap, handles signals and drops root.

One thread (loop.py, plain epoll) serves every connection (sendmail keeps one per
process, so hundreds may be open) and answers cached keys at once; the others are
asked of the database under a timeout, by that loop itself on PostgreSQL connections
of its own (pglink.py) or in a lookup thread (cache.py), so one slow lookup holds up
only the connection waiting for it.  A client silent in the middle of a request is closed after `client_timeout`.

Listeners, from the [socketmap] table (see docs/socketmap.md):

    socket_in   unix socket for the incoming sendmail: map `access` is the incoming flavour
    socket_out  unix socket for the outgoing sendmail: map `access` is the outgoing flavour
    tcp         "127.0.0.1:PORT" (loopback only: the protocol has no authentication),
                its `access` flavour from `tcp_access`

Maps `access_in` and `access_out` are answered on every listener under those names;
the names in `aliases_names` (default `Alias1`: the second entry of sendmail's
AliasFile list) answer the generated aliases.
SIGHUP makes every cached answer stale (asked again at once); SIGTERM/SIGINT stop.
Exit codes: 0 stopped cleanly, 78 configuration error, 71 cannot listen.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from vdeliver import unixd
from vdeliver.config import ConfigError
from vdeliver.log import Logger, RateLimited
from vdeliver.metrics import MetricsServer, Registry, process_gauges
from vdeliver.socketmap.cache import Backend, Resolver
from vdeliver.socketmap.loop import AnswerLoop
from vdeliver.socketmap.settings import Listener, Settings, load_settings

EX_OK = 0
EX_OSERR = 71
EX_CONFIG = 78

class Server:
    """The listeners, the resolver, and one coroutine per connection."""

    def __init__(self, settings: Settings, backend: Backend, log: Logger) -> None:
        self.settings = settings
        self.backend = backend
        self.log = log
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="socketmap-lookup")
        self.resolver = Resolver(
            backend, self.executor, log, ttl=settings.ttl, negative_ttl=settings.negative_ttl,
            stale_max_age=settings.stale_max_age, db_timeout=settings.db_timeout, max_entries=settings.cache_size,
        )
        self.connections = 0
        self.run_user: unixd.RunUser | None = None  # main() sets it; start() drops to it
        self.max_connections, self.backlog, self.fd_note = connection_cap(settings)
        self._refusals = RateLimited(log, 10.0)
        self._accept_errors = RateLimited(log, 10.0)
        self._sockets: list[tuple[socket.socket, Listener]] = []
        self._socket_inodes: dict[str, int] = {}
        self._stopping: asyncio.Event | None = None
        self.answers: AnswerLoop | None = None
        self.ready = False
        self.metrics = self._registry()
        self.metrics_server: MetricsServer | None = None

    def _registry(self) -> Registry:
        reg = Registry("vdeliver_socketmap")
        stats = self.resolver.stats
        reg.gauge("cache_total", "Cache events: hit, miss (asked the database), stale (served during an outage), "
                  "temp (deferred: no answer to serve).",
                  lambda: {(("event", k),): float(v) for k, v in stats.items()}, kind="counter")
        reg.gauge("cache_hit_ratio", "Hits among all lookups that reached the cache.",
                  lambda: stats["hit"] / max(1, stats["hit"] + stats["miss"]))
        reg.gauge("cache_entries", "Answers in the cache.", lambda: len(self.resolver))
        reg.gauge("database_up", "1 while the database answers, 0 since a lookup failed.",
                  lambda: 0 if self.resolver.trouble else 1)
        reg.gauge("connections", "Open socketmap connections.", lambda: self.connections)
        reg.gauge("up", "1 while the server accepts connections.", lambda: 1 if self.ready else 0)
        process_gauges(reg)
        return reg

    # -- listening -------------------------------------------------------------

    async def start(self) -> None:
        # Many sendmail processes may connect at once (a queue run starts R=8 runners per
        # group, a burst of SMTP sessions each opens its own): a short backlog would make
        # connect() fail with EAGAIN, which sendmail treats as a map failure.
        backlog = self.backlog
        if self.fd_note:
            self.log.warning(self.fd_note)
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)
        owner = self.run_user if self.run_user is not None else unixd.RunUser()
        for listener in self.settings.listeners:
            if listener.kind == "unix":
                sock, ino = unixd.bind_unix(listener.address, self.settings.mode, owner, backlog=backlog)
                self._socket_inodes[listener.address] = ino
            else:
                family = socket.AF_INET6 if ":" in listener.address else socket.AF_INET
                sock = socket.create_server((listener.address, listener.port), family=family, backlog=backlog)
            self._sockets.append((sock, listener))
            self.log.info(f"listening on {listener.describe()} (access = {listener.access})")
        prepare = getattr(self.backend, "prepare", None)
        if prepare is not None and os.geteuid() == 0:
            await asyncio.get_running_loop().run_in_executor(self.executor, prepare)
        if self.settings.metrics_endpoint is not None:
            self.metrics_server = MetricsServer(self.metrics, self.settings.metrics_endpoint, self.log).bind(owner)
            self.log.info(f"metrics on {self.metrics_server.describe()}")
        # Everything that needed root is done: serve as the run user, for good.
        unixd.drop_privileges(owner)
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.answers = AnswerLoop(self, self._sockets, asyncio.get_running_loop())
        self.answers.start()
        self.ready = True

    async def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.answers is not None:
            answers, self.answers = self.answers, None
            await asyncio.get_running_loop().run_in_executor(None, answers.stop)
            await asyncio.sleep(0)  # let the cancelled lookups end
        for sock, _ in self._sockets:
            sock.close()
        for path, ino in self._socket_inodes.items():
            unixd.remove_socket(path, ino)  # only our own: a successor may have bound a new one
        self.executor.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        """asyncio's own errors (an accept() that fails with EMFILE retries every second for
        as long as it lasts): one log line per interval, never a flood."""
        exc = context.get("exception")
        text = str(context.get("message", "event loop error"))
        if exc is not None:
            text += f": {exc}"
        self._accept_errors.error(text)

    # -- running ---------------------------------------------------------------

    async def run(self, *, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self.start()
        if install_signals:
            loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
            loop.add_signal_handler(signal.SIGINT, self._stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self._reload)
        watcher = asyncio.create_task(self._watch_changes())
        unixd.notify(f"READY=1\nMAINPID={os.getpid()}")
        try:
            await self._stopping.wait()
        finally:
            unixd.notify("STOPPING=1")
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            st = self.resolver.stats
            self.log.info(f"stopping: {st['hit']} cached answers, {st['miss']} database lookups, "
                          f"{st['stale']} stale answers, {st['temp']} deferrals")
            await self.close()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    def _reload(self) -> None:
        unixd.notify("RELOADING=1")
        self.resolver.invalidate()
        self.log.info("SIGHUP: cached answers marked stale")
        unixd.notify("READY=1")

    async def _watch_changes(self) -> None:
        """Poll the database's change serial (when the backend has one): a change
        made with vmailctl makes every cached answer stale within poll_interval."""
        serial_of = getattr(self.backend, "serial", None)
        if serial_of is None or self.settings.poll_interval <= 0:
            return
        loop = asyncio.get_running_loop()
        last: object = None
        while True:
            try:
                current = await asyncio.wait_for(loop.run_in_executor(self.executor, serial_of),
                                                 self.settings.db_timeout)
            except Exception:  # noqa: BLE001 - trouble is logged by lookups; the serial is only a hint
                current = None
            if current is not None:
                if last is not None and current != last:
                    self.resolver.invalidate()
                    self.log.info(f"database changed (serial {last} -> {current}): cached answers marked stale")
                last = current
            await asyncio.sleep(self.settings.poll_interval)


# Descriptors kept free beyond the connections: listeners, the log, the event loop's own,
# a database connection per lookup thread (twice: one may be reconnecting), and as many
# of the answer loop's own (PostgreSQL: up to `workers`).
FD_RESERVE = 32


def connection_cap(settings: Settings) -> tuple[int, int, str]:
    """max_connections and the listen backlog, within what RLIMIT_NOFILE allows.

    Past the limit, accept() fails with EMFILE and so do the database's sockets: every
    lookup would fail at once.  asyncio accepts up to `backlog` connections in one go,
    before any of them can be refused, so the backlog is budgeted too.  Returns the cap,
    the backlog and a warning for the log ("" if none)."""
    import resource

    # Many sendmail processes may connect at once (a queue run starts R=8 runners per
    # group, a burst of SMTP sessions each opens its own): a short backlog would make
    # connect() fail with EAGAIN, which sendmail treats as a map failure.
    backlog = max(128, min(settings.max_connections, 4096))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections, backlog, ""
    reserve = FD_RESERVE + 3 * settings.workers + len(settings.listeners)
    room = max(2, soft - reserve)
    burst = min(backlog, max(1, room // 4))
    if settings.max_connections + burst <= room:
        return settings.max_connections, burst if burst < backlog else backlog, ""
    cap = max(1, room - burst)
    return cap, burst, (f"max_connections {settings.max_connections} lowered to {cap}: the open-files limit is "
                        f"{soft}, and {reserve + burst} descriptors are kept for listeners, the log, the "
                        f"database and connections being accepted (raise it with `ulimit -n` or LimitNOFILE=)")



def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vdeliver-socketmapd", description="sendmail socket map server for vdeliver")
    ap.add_argument("-c", "--config", help="configuration file (default $VDELIVER_CONFIG or /etc/vdeliver.toml)")
    ap.add_argument("--log", choices=("syslog", "stderr", "none"), help="where to log (default: the config's `log`)")
    ap.add_argument("--check", action="store_true", help="validate the configuration and the database, then exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from vdeliver import config as config_module

    try:
        cfg = config_module.load(args.config)
        settings = load_settings(cfg)
    except ConfigError as exc:
        print(f"vdeliver-socketmapd: {exc.where}: {exc.message}", file=sys.stderr)
        return EX_CONFIG
    log = Logger("vdeliver-socketmapd", cfg.syslog_facility, args.log or cfg.log)
    from vdeliver.socketmap.lookup import BackendConfigError, open_backend

    try:
        backend = open_backend(cfg, log)
    except BackendConfigError as exc:
        print(f"vdeliver-socketmapd: {exc}", file=sys.stderr)
        return EX_CONFIG
    for warning in getattr(backend.settings, "warnings", []):
        log.warning(warning)
    if backend.kind == "postgresql":
        import psycopg

        if psycopg.pq.__impl__ == "python":  # measured: a miss costs 3x the CPU, 16 connections 2.5x slower
            log.warning("psycopg runs its pure-Python implementation: uncached lookups cost about three times "
                        "the CPU; install psycopg[binary] (pip install 'vdeliver[postgres]') in the server's venv")
    if args.check:
        try:
            backend.check()
        except Exception as exc:  # noqa: BLE001 - any driver error: report it, exit 75
            print(f"vdeliver-socketmapd: database: {exc}", file=sys.stderr)
            return 75
        print("vdeliver-socketmapd: configuration and database OK")
        return EX_OK
    server = Server(settings, backend, log)
    try:
        server.run_user = unixd.RunUser(settings.user, settings.group) if os.geteuid() == 0 and settings.user \
            else unixd.RunUser()
        asyncio.run(server.run())
    except OSError as exc:
        print(f"vdeliver-socketmapd: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        log.error(f"cannot listen: {exc}")
        return EX_OSERR
    except KeyboardInterrupt:
        pass
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
