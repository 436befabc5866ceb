"""Mailbox locks every mail reader honours: a dotlock and an fcntl write lock.

Knows nothing of mail.  The dotlock is `<file>.lock`, made race-free (also on NFS)
by writing a uniquely named file and link()ing it into place; success is link()
returning 0 or the temporary file's link count reaching 2.  Its content is
`pid:host`, as Dovecot writes it, so a lock left by a dead local process is broken
at once.  Otherwise a lock is stale when neither it nor the mailbox changed for
`stale_age` seconds; the holder refreshes its lock's mtime while it writes.

The fcntl lock covers the whole file, so it conflicts with procmail's (from EOF)
and Dovecot's (whole file) locks.  Python's fcntl.lockf() is fcntl(F_SETLK), not
flock(): the two kinds do not exclude each other on Linux, and readers use fcntl.
"""

import errno
import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py
import time

from vdeliver.errors import DeliveryError, Status
from vdeliver.fileio import join, lexists, split

REFRESH_EVERY = 15.0



def _timeout(what: str, path: str, waited: float) -> DeliveryError:
    return DeliveryError(Status("4.2.0", "mailbox is locked", f"{what} {path}: gave up after {waited:.0f}s"))


def _sleep_step(attempt: int) -> float:
    return min(0.005 * float(1 << min(attempt, 6)), 0.25)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DotLock:
    """`<path>.lock`, acquired with a timeout, broken when stale, released once."""

    def __init__(self, path: str, host: str, timeout: float = 60.0, stale_age: float = 300.0,
                 content: "bytes | None" = None) -> None:
        self.path = path
        self.lockpath = path + ".lock"
        self.host = host
        self.timeout = timeout
        self.stale_age = stale_age
        self.content = content if content is not None else f"{os.getpid()}:{host}".encode()
        self.held = False
        self.ino = -1
        self._refreshed = 0.0
        self.broke: "list[str]" = []  # what stale locks were broken, for the log

    def _try_once(self) -> bool:
        directory, base = split(self.lockpath)
        tmp = join(directory or ".", f".{base}.{self.host}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DeliveryError(
                Status("4.3.0", "cannot create lock file", f"{directory}: {exc.strerror}")
            ) from None
        try:
            try:
                os.write(fd, self.content)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.lockpath)
                ok = True
            except FileExistsError:
                ok = False
            except OSError as exc:
                # NFS may report failure for a link that happened: trust the link count.
                try:
                    ok = os.stat(tmp).st_nlink == 2
                except OSError:
                    ok = False
                if not ok and exc.errno != errno.EEXIST:
                    raise DeliveryError(
                        Status("4.3.0", "cannot create lock file", f"{self.lockpath}: {exc.strerror}")
                    ) from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if ok:
            st = os.lstat(self.lockpath)
            self.ino = st.st_ino
            self._refreshed = time.monotonic()
        return ok

    def _stale(self) -> bool:
        """Decide whether the existing lock may be broken; break it if so."""
        try:
            st = os.lstat(self.lockpath)
        except FileNotFoundError:
            return True  # gone already: just try again
        except OSError:
            return False
        reason = ""
        data = _read_lock(self.lockpath)
        pid_s, colon, host = data.strip().partition(b":")
        if colon and host.decode("utf-8", "replace") == self.host and pid_s.isdigit():
            pid = int(pid_s)
            if pid > 0 and pid != os.getpid() and not _pid_alive(pid):
                reason = f"holder pid {pid} is dead"
        if not reason:
            now = time.time()
            try:
                mtime = os.stat(self.path).st_mtime
            except OSError:
                mtime = 0.0
            if now - st.st_mtime > self.stale_age and now - mtime > self.stale_age:
                reason = f"unchanged for {now - max(st.st_mtime, mtime):.0f}s"
        if not reason:
            return False
        # Unlink only the lock we judged: a new one may have taken its place.
        try:
            again = os.lstat(self.lockpath)
            if again.st_ino == st.st_ino and again.st_mtime == st.st_mtime:
                os.unlink(self.lockpath)
                self.broke.append(f"{self.lockpath} ({reason})")
        except OSError:
            pass
        return True

    def acquire(self) -> None:
        """Every round checks the deadline: a stale lock that cannot be removed (a directory
        we may not write, a lock that is a directory) must not make this loop spin for ever."""
        start = time.monotonic()
        attempt = 0
        while not self._try_once():
            broken = self._stale()
            waited = time.monotonic() - start
            if waited >= self.timeout:
                raise _timeout("dotlock", self.lockpath, waited)
            if not broken or lexists(self.lockpath):
                time.sleep(_sleep_step(attempt))
                attempt += 1
        self.held = True

    def refresh(self, force: bool = False) -> None:
        """Touch the lock so that others do not judge it stale during a long write."""
        if not self.held:
            return
        now = time.monotonic()
        if force or now - self._refreshed >= REFRESH_EVERY:
            self._refreshed = now
            try:
                os.utime(self.lockpath)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if os.lstat(self.lockpath).st_ino == self.ino:
                os.unlink(self.lockpath)
        except OSError:
            pass


def _read_lock(path: str) -> bytes:
    """The start of a lock file, without blocking: a FIFO or device planted as the lock
    must not hang us (O_NONBLOCK), and it is not read unless it is a regular file."""
    import _stat as stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, 256)
    except OSError:
        return b""
    finally:
        os.close(fd)


def fcntl_lock(fd: int, path: str, timeout: float, write: bool = True) -> None:
    """Take a whole-file fcntl lock, polling so that the wait can time out."""
    import fcntl

    mode = (fcntl.LOCK_EX if write else fcntl.LOCK_SH) | fcntl.LOCK_NB
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            fcntl.lockf(fd, mode, 0, 0, 0)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EINTR):
                raise DeliveryError(
                    Status("4.3.0", "cannot lock mailbox", f"fcntl {path}: {exc.strerror}")
                ) from None
        waited = time.monotonic() - start
        if waited >= timeout:
            raise _timeout("fcntl lock on", path, waited)
        time.sleep(_sleep_step(attempt))
        attempt += 1


def fcntl_unlock(fd: int) -> None:
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0, 0)
    except OSError:
        pass
