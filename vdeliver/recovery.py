"""Crash recovery for mbox appends: a journal written before the append, undone after a kill.

procmail, Postfix and Dovecot truncate an mbox back after a write *error*, but a
process killed with SIGKILL (sendmail's own timeout does that) cannot: half a
message stays in the mailbox for ever.  vdeliver records, under both locks and
before the first byte is appended, what is needed to undo the append, in a
journal file beside the mbox that is made once and then reused by every delivery:

    <dir>/.<mbox>.vdeliver-journal.lock   (4096 bytes, one fixed-size record at offset 0)
    vdeliver-journal 3 busy <st_dev> <st_ino> <original size> <intended end> <pid> <head hex> <boot id> ... <crc32>
    vdeliver-journal 3 idle ... <crc32>

Each record is exactly RECLEN bytes (one disk sector): text padded with spaces, then
the CRC-32 of what precedes it as 8 hex digits, then a newline; the rest of the file
is zeros.  `head` is the first bytes of the record (separator and From_ line).
begin() writes the busy record with one pwrite() at offset 0 and fdatasync()s it:
no file is created and no directory synced, and since the file's size and blocks
never change, the data sync writes one block.  end() overwrites it with the idle
record after the mbox fsync, without a sync: within one boot the write is seen at
once by every process, and a kill -9 (the crash that matters) loses nothing of the
page cache.  Only a power loss can bring the busy record back; the boot id in it
tells the next run so, and a *complete* record found under a busy journal of an
earlier boot is kept (it may have been acknowledged: a possible duplicate is
better than a lost message), while a partial one is still cut.  Two syncs per
delivery: the journal's and the mbox's.  The first delivery into an mbox creates
the journal (O_EXCL, written in full with its busy record, fsynced with its
directory): three syncs, once.  A record whose CRC does not match (torn by a power
loss, or never completely written) is taken for "the append never started": the
append starts only after the record's sync.  A recipient name may not start with
'.', so the journal can never be taken for a mailbox; the dotlock content stays
`pid:host` for Dovecot.

The journal's name ends in `.lock` because Dovecot takes such names for internal files:
beside an mbox folder in ~/mail it would otherwise list the journal as a folder.  Journals
of versions 1 and 2 (one text line in `.<mbox>.vdeliver-journal`, made per delivery and
removed after it) are still recovered (one failed lstat per delivery looks for one), and
then removed: the next delivery makes the persistent one.  With `mbox_journal = false`
none is written, and one found is recovered and removed.  A file by the journal's name
that vdeliver cannot have written is moved aside, never reset or deleted.

The next vdeliver that takes the locks (or `vdeliver --repair`) calls recover()
before anything else.  It cuts the mbox back to the original size only when
everything says the bytes after it are ours: same file (dev, ino), size in
(orig, end], our record's head at orig, and no other program's From_ line in what
would be cut.  Anything else was changed by another program after the crash, and
a completed delivery by someone else is never cut: the record is dropped (the
file was rewritten, replaced or shrunk) or the journal is kept aside as
`.unresolved` with a loud log line (our partial record lies under someone else's
message).  Every step is idempotent: killed during recovery, the next run finds
either the busy record with the size already at orig (and resets it) or the
journal idle.  A reset after recovery is synced (it is rare, and a busy record
coming back after a power loss would be recovered again).

vdeliver-lmtpd with `[lmtp] group_commit` writes the same record, plus the mbox's path, into
a slot of one server-wide group journal instead (vdeliver/groupjournal.py): every mbox locker
looks there too (check_group(): one open and one pread when no slot is busy), and a dead
server's record naming this mbox is moved into the mbox's own journal and decided like any
other (recover_mbox()).  A slot's OFD lock tells a live owner from a dead one.

Design notes and the fault table: docs/crash-safety.md.  Only `os` at import
time: this module is on the delivery path (binascii, a built-in module, is
imported when a record is written or checked).

About 950 lines on purpose: every case of recover() is a decision about someone's mail, and
they read best as one sequence next to the journal's format and the checks that decide
whether a journal file is ours.  The group journal's slots (vdeliver-lmtpd's group commit)
are recovered here too, through the same decision: in a module of their own they would import
this one and be imported by it (an import circle).  The cost is on the delivery path: this
module is the largest an mbox delivery imports (about 63 KB of bytecode, roughly 0.3 ms of a
process's start-up, benchmarks/results/cli.md); moving the rarely run decisions into a module
imported only when a journal is busy is the next step for the command line's start-up.
"""

import errno
import posix as os  # not os: importing it costs the delivery path about 1 ms (vdeliver/fileio.py)

from vdeliver import fileio
from vdeliver.errors import DeliveryError, fail
from vdeliver.fileio import fsync_dir, write_all
from vdeliver.mbox import Journal
from vdeliver.message import Prepared

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

    from vdeliver.hooks import Log

OLD_SUFFIX = ".vdeliver-journal"  # where versions 1 and 2 wrote their journal, still recovered
# Every name vdeliver keeps beside an mbox ends in ".lock": Dovecot takes such names for its
# own and never lists them as folders, nor lets anyone create a folder by that name.
SUFFIX = OLD_SUFFIX + ".lock"
UNRESOLVED = ".unresolved"  # a journal set aside: .<mbox>.vdeliver-journal.unresolved.lock
UNTRUSTED_SUFFIX = ".untrusted"
MAGIC = "vdeliver-journal"
VERSION = "2"  # the line format of versions 1 and 2 (one file per delivery), still read
PERSISTENT = "3"  # the fixed-size record of the persistent journal
SIZE = 4096  # the persistent journal: one block, written in full once
RECLEN = 512  # one record at offset 0: one sector, written with one pwrite()
HEAD = 96  # bytes of the record kept in the journal to recognise it again
SCAN_CHUNK = 1 << 20
# The LMTP server's group journal (vdeliver/groupjournal.py): GROUP_SLOTS records of GROUP_SLOT
# bytes; every mbox delivery looks for a busy one naming its mbox (check_group()).
GROUP_SLOT = 1024  # bytes a slot: the record, padded, CRC, newline
GROUP_SLOTS = 64  # slots in the file: concurrent mbox appends of all server processes
GROUP_SIZE = GROUP_SLOT * GROUP_SLOTS
GROUP_BUSY = b"vdeliver-slot 1 busy "  # how a busy slot starts
# What check_group() looks for: in a record only the word "busy" holds these letters (the other
# fields are digits, hex and dashes), and a needle without the padding's spaces makes the search
# skip: 10 us for the whole file, against 100 us for GROUP_BUSY itself.
_GROUP_NEEDLE = b"busy"
_WRLCK, _UNLCK = 1, 2  # fcntl.F_WRLCK, F_UNLCK (Linux)
_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC  # never follow, never block

# Outcomes of recover(), also the words of `vdeliver --repair`.
CLEAN = "clean"  # no journal, or an idle one
CUT = "cut"  # partial record removed
NOTHING = "nothing written"  # journal found, mailbox already at its original size
DROPPED = "dropped"  # journal stale (file replaced, rewritten or shrunk): nothing cut
UNRESOLVED_STATE = "unresolved"  # our partial record is followed by another program's data
KEPT = "kept"  # a complete record under a journal from before a reboot: not cut
UNTRUSTED = "untrusted"  # a journal we cannot have written: moved aside, mailbox untouched


def _seal(text: str, length: int = RECLEN) -> bytes:
    """A fixed-size record: text padded with spaces, its CRC-32 in hex, a newline."""
    import binascii

    body = text.encode("ascii").ljust(length - 9)
    if len(body) != length - 9 or body[-1] != 32:
        raise ValueError("journal record too long")
    return body + b"%08x\n" % binascii.crc32(body)


def _unseal(block: bytes, length: int = RECLEN) -> "str | None":
    """The text of a whole record, or None when it is short or torn (its CRC does not match)."""
    import binascii

    if len(block) < length or block[length - 1] != 10:
        return None
    body = block[: length - 9]
    if block[length - 9: length - 1] != b"%08x" % binascii.crc32(body):
        return None
    return body.decode("ascii", "replace")


# The idle record, spelled out so that recognising it costs one comparison and no import
# (tests/test_crash.py checks it against _seal()).
IDLE = (f"{MAGIC} {PERSISTENT} idle".encode("ascii").ljust(RECLEN - 9) + b"6ec831a8\n")


def journal_path(mbox_path: str, suffix: str = SUFFIX) -> str:
    directory, base = fileio.split(mbox_path)
    return fileio.join(directory or ".", f".{base}{suffix}")


def aside_path(mbox_path: str, kind: str) -> str:
    """Where a journal set aside for the administrator goes (kind: UNRESOLVED or UNTRUSTED_SUFFIX)."""
    return journal_path(mbox_path, f"{OLD_SUFFIX}{kind}.lock")


def companions(mbox_path: str) -> "list[str]":
    """The journal files that belong to an mbox, for tools that move or remove it: the
    journal, an old version's, and those set aside (also under their old names)."""
    return [journal_path(mbox_path, s) for s in (SUFFIX, OLD_SUFFIX, f"{OLD_SUFFIX}{UNRESOLVED}.lock",
                                                 f"{OLD_SUFFIX}{UNTRUSTED_SUFFIX}.lock", OLD_SUFFIX + UNRESOLVED,
                                                 OLD_SUFFIX + UNTRUSTED_SUFFIX)]


def state(mbox_path: str) -> str:
    """What the journal beside an mbox says, for `vmailctl check` and tests, read-only and
    never followed: "none", "idle", "busy" (an append in progress, or interrupted: the next
    delivery or `vdeliver --repair` recovers it), "torn", "old" (a version 1 or 2 journal),
    "wrong size" or "not a regular file"."""
    import _stat as stat

    if fileio.lexists(journal_path(mbox_path, OLD_SUFFIX)):
        return "old"
    try:
        fd = os.open(journal_path(mbox_path), os.O_RDONLY | _OPEN)
    except FileNotFoundError:
        return "none"
    except OSError:
        return "not a regular file"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        data = os.pread(fd, SIZE, 0)
    finally:
        os.close(fd)
    if data[:RECLEN] == IDLE:
        return "idle" if st.st_size == SIZE else "wrong size"
    if not data.startswith(IDLE[:19]):
        return "old" if parse(data) is not None else "torn"
    if parse(data) is None:
        return "torn"
    return "busy" if st.st_size == SIZE else "wrong size"


def head_of(sep: bytes, msg: Prepared) -> bytes:
    """The first HEAD bytes the append will write: separator, then the record."""
    return sep + msg.spool.head(HEAD - len(sep))


class Record:
    """One parsed journal record."""

    __slots__ = ("dev", "ino", "orig", "end", "pid", "head", "boot")

    def __init__(self, dev: int, ino: int, orig: int, end: int, pid: int, head: bytes, boot: str = "") -> None:
        self.dev, self.ino = dev, ino  # the mailbox file
        self.orig, self.end = orig, end  # its size before the append, and after it
        self.pid, self.head = pid, head  # who appended, and the first bytes of the record
        self.boot = boot  # the boot it happened in; "" for a version 1 journal

    def block(self) -> bytes:
        """The busy record of the persistent journal (RECLEN bytes)."""
        return _seal(
            f"{MAGIC} {PERSISTENT} busy {self.dev} {self.ino} {self.orig} {self.end} {self.pid}"
            f" {self.head.hex()} {self.boot or boot_id()}"
        )

    def line(self) -> bytes:
        """The version 2 line (journals of earlier versions; kept to test that they are read)."""
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


def _could_be_ours(data: bytes) -> bool:
    """Empty, zeros (made, not yet written), or starting like a record or line of ours (perhaps
    torn): what may be reset or removed.  Anything else is set aside, never deleted."""
    return not data.strip(b"\0") or b"vdeliver-journal ".startswith(data[:17])


def parse(data: bytes) -> "Record | None":
    """A busy record (version 3) or a complete journal line (versions 1, 2), or None: torn,
    idle or foreign, so the append never started."""
    if data.startswith(f"{MAGIC} {PERSISTENT} ".encode("ascii")):
        text = _unseal(data)
        fields = text.split() if text is not None else []
        if len(fields) != 10 or fields[2] != "busy":
            return None
        numbers, hexhead, boot = fields[3:8], fields[8], fields[9]
    else:
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
        numbers, hexhead = fields[2:7], fields[7]
    try:
        dev, ino, orig, end, pid = (int(f) for f in numbers)
        head = bytes.fromhex(hexhead)
    except ValueError:
        return None
    if min(dev, ino, orig, end, pid) < 0 or end < orig or len(head) > end - orig:
        return None
    return Record(dev, ino, orig, end, pid, head, boot)


class Found:
    """The journal beside an mbox, open read-write, and how to retire its record.

    `fd` is -1 and `why` empty when there is none; `why` says why it cannot be trusted.
    `data` holds its first SIZE bytes."""

    __slots__ = ("path", "fd", "size", "data", "why")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.size = 0
        self.data = b""
        self.why = ""

    @property
    def persistent(self) -> bool:
        """A version 3 journal of the right size, still at its path: reused by begin()."""
        return self.fd >= 0 and self.size == SIZE

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def settle(self, keep: bool) -> None:
        """The record is dealt with: the persistent journal goes back to idle, synced (see
        the module's docstring); any other (an old version's, a wrong size, or journalling
        turned off) is removed, durably."""
        if keep and self.persistent:
            try:
                if os.pwrite(self.fd, IDLE, 0) != RECLEN:
                    raise OSError(errno.ENOSPC, "short write")
                os.fdatasync(self.fd)
            except OSError as exc:
                raise fail("cannot reset mailbox journal", f"{self.path}: {exc.strerror}") from None
            self.data = IDLE
            return
        self.close()
        _remove(self.path)

    def gone(self) -> None:
        """Renamed away (untrusted or unresolved): the next delivery makes a new one."""
        self.close()


def find(jpath: str) -> Found:
    """Open the journal at jpath if there is one we can have written.

    The directory belongs to the vmail user (or worse), so a journal is acted upon only
    when it is a regular file (not a symlink, FIFO or device: opened O_NOFOLLOW |
    O_NONBLOCK | O_NOCTTY), owned by the uid that delivers, with one link (a hard link
    could make us act on, or later overwrite, another file).  Anything else may be forged
    to cut acknowledged mail: `why` says what is wrong, and the file is never read."""
    j = Found(jpath)
    try:
        fd = os.open(jpath, os.O_RDWR | _OPEN)
    except FileNotFoundError:
        return j
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            j.why = "it is a symbolic link"
        elif exc.errno == errno.EISDIR:
            j.why = "it is not a regular file"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            j.why = _why_not_writable(jpath, exc)
        else:
            j.why = f"it cannot be opened ({exc.strerror})"
        return j
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:  # not S_ISREG (the stat module is one more import)
            j.why = "it is not a regular file"
        elif st.st_uid != os.geteuid():
            j.why = f"it is owned by uid {st.st_uid}, not by the delivering uid {os.geteuid()}"
        elif st.st_nlink != 1:
            j.why = f"it has {st.st_nlink} links"
        else:
            j.data = os.pread(fd, SIZE, 0)
            j.size = st.st_size
            j.fd, fd = fd, -1
    except OSError as exc:
        j.why = f"it cannot be read ({exc.strerror})"
    finally:
        if fd >= 0:
            os.close(fd)
    return j


def _why_not_writable(jpath: str, exc: OSError) -> str:
    """A journal we may not open for writing: say whose it is (read-only, never followed)."""
    try:
        st = os.lstat(jpath)
    except OSError:
        return f"it cannot be opened ({exc.strerror})"
    if st.st_uid != os.geteuid():
        return f"it is owned by uid {st.st_uid}, not by the delivering uid {os.geteuid()}"
    return f"it cannot be opened for writing ({exc.strerror})"


def _untrusted(j: Found, path: str, why: str, log: "Log | None", outcome: str = UNTRUSTED) -> "tuple[str, str]":
    """Move a journal we cannot trust out of the way (never following it, never deleting it:
    it may be someone's data) and go on: it must neither cut the mailbox nor block delivery."""
    j.gone()
    aside = aside_path(path, UNTRUSTED_SUFFIX)
    try:
        os.rename(j.path, aside)
        moved = f"moved to {aside}"
    except OSError as exc:
        moved = f"could not move it aside ({exc.strerror})"
    level = "error" if outcome == UNTRUSTED else "warning"
    return _say(log, level, outcome, f"{path}: ignored the journal {j.path}: {why}; mailbox untouched, {moved}")


def _remove(jpath: str) -> None:
    """Remove a journal, durably (fsync of the directory): an old version's after recovery,
    or any after recovery with journalling turned off."""
    try:
        os.unlink(jpath)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise fail("cannot remove mailbox journal", f"{jpath}: {exc.strerror}") from None
    try:
        fsync_dir(fileio.dirname(jpath))
    except OSError as exc:
        raise fail("cannot sync mailbox directory", f"{jpath}: {exc.strerror}") from None


def _set_aside(j: Found, path: str) -> str:
    j.gone()
    aside = aside_path(path, UNRESOLVED)
    try:
        os.rename(j.path, aside)
        fsync_dir(fileio.dirname(j.path))
    except OSError as exc:
        raise fail("cannot set mailbox journal aside", f"{j.path}: {exc.strerror}") from None
    return aside


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


def recover(fd: int, path: str, st: os.stat_result, log: "Log | None" = None,
            keep: bool = True, group: str = "") -> "tuple[str, str]":
    """Undo an interrupted append to the mbox open on fd (both locks held).

    Returns (outcome, text for the log/administrator).  Raises DeliveryError when
    the journal cannot be reset or removed (the delivery defers).  keep=False (journalling
    turned off) removes the journal instead of resetting it.  `group`: the LMTP server's group
    journal, whose busy slots naming this mbox are recovered too (check_group()).
    """
    outcome, text = CLEAN, ""
    if fileio.lexists(journal_path(path, OLD_SUFFIX)):  # left by an earlier version
        old = find(journal_path(path, OLD_SUFFIX))
        try:
            outcome, text = decide(old, fd, path, st, log, False)
        finally:
            old.close()
        st = os.fstat(fd)
    if group:  # first: it recovers the mbox's own journal before it moves a slot's record there
        st, now = check_group(group, fd, path, st, log, keep)
        if now[0] != CLEAN:
            outcome, text = now
    j = find(journal_path(path))
    try:
        now = decide(j, fd, path, st, log, keep)
    finally:
        j.close()
    return (outcome, text) if now[0] == CLEAN else now


def check_group(jpath: str, fd: int, path: str, st: os.stat_result, log: "Log | None" = None,
                keep: bool = True) -> "tuple[os.stat_result, tuple[str, str]]":
    """Recover an append of the LMTP server's group commit to the mbox open on fd (both locks
    held), found in a busy slot of its group journal at jpath.  The common case is one open and
    one pread that finds no busy slot (or a failed open: no server); vdeliver.groupjournal is
    imported only when a slot is busy.  Returns the mbox's stat after, and what recovery did."""
    try:
        gfd = os.open(jpath, os.O_RDONLY | _OPEN)
    except OSError:
        return st, (CLEAN, "")  # none (no LMTP server), or not ours: our server cannot have written it
    try:
        busy = _GROUP_NEEDLE in os.pread(gfd, GROUP_SIZE, 0)
    except OSError:
        busy = False
    finally:
        os.close(gfd)
    if not busy:
        return st, (CLEAN, "")
    return recover_mbox(jpath, fd, path, st, log, keep)


def decide(j: Found, fd: int, path: str, st: os.stat_result, log: "Log | None" = None,
           keep: bool = True) -> "tuple[str, str]":
    """recover() on a journal already found (MboxJournal keeps it open for the append)."""
    if j.why:
        return _untrusted(j, path, j.why, log)
    if j.fd < 0:
        return CLEAN, ""
    if j.data[:RECLEN] == IDLE:
        if not (keep and j.persistent):
            j.settle(False)
        return CLEAN, ""
    rec = parse(j.data)
    if rec is None and not _could_be_ours(j.data):
        return _untrusted(j, path, "it is not a vdeliver journal", log)
    if rec is None:
        # Written with one write() and synced before the first byte of the append: a torn
        # or empty record means the append never started.
        j.settle(keep)
        return _say(log, "info", NOTHING, f"{path}: the journal held an incomplete record; the mailbox was not touched")
    size = st.st_size
    who = f"pid {rec.pid}"
    if (st.st_dev, st.st_ino) != (rec.dev, rec.ino):
        return _untrusted(j, path, f"it names another file (device {rec.dev}, inode {rec.ino}:"
                          " the mailbox was replaced, or the journal forged)", log, DROPPED)
    if not rec.orig <= rec.end or rec.end - rec.orig < len(rec.head):
        return _untrusted(j, path, f"its cut point {rec.orig} and end {rec.end} do not describe a record", log)
    if size == rec.orig:
        j.settle(keep)
        return _say(log, "info", NOTHING, f"{path}: interrupted delivery of {who} had written nothing at {rec.orig}")
    if size < rec.orig:
        return _untrusted(j, path, f"its cut point {rec.orig} is past the end of the mailbox ({size} bytes):"
                          " rewritten by another program, or the journal forged", log, DROPPED)
    n = min(len(rec.head), size - rec.orig)
    found = os.pread(fd, n, rec.orig)
    if found != rec.head[:n]:
        same = 0
        while same < n and found[same] == rec.head[same]:
            same += 1
        if same == 0:
            j.settle(keep)
            return _say(log, "warning", DROPPED,
                        f"{path}: bytes at offset {rec.orig} are not the record of {who}"
                        " (rewritten by another program); nothing cut")
        aside = _set_aside(j, path)
        return _say(log, "error", UNRESOLVED_STATE,
                    f"{path}: the record of {who} at offset {rec.orig} stops after at most {same} bytes and other"
                    f" data follows; nothing cut, journal kept as {aside}")
    if size > rec.end:
        aside = _set_aside(j, path)
        return _say(log, "error", UNRESOLVED_STATE,
                    f"{path}: the interrupted record of {who} at offset {rec.orig} (at most {rec.end - rec.orig}"
                    f" bytes) is followed by {size - rec.end}+ bytes another program appended; nothing cut,"
                    f" journal kept as {aside}")
    foreign = _foreign_from_line(fd, rec.orig + len(rec.head), size)
    if foreign >= 0:
        aside = _set_aside(j, path)
        return _say(log, "error", UNRESOLVED_STATE,
                    f"{path}: another program appended a message at offset {foreign} after the interrupted"
                    f" record of {who} at offset {rec.orig}; nothing cut, journal kept as {aside}")
    if size == rec.end and rec.boot and rec.boot != boot_id():
        # A whole record under the journal of an earlier boot: the machine went down
        # after the append, perhaps after sendmail was told.  Keep it.
        j.settle(keep)
        return _say(log, "warning", KEPT,
                    f"{path}: the record of {who} at offset {rec.orig} is complete and its journal is from an"
                    " earlier boot (power loss): kept; sendmail may deliver it once more")
    try:
        os.ftruncate(fd, rec.orig)
        os.fsync(fd)
    except OSError as exc:
        raise fail("cannot cut back mailbox", f"{path}: to {rec.orig}: {exc.strerror}") from None
    j.settle(keep)
    return _say(log, "warning", CUT,
                f"{path}: cut {size - rec.orig} bytes at offsets {rec.orig}..{size} left by the interrupted"
                f" delivery of {who} (record of {rec.end - rec.orig} bytes)")


def _say(log: "Log | None", level: str, outcome: str, text: str) -> "tuple[str, str]":
    if log is not None:
        getattr(log, level)(f"mbox recovery: {text}")
    return outcome, text


SLOT_MAGIC = "vdeliver-slot"
SLOT_VERSION = "1"
SLOT_IDLE = _seal(f"{SLOT_MAGIC} {SLOT_VERSION} idle", GROUP_SLOT)
_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit): type, whence, start, len, pid (0 for OFD locks)

# The server process's group, so that a recoverer in this process can settle a slot of its own
# (set by Group.open(); a slot of this process is never lock-free to this process's other descriptors).
OWN: "list[Any]" = []


def slot_block(rec: Record, path: str) -> bytes:
    """The busy record of a slot; ValueError when the path does not fit."""
    return _seal(
        f"{SLOT_MAGIC} {SLOT_VERSION} busy {rec.dev} {rec.ino} {rec.orig} {rec.end} {rec.pid} {rec.head.hex()}"
        f" {rec.boot or boot_id()} {path.encode('utf-8', 'surrogateescape').hex()}", GROUP_SLOT)


def parse_slot(block: bytes) -> "tuple[Record, str] | None":
    """(record, mbox path) of a whole busy slot, or None: idle, zeros, torn or foreign."""
    if not block.startswith(GROUP_BUSY):
        return None
    text = _unseal(block, GROUP_SLOT)
    fields = text.split() if text is not None else []
    if len(fields) != 11:
        return None
    try:
        dev, ino, orig, end, pid = (int(f) for f in fields[3:8])
        head = bytes.fromhex(fields[8])
        path = bytes.fromhex(fields[10]).decode('utf-8', 'surrogateescape')
    except ValueError:
        return None
    if min(dev, ino, orig, end, pid) < 0 or end < orig or len(head) > end - orig or not path.startswith("/"):
        return None
    if "\0" in path:
        return None
    return Record(dev, ino, orig, end, pid, head, fields[9]), path


def _lock(fd: int, slot: int, kind: int) -> bool:
    """Take (F_WRLCK) or drop (F_UNLCK) our OFD lock on a slot's bytes; False if another holds it."""
    import fcntl
    import struct

    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, 0, slot * GROUP_SLOT, GROUP_SLOT, 0))
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
            fileio.write_all(fd, SLOT_IDLE * GROUP_SLOTS)
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
        elif st.st_size != GROUP_SIZE:
            why = f"its size is {st.st_size}, not {GROUP_SIZE}"
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
    now: "tuple[str, str]" = (CLEAN, "")
    try:
        gfd = open_journal(jpath, False)
    except OSError:
        return st, now  # none, or not ours (wrong owner, a link...): our server cannot have written it
    try:
        data = os.pread(gfd, GROUP_SIZE, 0)
        ours = GROUP_BUSY + b"%d %d " % (st.st_dev, st.st_ino)  # a record naming this mbox starts so
        for slot in range(GROUP_SLOTS):
            at = slot * GROUP_SLOT
            if not data.startswith(GROUP_BUSY, at):
                continue
            block = data[at: at + GROUP_SLOT]
            if not block.startswith(ours):  # another mbox's (in the server, mostly live ones): only if torn
                if _unseal(block, GROUP_SLOT) is None:
                    _reset_torn(gfd, slot)
                continue
            found = parse_slot(block)
            if found is None:
                _reset_torn(gfd, slot)
            elif (found[0].dev, found[0].ino) == (st.st_dev, st.st_ino):
                st, said = _settle(gfd, slot, found[0], jpath, fd, path, st, log, keep)
                if said[0] != CLEAN:
                    now = said
    finally:
        os.close(gfd)
    return st, now


def _settle(gfd: int, slot: int, rec: Record, jpath: str, fd: int, path: str, st: os.stat_result,
            log: "Log | None", keep: bool) -> "tuple[os.stat_result, tuple[str, str]]":
    where = f"slot {slot} of the group journal {jpath}"
    if not _lock(gfd, slot, _WRLCK):
        # Its owner is alive; we hold the mbox's locks, so its append is not in progress.
        if rec.pid == os.getpid() and OWN and OWN[0].settle_own(slot):
            return st, (NOTHING, f"{path}: settled {where}, left by a rolled-back delivery")
        raise fail("mailbox journal busy", f"{path}: {where} (vdeliver-lmtpd pid {rec.pid}) is not settled yet")
    try:
        now = os.pread(gfd, GROUP_SLOT, slot * GROUP_SLOT)  # again, under its lock
        if parse_slot(now) is None:
            return st, (CLEAN, "")
        recover(fd, path, st, log, keep)  # the mbox's own journal first: its record goes there
        st = os.fstat(fd)
        pj = find(journal_path(path))
        if pj.why:
            pj.close()
            raise fail("cannot recover mailbox", f"{path}: {where}: the mailbox's journal is untrusted: {pj.why}")
        block = rec.block()
        try:
            if pj.persistent:
                if os.pwrite(pj.fd, block, 0) != RECLEN:
                    raise OSError(errno.ENOSPC, "short write")
                os.fdatasync(pj.fd)
                pj.data = block
            else:
                pj.close()
                if pj.fd < 0 and fileio.lexists(pj.path):
                    raise OSError(errno.EEXIST, "a journal of another size is in the way")
                _make(pj, block)
            _write_idle(gfd, slot, sync=True)
        except OSError as exc:
            pj.close()
            raise fail("cannot recover mailbox", f"{path}: {where}: {exc.strerror}") from None
        if log is not None:
            log.info(f"mbox recovery: {path}: moved the record of {where} (pid {rec.pid}) into {pj.path}")
        try:
            said = decide(pj, fd, path, st, log, keep)
        finally:
            pj.close()
        return os.fstat(fd), said
    finally:
        _lock(gfd, slot, _UNLCK)


def _reset_torn(gfd: int, slot: int) -> None:
    """A torn busy record of a dead owner: its append never started (the slot's sync comes
    first); reset it so that the next deliveries find no busy slot (and import nothing)."""
    if not _lock(gfd, slot, _WRLCK):
        return  # its owner is alive: it is writing it now
    try:
        block = os.pread(gfd, GROUP_SLOT, slot * GROUP_SLOT)
        if block.startswith(GROUP_BUSY) and parse_slot(block) is None:
            _write_idle(gfd, slot, sync=True)
    finally:
        _lock(gfd, slot, _UNLCK)


def _write_idle(gfd: int, slot: int, sync: bool = False) -> None:
    if os.pwrite(gfd, SLOT_IDLE, slot * GROUP_SLOT) != GROUP_SLOT:
        raise OSError(errno.ENOSPC, "short write")
    if sync:
        os.fdatasync(gfd)


class MboxJournal(Journal):
    """The journal hook mbox.deliver() calls: recover(), then begin() .. end(), close().

    recover() opens the persistent journal and keeps it open; begin() writes the busy
    record into it (or makes it, the first time); end() writes the idle record."""

    __slots__ = ("log", "found", "busy", "outcome", "record", "group")

    def __init__(self, log: "Log | None" = None, record: bool = True, group: str = "") -> None:
        self.log = log  # where recovery says what it did (the caller's logger)
        self.record = record  # False (mbox_journal = false): recover old journals, write none
        self.group = group  # the LMTP server's group journal, whose slots may name this mbox
        self.found = Found("")
        self.busy = False
        self.outcome = CLEAN

    def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:
        self.close()
        if fileio.lexists(journal_path(path, OLD_SUFFIX)):  # an earlier version's: one failed lstat
            old = find(journal_path(path, OLD_SUFFIX))
            try:
                self.outcome, _text = decide(old, fd, path, st, self.log, False)
            finally:
                old.close()
            st = os.fstat(fd)
        if self.group:
            st, (outcome, _text) = check_group(self.group, fd, path, st, self.log, self.record)
            if outcome != CLEAN:
                self.outcome = outcome
        j = self.found = find(journal_path(path))
        if j.persistent and self.record and j.data[:RECLEN] == IDLE:
            return st  # the common case: open, fstat, pread
        if j.fd < 0 and not j.why:
            return st  # no journal (journalling off, or the first delivery)
        outcome, _text = decide(j, fd, path, st, self.log, self.record)
        if outcome != CLEAN:
            self.outcome = outcome
        return os.fstat(fd)

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes, msg: Prepared) -> None:
        """Make the undo record durable before the first byte is appended.  An OSError goes
        to the caller, which knows whether a full quota bounces (its errno decides)."""
        if not self.record:
            return
        j = self.found
        if j.path != journal_path(path):  # begin() without recover(): make one (O_EXCL) or refuse
            self.close()
            j = self.found = Found(journal_path(path))
        block = Record(st.st_dev, st.st_ino, size, size + len(sep) + msg.length, os.getpid(),
                       head_of(sep, msg)).block()
        try:
            if j.persistent:
                try:
                    if os.pwrite(j.fd, block, 0) != RECLEN:
                        raise OSError(errno.ENOSPC, "short write")
                    os.fdatasync(j.fd)
                except OSError:
                    _reset_quietly(j)
                    raise
            else:
                _make(j, block)
        except OSError as exc:
            if not exc.filename:
                exc.filename = j.path  # the caller's status names the journal, not the mailbox
            raise
        self.busy = True

    def end(self) -> None:
        """The append is durable (or rolled back): forget it before we say so.  The commit
        point; not synced (see the module's docstring)."""
        if self.busy:
            self.busy = False
            try:
                if os.pwrite(self.found.fd, IDLE, 0) != RECLEN:
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as exc:
                raise fail("cannot reset mailbox journal", f"{self.found.path}: {exc.strerror}") from None

    def abandon(self) -> None:
        """After a rollback: the mailbox is back at its size; a busy record left is harmless
        (the next recovery finds nothing written after the original size)."""
        try:
            self.end()
        except DeliveryError:
            pass

    def close(self) -> None:
        self.busy = False
        self.found.close()


def _reset_quietly(j: Found) -> None:
    """Nothing was appended: leave no busy record behind (best effort; one left is harmless)."""
    try:
        os.pwrite(j.fd, IDLE, 0)
    except OSError:
        pass


def _make(j: Found, block: bytes) -> None:
    """The first delivery into an mbox makes its journal: O_EXCL (find() saw none, or moved
    it aside: whatever is there now was planted, and is neither followed nor overwritten),
    written in full with the busy record, then synced with its directory."""
    fd = os.open(j.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN, 0o600)
    try:
        write_all(fd, block + bytes(SIZE - RECLEN))  # a short write goes on, to the real errno (EFBIG...)
        os.fsync(fd)
        fsync_dir(fileio.dirname(j.path))
    except BaseException:
        os.close(fd)
        try:
            os.unlink(j.path)  # nothing was appended: leave no clutter
        except OSError:
            pass
        raise
    j.fd, j.size, j.data = fd, SIZE, block


def _sweep_lock_temps(path: str, host: str) -> int:
    """Remove `.<mbox>.lock.<host>.<pid>.<random>` files whose process is gone.

    DotLock links such a uniquely named file to `<mbox>.lock`; a process killed
    between creating and unlinking it leaves it behind.  It is never a lock (only
    `<mbox>.lock` is), so removing it is only tidying, done by --repair alone.
    """
    from vdeliver.locking import _pid_alive

    directory, base = fileio.split(path)
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
                os.unlink(fileio.join(directory or ".", name))
                removed += 1
            except OSError:
                pass
    return removed


def repair(path: str, *, host: str, lock_timeout: float = 60.0, stale_age: float = 300.0,
           log: "Log | None" = None, group: str = "") -> "tuple[str, str]":
    """`vdeliver --repair MBOX`: take the locks like a delivery and recover."""
    from vdeliver.mbox import MailboxLock

    with MailboxLock(path, host=host, lock_timeout=lock_timeout, stale_age=stale_age) as box:
        assert box.st is not None
        for note in box.broke:
            if log is not None:
                log.warning(f"mbox recovery: broke stale lock {note}")
        outcome, text = recover(box.fd, path, box.st, log, group=group)
        swept = _sweep_lock_temps(path, host)
        if swept:
            text = (text or f"{path}: clean") + f"; removed {swept} temporary lock file(s) of dead processes"
            if log is not None:
                log.info(f"mbox recovery: {text}")
    if fileio.lexists(aside_path(path, UNRESOLVED)):
        return UNRESOLVED_STATE, text or f"{path}: an unresolved journal {aside_path(path, UNRESOLVED)} needs a look"
    return outcome, text or f"{path}: clean"
