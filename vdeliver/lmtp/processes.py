"""[lmtp] processes: the spawner, the single-threaded process that forks vdeliver-lmtpd's
workers and replaces the ones that die, so that the server keeps the number of processes it
was given, as Postfix's master and Dovecot keep theirs.

    first process (threads: accepts, delivers, /metrics, pid file, socket file, sd_notify)
      `- spawner (one thread: never accepts, never delivers; forks, reaps, passes signals on)
           |- worker 1 (threads: accepts, delivers)
           `- worker N-1

Why a process of its own: the first process runs threads, and a fork() from a threaded
process may give the child a lock some other thread held mid-update (in the allocator, in
a logging or I/O object), which the child then waits on for ever.  The spawner is forked
where the workers used to be, once the sockets are bound and root is given up and before
any thread starts, and it never starts one: every fork from it is as safe as the first, and
each worker starts from the same state (listeners, configuration, privileges; the group
journal is opened by each process at its first mbox delivery, so its OFD locks are its own).
A fresh interpreter (posix_spawn of `vdeliver-lmtpd --worker`) would need the listeners passed
on and would re-read a configuration that may be readable by root only: not chosen.

Signals: the first process passes TERM, INT and HUP to the spawner, which passes them to the
workers; it waits for them with sigtimedwait() (they are blocked from before its fork, and in
each worker until its handlers are in place).  The spawner and the workers ask the kernel for
a signal when their parent dies (PR_SET_PDEATHSIG: SIGUSR2 for the spawner, which then says so
and stops its workers, SIGTERM for a worker), so nothing serves on unsupervised; each also
looks at its parent now and then, in case prctl() cannot be called.
Standard library only; only the server imports this module.
"""

from __future__ import annotations

import os
import signal
import time
from mmap import mmap

from vdeliver.errors import DeliveryError
from vdeliver.lmtp.session import where
from vdeliver.lmtp.settings import load
from vdeliver.log import Logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdeliver.lmtp.daemon import Server

# The signals a spawner waits for with sigtimedwait(); blocked from before its fork until each
# process has its handlers (a signal in between waits instead of killing it).  SIGUSR2 is the
# spawner's parent-death signal: a SIGTERM may be the first process's own, passed on.
SPAWNER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR2)
PARENT_GONE = signal.SIGUSR2
YOUNG = 10.0  # a worker that dies sooner after its start makes the next start wait twice as long
MAX_DELAY = 60.0  # the longest wait between two starts of a crash-looping worker


def _die_with_parent(parent: int, signum: int) -> bool:
    """Ask the kernel for `signum` when our parent process ends (Linux PR_SET_PDEATHSIG), so that
    a spawner or worker never serves on unsupervised; True if the parent is already gone."""
    try:
        import ctypes  # imported before root was given up (_run)

        ctypes.CDLL(None, use_errno=True).prctl(1, signum, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (ImportError, OSError, AttributeError, MemoryError):
        pass  # each also looks at its parent: the spawner every second, a worker every POLL
    return os.getppid() != parent


class Spawner:
    """The spawner's state: its workers and when each started, and when the next may start.
    Starts are rate-limited: one a second at most, and a worker that dies within YOUNG seconds
    of its start doubles the wait before the next one, up to MAX_DELAY, so that a worker that
    cannot live (a crash loop) is no fork storm; one that lived longer resets the wait."""

    def __init__(self, server: Server, config: str | None, logger: Logger, count: int, shared: mmap,
                 parent: int) -> None:
        self.server, self.config, self.log = server, config, logger
        self.count = count  # workers to keep
        self.shared = shared  # the live workers' count, read by the first process's gauge
        self.parent = parent  # the first process
        self.workers: dict[int, float] = {}  # pid -> when it started (monotonic)
        self.delay = 1.0
        self.next_start = 0.0

    def run(self) -> int:
        """The spawner's loop: -1 in a worker just forked (which goes on to serve, its signals
        still blocked), else the spawner's exit status once its workers are gone."""
        stop = 0 if not _die_with_parent(self.parent, PARENT_GONE) else self._orphaned()
        for _ in range(self.count):  # the first workers, at once
            if self._fork(replacing=False):
                return -1
        while not stop:
            while len(self.workers) < self.count and time.monotonic() >= self.next_start:
                if self._fork(replacing=True):
                    return -1
            wait = self.next_start - time.monotonic() if len(self.workers) < self.count else 1.0
            info = signal.sigtimedwait(SPAWNER_SIGNALS, min(max(wait, 0.01), 1.0))
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                stop = info.si_signo
            elif info is not None and info.si_signo == signal.SIGHUP:
                self._pass_on(signal.SIGHUP)
                self._reload()
            if (info is not None and info.si_signo == PARENT_GONE) or os.getppid() != self.parent:
                stop = self._orphaned()
            self._collect()
        self._pass_on(stop)
        reap(list(self.workers), self.server.opts.shutdown_grace, self.log)
        return 0

    def _orphaned(self) -> int:
        self.log.error(f"spawner process {os.getpid()}: the first process {self.parent} is gone: "
                       "stopping the workers")
        return signal.SIGTERM

    def _fork(self, replacing: bool) -> bool:
        """Start one worker; True in it."""
        now = time.monotonic()
        self.next_start = now + self.delay
        me = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            self.log.error(f"cannot start a worker process: {exc.strerror}; trying again in {self.delay:.0f}s")
            return False
        if pid == 0:
            self.server.parent = me
            if _die_with_parent(me, signal.SIGTERM):  # a worker stops as when told to
                os.kill(os.getpid(), signal.SIGTERM)  # delivered once its handlers are in place: it stops at once
            return True
        self.workers[pid] = now
        self._publish()
        if replacing:
            self.log.info(f"started worker process {pid}: {len(self.workers) + 1} of {self.count + 1} "
                          "processes serving")
        return False

    def _collect(self) -> None:
        """Reap the workers that ended, each logged; its replacement is due after the delay."""
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid, status = 0, 0
            if not pid:
                return
            started = self.workers.pop(pid, None)
            if started is None:
                continue
            self._publish()
            age = time.monotonic() - started
            if age < YOUNG:
                self.delay = min(self.delay * 2, MAX_DELAY)
                why = f"; it ran {age:.1f}s: the next start waits {self.delay:.0f}s (crash loop?)"
            else:
                self.delay = 1.0
                why = ""
            now = time.monotonic()
            self.next_start = max(self.next_start, now + (self.delay if why else 0))
            if not why:
                wait = self.next_start - now
                why = "; starting another" + (f" in {wait:.0f}s" if wait >= 0.5 else "")
            self.log.error(f"worker process {pid} {_how(status)}: {len(self.workers) + 1} of {self.count + 1} "
                           f"processes serving{why}")

    def _publish(self) -> None:
        self.shared[:4] = len(self.workers).to_bytes(4, "little")

    def _pass_on(self, signum: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    def _reload(self) -> None:
        """The workers started from now on start with the new configuration (they and the first
        process reload and log for themselves; a bad file keeps the old one here too)."""
        try:
            self.server.cfg, self.server.opts = load(self.config)
        except DeliveryError:
            pass


def fork_spawner(server: Server, config: str | None, logger: Logger, count: int, shared: mmap) -> tuple[bool, int]:
    """Fork the Spawner, which forks `count` workers.  (False, its pid) in the first process,
    (True, 0) in a worker; the spawner itself never returns from here.  The socket file, the
    pid file, the metrics endpoint and the service manager's notifications stay the first
    process's."""
    first = os.getpid()
    pid = os.fork()
    if pid:
        return False, pid
    os.environ.pop("NOTIFY_SOCKET", None)
    server._socket_ino = -1  # the socket file is the first process's to remove
    metrics, server.metrics_server = server.metrics_server, None
    if metrics is not None and metrics.sock is not None:
        metrics.sock.close()  # no shutdown(): the socket itself is shared
    me = os.getpid()
    try:
        code = Spawner(server, config, logger, count, shared, first).run()
    except BaseException as exc:
        if os.getpid() != me:
            raise  # a worker's, after its fork
        logger.error(f"spawner process {me}: internal error: {type(exc).__name__}: {exc}{where(exc)}")
        code = 70
    if code < 0:
        return True, 0
    os._exit(code)


def spawner_gone(pid: int, total: int, logger: Logger) -> bool:
    """The spawner ended while the server runs (killed by hand or by the OOM killer): its workers
    stop with it (they finish their messages), and this process serves alone, loudly."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done, status = pid, 0
    if not done:
        return False
    logger.error(f"spawner process {pid} (it starts the worker processes) {_how(status)}: its workers stop; "
                 f"1 of {total} processes serving until vdeliver-lmtpd is restarted")
    return True


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def reap(pids: list[int], grace: int, logger: Logger, what: str = "worker process(es)") -> None:
    """Wait for the children to finish their messages (as long as shutdown_grace, and a little)."""
    deadline = time.monotonic() + grace + 5
    left = list(pids)
    while left:
        for pid in list(left):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.remove(pid)
        if left and time.monotonic() > deadline:
            logger.warning(f"{len(left)} {what} still running after shutdown_grace: killed")
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except OSError:
                    pass
            return
        if left:
            time.sleep(0.05)
