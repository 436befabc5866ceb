"""Append one prepared message to an mbox, under dotlock + fcntl, with rollback.

Assume the operation will fail:
1. open with O_APPEND|O_NOFOLLOW; refuse anything but a regular file with one
   link, owned by us (a symlink or hard link could point anywhere);
2. take the dotlock, then the fcntl lock; check the path still names the file;
3. remember the length, write the whole record, fsync;
4. on any error, ftruncate back to the remembered length and fsync while the
   locks are still held, so the mailbox is exactly as it was.
The existing mailbox is never read (only its last two bytes), so the cost does not
grow with its size.
"""

import _stat as stat  # the C module: `stat` is a Python module over it, 50 us more a process
import errno
import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py

from vdeliver import locking
from vdeliver.errors import DeliveryError, Status, fail, status_for_errno
from vdeliver.fileio import write_all
from vdeliver.message import Prepared, Spool


def open_mbox(path: str, create: bool) -> int:
    """Open (or create) the mbox for appending and check what it is."""
    # Read-write: the separator check and crash recovery read the tail of the file.
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not create:
            raise fail("user unknown", f"no mailbox {path}", "5.1.1") from None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return open_mbox(path, False)
        except OSError as exc:
            raise fail("cannot create mailbox", f"{path}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise fail("mailbox is a symbolic link", path) from None
        raise fail("cannot open mailbox", f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise fail("mailbox is not a regular file", path)
        if st.st_nlink != 1:
            raise fail("mailbox has more than one link", f"{path}: {st.st_nlink} links")
        if st.st_uid != os.geteuid():
            raise fail("mailbox has the wrong owner", f"{path}: uid {st.st_uid}, we are {os.geteuid()}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _separator_needed(fd: int, size: int) -> bytes:
    """An mbox message must start after an empty line; repair a missing one cheaply."""
    if size == 0:
        return b""
    tail = os.pread(fd, 2, max(0, size - 2))
    if tail.endswith(b"\n\n") or (size == 1 and tail == b"\n"):
        return b""
    return b"\n" if tail.endswith(b"\n") else b"\n\n"


class Journal:
    """The crash-recovery hook (recovery.MboxJournal is the one in use): undoes an
    interrupted append found under the locks, and records an append before it starts.
    This base does nothing, so mbox.py never depends on recovery.py."""

    def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:
        return st

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes, msg: Prepared) -> None:
        """Record the append about to start; an OSError refuses the delivery (nothing written)."""

    def end(self) -> None:
        pass

    def abandon(self) -> None:
        pass

    def close(self) -> None:
        """The delivery is over, whatever happened (called under the locks)."""


class Recorded(Journal):
    """A journal hook that passes every call on and remembers what the append spans,
    (dev, ino, size before, size after), so that the caller can take it back (undo())."""

    __slots__ = ("inner", "span")

    def __init__(self, inner: Journal) -> None:
        self.inner = inner
        self.span: "tuple[int, int, int, int] | None" = None

    def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:
        return self.inner.recover(fd, path, st)

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes, msg: Prepared) -> None:
        self.inner.begin(fd, path, size, st, sep, msg)
        self.span = (st.st_dev, st.st_ino, size, size + len(sep) + msg.length)

    def end(self) -> None:
        self.inner.end()

    def abandon(self) -> None:
        self.span = None
        self.inner.abandon()

    def close(self) -> None:
        self.inner.close()


def undo(path: str, span: "tuple[int, int, int, int]", *, host: str, lock_timeout: float = 60.0,
         stale_age: float = 300.0) -> None:
    """Take back an append that succeeded: cut the mbox back to its size before it, under the
    locks, but only if it is the same file and nothing was appended since."""
    dev, ino, orig, end = span
    with MailboxLock(path, host=host, lock_timeout=lock_timeout, stale_age=stale_age) as box:
        assert box.st is not None
        if (box.st.st_dev, box.st.st_ino) != (dev, ino) or box.st.st_size != end:
            raise fail("cannot take back the copy", f"{path} changed since it was written")
        _rollback(box.fd, path, orig)


class MailboxLock:
    """The lock sequence of every mbox writer (delivery, `vdeliver --repair`), as a pair like
    Postfix's mbox_open()/mbox_release(): open the file, take the dotlock, then the fcntl
    lock, and check that the path still names the file we locked (else start again with
    the new one); released in the reverse order, whatever happened in between.

        with MailboxLock(path, host=..., create=False) as box:
            ... box.fd, box.st (fstat under the locks), box.dotlock ...
    """

    __slots__ = ("path", "host", "create", "timeout", "stale_age", "fd", "st", "dotlock", "_fcntl")

    def __init__(self, path: str, *, host: str, create: bool = False, lock_timeout: float = 60.0,
                 stale_age: float = 300.0) -> None:
        self.path = path
        self.host = host
        self.create = create
        self.timeout = lock_timeout
        self.stale_age = stale_age
        self.fd = -1
        self.st: "os.stat_result | None" = None
        self.dotlock: "locking.DotLock | None" = None
        self._fcntl = False

    def __enter__(self) -> "MailboxLock":
        path = self.path
        for _attempt in range(3):
            self.fd = open_mbox(path, self.create)
            self.dotlock = locking.DotLock(path, self.host, self.timeout, self.stale_age)
            try:
                self.dotlock.acquire()
                locking.fcntl_lock(self.fd, path, self.timeout)
                self._fcntl = True
                st = os.fstat(self.fd)
                try:
                    now = os.lstat(path)
                except OSError:
                    now = None
                if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    if st.st_nlink != 1:
                        raise fail("mailbox has more than one link", f"{path}: {st.st_nlink} links")
                    self.st = st
                    return self
            except BaseException:
                self.release()
                raise
            self.release()  # replaced while we waited: start again with the new file
        raise fail("mailbox keeps changing", f"{path} was replaced three times while locking")

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def broke(self) -> "list[str]":
        """The stale locks broken on the way in, for the log."""
        return self.dotlock.broke if self.dotlock is not None else []

    def release(self) -> None:
        """fcntl first, then the dotlock; never raises (after a successful fsync nothing
        here may turn success into failure)."""
        if self._fcntl:
            self._fcntl = False
            locking.fcntl_unlock(self.fd)
        if self.fd >= 0:
            # Closed before the dotlock goes: fcntl locks belong to the process, so in a
            # threaded caller (the LMTP server) a later close would drop a sibling's lock.
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
        if self.dotlock is not None:
            self.dotlock.release()


def deliver(
    path: str,
    msg: Prepared,
    *,
    host: str,
    create: bool = False,
    lock_timeout: float = 60.0,
    stale_age: float = 300.0,
    over_quota_bounce: bool = False,
    journal: "Journal | None" = None,
) -> "list[str]":
    """Append msg to the mbox at path.  Returns notes for the log (broken locks)."""
    journal = journal if journal is not None else Journal()
    with MailboxLock(path, host=host, create=create, lock_timeout=lock_timeout, stale_age=stale_age) as box:
        assert box.st is not None and box.dotlock is not None
        try:
            st = journal.recover(box.fd, path, box.st)  # cut back what a killed delivery left
            _append(box.fd, path, st, msg, box.dotlock, over_quota_bounce, journal)
        finally:
            journal.close()
        return box.broke


def _append(fd: int, path: str, st: os.stat_result, msg: Prepared, lock: locking.DotLock,
            over_quota_bounce: bool, journal: Journal) -> None:
    size = st.st_size
    try:
        sep = _separator_needed(fd, size)
    except OSError as exc:
        raise DeliveryError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
    try:
        journal.begin(fd, path, size, st, sep, msg)
    except OSError as exc:  # a full quota on the journal is the mailbox's full quota
        raise DeliveryError(status_for_errno(exc.errno or errno.EIO, exc.filename or path, over_quota_bounce)) from None
    try:
        if sep:
            write_all(fd, sep)
        if not _copy_spool(fd, size + len(sep), msg, lock):
            for chunk in msg.spool.chunks():
                write_all(fd, chunk)
                lock.refresh()
        os.fsync(fd)
        # The commit point is the journal's reset to idle: a busy record left beside a whole
        # record would make the next delivery cut it.  If it cannot be reset, undo the append.
        journal.end()
    except BaseException as exc:
        _rollback(fd, path, size)
        journal.abandon()
        if isinstance(exc, OSError):
            raise DeliveryError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
        raise


def _copy_spool(fd: int, at: int, msg: Prepared, lock: locking.DotLock) -> bool:
    """A message spooled to a file goes into the mbox by copy_file_range, at the end we
    know under the locks, without passing through Python (a 10 MB message: two copies of
    10 MB less).  The kernel refuses it for an O_APPEND descriptor, so that flag is off for
    the copy: safe, every writer appends under the same locks.  False: nothing written, use
    the chunks."""
    spool = msg.spool
    if not isinstance(spool, Spool) or spool.fd < 0:
        return False
    import fcntl  # already loaded on this path (locking.py)

    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
    try:
        return spool.copy_file(fd, at, lock.refresh)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _rollback(fd: int, path: str, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        # Nothing more can be done here; the log line says the mailbox needs a look.
        raise DeliveryError(
            Status("4.3.0", "cannot write mailbox", f"{path}: rollback to {size} failed: {exc.strerror}")
        ) from None
