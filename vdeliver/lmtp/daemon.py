"""`vdeliver-lmtpd`: a resident LMTP server delivering through the vdeliver core.

A process per message pays for interpreter start-up on every delivery; this server
pays it once, so a delivery costs what the core costs (mostly fsync).  Everything
that decides where and how mail is stored is the command line's: recipient.parse(),
deliver.resolve() at RCPT time and deliver.deliver() after DATA, with the same
configuration file, locks, fsync, rollback, headers and log lines.

Shape: protocol.py holds every protocol rule and does no I/O; settings.py the [lmtp]
table; session.py one connection; processes.py the spawner of [lmtp] processes' workers;
this module the listeners, the threads and start-up.
One thread per connection (bounded by [lmtp] max_connections);
a message with several recipients is delivered to them in parallel by a small
pool, and the replies go out in RCPT order as each becomes ready.  Deliveries are
fsync-bound and fsync releases the GIL, so threads are enough.  Within this
process one mutex per mailbox serialises deliveries to the same mbox (fcntl locks
are per process, so two of our own threads must never meet inside them); other
processes are kept out by the core's dotlock + fcntl as usual.

Signals: SIGTERM/SIGINT stop accepting, finish messages in flight, answer 421 to
anything new; SIGHUP re-reads the configuration (socket, tcp and user need a
restart).  Standard library only: this is a delivery path.

Over 400 lines on purpose: the listeners, connection accounting and start-up/shutdown
sequence share the Server's state; the protocol, settings and sessions are apart.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from mmap import mmap

from vdeliver import __version__, unixd
from vdeliver.config import Config, ConfigError
from vdeliver.errors import DeliveryError
from vdeliver.lmtp import protocol as p
from vdeliver.lmtp.processes import SPAWNER_SIGNALS, fork_spawner, reap, spawner_gone
from vdeliver.lmtp.session import POLL, Session, where
from vdeliver.lmtp.settings import Settings, load
from vdeliver.log import Logger, RateLimited
from vdeliver.metrics import MetricsServer, Registry, process_gauges

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdeliver.hooks import Hook

EX_OK = 0
EX_USAGE = 64
EX_OSERR = 71
EX_CONFIG = 78
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
        self._refusals = RateLimited(logger, 10.0)
        self._socket_ino = -1
        self.run_user: unixd.RunUser | None = None  # set by _run() before listen()
        self.parent = 0  # in a worker: its spawner (processes.py), whose end stops it
        self.metrics = self._registry()
        self.metrics_server: MetricsServer | None = None

    def _registry(self) -> Registry:
        reg = Registry("vdeliver_lmtp")
        reg.gauge("connections", "Open LMTP connections.", lambda: len(self.threads))
        reg.gauge("max_connections", "The [lmtp] max_connections limit.", lambda: self.opts.max_connections)
        reg.gauge("up", "1 while the server accepts connections.", lambda: 0 if self.stopping.is_set() else 1)
        process_gauges(reg)
        return reg

    # -- listening --------------------------------------------------------------------

    def listen(self) -> None:
        """Bind the unix socket (and TCP); raises OSError or ConfigError."""
        owner = self.run_user if self.run_user is not None else unixd.RunUser()
        socket_owner = None
        if self.opts.socket_owner:
            name, _, group = self.opts.socket_owner.partition(":")
            try:
                user = unixd.RunUser(name, group)
            except unixd.DaemonError as exc:
                raise ConfigError(self.cfg.where("lmtp", "socket_owner"), exc.strerror or str(exc)) from None
            socket_owner = (user.uid, user.gid)
        unix, self._socket_ino = unixd.bind_unix(self.opts.socket, self.opts.socket_mode, owner, socket_owner)
        self.listeners.append(unix)
        if self.opts.metrics is not None:
            self.metrics_server = MetricsServer(self.metrics, self.opts.metrics, self.log).bind(owner)
        if self.opts.tcp is not None:
            host, port = self.opts.tcp
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            tcp.listen(64)
            self.listeners.append(tcp)

    def close_listeners(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        for s in self.listeners:
            try:
                s.close()
            except OSError:
                pass
        self.listeners = []
        # Only our own socket file: a successor may already have bound a new one there.
        unixd.remove_socket(self.opts.socket, self._socket_ino)

    def serve(self, wakeup: socket.socket | None = None, on_wake: Hook | None = None) -> None:
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
                if self.parent and os.getppid() != self.parent:  # besides PR_SET_PDEATHSIG
                    self.log.error(f"worker process {os.getpid()}: its spawner {self.parent} is gone: stopping")
                    self.stop()
                    break
                for key, _ in sel.select(POLL):
                    if key.data == "wake":
                        try:
                            wakeup.recv(512)  # type: ignore[union-attr]
                        except OSError:
                            pass
                        if on_wake is not None:
                            on_wake()
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
            self.log.warning("reload: changes to socket*, tcp, pid_file, user, group, max_connections, "
                             "delivery_threads and processes take effect after a restart")
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
        self.metrics.inc("connections_total", "LMTP connections, refused ones included.")
        if peer is not None and self._peers.get(peer, 0) >= self.opts.max_connections_per_peer:
            self.metrics.inc("connections_refused_total", "Connections refused, by limit.",
                             limit="max_connections_per_peer")
            _refuse(client, p.Reply(421, "4.4.2", "too many connections from you, try again later"))
            self._refusals.warning(f"refused a connection from {peer}: "
                                   f"max_connections_per_peer={self.opts.max_connections_per_peer} reached")
            return
        if not self._slots.acquire(blocking=False):
            self.metrics.inc("connections_refused_total", "Connections refused, by limit.", limit="max_connections")
            _refuse(client, p.Reply(421, "4.3.2", "too many connections, try again later"))
            self._refusals.warning(f"refused a connection: max_connections={self.opts.max_connections} reached")
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
            _refuse(client, p.Reply(421, "4.3.2", "server busy, try again later"))

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
            self.log.error(f"{name}: internal error: {type(exc).__name__}: {exc}{where(exc)}")
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



def _refuse(client: socket.socket, reply: p.Reply) -> None:
    """Answer a connection we will not serve, and close it."""
    try:
        client.sendall(bytes(reply))
    except OSError:
        pass
    client.close()


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

    if os.geteuid() == 0 and not opts.user:
        return f"{cfg.where('lmtp', 'user')}: refusing to deliver as root: set [lmtp] user or user"
    try:
        owner = unixd.RunUser(opts.user, opts.group) if os.geteuid() == 0 else unixd.RunUser()
    except unixd.DaemonError as exc:
        return f"{cfg.where('lmtp', 'user')}: {exc.strerror}"
    for path in [opts.socket] + ([opts.pid_file] if opts.pid_file else []):
        directory = os.path.dirname(path) or "/"
        if not os.path.isdir(directory):
            if os.path.isdir(os.path.dirname(directory.rstrip("/")) or "/"):
                continue  # created at start (owned by the run user), as after a reboot
            return f"{path}: directory {directory} does not exist"
        try:
            unixd.Place(directory, owner, create=False).close()
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
    return ""


def _start_group(cfg: Config, opts: Settings, logger: Logger) -> None:
    """Recover what killed server processes left in the group journal (vdeliver/groupjournal.py),
    then turn group commit on (made here once; each process opens it for itself at its first
    mbox delivery, after the fork: its OFD locks must be its own)."""
    from vdeliver import deliver, groupjournal, recovery
    from vdeliver.config import group_journal

    path = group_journal(cfg)
    # Bounded as a whole: a service manager kills a server that does not start in time (systemd:
    # 90 s), and would restart it into the same wait for ever.  What is left, the deliveries do.
    said, left = groupjournal.recover_all(path, host=cfg.host(), lock_timeout=min(cfg.lock_timeout, 10),
                                          stale_age=cfg.stale_lock_age, keep=cfg.mbox_journal, log=logger,
                                          time_limit=opts.recovery_time_limit)
    for line in said:
        logger.warning(f"mbox recovery: group journal: {line}")
    if left:
        logger.warning(f"mbox recovery: group journal: [lmtp] recovery_time_limit ({opts.recovery_time_limit}s) "
                       f"reached: {left} busy slot(s) left, each recovered by the next delivery into its mailbox")
    deliver.GROUP[:] = []
    if not (opts.group_commit and cfg.mbox_journal):
        return
    try:
        os.close(recovery.open_journal(path, True))
    except OSError as exc:
        logger.warning(f"group commit off: cannot use the group journal {path}: {exc.strerror or exc}; "
                       "mbox deliveries use their own journal")
        return
    deliver.GROUP[:] = [groupjournal.Group(path, cfg.lock_timeout)]


def _run(cfg: Config, opts: Settings, logger: Logger, config: str | None) -> int:
    import signal


    user = opts.user
    owner = unixd.RunUser()
    if os.geteuid() == 0:
        if not user:
            raise ConfigError(cfg.where("lmtp", "user"), "refusing to deliver as root: set [lmtp] user or user")
        try:
            owner = unixd.RunUser(user, opts.group)
        except unixd.DaemonError as exc:
            raise ConfigError(cfg.where("lmtp", "user"), exc.strerror or str(exc)) from None
    # A write past RLIMIT_FSIZE must fail with EFBIG (and be rolled back), not kill us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Import now what deliveries import lazily: after giving up root the code's directory
    # may no longer be readable, and a failed import mid-delivery would defer every message.
    import selectors  # noqa: F401
    import tempfile  # noqa: F401

    from vdeliver import locking, maildir, mbox, message  # noqa: F401

    if opts.processes > 1:
        try:
            import ctypes  # noqa: F401  (the spawner's and workers' PR_SET_PDEATHSIG)
        except (ImportError, OSError, MemoryError):
            pass  # they look at their parent instead

    server = Server(cfg, opts, logger)
    server.run_user = owner
    server.listen()
    pid_file = unixd.PidFile(opts.pid_file, owner) if opts.pid_file else None
    try:
        if pid_file is not None:
            pid_file.write()
        unixd.drop_privileges(owner)
    except BaseException:
        server.close_listeners()
        raise
    _start_group(cfg, opts, logger)
    worker, spawner, shared = False, [0], None
    if opts.processes > 1:
        shared = mmap(-1, 4)  # the spawner's count of live workers, for the gauge
        signal.pthread_sigmask(signal.SIG_BLOCK, SPAWNER_SIGNALS)
        worker, spawner[0] = fork_spawner(server, config, logger, opts.processes - 1, shared)

    # What the signal handler saw, for the loop to act on.  A Python handler runs in the main
    # thread between two bytecodes of whatever it is doing, inside a lock that code holds
    # (threading.Event.set() in server.stop(), say) and inside itself when signals come fast:
    # a handler that took such a lock (Event.set() did) waited for itself, each further signal
    # nested one more handler, and the stop storm of a service manager ended in RecursionError,
    # exit 1.  So the handler only notes the signal (a dict store takes no lock); the wakeup fd
    # wakes the loop, and on_wake() does the rest there.
    signalled: dict[int, bool] = {}

    def on_signal(signum: int, _frame: object) -> None:
        signalled[signum] = True

    def on_wake() -> None:
        if spawner[0] and not server.stopping.is_set() and spawner_gone(spawner[0], opts.processes, logger):
            spawner[0] = 0
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signalled.pop(signum, False):
                on_stop_or_reload(signum)

    def on_stop_or_reload(signum: int) -> None:
        if spawner[0]:  # the spawner passes it on to the workers: stop, or reload
            try:
                os.kill(spawner[0], signum)
            except OSError:
                pass
        if signum != signal.SIGHUP:
            unixd.notify("STOPPING=1")
            server.stop()
            return
        if server.stopping.is_set():
            return
        unixd.notify("RELOADING=1")
        try:
            new_cfg, new_opts = load(config)
        except DeliveryError as exc:
            logger.error(f"reload failed, keeping the old configuration: {exc.status.detail or exc.status.reason}")
            unixd.notify("READY=1")
            return
        server.reload(new_cfg, new_opts)
        logger.info(f"reloaded {new_cfg.path}")
        unixd.notify("READY=1")

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
        if spawner[0]:  # the spawner's end wakes the loop (through the wakeup fd), which reports it
            signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    if shared is not None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SPAWNER_SIGNALS)
    if not worker and shared is not None:
        server.metrics.gauge("processes", "Server processes serving the socket(s): this one and its live workers.",
                             lambda: 1 + (int.from_bytes(shared[:4], "little") if spawner[0] else 0))
    where = opts.socket + (f" and {opts.tcp[0]}:{opts.tcp[1]}" if opts.tcp else "")
    if server.metrics_server is not None:
        server.metrics_server.start()
        where += f" (metrics on {server.metrics_server.describe()})"
    if not worker:
        processes = f", processes={opts.processes}" if opts.processes > 1 else ""
        logger.info(f"listening on {where} (vdeliver {__version__}, max_connections={opts.max_connections}"
                    f"{processes})")
        unixd.notify(f"READY=1\nSTATUS=listening on {where}\nMAINPID={os.getpid()}")
    try:
        server.serve(wake_r, on_wake)
    finally:
        if in_main:
            signal.set_wakeup_fd(-1)
            # Stopping already: a later TERM, INT or HUP changes nothing.  Under systemd a worker
            # gets the stop twice (the service manager signals every process of the unit, the
            # spawner passes its own on), and the default action would kill it on its way out.
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for s in (wake_r, wake_w):
            if s is not None:
                s.close()
        if pid_file is not None and not worker:
            pid_file.remove()
        if spawner[0]:  # it waits for its workers as long (and a little): wait for it a little longer
            reap([spawner[0]], opts.shutdown_grace + 5, logger, "spawner process")
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
