"""Group commit for the LMTP server: one journal sync shared by concurrent mbox appends.

A delivery through the per-mbox journal (vdeliver/recovery.py) makes two syncs: its busy
record, then the mbox.  In vdeliver-lmtpd, deliveries to different mboxes run at the same
time, so their busy records can share one sync: each one writes its record into its own
slot of one server-wide file, the group journal, and joins a group commit: one thread
(the leader) fdatasync()s the file for every record written before the sync began, the
others wait for it.  Then each appends and fsyncs its own mbox and writes its slot back
to idle, without a sync, exactly as the per-mbox journal does.  Under load a message
costs about one mbox sync, plus a share of one journal sync.

    <group journal> (SLOTS x SLOT bytes, made once, never grows)
    vdeliver-slot 1 busy <st_dev> <st_ino> <orig> <end> <pid> <head hex> <boot id> <mbox path hex> ... <crc32>
    vdeliver-slot 1 idle ... <crc32>

A slot record is the per-mbox busy record (the same fields, the same CRC rule: a torn
slot means "the append never started") plus the mbox's path, which server start needs to
take the mbox's locks; it is SLOT bytes, so paths of up to about 340 bytes fit (a longer
one, or no free slot, uses the per-mbox journal: nothing is lost but the sharing).

Who owns a slot: every server process opens the file itself and holds an OFD lock
(fcntl F_OFD_SETLK, tied to its open file description, so forked workers and other
instances never share one) on the byte range of each slot it uses, for its lifetime.
A lock that can be taken means the owner is dead.  A slot is claimed only when its lock
can be taken and it holds no busy record: a dead owner's busy record waits for recovery.

Recovery: whoever takes an mbox's locks (vdeliver, `vdeliver --repair`, the server)
looks in the group journal for a busy slot naming that mbox's device and inode
(recovery.check_group: one open and one pread, nothing imported unless a slot is busy).
Found, and its owner dead (its lock taken), the record is moved into the mbox's own
journal (busy, synced), the slot reset (synced), and the per-mbox decision made on it
unchanged (recovery.decide): cut, nothing written, kept, dropped or unresolved, with the
same checks and logs.  Killed in between, the next recoverer finds the same record twice
and decides the same.  The owner alive means the append is not in progress (we hold the
mbox's locks): its slot was left busy by a failed idle write after a rollback; the
delivery defers until that server writes it (its next delivery through the slot), or
settles it itself when the owner is this process.  Server start recovers every busy slot
of dead owners (recover_all()).

Only the server imports this module (and the command line, on the rare path where a slot
is busy), so the threading and struct imports never reach a CLI delivery.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

from vdeliver import fileio, recovery
from vdeliver.errors import DeliveryError, fail
from vdeliver.mbox import MailboxLock
from vdeliver.message import Prepared
from vdeliver.recovery import MboxJournal, Record, head_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdeliver.hooks import Log

MAGIC = "vdeliver-slot"
VERSION = "1"
SLOT = recovery.GROUP_SLOT  # bytes a slot: the record, padded, CRC, newline
SLOTS = recovery.GROUP_SLOTS  # slots in the file: concurrent mbox appends of all server processes
SIZE = SLOT * SLOTS
BUSY = recovery.GROUP_BUSY  # how a busy slot starts
IDLE = recovery._seal(f"{MAGIC} {VERSION} idle", SLOT)
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit): type, whence, start, len, pid (0 for OFD locks)

# The server process's group, so that a recoverer in this process can settle a slot of its own
# (set by Group.open(); a slot of this process is never lock-free to this process's other descriptors).
_OWN: "list[Group]" = []


def slot_block(rec: Record, path: str) -> bytes:
    """The busy record of a slot; ValueError when the path does not fit."""
    return recovery._seal(
        f"{MAGIC} {VERSION} busy {rec.dev} {rec.ino} {rec.orig} {rec.end} {rec.pid} {rec.head.hex()}"
        f" {rec.boot or recovery.boot_id()} {os.fsencode(path).hex()}", SLOT)


def parse_slot(block: bytes) -> "tuple[Record, str] | None":
    """(record, mbox path) of a whole busy slot, or None: idle, zeros, torn or foreign."""
    if not block.startswith(BUSY):
        return None
    text = recovery._unseal(block, SLOT)
    fields = text.split() if text is not None else []
    if len(fields) != 11:
        return None
    try:
        dev, ino, orig, end, pid = (int(f) for f in fields[3:8])
        head = bytes.fromhex(fields[8])
        path = os.fsdecode(bytes.fromhex(fields[10]))
    except ValueError:
        return None
    if min(dev, ino, orig, end, pid) < 0 or end < orig or len(head) > end - orig or not path.startswith("/"):
        return None
    if "\0" in path:
        return None
    return Record(dev, ino, orig, end, pid, head, fields[9]), path


def _lock(fd: int, slot: int, kind: int) -> bool:
    """Take (F_WRLCK) or drop (F_UNLCK) our OFD lock on a slot's bytes; False if another holds it."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, slot * SLOT, SLOT, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def open_journal(path: str, create: bool) -> int:
    """Open the group journal read-write, checked like a per-mbox journal (a regular file of
    ours, one link, the right size, never followed); made (all slots idle, synced with its
    directory) when missing and `create`.  OSError with the reason otherwise."""
    try:
        fd = os.open(path, os.O_RDWR | _OPEN)
    except FileNotFoundError:
        if not create:
            raise
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN, 0o600)
        try:
            fileio.write_all(fd, IDLE * SLOTS)
            os.fsync(fd)
            fileio.fsync_dir(fileio.dirname(path))
        except BaseException:
            os.close(fd)
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        return fd
    try:
        st = os.fstat(fd)
        why = ""
        if st.st_mode & 0o170000 != 0o100000:
            why = "not a regular file"
        elif st.st_uid != os.geteuid():
            why = f"owned by uid {st.st_uid}, not by the delivering uid {os.geteuid()}"
        elif st.st_nlink != 1:
            why = f"it has {st.st_nlink} links"
        elif st.st_size != SIZE:
            why = f"its size is {st.st_size}, not {SIZE}"
        if why:
            raise OSError(errno.EPERM, f"not a vdeliver group journal: {why}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def recover_mbox(jpath: str, fd: int, path: str, st: os.stat_result, log: "Log | None",
                 keep: bool) -> "tuple[os.stat_result, tuple[str, str]]":
    """Settle every busy slot naming the mbox open on fd (both its locks held): see the module's
    docstring.  Returns the mbox's stat after and what recovery did.  DeliveryError: the
    delivery defers."""
    now: "tuple[str, str]" = (recovery.CLEAN, "")
    try:
        gfd = open_journal(jpath, False)
    except OSError:
        return st, now  # none, or not ours (wrong owner, a link...): our server cannot have written it
    try:
        data = os.pread(gfd, SIZE, 0)
        i = data.find(BUSY)
        while i >= 0:
            slot, off = divmod(i, SLOT)
            found = parse_slot(data[i: i + SLOT]) if off == 0 else None
            if found is not None and (found[0].dev, found[0].ino) == (st.st_dev, st.st_ino):
                st, said = _settle(gfd, slot, found[0], jpath, fd, path, st, log, keep)
                if said[0] != recovery.CLEAN:
                    now = said
            elif found is None and off == 0:
                _reset_torn(gfd, slot)
            i = data.find(BUSY, i + 1)
    finally:
        os.close(gfd)
    return st, now


def _settle(gfd: int, slot: int, rec: Record, jpath: str, fd: int, path: str, st: os.stat_result,
            log: "Log | None", keep: bool) -> "tuple[os.stat_result, tuple[str, str]]":
    where = f"slot {slot} of the group journal {jpath}"
    if not _lock(gfd, slot, fcntl.F_WRLCK):
        # Its owner is alive; we hold the mbox's locks, so its append is not in progress.
        if rec.pid == os.getpid() and _OWN and _OWN[0].settle_own(slot):
            return st, (recovery.NOTHING, f"{path}: settled {where}, left by a rolled-back delivery")
        raise fail("mailbox journal busy", f"{path}: {where} (vdeliver-lmtpd pid {rec.pid}) is not settled yet")
    try:
        now = os.pread(gfd, SLOT, slot * SLOT)  # again, under its lock
        if parse_slot(now) is None:
            return st, (recovery.CLEAN, "")
        recovery.recover(fd, path, st, log, keep)  # the mbox's own journal first: its record goes there
        st = os.fstat(fd)
        pj = recovery.find(recovery.journal_path(path))
        if pj.why:
            pj.close()
            raise fail("cannot recover mailbox", f"{path}: {where}: the mailbox's journal is untrusted: {pj.why}")
        block = rec.block()
        try:
            if pj.persistent:
                if os.pwrite(pj.fd, block, 0) != recovery.RECLEN:
                    raise OSError(errno.ENOSPC, "short write")
                os.fdatasync(pj.fd)
                pj.data = block
            else:
                pj.close()
                if pj.fd < 0 and fileio.lexists(pj.path):
                    raise OSError(errno.EEXIST, "a journal of another size is in the way")
                recovery._make(pj, block)
            _write_idle(gfd, slot, sync=True)
        except OSError as exc:
            pj.close()
            raise fail("cannot recover mailbox", f"{path}: {where}: {exc.strerror}") from None
        if log is not None:
            log.info(f"mbox recovery: {path}: moved the record of {where} (pid {rec.pid}) into {pj.path}")
        try:
            said = recovery.decide(pj, fd, path, st, log, keep)
        finally:
            pj.close()
        return os.fstat(fd), said
    finally:
        _lock(gfd, slot, fcntl.F_UNLCK)


def _reset_torn(gfd: int, slot: int) -> None:
    """A torn busy record of a dead owner: its append never started (the slot's sync comes
    first); reset it so that the next deliveries find no busy slot (and import nothing)."""
    if not _lock(gfd, slot, fcntl.F_WRLCK):
        return  # its owner is alive: it is writing it now
    try:
        if os.pread(gfd, SLOT, slot * SLOT).startswith(BUSY) and parse_slot(os.pread(gfd, SLOT, slot * SLOT)) is None:
            _write_idle(gfd, slot, sync=True)
    finally:
        _lock(gfd, slot, fcntl.F_UNLCK)


def _write_idle(gfd: int, slot: int, sync: bool = False) -> None:
    if os.pwrite(gfd, IDLE, slot * SLOT) != SLOT:
        raise OSError(errno.ENOSPC, "short write")
    if sync:
        os.fdatasync(gfd)


def recover_all(jpath: str, *, host: str, lock_timeout: float, stale_age: float, keep: bool,
                log: "Log | None") -> "list[str]":
    """Server start: settle the busy slots of dead owners, each under its mbox's locks.  A slot
    whose mbox is gone or was replaced names nothing that could be cut: it is reset.  Returns
    what was done (for the log); one that cannot be settled now waits for the next delivery
    into its mbox."""
    try:
        gfd = open_journal(jpath, False)
    except OSError:
        return []
    said: "list[str]" = []
    try:
        data = os.pread(gfd, SIZE, 0)
        for slot in range(SLOTS):
            found = parse_slot(data[slot * SLOT: (slot + 1) * SLOT])
            if found is None and data.startswith(BUSY, slot * SLOT):
                _reset_torn(gfd, slot)
            if found is None or not _lock(gfd, slot, fcntl.F_WRLCK):
                continue  # idle, or a live owner's
            rec, path = found
            try:
                try:
                    now = os.lstat(path)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (rec.dev, rec.ino):
                    _write_idle(gfd, slot, sync=True)
                    said.append(f"{path}: slot {slot} (pid {rec.pid}) names a mailbox that is gone or was replaced:"
                                " reset, nothing cut")
                    continue
            finally:
                _lock(gfd, slot, fcntl.F_UNLCK)
            try:
                with MailboxLock(path, host=host, lock_timeout=lock_timeout, stale_age=stale_age) as box:
                    assert box.st is not None
                    recovery.recover(box.fd, path, box.st, log, keep, group=jpath)
                said.append(f"{path}: slot {slot} (pid {rec.pid}) recovered")
            except (DeliveryError, OSError) as exc:
                text = exc.status.detail or exc.status.reason if isinstance(exc, DeliveryError) else str(exc)
                said.append(f"{path}: slot {slot} (pid {rec.pid}) left for the next delivery: {text}")
    finally:
        os.close(gfd)
    return said


class Batch:
    """The records waiting for one sync."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: "OSError | None" = None


class Group:
    """One server process's side of the group journal: its descriptor and OFD locks, its
    slots (claimed as needed, kept for life), and the group commit.  Opened lazily in the
    process that delivers (after the workers' fork: OFD locks follow the open file
    description, which a fork would share)."""

    def __init__(self, path: str, wait: float) -> None:
        self.path = path
        self.wait = wait  # how long a delivery waits for the group's sync (then it defers)
        self.fd = -1
        self.pid = 0
        self.mutex = threading.Lock()
        self.cond = threading.Condition(self.mutex)
        self.free: "list[int]" = []
        self.poisoned: "set[int]" = set()  # left busy by a failed idle write: not reused until settled
        self.next = 0
        self.batch = Batch()
        self.syncing = False
        self.syncs = 0  # journal syncs made, for tests and metrics
        self.broken = ""  # why group commit is off in this process ("" while it works)

    def open(self, log: "Log | None" = None) -> bool:
        """Open (or make) the journal in this process; False (logged once) when it cannot be used."""
        with self.mutex:
            if self.fd >= 0 and self.pid == os.getpid():
                return True
            if self.broken:
                return False
            try:
                self.fd = open_journal(self.path, True)
            except OSError as exc:
                self.broken = f"{self.path}: {exc.strerror or exc}"
                if log is not None:
                    log.warning(f"group commit off: cannot use the group journal {self.broken}; "
                                "mbox deliveries use their own journal")
                return False
            self.pid = os.getpid()
            self.free, self.poisoned, self.next = [], set(), 0
            _OWN[:] = [self]
            return True

    def claim(self) -> int:
        """A slot for one delivery, or -1 (all taken: the caller uses the per-mbox journal)."""
        with self.mutex:
            if self.free:
                return self.free.pop()
            while self.next < SLOTS:
                slot = self.next
                self.next += 1
                if not _lock(self.fd, slot, fcntl.F_WRLCK):
                    continue  # another process's
                if parse_slot(os.pread(self.fd, SLOT, slot * SLOT)) is not None:
                    _lock(self.fd, slot, fcntl.F_UNLCK)  # a dead owner's record: for recovery
                    continue
                return slot
            return -1

    def release(self, slot: int, ok: bool) -> None:
        with self.mutex:
            if ok:
                self.free.append(slot)
            else:
                self.poisoned.add(slot)

    def settle_own(self, slot: int) -> bool:
        """A recoverer in this process found our slot busy under its mbox's locks: settle it if
        it is a poisoned one (its append was rolled back); a slot in use is never touched."""
        with self.mutex:
            if slot not in self.poisoned:
                return False
            try:
                _write_idle(self.fd, slot, sync=True)
            except OSError:
                return False
            self.poisoned.discard(slot)
            self.free.append(slot)
            return True

    def commit(self) -> None:
        """Make every slot record written so far durable: lead one fdatasync for all the records
        written before it starts, or wait (at most self.wait seconds) for the one that covers
        ours.  OSError: not durable (the delivery must not append)."""
        deadline = time.monotonic() + self.wait
        with self.cond:
            batch = self.batch
            while not batch.done:
                if not self.syncing:
                    self.batch = Batch()  # records written from now on wait for the next sync
                    self.syncing = True
                    self.cond.release()
                    error = None
                    try:
                        os.fdatasync(self.fd)
                    except OSError as exc:
                        error = exc
                    finally:
                        self.cond.acquire()
                        self.syncing = False
                        self.syncs += 1
                        batch.done, batch.error = True, error
                        self.cond.notify_all()
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OSError(errno.ETIMEDOUT, f"waited {self.wait}s for the group journal's sync")
                self.cond.wait(left)
        if batch.error is not None:
            raise OSError(batch.error.errno, batch.error.strerror)

    def hook(self, log: "Log | None", record: bool) -> "GroupHook":
        return GroupHook(self, log, record)


class GroupHook(MboxJournal):
    """The journal hook of a server delivery: recovery as everywhere (per-mbox journal, then
    the group journal's slots naming this mbox), the busy record into a slot with a group
    commit, the idle record back into it.  Without a slot, the per-mbox journal."""

    __slots__ = ("shared", "slot")

    def __init__(self, group: Group, log: "Log | None", record: bool) -> None:
        super().__init__(log, record, group=group.path)
        self.shared = group
        self.slot = -1

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes, msg: Prepared) -> None:
        slot = -1
        if self.record and self.shared.open(self.log):
            rec = Record(st.st_dev, st.st_ino, size, size + len(sep) + msg.length, os.getpid(), head_of(sep, msg))
            try:
                block = slot_block(rec, path)
                slot = self.shared.claim()
            except ValueError:
                pass  # a path too long for a slot
        if slot < 0:  # no slot free: the per-mbox journal
            super().begin(fd, path, size, st, sep, msg)
            return
        try:
            if os.pwrite(self.shared.fd, block, slot * SLOT) != SLOT:
                raise OSError(errno.ENOSPC, "short write")
            self.shared.commit()
        except OSError as exc:
            self._give_back(slot)
            if not exc.filename:
                exc.filename = self.shared.path
            raise
        self.slot = slot
        self.busy = True

    def _give_back(self, slot: int) -> None:
        """Nothing was appended (or it was rolled back): the slot goes idle and back to the pool;
        if it cannot be written it stays busy and out of use (settle_own)."""
        try:
            _write_idle(self.shared.fd, slot)
        except OSError:
            self.shared.release(slot, False)
            raise
        self.shared.release(slot, True)

    def end(self) -> None:
        if self.slot < 0:
            super().end()
            return
        slot, self.slot = self.slot, -1
        self.busy = False
        try:
            self._give_back(slot)  # the commit point, not synced (as the per-mbox journal's)
        except OSError as exc:
            raise fail("cannot reset mailbox journal", f"{self.shared.path}: slot {slot}: {exc.strerror}") from None

    def close(self) -> None:
        if self.slot >= 0:  # begin() without end() or abandon(): nothing was appended
            slot, self.slot = self.slot, -1
            try:
                self._give_back(slot)
            except OSError:
                pass
        super().close()

