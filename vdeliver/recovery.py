"""Crash recovery for mbox appends: a journal written before the append, undone after a kill.

procmail, Postfix and Dovecot truncate an mbox back after a write *error*, but a
process killed with SIGKILL (sendmail's own timeout does that) cannot: half a
message stays in the mailbox for ever.  vdeliver records, under both locks and
before the first byte is appended, what is needed to undo the append:

    <dir>/.<mbox>.vdeliver-journal   (one line, fsynced with its directory)
    vdeliver-journal 2 <st_dev> <st_ino> <original size> <intended end> <pid> <head hex> <boot id>

`head` is the first bytes of the record (separator and From_ line).  The journal
is removed only after the mbox fsync succeeded, or after a rollback.  The removal
is not fsynced: within one boot an unlink is seen at once by every process, and a
kill -9 (the crash that matters) loses nothing of the page cache.  Only a power
loss can bring an unlinked journal back; the boot id in it tells the next run so,
and a *complete* record found under a journal of an earlier boot is kept (it may
have been acknowledged: a possible duplicate is better than a lost message),
while a partial one is still cut.  Two fsyncs per delivery: the journal's (with
its directory) and the mbox's.  A recipient name may not start with '.', so the journal can
never be taken for a mailbox; the dotlock content stays `pid:host` for Dovecot.

The next vdeliver that takes the locks (or `vdeliver --repair`) calls recover()
before anything else.  It cuts the mbox back to the original size only when
everything says the bytes after it are ours: same file (dev, ino), size in
(orig, end], our record's head at orig, and no other program's From_ line in what
would be cut.  Anything else was changed by another program after the crash, and
a completed delivery by someone else is never cut: the journal is dropped (the
file was rewritten, replaced or shrunk) or kept aside as `.unresolved` with a loud
log line (our partial record lies under someone else's message).  Every step is
idempotent: killed during recovery, the next run finds either the journal with
the size already at orig (and drops it) or the journal gone.

Design notes and the fault table: docs/crash-safety.md.  Only `os` at import
time: this module is on the delivery path.

Over 400 lines on purpose: every case of recover() is a decision about someone's mail, and
they read best as one sequence next to the journal format.
"""

import errno
import os

from vdeliver.errors import DeliveryError, fail
from vdeliver.fileio import fsync_dir
from vdeliver.mbox import Journal
from vdeliver.message import Prepared

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.hooks import Log

SUFFIX = ".vdeliver-journal"
UNRESOLVED = ".unresolved"
UNTRUSTED_SUFFIX = ".untrusted"
MAGIC = "vdeliver-journal"
VERSION = "2"  # version 1 journals (no boot id, durable removal) are still read
HEAD = 96  # bytes of the record kept in the journal to recognise it again
SCAN_CHUNK = 1 << 20

# Outcomes of recover(), also the words of `vdeliver --repair`.
CLEAN = "clean"  # no journal
CUT = "cut"  # partial record removed
NOTHING = "nothing written"  # journal found, mailbox already at its original size
DROPPED = "dropped"  # journal stale (file replaced, rewritten or shrunk): nothing cut
UNRESOLVED_STATE = "unresolved"  # our partial record is followed by another program's data
KEPT = "kept"  # a complete record under a journal from before a reboot: not cut
UNTRUSTED = "untrusted"  # a journal we cannot have written: moved aside, mailbox untouched




def journal_path(mbox_path: str) -> str:
    directory, base = os.path.split(mbox_path)
    return os.path.join(directory or ".", f".{base}{SUFFIX}")


def head_of(sep: bytes, msg: Prepared) -> bytes:
    """The first HEAD bytes the append will write: separator, then the record."""
    return sep + msg.spool.head(HEAD - len(sep))


class Record:
    """One parsed journal line."""

    __slots__ = ("dev", "ino", "orig", "end", "pid", "head", "boot")

    def __init__(self, dev: int, ino: int, orig: int, end: int, pid: int, head: bytes, boot: str = "") -> None:
        self.dev, self.ino = dev, ino  # the mailbox file
        self.orig, self.end = orig, end  # its size before the append, and after it
        self.pid, self.head = pid, head  # who appended, and the first bytes of the record
        self.boot = boot  # the boot it happened in; "" for a version 1 journal

    def line(self) -> bytes:
        boot = self.boot or boot_id()
        return (
            f"{MAGIC} {VERSION} {self.dev} {self.ino} {self.orig} {self.end} {self.pid} {self.head.hex()}"
            f" {boot}\n"
        ).encode("ascii")


_BOOT: "list[str]" = []


def boot_id() -> str:
    """This boot's id (Linux), so a journal can tell a kill from a power loss; "-" if unknown."""
    if not _BOOT:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as f:
                value = f.read(64).decode("ascii", "replace").strip()
        except OSError:
            value = ""
        _BOOT.append(value if value and " " not in value else "-")
    return _BOOT[0]


def parse(data: bytes) -> "Record | None":
    """A complete journal line, or None (torn or foreign: the append never started)."""
    if not data.endswith(b"\n") or data.count(b"\n") != 1:
        return None
    fields = data.decode("ascii", "replace").split()
    if len(fields) < 2 or fields[0] != MAGIC:
        return None
    if fields[1] == "1" and len(fields) == 8:
        boot = ""
    elif fields[1] == VERSION and len(fields) == 9:
        boot = fields[8]
    else:
        return None
    try:
        dev, ino, orig, end, pid = (int(f) for f in fields[2:7])
        head = bytes.fromhex(fields[7])
    except ValueError:
        return None
    if min(dev, ino, orig, end, pid) < 0 or end < orig or len(head) > end - orig:
        return None
    return Record(dev, ino, orig, end, pid, head, boot)


def _read_journal(jpath: str) -> "tuple[bytes | None, str]":
    """(bytes, "") for a journal we can have written; (None, why) for one we cannot;
    (None, "") when there is none.

    The directory belongs to the vmail user (or worse), so a journal is acted upon only
    when it is a regular file (not a symlink, FIFO or device: opened O_NOFOLLOW |
    O_NONBLOCK), owned by the uid that delivers, with one link (a hard link could make
    us act on, or later truncate, another file).  Anything else may be forged to cut
    acknowledged mail."""
    import errno
    import stat

    try:
        jfd = os.open(jpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "it is a symbolic link"
        return None, f"it cannot be opened ({exc.strerror})"
    try:
        st = os.fstat(jfd)
        if not stat.S_ISREG(st.st_mode):
            return None, "it is not a regular file"
        if st.st_uid != os.geteuid():
            return None, f"it is owned by uid {st.st_uid}, not by the delivering uid {os.geteuid()}"
        if st.st_nlink != 1:
            return None, f"it has {st.st_nlink} links"
        return os.read(jfd, 4096), ""
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror})"
    finally:
        os.close(jfd)


def _untrusted(jpath: str, path: str, why: str, log: "Log | None", outcome: str = UNTRUSTED) -> "tuple[str, str]":
    """Move a journal we cannot trust out of the way (never following it) and go on: it must
    neither cut the mailbox nor block delivery."""
    aside = f"{jpath}{UNTRUSTED_SUFFIX}"
    try:
        os.rename(jpath, aside)
        moved = f"moved to {aside}"
    except OSError as exc:
        moved = f"could not move it aside ({exc.strerror})"
    level = "error" if outcome == UNTRUSTED else "warning"
    return _say(log, level, outcome, f"{path}: ignored the journal {jpath}: {why}; mailbox untouched, {moved}")


def _remove(jpath: str, durable: bool = True) -> None:
    """Remove a journal.  After recovery the removal is made durable (fsync of the
    directory); the journal of a finished append is not (see the module's docstring)."""
    try:
        os.unlink(jpath)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise fail("cannot remove mailbox journal", f"{jpath}: {exc.strerror}") from None
    if not durable:
        return
    try:
        fsync_dir(os.path.dirname(jpath))
    except OSError as exc:
        raise fail("cannot sync mailbox directory", f"{jpath}: {exc.strerror}") from None


def _set_aside(jpath: str) -> None:
    try:
        os.rename(jpath, jpath + UNRESOLVED)
        fsync_dir(os.path.dirname(jpath))
    except OSError as exc:
        raise fail("cannot set mailbox journal aside", f"{jpath}: {exc.strerror}") from None


def _foreign_from_line(fd: int, start: int, stop: int) -> int:
    """Offset of another program's From_ line in [start, stop), or -1.

    Our record never holds `\\nFrom ` after its own From_ line (the body is
    escaped), so any such line is someone else's.  A writer that appended right
    after our cut-off record without a newline leaves its From_ line mid-line:
    that is recognised by the shape `From <sender> <weekday> <month> ...`.  The only
    From_-shaped text of ours is an escaped body line, `>From ...` with nothing but
    '>'s between it and a line start; any other one (also right after a '>' that our
    record happened to end with) is someone else's, or too close to tell: not cut.
    """
    import re

    shape = re.compile(
        rb"From \S+ +(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
        rb" [ \d]?\d \d\d:\d\d"
    )
    lookback = 200  # enough bytes before the region to see where a run of '>' begins
    overlap = 200
    pos = start
    while pos < stop:
        base = max(pos - lookback, 0)
        off = pos - base
        data = os.pread(fd, min(SCAN_CHUNK + overlap + off, stop - base), base)
        if len(data) <= off:
            break
        hits = []
        nl = data.find(b"\nFrom ", max(off - 1, 0))
        if nl >= 0:
            hits.append(nl + 1)
        for m in shape.finditer(data, off):
            i = j = m.start()
            while j > 0 and data[j - 1] == 62:  # '>'
                j -= 1
            if j < i and (j == 0 or data[j - 1] == 10):
                continue  # `>From ` at a line start: one of our escaped body lines
            hits.append(i)
            break
        if hits:
            return base + min(hits)
        pos += SCAN_CHUNK
    return -1


def recover(fd: int, path: str, st: os.stat_result, log: "Log | None" = None) -> "tuple[str, str]":
    """Undo an interrupted append to the mbox open on fd (both locks held).

    Returns (outcome, text for the log/administrator).  Raises JournalError when
    the journal cannot be read or removed (the delivery defers).
    """
    jpath = journal_path(path)
    data, why = _read_journal(jpath)
    if why:
        return _untrusted(jpath, path, why, log)
    if data is None:
        return CLEAN, ""
    rec = parse(data)
    if rec is None:
        # Written with one write() and fsynced before the first byte of the append:
        # a torn or empty journal means the append never started.
        _remove(jpath)
        return _say(log, "info", NOTHING, f"{path}: removed an incomplete journal; the mailbox was not touched")
    size = st.st_size
    who = f"pid {rec.pid}"
    if (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
        return _untrusted(jpath, path, f"it names another file (device {rec.dev}, inode {rec.ino}:"
                          " the mailbox was replaced, or the journal forged)", log, DROPPED)
    if not rec.orig <= rec.end or rec.end - rec.orig < len(rec.head):
        return _untrusted(jpath, path, f"its cut point {rec.orig} and end {rec.end} do not describe a record", log)
    if size == rec.orig:
        _remove(jpath)
        return _say(log, "info", NOTHING, f"{path}: interrupted delivery of {who} had written nothing at {rec.orig}")
    if size < rec.orig:
        return _untrusted(jpath, path, f"its cut point {rec.orig} is past the end of the mailbox ({size} bytes):"
                          " rewritten by another program, or the journal forged", log, DROPPED)
    n = min(len(rec.head), size - rec.orig)
    found = os.pread(fd, n, rec.orig)
    if found != rec.head[:n]:
        same = 0
        while same < n and found[same] == rec.head[same]:
            same += 1
        if same == 0:
            _remove(jpath)
            return _say(log, "warning", DROPPED,
                        f"{path}: bytes at offset {rec.orig} are not the record of {who}"
                        " (rewritten by another program); nothing cut")
        _set_aside(jpath)
        return _say(log, "error", UNRESOLVED_STATE,
                    f"{path}: the record of {who} at offset {rec.orig} stops after at most {same} bytes and other"
                    f" data follows; nothing cut, journal kept as {jpath}{UNRESOLVED}")
    if size > rec.end:
        _set_aside(jpath)
        return _say(log, "error", UNRESOLVED_STATE,
                    f"{path}: the interrupted record of {who} at offset {rec.orig} (at most {rec.end - rec.orig}"
                    f" bytes) is followed by {size - rec.end}+ bytes another program appended; nothing cut,"
                    f" journal kept as {jpath}{UNRESOLVED}")
    foreign = _foreign_from_line(fd, rec.orig + len(rec.head), size)
    if foreign >= 0:
        _set_aside(jpath)
        return _say(log, "error", UNRESOLVED_STATE,
                    f"{path}: another program appended a message at offset {foreign} after the interrupted"
                    f" record of {who} at offset {rec.orig}; nothing cut, journal kept as {jpath}{UNRESOLVED}")
    if size == rec.end and rec.boot and rec.boot != boot_id():
        # A whole record under the journal of an earlier boot: the machine went down
        # after the append, perhaps after sendmail was told.  Keep it.
        _remove(jpath)
        return _say(log, "warning", KEPT,
                    f"{path}: the record of {who} at offset {rec.orig} is complete and its journal is from an"
                    " earlier boot (power loss): kept; sendmail may deliver it once more")
    try:
        os.ftruncate(fd, rec.orig)
        os.fsync(fd)
    except OSError as exc:
        raise fail("cannot cut back mailbox", f"{path}: to {rec.orig}: {exc.strerror}") from None
    _remove(jpath)
    return _say(log, "warning", CUT,
                f"{path}: cut {size - rec.orig} bytes at offsets {rec.orig}..{size} left by the interrupted"
                f" delivery of {who} (record of {rec.end - rec.orig} bytes)")


def _say(log: "Log | None", level: str, outcome: str, text: str) -> "tuple[str, str]":
    if log is not None:
        getattr(log, level)(f"mbox recovery: {text}")
    return outcome, text


class MboxJournal(Journal):
    """The journal hook mbox.deliver() calls: recover(), then begin() .. end()."""

    __slots__ = ("log", "jpath", "outcome", "record")

    def __init__(self, log: "Log | None" = None, record: bool = True) -> None:
        self.log = log  # where recovery says what it did (the caller's logger)
        self.record = record  # False (mbox_journal = false): recover old journals, write none
        self.jpath = ""
        self.outcome = CLEAN

    def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:
        jpath = journal_path(path)
        try:
            os.lstat(jpath)
        except FileNotFoundError:
            return st  # the common case: one failed lstat
        except OSError:
            pass
        self.outcome, _text = recover(fd, path, st, self.log)
        return os.fstat(fd)

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes, msg: Prepared) -> None:
        """Make the undo record durable before the first byte is appended.  An OSError goes
        to the caller, which knows whether a full quota bounces (its errno decides)."""
        if not self.record:
            return
        jpath = journal_path(path)
        end = size + len(sep) + msg.length
        head = head_of(sep, msg)
        line = Record(st.st_dev, st.st_ino, size, end, os.getpid(), head).line()
        try:
            # O_EXCL: recover() has removed or moved aside any journal; whatever is there now
            # was planted, and is neither followed nor truncated.
            jfd = os.open(jpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if os.write(jfd, line) != len(line):
                    raise OSError(28, "short write")
                os.fsync(jfd)
            finally:
                os.close(jfd)
            fsync_dir(os.path.dirname(jpath))
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                try:
                    os.unlink(jpath)  # nothing was appended: leave no clutter (a torn one is harmless)
                except OSError:
                    pass
            if not exc.filename:
                exc.filename = jpath  # the caller's status names the journal, not the mailbox
            raise
        self.jpath = jpath

    def end(self) -> None:
        """The append is durable (or rolled back): forget it before we say so."""
        if self.jpath:
            jpath, self.jpath = self.jpath, ""
            _remove(jpath, durable=False)

    def abandon(self) -> None:
        """After a rollback: the mailbox is back at its size; a left journal is harmless."""
        try:
            self.end()
        except DeliveryError:
            pass


def _sweep_lock_temps(path: str, host: str) -> int:
    """Remove `.<mbox>.lock.<host>.<pid>.<random>` files whose process is gone.

    DotLock links such a uniquely named file to `<mbox>.lock`; a process killed
    between creating and unlinking it leaves it behind.  It is never a lock (only
    `<mbox>.lock` is), so removing it is only tidying, done by --repair alone.
    """
    from vdeliver.locking import _pid_alive

    directory, base = os.path.split(path)
    prefix = f".{base}.lock.{host}."
    removed = 0
    try:
        names = os.listdir(directory or ".")
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        pid_s, dot, _rest = name[len(prefix):].partition(".")
        if dot and pid_s.isdigit() and int(pid_s) != os.getpid() and not _pid_alive(int(pid_s)):
            try:
                os.unlink(os.path.join(directory or ".", name))
                removed += 1
            except OSError:
                pass
    return removed


def repair(path: str, *, host: str, lock_timeout: float = 60.0, stale_age: float = 300.0,
           log: "Log | None" = None) -> "tuple[str, str]":
    """`vdeliver --repair MBOX`: take the locks like a delivery and recover."""
    from vdeliver.mbox import MailboxLock

    with MailboxLock(path, host=host, lock_timeout=lock_timeout, stale_age=stale_age) as box:
        assert box.st is not None
        for note in box.broke:
            if log is not None:
                log.warning(f"mbox recovery: broke stale lock {note}")
        outcome, text = recover(box.fd, path, box.st, log)
        swept = _sweep_lock_temps(path, host)
        if swept:
            text = (text or f"{path}: clean") + f"; removed {swept} temporary lock file(s) of dead processes"
            if log is not None:
                log.info(f"mbox recovery: {text}")
    if os.path.lexists(journal_path(path) + UNRESOLVED):
        return UNRESOLVED_STATE, text or f"{path}: an unresolved journal {journal_path(path)}{UNRESOLVED} needs a look"
    return outcome, text or f"{path}: clean"
