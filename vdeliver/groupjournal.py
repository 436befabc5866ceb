"""Group commit for the LMTP server: one journal sync shared by concurrent mbox appends.

A delivery through the per-mbox journal (vdeliver/recovery.py) makes two syncs: its busy
record, then the mbox.  In vdeliver-lmtpd, deliveries to different mboxes run at the same
time, so their busy records can share one sync: each one writes its record into its own
slot of one server-wide file, the group journal, and joins a group commit: one thread
(the leader) fdatasync()s the file for every record written before the sync began, the
others wait for it.  Then each appends and fsyncs its own mbox and writes its slot back
to idle, without a sync, exactly as the per-mbox journal does.  Under load a message
costs about one mbox sync, plus a share of one journal sync.

    <group journal> (GROUP_SLOTS x GROUP_SLOT bytes, made once, never grows)
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

Recovery (in recovery.py, so that every mbox locker has it without importing this module):
whoever takes an mbox's locks (vdeliver, `vdeliver --repair`, the server) looks in the group
journal for a busy slot naming that mbox's device and inode (recovery.check_group: one open
and one pread of 64 KiB when no slot is busy).
Found, and its owner dead (its lock taken), the record is moved into the mbox's own
journal (busy, synced), the slot reset (synced), and the per-mbox decision made on it
unchanged (recovery.decide): cut, nothing written, kept, dropped or unresolved, with the
same checks and logs.  Killed in between, the next recoverer finds the same record twice
and decides the same.  The owner alive means the append is not in progress (we hold the
mbox's locks): its slot was left busy by a failed idle write after a rollback; the
delivery defers until that server writes it (its next delivery through the slot), or
settles it itself when the owner is this process.  Server start recovers every busy slot
of dead owners (recover_all()).

Only the server imports this module (threading, struct: never on a CLI delivery).
Off by default ([lmtp] group_commit): see docs/crash-safety.md for what it costs and saves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

from vdeliver import recovery
from vdeliver.errors import DeliveryError, fail
from vdeliver.mbox import MailboxLock
from vdeliver.message import Prepared
from vdeliver.recovery import (
    GROUP_BUSY,
    GROUP_SIZE,
    GROUP_SLOT,
    GROUP_SLOTS,
    OWN,
    MboxJournal,
    Record,
    _lock,
    _reset_torn,
    _write_idle,
    head_of,
    open_journal,
    parse_slot,
    slot_block,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdeliver.hooks import Log

def recover_all(jpath: str, *, host: str, lock_timeout: float, stale_age: float, keep: bool,
                log: "Log | None", time_limit: float = 1e9) -> "tuple[list[str], int]":
    """Server start: settle the busy slots of dead owners, each under its mbox's locks.  A slot
    whose mbox is gone or was replaced names nothing that could be cut: it is reset.  Returns
    what was done (for the log) and how many slots were left when `time_limit` seconds ran out
    (mbox lock waits included, each cut to half the time left): a slot that cannot be
    settled now waits for the next delivery into its mbox, which recovers it under the same
    locks (recovery.check_group()), so the server need not wait for all of them to listen."""
    try:
        gfd = open_journal(jpath, False)
    except OSError:
        return [], 0
    said: "list[str]" = []
    deadline = time.monotonic() + time_limit
    left = 0
    try:
        data = os.pread(gfd, GROUP_SIZE, 0)
        for slot in range(GROUP_SLOTS):
            found = parse_slot(data[slot * GROUP_SLOT: (slot + 1) * GROUP_SLOT])
            if found is None and data.startswith(GROUP_BUSY, slot * GROUP_SLOT):
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
            remaining = deadline - time.monotonic()
            if remaining < 1:
                left += 1
                continue
            try:  # half the time left at most: the dotlock and the fcntl lock may each wait this long
                with MailboxLock(path, host=host, lock_timeout=min(lock_timeout, remaining / 2),
                                 stale_age=stale_age) as box:
                    assert box.st is not None
                    outcome, text = recovery.recover(box.fd, path, box.st, log, keep, group=jpath)
                said.append(f"{path}: slot {slot} (pid {rec.pid}): {outcome}" + (f" ({text})" if text else ""))
            except (DeliveryError, OSError) as exc:
                text = exc.status.detail or exc.status.reason if isinstance(exc, DeliveryError) else str(exc)
                said.append(f"{path}: slot {slot} (pid {rec.pid}) left for the next delivery: {text}")
    finally:
        os.close(gfd)
    return said, left


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
            OWN[:] = [self]
            return True

    def claim(self) -> int:
        """A slot for one delivery, or -1 (all taken: the caller uses the per-mbox journal)."""
        with self.mutex:
            if self.free:
                return self.free.pop()
            while self.next < GROUP_SLOTS:
                slot = self.next
                self.next += 1
                if not _lock(self.fd, slot, fcntl.F_WRLCK):
                    continue  # another process's
                if parse_slot(os.pread(self.fd, GROUP_SLOT, slot * GROUP_SLOT)) is not None:
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
            if os.pwrite(self.shared.fd, block, slot * GROUP_SLOT) != GROUP_SLOT:
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

