"""locking.py in-process: the dotlock (`<path>.lock`) and the whole-file fcntl lock.

The end-to-end tests hold locks with peer programs; here every decision of DotLock
(take, wait, break a dead holder's or an old lock, give up at the deadline) and of
fcntl_lock is reached directly, with a forked child where a second process is needed.
Lock timeouts are short (0.3 s) and nothing here measures speed; pytest-timeout turns a
hang (the bug a FIFO or directory planted as the lock could cause) into a failure.
dead_pid(), child_holding() and child_can_lock() serve test_mbox.py too.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from vdeliver import locking
from vdeliver.errors import DeliveryError
from vdeliver.locking import DotLock, fcntl_lock, fcntl_unlock

HOST = "unit.test"
SHORT = 0.3


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _plant(lock: Path, content: bytes, age: float = 0.0) -> None:
    lock.write_bytes(content)
    if age:
        then = time.time() - age
        os.utime(lock, (then, then))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture
def box(tmp_path: Path) -> Path:
    p = tmp_path / "fred"
    p.write_bytes(b"")
    return p


# -- DotLock ---------------------------------------------------------------------------


def test_acquire_writes_pid_and_host_and_release_removes(box: Path) -> None:
    lock = DotLock(str(box), HOST, timeout=SHORT)
    assert lock.lockpath == f"{box}.lock"
    lock.acquire()
    assert lock.held
    lockfile = Path(lock.lockpath)
    assert lockfile.read_bytes() == f"{os.getpid()}:{HOST}".encode()
    assert stat.S_ISREG(lockfile.lstat().st_mode) and lockfile.lstat().st_nlink == 1
    assert lock.broke == []
    lock.release()
    assert not lock.held and not lockfile.exists()
    # No temporary link file is left beside it.
    assert sorted(p.name for p in box.parent.iterdir()) == ["fred"]


def test_release_twice_and_release_unheld_are_harmless(box: Path) -> None:
    lock = DotLock(str(box), HOST, timeout=SHORT)
    lock.release()  # never acquired
    lock.acquire()
    lock.release()
    Path(lock.lockpath).write_bytes(b"someone else")
    lock.release()  # not held any more: the new lock is not ours
    assert Path(lock.lockpath).read_bytes() == b"someone else"


def test_custom_content(box: Path) -> None:
    lock = DotLock(str(box), HOST, timeout=SHORT, content=b"dovecot-ish\n")
    lock.acquire()
    try:
        assert Path(lock.lockpath).read_bytes() == b"dovecot-ish\n"
    finally:
        lock.release()


def test_second_acquire_in_the_same_process_waits_for_the_first(box: Path) -> None:
    """Our own pid in the lock is never judged dead: a second lock object times out."""
    first = DotLock(str(box), HOST, timeout=SHORT)
    first.acquire()
    try:
        second = DotLock(str(box), HOST, timeout=SHORT)
        with pytest.raises(DeliveryError) as info:
            second.acquire()
        assert info.value.status.dsn == "4.2.0"
        assert not second.held and second.broke == []
    finally:
        first.release()
    assert not Path(first.lockpath).exists()


@pytest.mark.timeout(20)
def test_timeout_on_a_live_holder(box: Path) -> None:
    lockfile = Path(f"{box}.lock")
    held = f"1:{HOST}".encode()  # pid 1 is alive
    _plant(lockfile, held)
    lock = DotLock(str(box), HOST, timeout=SHORT)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    status = info.value.status
    assert status.dsn == "4.2.0" and status.temporary
    assert status.reason == "mailbox is locked"
    assert str(lockfile) in status.detail and "gave up after" in status.detail
    assert not lock.held and lock.broke == []
    assert lockfile.read_bytes() == held  # never broken, never touched


def test_dead_holder_on_this_host_is_broken_at_once(box: Path) -> None:
    pid = dead_pid()
    lockfile = Path(f"{box}.lock")
    _plant(lockfile, f"{pid}:{HOST}".encode())
    lock = DotLock(str(box), HOST, timeout=SHORT, stale_age=3600)
    lock.acquire()
    try:
        assert lockfile.read_bytes() == f"{os.getpid()}:{HOST}".encode()
        assert len(lock.broke) == 1
        assert lock.broke[0] == f"{lockfile} (holder pid {pid} is dead)"
    finally:
        lock.release()


@pytest.mark.parametrize("content", ["{pid}:other.host", "{pid}", "x{pid}:{host}", "-1:{host}", "0:{host}"])
def test_dead_pid_is_trusted_only_for_our_host_and_a_plain_pid(box: Path, content: str) -> None:
    """A pid on another host (or not a pid at all) says nothing: only age may break it."""
    lockfile = Path(f"{box}.lock")
    text = content.format(pid=dead_pid(), host=HOST).encode()
    _plant(lockfile, text)
    lock = DotLock(str(box), HOST, timeout=SHORT, stale_age=3600)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.2.0"
    assert lockfile.read_bytes() == text and lock.broke == []


def test_lock_older_than_stale_age_is_broken(box: Path) -> None:
    lockfile = Path(f"{box}.lock")
    _plant(lockfile, f"1:{HOST}".encode(), age=1000)  # a live pid, but nothing moved for long
    _age(box, 1000)
    lock = DotLock(str(box), HOST, timeout=SHORT, stale_age=100)
    lock.acquire()
    try:
        assert lock.held
        assert len(lock.broke) == 1 and lock.broke[0].startswith(f"{lockfile} (unchanged for ")
    finally:
        lock.release()


def test_old_lock_on_a_recently_changed_mailbox_is_not_broken(box: Path) -> None:
    """The holder writes the mailbox: its mtime moving keeps the lock alive."""
    lockfile = Path(f"{box}.lock")
    _plant(lockfile, b"1:elsewhere", age=1000)
    lock = DotLock(str(box), HOST, timeout=SHORT, stale_age=100)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.2.0"
    assert lockfile.exists() and lock.broke == []


def test_old_lock_without_a_mailbox_is_broken(tmp_path: Path) -> None:
    """The mailbox does not exist yet (its mtime counts as 0)."""
    path = tmp_path / "new-box"
    lockfile = Path(f"{path}.lock")
    _plant(lockfile, b"garbage", age=1000)
    lock = DotLock(str(path), HOST, timeout=SHORT, stale_age=100)
    lock.acquire()
    lock.release()
    assert len(lock.broke) == 1 and not lockfile.exists()


@pytest.mark.timeout(20)
def test_lock_that_is_a_directory_times_out(box: Path) -> None:
    lockdir = Path(f"{box}.lock")
    lockdir.mkdir()
    lock = DotLock(str(box), HOST, timeout=SHORT)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.2.0"
    assert lockdir.is_dir()


@pytest.mark.timeout(20)
def test_old_lock_directory_cannot_be_removed_and_the_deadline_holds(box: Path) -> None:
    """Judged stale, but unlink() fails on a directory: the loop must still end."""
    lockdir = Path(f"{box}.lock")
    lockdir.mkdir()
    (lockdir / "inside").write_bytes(b"x")
    _age(lockdir, 1000)
    _age(box, 1000)
    lock = DotLock(str(box), HOST, timeout=SHORT, stale_age=100)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.2.0"
    assert lockdir.is_dir() and lock.broke == []


@pytest.mark.timeout(20)
def test_lock_that_is_a_fifo_does_not_hang(box: Path) -> None:
    fifo = Path(f"{box}.lock")
    os.mkfifo(fifo, 0o600)
    lock = DotLock(str(box), HOST, timeout=SHORT)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.2.0"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.timeout(20)
def test_old_fifo_lock_is_broken(box: Path) -> None:
    fifo = Path(f"{box}.lock")
    os.mkfifo(fifo, 0o600)
    _age(fifo, 1000)
    _age(box, 1000)
    lock = DotLock(str(box), HOST, timeout=SHORT, stale_age=100)
    lock.acquire()
    try:
        assert stat.S_ISREG(fifo.lstat().st_mode) and len(lock.broke) == 1
    finally:
        lock.release()


def test_symlink_planted_as_the_lock_is_not_followed(box: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = Path(f"{box}.lock")
    link.symlink_to(victim)
    lock = DotLock(str(box), HOST, timeout=SHORT)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.2.0"
    assert victim.read_bytes() == b"precious" and link.is_symlink()


def test_release_removes_only_our_own_lock(box: Path) -> None:
    lock = DotLock(str(box), HOST, timeout=SHORT)
    lock.acquire()
    lockfile = Path(lock.lockpath)
    # Someone judged ours stale, broke it and took the lock: another inode in its place.
    other = box.parent / "other"
    other.write_bytes(b"4242:elsewhere")
    os.rename(other, lockfile)
    lock.release()
    assert lockfile.read_bytes() == b"4242:elsewhere"
    assert not lock.held


def test_release_after_our_lock_vanished(box: Path) -> None:
    lock = DotLock(str(box), HOST, timeout=SHORT)
    lock.acquire()
    os.unlink(lock.lockpath)
    lock.release()
    assert not lock.held and not Path(lock.lockpath).exists()


def test_refresh_touches_the_lock(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = DotLock(str(box), HOST, timeout=SHORT)
    lockfile = Path(lock.lockpath)
    lock.refresh(force=True)  # not held: nothing to touch, nothing raised
    assert not lockfile.exists()
    lock.acquire()
    try:
        _age(lockfile, 1000)
        old = lockfile.stat().st_mtime
        lock.refresh()  # just acquired: within REFRESH_EVERY, left alone
        assert lockfile.stat().st_mtime == old
        lock.refresh(force=True)
        assert lockfile.stat().st_mtime > old + 500
        _age(lockfile, 1000)
        monkeypatch.setattr(locking, "REFRESH_EVERY", 0.0)
        lock.refresh()
        assert lockfile.stat().st_mtime > old + 500
    finally:
        lock.release()


def test_refresh_keeps_an_old_mailbox_lock_from_being_broken(box: Path) -> None:
    _age(box, 1000)
    holder = DotLock(str(box), HOST, timeout=SHORT, stale_age=100)
    holder.acquire()
    try:
        _age(Path(holder.lockpath), 1000)
        holder.refresh(force=True)
        other = DotLock(str(box), HOST, timeout=SHORT, stale_age=100, content=b"1:x")
        with pytest.raises(DeliveryError):
            other.acquire()
        assert other.broke == []
    finally:
        holder.release()


def test_cannot_create_the_lock_file(tmp_path: Path) -> None:
    lock = DotLock(str(tmp_path / "missing-dir" / "fred"), HOST, timeout=SHORT)
    with pytest.raises(DeliveryError) as info:
        lock.acquire()
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "cannot create lock file"
    assert not lock.held


def test_default_host_in_content(box: Path) -> None:
    lock = DotLock(str(box), socket.gethostname(), timeout=SHORT)
    lock.acquire()
    try:
        assert Path(lock.lockpath).read_bytes() == f"{os.getpid()}:{socket.gethostname()}".encode()
    finally:
        lock.release()


def test_sleep_steps_are_bounded() -> None:
    steps = [locking._sleep_step(i) for i in range(50)]
    assert steps == sorted(steps)
    assert steps[0] > 0 and max(steps) <= 0.25


def test_pid_alive() -> None:
    assert locking._pid_alive(os.getpid())
    assert locking._pid_alive(1)
    assert not locking._pid_alive(dead_pid())


def test_read_lock_of_odd_files(tmp_path: Path) -> None:
    regular = tmp_path / "r"
    regular.write_bytes(b"x" * 1000)
    assert locking._read_lock(str(regular)) == b"x" * 256
    assert locking._read_lock(str(tmp_path / "missing")) == b""
    assert locking._read_lock(str(tmp_path)) == b""
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    assert locking._read_lock(str(fifo)) == b""
    link = tmp_path / "l"
    link.symlink_to(regular)
    assert locking._read_lock(str(link)) == b""


# -- fcntl ------------------------------------------------------------------------------


@contextmanager
def child_holding(path: Path, kind: int = fcntl.LOCK_EX) -> Iterator[int]:
    """A forked child holding an fcntl lock on path until the block ends; yields its pid."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: lock, say so, wait for the word, exit (which unlocks)
        code = 1
        try:
            os.close(ready_r)
            os.close(go_w)
            fd = os.open(path, os.O_RDWR)
            fcntl.lockf(fd, kind, 0, 0, 0)
            os.write(ready_w, b"L")
            os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        assert os.read(ready_r, 1) == b"L", "the child could not take its lock"
        yield pid
    finally:
        os.close(go_w)  # EOF: the child goes on and exits
        os.close(ready_r)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def boxfd(box: Path) -> Iterator[int]:
    fd = os.open(box, os.O_RDWR | os.O_APPEND)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.timeout(20)
def test_fcntl_conflict_with_another_process_times_out(box: Path, boxfd: int) -> None:
    with child_holding(box):
        with pytest.raises(DeliveryError) as info:
            fcntl_lock(boxfd, str(box), SHORT)
        assert info.value.status.dsn == "4.2.0"
        assert f"fcntl lock on {box}" in info.value.status.detail
    fcntl_lock(boxfd, str(box), SHORT)  # the child is gone: free now
    fcntl_unlock(boxfd)


@pytest.mark.timeout(20)
def test_shared_locks_share_and_exclude_writers(box: Path, boxfd: int) -> None:
    with child_holding(box, fcntl.LOCK_SH):
        fcntl_lock(boxfd, str(box), SHORT, write=False)
        fcntl_unlock(boxfd)
        with pytest.raises(DeliveryError) as info:
            fcntl_lock(boxfd, str(box), SHORT, write=True)
        assert info.value.status.dsn == "4.2.0"


@pytest.mark.timeout(20)
def test_our_fcntl_lock_blocks_another_process(box: Path, boxfd: int) -> None:
    fcntl_lock(boxfd, str(box), SHORT)
    assert not child_can_lock(box)
    fcntl_unlock(boxfd)
    assert child_can_lock(box)


def child_can_lock(path: Path) -> bool:
    """Whether another process could take a write lock on path right now."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, 0)
                code = 0
            except OSError:
                code = 1
        finally:
            os._exit(code)
    _pid, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1)
    return code == 0


def test_fcntl_on_a_bad_descriptor(box: Path) -> None:
    fd = os.open(box, os.O_RDWR)
    os.close(fd)
    with pytest.raises(DeliveryError) as info:
        fcntl_lock(fd, str(box), SHORT)
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "cannot lock mailbox"
    fcntl_unlock(fd)  # never raises


def test_fcntl_read_only_descriptor_cannot_take_a_write_lock(box: Path) -> None:
    fd = os.open(box, os.O_RDONLY)
    try:
        with pytest.raises(DeliveryError) as info:
            fcntl_lock(fd, str(box), SHORT)
        assert info.value.status.dsn == "4.3.0"
    finally:
        os.close(fd)
