"""mbox.py in-process: open_mbox's refusals, MailboxLock, and deliver() with its rollback.

Faults are injected through the seams the kill harness (tests/faultinject.py) uses -
`vdeliver.mbox.write_all`, `os.fsync`, `os.ftruncate`, the lock functions - but instead of
SIGKILL they raise, so the rollback path runs in this process and a failing case names
the step.  After every failure the mailbox must be byte-for-byte what it was, no lock or
descriptor may be left, and the status must be the one sendmail needs (4.3.1 for a full
disk, 4.2.2 or 5.2.2 for a quota).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.test_locking import child_can_lock, child_holding, dead_pid
from tests.unit_helpers import fail_at_byte, fail_at_call, open_fds, patch_os, prepared, spooled
from vdeliver import fileio, locking, mbox, message
from vdeliver.errors import DeliveryError
from vdeliver.mbox import Journal, MailboxLock, open_mbox
from vdeliver.message import Prepared, Spool
from vdeliver.recovery import MboxJournal, journal_path
from vdeliver.recovery import state as journal_state

HOST = "unit.test"
SHORT = 0.3
RECORD = b"From alice@example.org  Wed Nov 25 03:53:52 2026\nReturn-Path: <alice@example.org>\nSubject: new\n\nbody\n\n"
OLD = b"From bob@example.org  Tue Nov 24 10:00:00 2026\nSubject: old\n\nold body\n\n"


@pytest.fixture
def box(tmp_path: Path) -> Path:
    p = tmp_path / "fred"
    p.write_bytes(OLD)
    os.chmod(p, 0o600)
    return p


@pytest.fixture
def msg(tmp_path: Path) -> Iterator[Prepared]:
    yield from spooled(RECORD, str(tmp_path))


def deliver(path: Path, m: Prepared, **kw: object) -> list[str]:
    return mbox.deliver(str(path), m, host=HOST, lock_timeout=SHORT, **kw)  # type: ignore[arg-type]


def assert_clean(path: Path) -> None:
    """No lock, no busy journal, no temporary lock file beside the mailbox; nobody holds fcntl.
    The persistent journal may be there, idle."""
    journal = Path(journal_path(str(path))).name
    leftovers = [p.name for p in path.parent.iterdir()
                 if p.name.startswith((path.name + ".", "." + path.name)) and p.name != journal]
    assert leftovers == []
    assert journal_state(str(path)) in ("none", "idle")
    if path.exists():
        assert child_can_lock(path)


# -- open_mbox ---------------------------------------------------------------------------


def test_open_existing(box: Path) -> None:
    fd = open_mbox(str(box), create=False)
    try:
        flags = os.get_blocking(fd), os.get_inheritable(fd)
        assert flags == (True, False)
        os.write(fd, b"X")  # O_APPEND: lands at the end
        assert box.read_bytes() == OLD + b"X"
    finally:
        os.close(fd)


def test_missing_without_create_is_user_unknown(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(tmp_path / "nobody"), create=False)
    assert info.value.status.dsn == "5.1.1" and info.value.status.reason == "user unknown"
    assert not (tmp_path / "nobody").exists()


def test_missing_with_create_is_made_0600(tmp_path: Path) -> None:
    path = tmp_path / "newbie"
    fd = open_mbox(str(path), create=True)
    os.close(fd)
    st_ = path.lstat()
    assert stat.S_ISREG(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_size == 0
    assert st_.st_uid == os.geteuid()


def test_create_in_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(tmp_path / "no-domain" / "fred"), create=True)
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "cannot create mailbox"


def test_symlink_is_refused(box: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(box)
    for create in (False, True):
        with pytest.raises(DeliveryError) as info:
            open_mbox(str(link), create=create)
        assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "mailbox is a symbolic link"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(dangling), create=True)
    assert info.value.status.reason in ("mailbox is a symbolic link", "cannot create mailbox")
    assert not (tmp_path / "elsewhere").exists()
    assert box.read_bytes() == OLD


def test_hard_link_is_refused(box: Path, tmp_path: Path) -> None:
    os.link(box, tmp_path / "second")
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(box), create=False)
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "mailbox has more than one link"
    assert "2 links" in info.value.status.detail


@pytest.mark.timeout(20)
def test_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    before = open_fds()
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(fifo), create=False)
    assert info.value.status.reason == "mailbox is not a regular file"
    assert open_fds() == before


def test_directory_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(d), create=False)
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "cannot open mailbox"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_wrong_owner_is_refused(box: Path) -> None:
    os.chown(box, 12345, 12345)
    before = open_fds()
    with pytest.raises(DeliveryError) as info:
        open_mbox(str(box), create=False)
    assert info.value.status.reason == "mailbox has the wrong owner"
    assert "uid 12345" in info.value.status.detail
    assert open_fds() == before


# -- MailboxLock ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_lock_holds_dotlock_and_fcntl_inside_and_releases_both(box: Path) -> None:
    lockfile = Path(f"{box}.lock")
    before = open_fds()
    with MailboxLock(str(box), host=HOST, lock_timeout=SHORT) as lk:
        assert lk.fd >= 0 and lk.dotlock is not None and lk.dotlock.held
        assert lk.st is not None and (lk.st.st_ino, lk.st.st_size) == (box.stat().st_ino, len(OLD))
        assert lockfile.read_bytes() == f"{os.getpid()}:{HOST}".encode()
        assert not child_can_lock(box)
        assert lk.broke == []
    assert lk.fd == -1 and not lk.dotlock.held
    assert open_fds() == before
    assert_clean(box)


@pytest.mark.timeout(20)
def test_lock_is_released_when_the_body_raises(box: Path) -> None:
    before = open_fds()
    with pytest.raises(RuntimeError, match="boom"), MailboxLock(str(box), host=HOST, lock_timeout=SHORT):
        raise RuntimeError("boom")
    assert open_fds() == before
    assert_clean(box)


def test_release_is_idempotent(box: Path) -> None:
    lk = MailboxLock(str(box), host=HOST, lock_timeout=SHORT)
    assert lk.broke == []  # no dotlock yet
    lk.release()
    with lk:
        pass
    lk.release()
    assert_clean(box)


@pytest.mark.timeout(20)
def test_lock_create_makes_the_mailbox(tmp_path: Path) -> None:
    path = tmp_path / "newbie"
    with MailboxLock(str(path), host=HOST, create=True, lock_timeout=SHORT) as lk:
        assert lk.st is not None and lk.st.st_size == 0
    assert path.exists()
    assert_clean(path)


@pytest.mark.timeout(20)
def test_dotlock_timeout_closes_the_mailbox(box: Path) -> None:
    Path(f"{box}.lock").write_bytes(f"1:{HOST}".encode())
    before = open_fds()
    with pytest.raises(DeliveryError) as info, MailboxLock(str(box), host=HOST, lock_timeout=SHORT):
        pytest.fail("entered without the lock")
    assert info.value.status.dsn == "4.2.0"
    assert open_fds() == before
    assert Path(f"{box}.lock").read_bytes() == f"1:{HOST}".encode()  # someone else's: kept


@pytest.mark.timeout(20)
def test_fcntl_timeout_releases_the_dotlock(box: Path) -> None:
    before = open_fds()
    with child_holding(box):
        with pytest.raises(DeliveryError) as info, MailboxLock(str(box), host=HOST, lock_timeout=SHORT):
            pytest.fail("entered without the lock")
        assert info.value.status.dsn == "4.2.0" and "fcntl" in info.value.status.detail
        assert not Path(f"{box}.lock").exists()
    assert open_fds() == before


def test_broken_stale_lock_is_noted(box: Path) -> None:
    pid = dead_pid()
    Path(f"{box}.lock").write_bytes(f"{pid}:{HOST}".encode())
    with MailboxLock(str(box), host=HOST, lock_timeout=SHORT) as lk:
        assert lk.broke == [f"{box}.lock (holder pid {pid} is dead)"]
    assert_clean(box)


def _during_fcntl(monkeypatch: pytest.MonkeyPatch, action: Callable[[int], None]) -> list[int]:
    """Run action(n) just before the n-th fcntl lock is taken (while 'waiting')."""
    real = locking.fcntl_lock
    calls: list[int] = []

    def fcntl_lock(fd: int, path: str, timeout: float, write: bool = True) -> None:
        calls.append(fd)
        action(len(calls))
        real(fd, path, timeout, write)

    monkeypatch.setattr(locking, "fcntl_lock", fcntl_lock)
    return calls


def _replace(path: Path, content: bytes) -> int:
    new = path.parent / (path.name + "-replacement")
    new.write_bytes(content)
    os.chmod(new, 0o600)
    ino = new.stat().st_ino
    os.rename(new, path)
    return ino


def test_file_replaced_while_waiting_is_reopened(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inos: list[int] = []

    def swap(n: int) -> None:
        if n == 1:
            inos.append(_replace(box, b"NEW\n\n"))

    calls = _during_fcntl(monkeypatch, swap)
    before = open_fds()
    with MailboxLock(str(box), host=HOST, lock_timeout=SHORT) as lk:
        assert len(calls) == 2
        assert lk.st is not None and lk.st.st_ino == inos[0] == os.fstat(lk.fd).st_ino
        assert lk.st.st_size == 5
    assert open_fds() == before
    assert_clean(box)


def test_deliver_appends_to_the_replacement(box: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    def swap(n: int) -> None:
        if n == 1:
            _replace(box, b"NEW\n")

    _during_fcntl(monkeypatch, swap)
    deliver(box, msg)
    assert box.read_bytes() == b"NEW\n" + b"\n" + RECORD


def test_file_that_keeps_changing_is_given_up(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def swap(n: int) -> None:
        _replace(box, b"v%d\n" % n)

    calls = _during_fcntl(monkeypatch, swap)
    before = open_fds()
    with pytest.raises(DeliveryError) as info, MailboxLock(str(box), host=HOST, lock_timeout=SHORT):
        pytest.fail("entered a mailbox that kept changing")
    assert len(calls) == 3
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "mailbox keeps changing"
    assert open_fds() == before
    assert_clean(box)


def test_file_removed_while_waiting(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _during_fcntl(monkeypatch, lambda n: box.unlink() if n == 1 else None)
    with pytest.raises(DeliveryError) as info, MailboxLock(str(box), host=HOST, lock_timeout=SHORT):
        pytest.fail("entered a removed mailbox")
    assert info.value.status.dsn == "5.1.1"
    assert_clean(box)


def test_hard_link_made_while_waiting_is_refused(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    second = box.parent / "second"
    _during_fcntl(monkeypatch, lambda n: os.link(box, second))
    before = open_fds()
    with pytest.raises(DeliveryError) as info, MailboxLock(str(box), host=HOST, lock_timeout=SHORT):
        pytest.fail("entered a mailbox with two links")
    assert info.value.status.reason == "mailbox has more than one link"
    assert open_fds() == before
    assert not Path(f"{box}.lock").exists() and child_can_lock(box)


# -- the separator ------------------------------------------------------------------------


def _reference_separator(old: bytes) -> bytes:
    if not old or old == b"\n" or old.endswith(b"\n\n"):
        return b""
    return b"\n" if old.endswith(b"\n") else b"\n\n"


@pytest.mark.parametrize(
    ("old", "sep"),
    [(b"", b""), (b"\n", b""), (b"x", b"\n\n"), (b"x\n", b"\n"), (b"x\n\n", b""), (b"\n\n", b""),
     (b"ab", b"\n\n"), (OLD, b""), (OLD[:-1], b"\n"), (OLD[:-2], b"\n\n"), (b"\r\n", b"\n")],
)
def test_separator_needed(tmp_path: Path, old: bytes, sep: bytes) -> None:
    p = tmp_path / "m"
    p.write_bytes(old)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert mbox._separator_needed(fd, len(old)) == sep == _reference_separator(old)
    finally:
        os.close(fd)


# -- deliver -------------------------------------------------------------------------------


def test_deliver_appends_exactly(box: Path, msg: Prepared) -> None:
    assert deliver(box, msg) == []
    assert box.read_bytes() == OLD + RECORD
    assert_clean(box)


@pytest.mark.parametrize("old", [b"", b"x", b"x\n", OLD[:-1]], ids=["empty", "x", "x-nl", "one-newline"])
def test_deliver_repairs_a_missing_empty_line(tmp_path: Path, msg: Prepared, old: bytes) -> None:
    p = tmp_path / "m"
    p.write_bytes(old)
    deliver(p, msg)
    assert p.read_bytes() == old + _reference_separator(old) + RECORD


def test_deliver_from_a_spool_file(box: Path, tmp_path: Path) -> None:
    big = RECORD[:-1] + b"line\n" * 5000 + b"\n"
    m = prepared(big, str(tmp_path), threshold=64)
    try:
        assert isinstance(m.spool, Spool) and m.spool.fd >= 0
        deliver(box, m)
    finally:
        m.close()
    assert box.read_bytes() == OLD + big


def test_deliver_creates_when_asked(tmp_path: Path, msg: Prepared) -> None:
    p = tmp_path / "newbie"
    with pytest.raises(DeliveryError) as info:
        deliver(p, msg)
    assert info.value.status.dsn == "5.1.1"
    deliver(p, msg, create=True)
    assert p.read_bytes() == RECORD


def test_deliver_twice(box: Path, msg: Prepared) -> None:
    deliver(box, msg)
    deliver(box, msg)
    assert box.read_bytes() == OLD + RECORD + RECORD


def test_deliver_returns_broken_locks(box: Path, msg: Prepared) -> None:
    pid = dead_pid()
    Path(f"{box}.lock").write_bytes(f"{pid}:{HOST}".encode())
    assert deliver(box, msg) == [f"{box}.lock (holder pid {pid} is dead)"]
    assert box.read_bytes() == OLD + RECORD
    assert_clean(box)


@pytest.mark.timeout(20)
def test_deliver_to_a_locked_mailbox_defers(box: Path, msg: Prepared) -> None:
    Path(f"{box}.lock").write_bytes(b"1:" + HOST.encode())
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg)
    assert info.value.status.dsn == "4.2.0" and info.value.status.exit_code() == 75
    assert box.read_bytes() == OLD


def test_deliver_through_prepare_byte_exact(box: Path, tmp_path: Path) -> None:
    """The real pipeline: message.prepare() from a descriptor, then mbox.deliver()."""
    when = 1_764_000_000.0
    raw = (b"From alice@example.org Mon Jan  5 00:00:00 2026\r\nSubject: hi\r\nStatus: RO\r\n"
           b"Return-Path: <forged@example.net>\r\n\r\nFrom me\r\n>From you\r\nbody")
    src = tmp_path / "in"
    src.write_bytes(raw)
    fd = os.open(src, os.O_RDONLY)
    try:
        m = message.prepare(fd, sender=None, recipient="fred@example.org", mbox=True, when=when,
                            spool_dir=str(tmp_path))
    finally:
        os.close(fd)
    stamp = time.asctime(time.localtime(when))
    expected = (f"From alice@example.org  {stamp}\n".encode()
                + b"Return-Path: <alice@example.org>\nDelivered-To: fred@example.org\nSubject: hi\n\n"
                + b">From me\n>From you\nbody\n\n")
    try:
        assert (m.length, m.input_size, m.had_from_line) == (len(expected), len(raw), True)
        deliver(box, m)
    finally:
        m.close()
    assert box.read_bytes() == OLD + expected


@given(old=st.binary(max_size=300), record=st.binary(min_size=1, max_size=300))
def test_old_content_is_always_a_prefix(old: bytes, record: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m"
        p.write_bytes(old)
        m = prepared(record, d)
        try:
            deliver(p, m)
        finally:
            m.close()
        data = p.read_bytes()
        assert data == old + _reference_separator(old) + record
        assert data.startswith(old)


# -- faults through the same seams as the kill harness ----------------------------------


@pytest.mark.parametrize(("err", "bounce", "dsn"), [
    (errno.ENOSPC, False, "4.3.1"), (errno.ENOSPC, True, "4.3.1"),
    (errno.EDQUOT, False, "4.2.2"), (errno.EDQUOT, True, "5.2.2"),
    (errno.EFBIG, False, "4.2.2"), (errno.EFBIG, True, "5.2.2"),
    (errno.EIO, False, "4.3.0"),
])
@pytest.mark.parametrize("old", [OLD, OLD[:-1], b"", b"x"], ids=["whole", "one-newline", "empty", "no-newline"])
@pytest.mark.parametrize("k", [0, 1, 2, 40, len(RECORD) - 1, len(RECORD)])
def test_write_failure_leaves_the_mailbox_unchanged(tmp_path: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                                     err: int, bounce: bool, dsn: str, old: bytes, k: int) -> None:
    p = tmp_path / "m"
    p.write_bytes(old)
    ino = p.stat().st_ino
    monkeypatch.setattr(mbox, "write_all", fail_at_byte(k, err))
    before = open_fds()
    with pytest.raises(DeliveryError) as info:
        deliver(p, msg, over_quota_bounce=bounce, journal=MboxJournal())
    assert info.value.status.dsn == dsn
    assert p.read_bytes() == old and p.stat().st_ino == ino
    assert open_fds() == before
    assert_clean(p)


@pytest.mark.parametrize(("err", "bounce", "dsn"), [
    (errno.ENOSPC, False, "4.3.1"), (errno.EDQUOT, False, "4.2.2"), (errno.EDQUOT, True, "5.2.2"),
    (errno.EIO, False, "4.3.0"),
])
def test_fsync_failure_of_the_mailbox_rolls_back(box: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                                 err: int, bounce: bool, dsn: str) -> None:
    """The base Journal syncs nothing: the first fsync is the mailbox's, the second the rollback's."""
    patch_os(monkeypatch, "fsync", fail_at_call(1, err, os.fsync))
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg, over_quota_bounce=bounce)
    assert info.value.status.dsn == dsn
    assert box.read_bytes() == OLD
    assert_clean(box)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(("err", "dsn"), [(errno.ENOSPC, "4.3.1"), (errno.EDQUOT, "4.2.2"), (errno.EIO, "4.3.0")])
def test_fsync_failures_with_the_journal(box: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                         n: int, err: int, dsn: str) -> None:
    """The first delivery makes the journal: fsync 1 is the journal's, 2 its directory's, 3 the
    mailbox's.  A journal that could not be made is not left behind."""
    patch_os(monkeypatch, "fsync", fail_at_call(n, err, os.fsync))
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg, journal=MboxJournal())
    assert info.value.status.dsn == dsn
    assert box.read_bytes() == OLD
    assert journal_state(str(box)) == ("idle" if n == 3 else "none")
    assert_clean(box)


@pytest.mark.parametrize(("call", "err", "dsn"), [
    ("fdatasync", errno.EIO, "4.3.0"), ("fdatasync", errno.ENOSPC, "4.3.1"),
    ("fsync", errno.EIO, "4.3.0"), ("fsync", errno.EDQUOT, "4.2.2"),
])
def test_sync_failures_with_the_persistent_journal(box: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                                   call: str, err: int, dsn: str) -> None:
    """Once the journal exists a delivery syncs twice: the journal's record (fdatasync), then
    the mailbox (fsync).  Either failing leaves the mailbox as it was."""
    deliver(box, msg, journal=MboxJournal())
    before = box.read_bytes()
    patch_os(monkeypatch, call, fail_at_call(1, err, getattr(os, call)))
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg, journal=MboxJournal())
    assert info.value.status.dsn == dsn
    assert box.read_bytes() == before
    assert_clean(box)


def test_quota_hit_on_the_journal_bounces_when_asked(box: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user at the hard quota limit cannot create the journal (its first block): that is
    the same 'mailbox full' as a failed append, and over_quota = "bounce" should bounce it."""
    patch_os(monkeypatch, "fsync", fail_at_call(1, errno.EDQUOT, os.fsync))
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg, over_quota_bounce=True, journal=MboxJournal())
    assert box.read_bytes() == OLD
    assert info.value.status.dsn == "5.2.2"


def test_interrupt_during_the_write_rolls_back_and_propagates(box: Path, msg: Prepared,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = fileio.write_all

    def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
        real(fd, memoryview(data)[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(mbox, "write_all", write_all)
    with pytest.raises(KeyboardInterrupt):
        deliver(box, msg, journal=MboxJournal())
    assert box.read_bytes() == OLD
    assert_clean(box)


def test_failed_rollback_is_reported(box: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mbox, "write_all", fail_at_byte(20, errno.ENOSPC))

    def ftruncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    patch_os(monkeypatch, "ftruncate", ftruncate)
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg)
    status = info.value.status
    assert status.dsn == "4.3.0" and f"rollback to {len(OLD)} failed" in status.detail
    assert_clean(box)  # the locks are released all the same


def test_lock_is_refreshed_while_writing(box: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refreshed: list[bool] = []
    real = locking.DotLock.refresh

    def refresh(self: locking.DotLock, force: bool = False) -> None:
        refreshed.append(self.held)
        real(self, force)

    monkeypatch.setattr(locking.DotLock, "refresh", refresh)
    big = RECORD[:-1] + b"y" * 100 + b"\n\n"
    m = prepared(big, str(tmp_path), threshold=16)
    try:
        deliver(box, m)
    finally:
        m.close()
    assert refreshed and all(refreshed)


# -- the journal hook's order --------------------------------------------------------------


class Recorder(Journal):
    def __init__(self, fail_in: str = "") -> None:
        self.calls: list[str] = []
        self.fail_in = fail_in
        self.begin_args: tuple[int, bytes, int] = (-1, b"", -1)

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_in:
            raise OSError(errno.EIO, f"{name} failed")

    def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:
        self._step("recover")
        return st

    def begin(self, fd: int, path: str, size: int, st: os.stat_result, sep: bytes, msg: Prepared) -> None:
        self.begin_args = (size, sep, msg.length)
        self._step("begin")

    def end(self) -> None:
        self._step("end")

    def abandon(self) -> None:
        self._step("abandon")


def test_journal_order_on_success(box: Path, msg: Prepared) -> None:
    j = Recorder()
    deliver(box, msg, journal=j)
    assert j.calls == ["recover", "begin", "end"]
    assert j.begin_args == (len(OLD), b"", len(RECORD))


def test_journal_order_on_failure(tmp_path: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "m"
    p.write_bytes(b"x\n")
    monkeypatch.setattr(mbox, "write_all", fail_at_byte(5, errno.ENOSPC))
    j = Recorder()
    with pytest.raises(DeliveryError):
        deliver(p, msg, journal=j)
    assert j.calls == ["recover", "begin", "abandon"]
    assert j.begin_args == (2, b"\n", len(RECORD))
    assert p.read_bytes() == b"x\n"


def test_journal_not_ended_means_rollback(box: Path, msg: Prepared) -> None:
    """end() is the commit point: if the journal cannot go, the append is undone."""
    j = Recorder(fail_in="end")
    with pytest.raises(DeliveryError) as info:
        deliver(box, msg, journal=j)
    assert info.value.status.dsn == "4.3.0"
    assert j.calls == ["recover", "begin", "end", "abandon"]
    assert box.read_bytes() == OLD
    assert_clean(box)


@pytest.mark.parametrize(("step", "raised"), [("recover", OSError), ("begin", DeliveryError)])
def test_journal_failure_before_the_append_writes_nothing(box: Path, msg: Prepared, step: str,
                                                          raised: type[Exception]) -> None:
    """A failed begin() is a failed delivery with a status (EIO: 4.3.0); recover() reports its
    own trouble as it sees fit."""
    j = Recorder(fail_in=step)
    with pytest.raises(raised):
        deliver(box, msg, journal=j)
    assert j.calls == ["recover", "begin"][: ["recover", "begin"].index(step) + 1]
    assert box.read_bytes() == OLD
    assert_clean(box)


def test_recover_result_is_where_the_append_goes(box: Path, msg: Prepared) -> None:
    """What recover() returns (the file after it cut a partial record) sets the size."""

    class Cutter(Recorder):
        def recover(self, fd: int, path: str, st: os.stat_result) -> os.stat_result:
            os.ftruncate(fd, 10)
            return os.fstat(fd)

    j = Cutter()
    deliver(box, msg, journal=j)
    assert j.begin_args[:2] == (10, b"\n\n")
    assert box.read_bytes() == OLD[:10] + b"\n\n" + RECORD


def test_mbox_journal_is_gone_after_success(box: Path, msg: Prepared) -> None:
    deliver(box, msg, journal=MboxJournal())
    assert box.read_bytes() == OLD + RECORD
    assert_clean(box)


def test_a_delivery_into_an_mbox_with_its_journal_syncs_twice(box: Path, msg: Prepared, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash safety at the cost of one sync: once the persistent journal exists, a delivery
    makes two syncs (the journal's record, fdatasync; the mailbox, fsync), no file is created
    or removed and no directory synced.  The first delivery makes the journal (three syncs)."""
    calls: list[str] = []

    def counted(name: str) -> Callable[[int], None]:
        real = getattr(os, name)

        def call(fd: int) -> None:
            calls.append(name)
            real(fd)
        return call

    for name in ("fsync", "fdatasync"):
        patch_os(monkeypatch, name, counted(name))
    deliver(box, msg, journal=MboxJournal())
    assert calls == ["fsync", "fsync", "fsync"]  # the new journal, its directory, the mailbox
    for _ in range(3):
        calls.clear()
        deliver(box, prepared(RECORD, str(tmp_path)), journal=MboxJournal())
        assert calls == ["fdatasync", "fsync"]
    assert journal_state(str(box)) == "idle" and box.read_bytes() == OLD + RECORD * 4
