"""`vdeliver-lmtpd`: a resident LMTP server delivering through the vdeliver core.

A process per message pays for interpreter start-up on every delivery; this server
pays it once, so a delivery costs what the core costs (mostly fsync).  Everything
that decides where and how mail is stored is the command line's: recipient.parse(),
deliver.resolve() at RCPT time and deliver.deliver() after DATA, with the same
configuration file, locks, fsync, rollback, headers and log lines.

Shape: protocol.py holds every protocol rule and does no I/O; this module is the
loop around it.  One thread per connection (bounded by [lmtp] max_connections);
a message with several recipients is delivered to them in parallel by a small
pool, and the replies go out in RCPT order as each becomes ready.  Deliveries are
fsync-bound and fsync releases the GIL, so threads are enough.  Within this
process one mutex per mailbox serialises deliveries to the same mbox (fcntl locks
are per process, so two of our own threads must never meet inside them); other
processes are kept out by the core's dotlock + fcntl as usual.

The message is streamed to an unnamed spool file (O_TMPFILE in spool_dir): a
client that disconnects mid-DATA leaves nothing behind, and nothing is delivered.

Signals: SIGTERM/SIGINT stop accepting, finish messages in flight, answer 421 to
anything new; SIGHUP re-reads the configuration (socket, tcp and user need a
restart).  Standard library only: this is a delivery path.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from vdeliver import __version__
from vdeliver.config import Config, ConfigError
from vdeliver.deliver import Target, deliver, resolve
from vdeliver.errors import DeliveryError, Status
from vdeliver.lmtp import protocol as p
from vdeliver.log import Logger, delivery_line
from vdeliver.recipient import Recipient, parse

EX_OK = 0
EX_USAGE = 64
EX_OSERR = 71
EX_CONFIG = 78

POLL = 0.5  # how often a waiting connection looks at the stop flag
RECV = 1 << 16

HELP = """\
usage: vdeliver-lmtpd [-c CONFIG] [--check]
       vdeliver-lmtpd --version | --help

Serve LMTP (RFC 2033) on a unix socket (and optionally 127.0.0.1 TCP), delivering
each recipient through the vdeliver core.  Runs in the foreground; logs like
vdeliver.  Configuration: -c CONFIG, else $VDELIVER_CONFIG, else /etc/vdeliver.toml,
table [lmtp] (see docs/lmtp.md).  --check validates the configuration and exits.

Signals: TERM finishes messages in flight and exits; HUP reloads the configuration.
Exit: 0 stopped cleanly, 64 usage, 71 cannot listen, 78 configuration error.
"""

# [lmtp] key -> (default, kind).  A default of None means "take the top-level key".
LMTP_KEYS: dict[str, tuple[object, str]] = {
    "socket": ("/run/vdeliver/lmtp.sock", "path"),
    "socket_mode": ("0660", "mode"),
    "socket_owner": ("", "owner"),
    "tcp": ("", "address"),
    "max_connections": (20, "count"),
    "max_recipients": (1000, "count"),
    "max_message_size": (None, "size"),
    "delivery_threads": (8, "count"),
    "pid_file": ("", "path?"),
    "user": (None, "str"),
    "group": (None, "str"),
    "timeout": (300, "count"),
    "data_timeout": (600, "count"),
    "command_time_limit": (300, "count"),
    "transaction_time_limit": (3600, "count"),
    "max_connections_per_peer": (10, "count"),
    "shutdown_grace": (60, "count"),
}


class Settings:
    """The validated [lmtp] table."""

    socket: str
    socket_mode: int
    socket_owner: str
    tcp: tuple[str, int] | None
    max_connections: int
    max_recipients: int
    max_message_size: int
    delivery_threads: int
    pid_file: str
    user: str
    group: str
    timeout: int
    data_timeout: int
    command_time_limit: int
    transaction_time_limit: int
    max_connections_per_peer: int
    shutdown_grace: int

    def restart_keys(self) -> tuple[object, ...]:
        return (self.socket, self.socket_mode, self.socket_owner, self.tcp, self.user, self.group, self.pid_file,
                self.max_connections, self.delivery_threads)


def settings(cfg: Config) -> Settings:
    """Validate [lmtp]; a ConfigError names the file, line and key at fault."""
    table = cfg.table("lmtp")
    for key in table:
        if key not in LMTP_KEYS:
            raise ConfigError(cfg.where("lmtp", key), "unknown key")
    s = Settings()
    for key, (default, kind) in LMTP_KEYS.items():
        where = cfg.where("lmtp", key)
        value = table.get(key, default)
        if value is None:
            value = cfg.max_message_size if key == "max_message_size" else getattr(cfg, key)
        if kind in ("count", "size"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(where, "must be a whole number")
            if value < (1 if kind == "count" else 0):
                raise ConfigError(where, "must be at least 1" if kind == "count" else "must not be negative")
        elif not isinstance(value, str):
            raise ConfigError(where, "must be a string")
        elif kind == "path" and not value.startswith("/"):
            raise ConfigError(where, "must be an absolute path")
        elif kind == "path?" and value and not value.startswith("/"):
            raise ConfigError(where, "must be an absolute path or empty")
        elif kind == "mode":
            if not value or len(value) > 4 or any(ch not in "01234567" for ch in value):
                raise ConfigError(where, f"must be an octal mode like \"0660\" (got {value!r})")
            value = int(value, 8)
        elif kind == "address":
            value = _tcp_address(value, where)
        elif kind == "owner" and value and (value.count(":") > 1 or value.startswith(":")):
            raise ConfigError(where, "must be USER or USER:GROUP")
        setattr(s, key, value)
    if len(s.socket.encode()) > 107:
        raise ConfigError(cfg.where("lmtp", "socket"), "path too long for a unix socket (107 bytes)")
    return s


def _tcp_address(value: str, where: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(where, f"must be HOST:PORT (got {value!r})")
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(where, f"host must be a loopback IP address (got {host!r})") from None
    if not ip.is_loopback:
        # LMTP has no authentication: anyone who can connect can deliver.
        raise ConfigError(where, f"only loopback addresses are allowed (got {host})")
    return host, int(port)


# -- status -> LMTP reply ---------------------------------------------------------------

_BASIC = {"4.2.2": 452, "4.3.1": 452, "5.2.2": 552, "5.3.4": 552, "5.4.6": 554}


def reply_for(status: Status, address: str) -> p.Reply:
    """The one place a delivery Status becomes an LMTP reply (sendmail acts on the class)."""
    if status.ok:
        return p.Reply(250, status.dsn, f"<{address}> delivered")
    code = _BASIC.get(status.dsn) or (550 if status.permanent else 451)
    return p.Reply(code, status.dsn, f"<{address}> {status.reason}")


# -- the server ---------------------------------------------------------------------------


class _Txn:
    """What a transaction has learnt so far: the resolved recipients, the spool."""

    def __init__(self, cfg: Config, sender: str) -> None:
        self.cfg = cfg  # a SIGHUP mid-transaction does not change this message
        self.sender = sender
        self.started = time.time()
        self.targets: list[tuple[str, Recipient, Target]] = []  # (as given, parsed, mailbox) per accepted RCPT
        self.spool = -1
        self.size = 0

    def close(self) -> None:
        if self.spool >= 0:
            os.close(self.spool)
            self.spool = -1


class Server:
    def __init__(self, cfg: Config, opts: Settings, logger: Logger) -> None:
        self.cfg = cfg
        self.opts = opts
        self.log = logger
        self.stopping = threading.Event()
        self.listeners: list[socket.socket] = []
        self.threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(opts.max_connections)
        self._mailbox_locks: dict[str, threading.Lock] = {}
        self._mailbox_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ids = 0
        self._peers: dict[object, int] = {}  # uid (unix socket) or address (TCP) -> open connections
        self.abandoned = 0  # sessions still running when shutdown_grace ran out
        self._refusals = 0
        self._refusal_logged = float("-inf")
        self._socket_ino = -1
        self.run_user: object = None  # daemon.RunUser, set by _run() before listen()

    # -- listening --------------------------------------------------------------------

    def listen(self) -> None:
        """Bind the unix socket (and TCP); raises OSError or ConfigError."""
        from vdeliver import daemon

        owner = self.run_user if isinstance(self.run_user, daemon.RunUser) else daemon.RunUser()
        socket_owner = None
        if self.opts.socket_owner:
            socket_owner = _owner(self.opts.socket_owner, self.cfg.where("lmtp", "socket_owner"))
        unix, self._socket_ino = daemon.bind_unix(self.opts.socket, self.opts.socket_mode, owner, socket_owner)
        self.listeners.append(unix)
        if self.opts.tcp is not None:
            host, port = self.opts.tcp
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            tcp.listen(64)
            self.listeners.append(tcp)

    def close_listeners(self) -> None:
        for s in self.listeners:
            try:
                s.close()
            except OSError:
                pass
        self.listeners = []
        from vdeliver import daemon

        # Only our own socket file: a successor may already have bound a new one there.
        daemon.remove_socket(self.opts.socket, self._socket_ino)

    def serve(self, wakeup: socket.socket | None = None, on_wake: object = None) -> None:
        """Accept until stop(); then let connections finish.  Runs in one thread."""
        import selectors

        sel = selectors.DefaultSelector()
        for s in self.listeners:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, "listen")
        if wakeup is not None:
            sel.register(wakeup, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(POLL):
                    if key.data == "wake":
                        try:
                            wakeup.recv(512)  # type: ignore[union-attr]
                        except OSError:
                            pass
                        if on_wake is not None:
                            on_wake()  # type: ignore[operator]
                        continue
                    try:
                        client, _addr = key.fileobj.accept()  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except OSError as exc:
                        self.log.error(f"accept: {exc.strerror}")
                        time.sleep(0.1)
                        continue
                    self._start(client)
        finally:
            sel.close()
            self.close_listeners()
        self._drain()

    def stop(self) -> None:
        self.stopping.set()

    def reload(self, cfg: Config, opts: Settings) -> None:
        if opts.restart_keys() != self.opts.restart_keys():
            self.log.warning("reload: changes to socket*, tcp, pid_file, user, group, max_connections and "
                             "delivery_threads take effect after a restart")
        self.cfg, self.opts = cfg, opts

    def _drain(self) -> None:
        """Let connections finish their message, for shutdown_grace seconds at most: a delivery
        stuck on a mailbox lock must not make the server unstoppable.  What is still running
        then is abandoned unanswered (the client retries; an append cut short is undone by
        the crash journal)."""
        deadline = time.monotonic() + (self.opts.shutdown_grace if self.stopping.is_set() else 1e9)
        while True:
            with self._threads_lock:
                threads = list(self.threads)
            if not threads:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self.abandoned = len(threads)
                self.log.warning(f"shutdown_grace ({self.opts.shutdown_grace}s) over: abandoning {len(threads)} "
                                 "connection(s) without an answer; their clients will retry")
                break
            threads[0].join(min(left, POLL))
        if self._pool is not None:
            self._pool.shutdown(wait=self.abandoned == 0, cancel_futures=True)

    def _peer(self, client: socket.socket) -> object:
        """Who is on the other end: the uid for the unix socket (root, i.e. sendmail, is never
        capped), the address for TCP."""
        if client.family == socket.AF_UNIX:
            import struct

            try:
                creds = client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                uid = struct.unpack("3i", creds)[1]
            except OSError:
                return None
            return None if uid == 0 else f"uid {uid}"
        try:
            return str(client.getpeername()[0])
        except OSError:
            return None

    def _start(self, client: socket.socket) -> None:
        client.setblocking(True)
        peer = self._peer(client)
        if peer is not None and self._peers.get(peer, 0) >= self.opts.max_connections_per_peer:
            try:
                client.sendall(bytes(p.Reply(421, "4.4.2", "too many connections from you, try again later")))
            except OSError:
                pass
            client.close()
            self._refusals += 1
            now = time.monotonic()
            if now - self._refusal_logged >= 10:
                self.log.warning(f"refused {self._refusals} connection(s) from {peer}: "
                                 f"max_connections_per_peer={self.opts.max_connections_per_peer} reached")
                self._refusal_logged, self._refusals = now, 0
            return
        if not self._slots.acquire(blocking=False):
            try:
                client.sendall(bytes(p.Reply(421, "4.3.2", "too many connections, try again later")))
            except OSError:
                pass
            client.close()
            self.log.warning(f"refused a connection: max_connections={self.opts.max_connections} reached")
            return
        self._ids += 1
        name = f"L{os.getpid():x}{self._ids:05X}"
        if peer is not None:
            with self._threads_lock:
                self._peers[peer] = self._peers.get(peer, 0) + 1
        t = threading.Thread(target=self._session, args=(client, name, peer), name=name, daemon=True)
        with self._threads_lock:
            self.threads.add(t)
        try:
            t.start()
        except RuntimeError as exc:  # out of threads: refuse this one, keep serving the others
            with self._threads_lock:
                self.threads.discard(t)
            self._forget_peer(peer)
            self._slots.release()
            self.log.error(f"cannot start a session thread: {exc}")
            try:
                client.sendall(bytes(p.Reply(421, "4.3.2", "server busy, try again later")))
            except OSError:
                pass
            client.close()

    # -- one connection ---------------------------------------------------------------

    def _forget_peer(self, peer: object) -> None:
        if peer is None:
            return
        with self._threads_lock:
            left = self._peers.get(peer, 0) - 1
            if left > 0:
                self._peers[peer] = left
            else:
                self._peers.pop(peer, None)

    def _session(self, client: socket.socket, name: str, peer: object = None) -> None:
        try:
            Session(self, client, name).run()
        except Exception as exc:  # noqa: BLE001 - a bug ends this connection, never the server
            self.log.error(f"{name}: internal error: {type(exc).__name__}: {exc}{_where(exc)}")
            try:
                client.sendall(bytes(p.Reply(421, "4.3.0", "internal error, closing connection")))
            except OSError:
                pass
        finally:
            try:
                client.close()
            except OSError:
                pass
            self._forget_peer(peer)
            self._slots.release()
            with self._threads_lock:
                self.threads.discard(threading.current_thread())

    def mailbox_lock(self, path: str) -> threading.Lock:
        with self._mailbox_lock:
            lock = self._mailbox_locks.get(path)
            if lock is None:
                if len(self._mailbox_locks) > 10000:
                    # Forget idle ones now and then so the table does not grow for ever.
                    self._mailbox_locks = {k: v for k, v in self._mailbox_locks.items() if v.locked()}
                lock = self._mailbox_locks[path] = threading.Lock()
            return lock

    def pool(self) -> ThreadPoolExecutor:
        with self._mailbox_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.opts.delivery_threads, thread_name_prefix="deliver")
            return self._pool


class Session:
    def __init__(self, server: Server, sock: socket.socket, name: str) -> None:
        self.server = server
        self.sock = sock
        self.name = name
        cfg, opts = server.cfg, server.opts
        self.conn = p.Connection(cfg.host(), max_size=opts.max_message_size, max_recipients=opts.max_recipients)
        self.txn: _Txn | None = None
        # Silence is not the only way to hold a slot: a client sending a byte a second is
        # never silent.  So a command must be complete within command_time_limit of the
        # previous answer, and a message within transaction_time_limit of DATA.
        self.command_started = time.monotonic()
        self.data_started = 0.0

    def run(self) -> None:
        conn = self.conn
        conn.greeting()
        self.sock.settimeout(POLL)
        try:
            while True:
                if self.server.stopping.is_set():
                    conn.stopping = True  # pipelined commands still buffered get 421
                event = conn.next_event()
                if event is p.NEED_DATA:
                    if not self._send() or not self._receive():
                        break
                    continue
                if isinstance(event, p.ConnectionClosed):
                    if event.mid_data:
                        self.server.log.warning(f"{self.name}: lost connection in DATA, message discarded")
                    break
                self._handle(event)
                self.command_started = time.monotonic()
                if isinstance(event, p.DataStart):
                    self.data_started = self.command_started
                if conn.closed:
                    break
            self._send()
        finally:
            if self.txn is not None:
                self.txn.close()

    def _send(self) -> bool:
        out = self.conn.data_to_send()
        if not out:
            return True
        try:
            # A client may be slow to read (it pipelines): give it the command timeout, not POLL.
            self.sock.settimeout(self.server.opts.timeout)
            self.sock.sendall(out)
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(POLL)

    def _receive(self) -> bool:
        """Feed the protocol; False when the connection is over."""
        server, conn = self.server, self.conn
        waited = 0.0
        while True:
            if server.stopping.is_set() and not conn.busy:
                # Between commands: whatever the client sends next would be new work.
                conn.close_with(p.Reply(421, "4.3.2", f"{conn.hostname} shutting down, try again later"))
                self._send()
                return False
            now = time.monotonic()
            opts = server.opts
            if conn.state == p.DATA:
                over = now - self.data_started > opts.transaction_time_limit
                what = f"message not complete after {opts.transaction_time_limit}s"
            else:
                over = now - self.command_started > opts.command_time_limit
                what = f"command not complete after {opts.command_time_limit}s"
            if over:
                server.log.warning(f"{self.name}: {what}, closing connection")
                conn.close_with(p.Reply(421, "4.4.2", f"{what}, closing connection"))
                self._send()
                return False
            try:
                data = self.sock.recv(RECV)
            except TimeoutError:
                waited += POLL
                limit = server.opts.data_timeout if conn.state == p.DATA else server.opts.timeout
                if waited >= limit:
                    if conn.state == p.DATA:
                        server.log.warning(f"{self.name}: timeout in DATA, message discarded")
                    conn.close_with(p.Reply(421, "4.4.2", "timeout, closing connection"))
                    self._send()
                    return False
                continue
            except OSError:
                data = b""
            conn.receive_data(data)
            return True

    def _handle(self, event: object) -> None:
        if isinstance(event, p.MailFrom):
            self._reset()
            self.txn = _Txn(self.server.cfg, event.sender)
        elif isinstance(event, p.RcptTo):
            self.conn.answer_rcpt(self._rcpt(event.address))
        elif isinstance(event, p.DataStart):
            self._open_spool()
        elif isinstance(event, p.Data):
            self._spool(event.data)
        elif isinstance(event, p.EndOfData):
            if event.error is not None:
                self._log_refused(event)
                self._reset()
            else:
                self._deliver_all()
        elif isinstance(event, (p.Reset, p.Hello)):
            self._reset()

    def _reset(self) -> None:
        if self.txn is not None:
            self.txn.close()
            self.txn = None

    # -- RCPT: resolve now, so that an unknown user is refused before the data --------

    def _rcpt(self, address: str) -> p.Reply:
        txn = self.txn
        assert txn is not None
        cfg = txn.cfg
        try:
            rcpt = parse(None, address, keep_case=cfg.keep_user_case, delimiter=cfg.recipient_delimiter)
            target = resolve(cfg, rcpt)
        except DeliveryError as exc:
            status = exc.status
            self._log(address, status, 0, status.reason + (f": {status.detail}" if status.detail else ""))
            return reply_for(status, address)
        except Exception as exc:  # noqa: BLE001
            status = Status("4.3.0", "internal error", f"{type(exc).__name__}: {exc}{_where(exc)}")
            self._log(address, status, 0, f"{status.reason}: {status.detail}")
            return reply_for(status, address)
        txn.targets.append((address, rcpt, target))
        return p.Reply(250, "2.1.5", f"<{address}> recipient ok")

    # -- DATA ------------------------------------------------------------------------------

    def _open_spool(self) -> None:
        txn = self.txn
        assert txn is not None
        spool_dir = txn.cfg.spool_dir
        try:
            txn.spool = os.open(spool_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            import tempfile

            try:
                fd, tmpname = tempfile.mkstemp(prefix="lmtp.", dir=spool_dir)
                os.unlink(tmpname)
                txn.spool = fd
            except OSError as exc:
                self.server.log.error(f"{self.name}: cannot spool in {spool_dir}: {exc.strerror}")
                txn.spool = -2  # remembered: every recipient gets 451 after the data

    def _spool(self, data: bytes) -> None:
        txn = self.txn
        if txn is None or txn.spool < 0:
            return
        try:
            view = memoryview(data)
            while view:
                n = os.write(txn.spool, view)
                view = view[n:]
            txn.size += len(data)
        except OSError as exc:
            self.server.log.error(f"{self.name}: cannot spool: {exc.strerror}")
            os.close(txn.spool)
            txn.spool = -2

    def _deliver_all(self) -> None:
        txn = self.txn
        assert txn is not None
        targets = txn.targets
        if txn.spool < 0:
            for address, rcpt, _target in targets:
                status = Status("4.3.0", "cannot spool message", txn.cfg.spool_dir)
                self._log(rcpt.address, status, txn.size, f"{status.reason}: {status.detail}")
                self.conn.answer_data(reply_for(status, address))
            self._reset()
            return
        readers = [_reopen(txn.spool) for _ in targets] if len(targets) > 1 else []
        if len(targets) > 1 and all(fd >= 0 for fd in readers):
            # Several recipients: deliver in parallel, answer in RCPT order as each is ready.
            pool = self.server.pool()
            futures = [
                pool.submit(self._deliver_one, txn, address, rcpt, target, fd)
                for (address, rcpt, target), fd in zip(targets, readers, strict=True)
            ]
            for fut in futures:
                self.conn.answer_data(fut.result())
                self._send()
        else:
            for fd in readers:
                if fd >= 0:
                    os.close(fd)
            for address, rcpt, target in targets:
                os.lseek(txn.spool, 0, os.SEEK_SET)
                self.conn.answer_data(self._deliver_one(txn, address, rcpt, target, txn.spool, own=False))
                self._send()
        self._reset()

    def _deliver_one(self, txn: _Txn, given: str, rcpt: Recipient, target: Target, fd: int,
                     own: bool = True) -> p.Reply:
        """Deliver one copy; the reply names the address as the client gave it, the log as resolved."""
        address = rcpt.address
        try:
            lock = self.server.mailbox_lock(target.path)
            if not lock.acquire(timeout=txn.cfg.lock_timeout):
                raise DeliveryError(Status("4.2.0", "mailbox is locked", f"{target.path}: busy in this server"))
            try:
                result = deliver(txn.cfg, rcpt, fd, txn.sender, target)
            finally:
                lock.release()
        except DeliveryError as exc:
            status = exc.status
            self._log(address, status, txn.size, status.reason + (f": {status.detail}" if status.detail else ""))
            return reply_for(status, given)
        except Exception as exc:  # noqa: BLE001 - a bug defers this recipient, never crashes the server
            status = Status("4.3.0", "internal error", f"{type(exc).__name__}: {exc}{_where(exc)}")
            self.server.log.error(f"{self.name}: to=<{address}>: {status.detail}")
            self._log(address, status, txn.size, f"{status.reason}: {status.detail}")
            return reply_for(status, given)
        finally:
            if own:
                try:
                    os.close(fd)
                except OSError:
                    pass
        # Durable: the answer is 250 whatever happens to the log lines (a 4xx would make the
        # client send it again).
        try:
            for note in result.notes:
                self.server.log.warning(f"{self.name}: to=<{address}>, broke stale lock {note}")
            why = f"{result.target.format} {result.target.path}"
            self._log(address, Status("2.0.0", "delivered"), result.size, why, result.sender)
        except Exception:  # noqa: BLE001
            pass
        return reply_for(Status("2.0.0", "delivered"), given)

    def _log(self, address: str, status: Status, size: int, why: str, sender: str | None = None) -> None:
        txn = self.txn
        if sender is None:
            sender = txn.sender if txn is not None else ""
        delay = time.time() - txn.started if txn is not None else 0.0
        line = delivery_line(address, sender, size, delay, status.dsn, status.word, why)
        self.server.log.info(f"{self.name}: {line}")

    def _log_refused(self, event: p.EndOfData) -> None:
        assert event.error is not None
        for address in event.recipients:
            status = Status(event.error.dsn, event.error.text)
            self._log(address, status, self.txn.size if self.txn else 0, event.error.text)


# -- helpers ------------------------------------------------------------------------------


def _reopen(fd: int) -> int:
    """A second open file description of the spool, with its own offset (-1 if impossible)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def _owner(spec: str, where: str) -> tuple[int, int]:
    import grp
    import pwd

    name, _, group = spec.partition(":")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(where, f"no such user {name!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(where, f"no such group {group!r}") from None
    return pw.pw_uid, gid


def _say(text: str) -> None:
    try:
        sys.stderr.write(f"vdeliver-lmtpd: {text}\n")
        sys.stderr.flush()
    except OSError:
        pass


def _parse_args(argv: list[str]) -> tuple[str, str | None]:
    """(action, config); raises ValueError with the usage problem."""
    action, config = "serve", None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            action = "help"
        elif arg == "--version":
            action = "version"
        elif arg == "--check":
            action = "check"
        elif arg in ("-c", "--config"):
            if i >= len(argv):
                raise ValueError(f"{arg} needs a file")
            config = argv[i]
            i += 1
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-c") and len(arg) > 2:
            config = arg[2:]
        else:
            raise ValueError(f"unexpected argument {arg[:40]!r}")
    return action, config


def load(config: str | None) -> tuple[Config, Settings]:
    from vdeliver import config as config_mod

    cfg = config_mod.load(config)
    return cfg, settings(cfg)


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until SIGTERM.  Returns the exit status."""
    try:
        action, config = _parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        _say(f"{exc}\n{HELP}")
        return EX_USAGE
    if action == "help":
        sys.stdout.write(HELP)
        return EX_OK
    if action == "version":
        sys.stdout.write(f"vdeliver-lmtpd {__version__}\n")
        return EX_OK
    try:
        cfg, opts = load(config)
    except DeliveryError as exc:
        _say(exc.status.detail or exc.status.reason)
        return EX_CONFIG
    if action == "check":
        # Everything start-up would refuse, refused here too: the run user, the directories.
        problem = _check_start(cfg, opts)
        if problem:
            _say(problem)
            return EX_CONFIG
        sys.stdout.write(f"{cfg.path}: [lmtp] ok, socket {opts.socket}, serving as {opts.user or 'the caller'}\n")
        return EX_OK
    logger = Logger("vdeliver-lmtpd", cfg.syslog_facility, cfg.log)
    try:
        return _run(cfg, opts, logger, config)
    except DeliveryError as exc:
        _say(exc.status.detail or exc.status.reason)
        logger.error(exc.status.detail or exc.status.reason)
        return EX_CONFIG
    except OSError as exc:
        _say(f"cannot listen: {exc.strerror or exc}")
        logger.error(f"cannot listen: {exc.strerror or exc}")
        return EX_OSERR


def _check_start(cfg: Config, opts: Settings) -> str:
    """What would stop the server from starting, as one line ("" if nothing)."""
    from vdeliver import daemon

    if os.geteuid() == 0 and not opts.user:
        return f"{cfg.where('lmtp', 'user')}: refusing to deliver as root: set [lmtp] user or user"
    try:
        owner = daemon.RunUser(opts.user, opts.group) if os.geteuid() == 0 else daemon.RunUser()
    except daemon.DaemonError as exc:
        return f"{cfg.where('lmtp', 'user')}: {exc.strerror}"
    for path in [opts.socket] + ([opts.pid_file] if opts.pid_file else []):
        directory = os.path.dirname(path) or "/"
        if not os.path.isdir(directory):
            if os.path.isdir(os.path.dirname(directory.rstrip("/")) or "/"):
                continue  # created at start (owned by the run user), as after a reboot
            return f"{path}: directory {directory} does not exist"
        try:
            daemon.Place(directory, owner, create=False).close()
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
    return ""


def _run(cfg: Config, opts: Settings, logger: Logger, config: str | None) -> int:
    import signal

    from vdeliver import daemon

    user = opts.user
    owner = daemon.RunUser()
    if os.geteuid() == 0:
        if not user:
            raise ConfigError(cfg.where("lmtp", "user"), "refusing to deliver as root: set [lmtp] user or user")
        try:
            owner = daemon.RunUser(user, opts.group)
        except daemon.DaemonError as exc:
            raise ConfigError(cfg.where("lmtp", "user"), exc.strerror or str(exc)) from None
    # A write past RLIMIT_FSIZE must fail with EFBIG (and be rolled back), not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Import now what deliveries import lazily: after giving up root the code's directory
    # may no longer be readable, and a failed import mid-delivery would defer every message.
    import selectors  # noqa: F401
    import tempfile  # noqa: F401

    from vdeliver import locking, maildir, mbox, message  # noqa: F401

    server = Server(cfg, opts, logger)
    server.run_user = owner
    server.listen()
    pid_file = daemon.PidFile(opts.pid_file, owner) if opts.pid_file else None
    try:
        if pid_file is not None:
            pid_file.write()
        daemon.drop_privileges(owner)
    except BaseException:
        server.close_listeners()
        raise

    reload_wanted = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            reload_wanted.set()
        else:
            server.stop()

    def on_wake() -> None:
        if not reload_wanted.is_set():
            return
        reload_wanted.clear()
        try:
            new_cfg, new_opts = load(config)
        except DeliveryError as exc:
            logger.error(f"reload failed, keeping the old configuration: {exc.status.detail or exc.status.reason}")
            return
        server.reload(new_cfg, new_opts)
        logger.info(f"reloaded {new_cfg.path}")

    wake_r: socket.socket | None = None
    wake_w: socket.socket | None = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
    where = opts.socket + (f" and {opts.tcp[0]}:{opts.tcp[1]}" if opts.tcp else "")
    logger.info(f"listening on {where} (vdeliver {__version__}, max_connections={opts.max_connections})")
    try:
        server.serve(wake_r, on_wake)
    finally:
        if in_main:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
        for s in (wake_r, wake_w):
            if s is not None:
                s.close()
        if pid_file is not None:
            pid_file.remove()
    logger.info("stopped")
    if server.abandoned:
        # Delivery threads still waiting on a lock would hold interpreter shutdown (it joins
        # the pool's threads): leave now, as promised by shutdown_grace.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EX_OK)
    return EX_OK


if __name__ == "__main__":
    raise SystemExit(main())
