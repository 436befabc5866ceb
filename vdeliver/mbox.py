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

import errno
import os
import stat

from vdeliver import locking
from vdeliver.errors import DeliveryError, Status, status_for_errno
from vdeliver.message import Prepared, _write_all


class MboxError(DeliveryError):
    pass


def _fail(reason: str, detail: str, dsn: str = "4.3.0") -> MboxError:
    return MboxError(Status(dsn, reason, detail))


def open_mbox(path: str, create: bool) -> int:
    """Open (or create) the mbox for appending and check what it is."""
    # Read-write: the separator check and crash recovery read the tail of the file.
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not create:
            raise _fail("user unknown", f"no mailbox {path}", "5.1.1") from None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return open_mbox(path, False)
        except OSError as exc:
            raise _fail("cannot create mailbox", f"{path}: {exc.strerror}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _fail("mailbox is a symbolic link", path) from None
        raise _fail("cannot open mailbox", f"{path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail("mailbox is not a regular file", path)
        if st.st_nlink != 1:
            raise _fail("mailbox has more than one link", f"{path}: {st.st_nlink} links")
        if st.st_uid != os.geteuid():
            raise _fail("mailbox has the wrong owner", f"{path}: uid {st.st_uid}, we are {os.geteuid()}")
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
    """Hook for crash recovery (see recovery.py): undoes an interrupted append found
    under the locks, and records an append before it starts."""

    def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:  # pragma: no cover
        return st

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes,
              msg: Prepared) -> None:  # pragma: no cover
        pass

    def end(self) -> None:  # pragma: no cover
        pass

    def abandon(self) -> None:  # pragma: no cover
        pass


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
    before_write: "object" = None,
) -> "list[str]":
    """Append msg to the mbox at path.  Returns notes for the log (broken locks)."""
    for _attempt in range(3):
        fd = open_mbox(path, create)
        lock = locking.DotLock(path, host, lock_timeout, stale_age)
        fcntl_held = False
        try:
            lock.acquire()
            locking.fcntl_lock(fd, path, lock_timeout)
            fcntl_held = True
            st = os.fstat(fd)
            try:
                now = os.lstat(path)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue  # replaced while we waited: start again with the new file
            if st.st_nlink != 1:
                raise _fail("mailbox has more than one link", f"{path}: {st.st_nlink} links")
            if journal is not None:
                st = journal.recover(fd, path, st)  # cut back what a killed delivery left
            _append(fd, path, st, msg, lock, over_quota_bounce, journal, before_write)
            return lock.broke
        finally:
            if fcntl_held:
                locking.fcntl_unlock(fd)
            # Close before the dotlock goes: fcntl locks belong to the process, so in a
            # threaded caller (the LMTP server) a later close would drop a sibling's lock.
            try:
                os.close(fd)  # after a successful fsync nothing here may turn success into failure
            except OSError:
                pass
            lock.release()
    raise _fail("mailbox keeps changing", f"{path} was replaced three times while locking")


def _append(fd: int, path: str, st: os.stat_result, msg: Prepared, lock: locking.DotLock,
            over_quota_bounce: bool, journal: "Journal | None", before_write: "object") -> None:
    size = st.st_size
    try:
        sep = _separator_needed(fd, size)
    except OSError as exc:
        raise MboxError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
    if journal is not None:
        journal.begin(fd, path, size, st, sep, msg)
    try:
        if before_write is not None:
            before_write()  # type: ignore[operator]
        if sep:
            _write_all(fd, sep)
        for chunk in msg.spool.chunks():
            _write_all(fd, chunk)
            lock.refresh()
        os.fsync(fd)
        if journal is not None:
            # The commit point is the journal's removal: a journal left beside a whole record
            # would make the next delivery cut it.  If it cannot go, undo the append instead.
            journal.end()
    except BaseException as exc:
        _rollback(fd, path, size)
        if journal is not None:
            journal.abandon()
        if isinstance(exc, OSError):
            raise MboxError(status_for_errno(exc.errno or errno.EIO, path, over_quota_bounce)) from None
        raise


def _rollback(fd: int, path: str, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        # Nothing more can be done here; the log line says the mailbox needs a look.
        raise MboxError(
            Status("4.3.0", "cannot write mailbox", f"{path}: rollback to {size} failed: {exc.strerror}")
        ) from None
