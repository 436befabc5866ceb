"""Faults from outside: random kill -9 of the real program, full disks, lock peers, bad paths.

Every test runs the installed `vdeliver` as sendmail would (as vmail when root)
and checks the exit code and what is on disk afterwards: the mailbox holds
exactly the acknowledged messages (Python `mailbox`, `formail -s`), and a failed
delivery changed nothing anywhere.  VDELIVER_SOAK=N multiplies the kill counts.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import faultinject as fi
from tests.helpers import (
    IS_ROOT,
    Account,
    MailRoot,
    RunAs,
    install_vdeliver,
    require,
    require_root,
    run_as,
    world_tmpdir,
)

SOAK = int(os.environ.get("VDELIVER_SOAK", "1") or "1")


def _snapshot(base: Path) -> dict[str, tuple[str, int, str]]:
    """Every file under base (but the spool) with its type, size and hash."""
    out: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        rel = os.path.relpath(dirpath, base)
        if rel == "spool":
            dirnames[:] = []
            continue
        for name in dirnames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, base)] = ("link" if os.path.islink(p) else "dir", 0, "")
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[os.path.relpath(p, base)] = ("link", 0, os.readlink(p))
            else:
                data = Path(p).read_bytes()
                out[os.path.relpath(p, base)] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture
def root(mailroot: MailRoot, vmail: Account, vdeliver_install: object) -> MailRoot:
    mailroot.add_mbox(fi.DOMAIN, fi.USER)
    return mailroot


def _mbox(root: MailRoot) -> Path:
    return root.vbox / fi.DOMAIN / fi.USER


# -- random kill -9 of the real program ------------------------------------------------------------


@pytest.mark.slow
def test_random_kills_of_the_real_program(root: MailRoot, vmail: Account) -> None:
    """Killed during the read of stdin, while waiting for a lock, or anywhere; then delivered again."""
    rng = random.Random(int(os.environ.get("VDELIVER_SEED", "0")) or None)
    tally = fi.Tally()
    delivered = fi.timing_loop(root, vmail, rng, 66 * SOAK, tally)
    fi.check_mbox(_mbox(root), delivered)
    d = root.vbox / fi.DOMAIN
    assert not (d / f"{fi.USER}.lock").exists()
    # A kill between creating the dotlock's unique temporary file and unlinking it
    # leaves that hidden file (harmless: never a lock, never read); count them.
    leftovers = [p.name for p in d.iterdir() if p.name not in (fi.USER, f".{fi.USER}.vdeliver-journal.lock")]
    assert all(name.startswith(f".{fi.USER}.lock.") for name in leftovers), leftovers
    print(tally.report())
    print(f"leftover dotlock temporary files: {len(leftovers)}")


# -- full disk --------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(vmail: Account) -> Iterator[Path]:
    """A 1 MB tmpfs (root, as in CI)."""
    require_root("mounting a small tmpfs")
    mnt = world_tmpdir("vdeliver-full-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def _fill(path: Path, account: Account, leave: int) -> Path:
    """A file taking all the space of path's file system but `leave` bytes."""
    filler = path / "filler"
    st = os.statvfs(path)
    size = max(0, st.f_bavail * st.f_frsize - leave)
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * size)
        except OSError:
            pass
    return filler


def test_full_disk_defers_and_leaves_mbox_identical(small_fs: Path, vmail: Account, vdeliver_install: object) -> None:
    root = MailRoot(small_fs, vmail)
    rng = random.Random(7)
    first = fi.make_message(rng, 1, 2000)
    root.add_mbox(fi.DOMAIN, fi.USER)
    assert fi.deliver_cli(root, first, vmail).returncode == 0
    mbox = _mbox(root)
    big = fi.make_message(rng, 2, 300_000)
    for leave in (0, 4096, 60_000, 200_000):
        filler = _fill(small_fs, vmail, leave)
        before = _snapshot(small_fs)
        res = fi.deliver_cli(root, big, vmail)
        assert res.returncode == 75, (leave, res.stderr)
        assert b"4.3.1 mail system full" in res.stderr or b"No space left" in res.stderr, res.stderr
        assert _snapshot(small_fs) == before, f"something changed with {leave} bytes free"
        filler.unlink()
    res = fi.deliver_cli(root, big, vmail)
    assert res.returncode == 0, res.stderr
    fi.check_mbox(mbox, [first, big])


def test_full_disk_maildir(small_fs: Path, vmail: Account, vdeliver_install: object) -> None:
    root = MailRoot(small_fs, vmail)
    md = root.add_maildir(fi.DOMAIN, fi.USER)
    big = fi.make_message(random.Random(8), 1, 300_000)
    for leave in (0, 100_000):
        filler = _fill(small_fs, vmail, leave)
        before = _snapshot(small_fs)
        res = fi.deliver_cli(root, big, vmail)
        assert res.returncode == 75, res.stderr
        assert _snapshot(small_fs) == before
        filler.unlink()
    assert fi.deliver_cli(root, big, vmail).returncode == 0
    assert fi.check_maildir(md, [big], []) == 0


def test_file_size_limit_defers(root: MailRoot, vmail: Account) -> None:
    """RLIMIT_FSIZE (the unprivileged stand-in for a full disk): EFBIG, 75, mbox identical."""
    rng = random.Random(9)
    first = fi.make_message(rng, 1, 5000)
    assert fi.deliver_cli(root, first, vmail).returncode == 0
    mbox = _mbox(root)
    before = _snapshot(root.base)
    big = fi.make_message(rng, 2, 200_000)
    limit = mbox.stat().st_size + 50_000

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    launcher = install_vdeliver() / "bin" / "vdeliver"
    kwargs: RunAs = {}
    if IS_ROOT:
        kwargs = run_as(vmail.uid, vmail.gid)
    res = subprocess.run(
        [str(launcher), "-c", str(root.config), "-f", fi.SENDER, "-a", fi.DOMAIN, "-a", fi.USER],
        input=big, capture_output=True, preexec_fn=limited, env={"PATH": "/usr/bin:/bin"}, cwd="/",
        timeout=60, **kwargs,
    )
    assert res.returncode == 75, res.stderr
    assert b"mailbox full" in res.stderr
    assert _snapshot(root.base) == before
    assert fi.deliver_cli(root, big, vmail).returncode == 0
    fi.check_mbox(mbox, [first, big])


# -- lock peers ----------------------------------------------------------------------------------------


def _as(account: Account) -> RunAs:
    if IS_ROOT and account.uid != 0:
        return run_as(account.uid, account.gid)
    return {}


def _records(path: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for rec in fi.split_mbox(path.read_bytes()):
        body = fi.unstore(rec)
        mid = fi.message_id(body)
        assert mid not in out, f"{mid} twice"
        out[mid] = body
    return out


def test_procmail_and_vdeliver_at_the_same_time(root: MailRoot, vmail: Account) -> None:
    peers = require("procmail", "formail")
    mbox = _mbox(root)
    rc = root.base / "procmailrc"
    rc.write_text(f"SHELL=/bin/sh\nLOCKTIMEOUT=60\n:0:\n{mbox}\n")
    rc.chmod(0o644)
    rng = random.Random(10)
    msgs: dict[str, bytes] = {}
    procs: list[tuple[subprocess.Popen[bytes], bytes]] = []
    launcher = install_vdeliver() / "bin" / "vdeliver"
    for i in range(12 * SOAK):
        for who in ("procmail", "vdeliver"):
            msg = fi.make_message(rng, i * 2 + (who == "vdeliver"), rng.randint(100, 150_000))
            msgs[fi.message_id(msg)] = msg
            if who == "procmail":
                argv = [peers["procmail"], "-m", str(rc)]
                data = f"From {fi.SENDER}  Wed Nov 25 03:53:52 2026\n".encode() + msg
            else:
                argv = [str(launcher), "-c", str(root.config), "-f", fi.SENDER, "-a", fi.DOMAIN, "-a", fi.USER]
                data = msg
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 cwd=str(root.base), env={"PATH": "/usr/bin:/bin", "HOME": str(root.base)},
                                 **_as(vmail))
            procs.append((p, data))
    for p, data in procs:
        _out, err = p.communicate(data, timeout=120)
        assert p.returncode == 0, err
    got = _records(mbox)
    assert got == msgs
    ids = fi.formail_ids(mbox)
    assert sorted(ids) == sorted(msgs)
    import mailbox

    box = mailbox.mbox(str(mbox), create=False)
    try:
        assert len(box) == len(msgs)
    finally:
        box.close()


def _start(root: MailRoot, account: Account, msgs: list[bytes]) -> list[subprocess.Popen[bytes]]:
    procs = []
    for msg in msgs:
        p = fi.popen_vdeliver(root, account)
        assert p.stdin is not None
        p.stdin.write(msg)
        p.stdin.close()
        procs.append(p)
    return procs


def _wait_blocked(procs: list[subprocess.Popen[bytes]], mbox: Path, before: bytes) -> None:
    time.sleep(0.6)
    assert all(p.poll() is None for p in procs), "a delivery did not wait for the lock"
    assert mbox.read_bytes() == before


def test_lockfile_program_holds_the_dotlock(root: MailRoot, vmail: Account) -> None:
    peers = require("lockfile")
    mbox = _mbox(root)
    lock = Path(str(mbox) + ".lock")
    subprocess.run([peers["lockfile"], "-r0", str(lock)], check=True, **_as(vmail))
    assert lock.exists()
    rng = random.Random(11)
    msgs = [fi.make_message(rng, i, rng.randint(100, 20_000)) for i in range(3)]
    procs = _start(root, vmail, msgs)
    try:
        _wait_blocked(procs, mbox, b"")
    finally:
        lock.unlink()
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert _records(mbox) == {fi.message_id(m): m for m in msgs}


def test_fcntl_lock_holder_like_dovecot(root: MailRoot, vmail: Account) -> None:
    mbox = _mbox(root)
    rng = random.Random(12)
    first = fi.make_message(rng, 0, 1000)
    assert fi.deliver_cli(root, first, vmail).returncode == 0
    before = mbox.read_bytes()
    holder = fi.FcntlHolder(mbox)
    msgs = [fi.make_message(rng, i + 1, rng.randint(100, 20_000)) for i in range(3)]
    try:
        procs = _start(root, vmail, msgs)
        _wait_blocked(procs, mbox, before)
    finally:
        holder.release()
    for p in procs:
        assert p.wait(timeout=60) == 0
    assert _records(mbox) == {fi.message_id(m): m for m in [first, *msgs]}
    assert not Path(str(mbox) + ".lock").exists()


def test_mailbox_replaced_while_waiting_for_the_lock(root: MailRoot, vmail: Account) -> None:
    """A rewriter renames a new file over the mbox while we wait: we deliver into the new one."""
    mbox = _mbox(root)
    holder = fi.FcntlHolder(mbox)
    msg = fi.make_message(random.Random(13), 1, 500)
    try:
        procs = _start(root, vmail, [msg])
        time.sleep(0.4)
        new = mbox.parent / "fred.rewritten"
        new.write_bytes(b"")
        os.chown(new, vmail.uid, vmail.gid)
        new.chmod(0o600)
        os.rename(new, mbox)
    finally:
        holder.release()
    assert procs[0].wait(timeout=60) == 0
    fi.check_mbox(mbox, [msg])


# -- bad paths ------------------------------------------------------------------------------------------


def _deliver_expect(root: MailRoot, account: Account, code: int, text: bytes) -> None:
    before = _snapshot(root.base)
    res = fi.deliver_cli(root, fi.make_message(random.Random(14), 1, 300), account)
    assert res.returncode == code, res.stderr
    assert text in res.stderr, res.stderr
    assert len(res.stderr.split(b"\n")[0]) < 300
    assert _snapshot(root.base) == before, "a failed delivery wrote something"


def test_unwritable_mailbox_directory(root: MailRoot, vmail: Account) -> None:
    d = root.vbox / fi.DOMAIN
    d.chmod(0o555)
    try:
        _deliver_expect(root, vmail, 75, b"cannot create lock file")
    finally:
        d.chmod(0o700)


def test_vanished_directories(root: MailRoot, vmail: Account) -> None:
    _mbox(root).unlink()
    _deliver_expect(root, vmail, 67, b"user unknown")
    shutil.rmtree(root.vbox / fi.DOMAIN)
    shutil.rmtree(root.home / fi.DOMAIN)
    _deliver_expect(root, vmail, 67, b"5.1.2")


def test_mailbox_is_a_symlink_or_hard_link(root: MailRoot, vmail: Account) -> None:
    mbox = _mbox(root)
    victim = root.base / "victim"
    victim.write_bytes(b"keep me\n")
    os.chown(victim, vmail.uid, vmail.gid)
    mbox.unlink()
    mbox.symlink_to(victim)
    _deliver_expect(root, vmail, 75, b"symbolic link")
    mbox.unlink()
    os.link(victim, mbox)
    _deliver_expect(root, vmail, 75, b"more than one link")
    assert victim.read_bytes() == b"keep me\n"


def _swap_symlink(mbox: Path, victim: Path) -> None:
    mbox.unlink()
    mbox.symlink_to(victim)


def _swap_hardlink(mbox: Path, victim: Path) -> None:
    mbox.unlink()
    os.link(victim, mbox)


@pytest.mark.parametrize("swap", [_swap_symlink, _swap_hardlink], ids=["symlink", "hardlink"])
def test_mailbox_swapped_between_check_and_open(root: MailRoot, vmail: Account,
                                                swap: Callable[[Path, Path], None]) -> None:
    """resolve() saw a plain file; before the open it became a link to another file."""
    mbox = _mbox(root)
    victim = root.base / "victim"
    victim.write_bytes(b"keep me\n")
    os.chown(victim, vmail.uid, vmail.gid)
    before_root = None

    def run() -> None:
        from vdeliver import config, deliver, recipient
        from vdeliver.errors import DeliveryError

        cfg = config.load(str(root.config))
        rcpt = recipient.parse(fi.DOMAIN, fi.USER)
        target = deliver.resolve(cfg, rcpt)
        assert target.format == "mbox"
        swap(mbox, victim)
        fd = fi._stdin_fd(fi.make_message(random.Random(15), 1, 300))
        try:
            deliver.deliver(cfg, rcpt, fd, fi.SENDER, target)
        except DeliveryError as exc:
            os.write(2, f"{exc.status.text()}\n".encode())
            os._exit(exc.status.exit_code())

    pid = os.fork()
    if pid == 0:
        try:
            fi._become(vmail)
            run()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 75
    assert victim.read_bytes() == b"keep me\n"
    assert before_root is None
    assert not list((root.vbox / fi.DOMAIN).glob("*.lock")) and not list((root.vbox / fi.DOMAIN).glob(".*"))


def test_file_in_place_of_a_maildir(root: MailRoot, vmail: Account) -> None:
    root.write_config(format="maildir")
    _mbox(root).unlink()
    userdir = root.home / fi.DOMAIN / fi.USER
    userdir.mkdir(mode=0o700)
    os.chown(userdir, vmail.uid, vmail.gid)
    (userdir / "Maildir").write_bytes(b"not a maildir\n")
    os.chown(userdir / "Maildir", vmail.uid, vmail.gid)
    _deliver_expect(root, vmail, 75, b"not a Maildir")


def test_maildir_without_new_or_with_unwritable_tmp(root: MailRoot, vmail: Account) -> None:
    root.write_config(format="maildir")
    _mbox(root).unlink()
    md = root.add_maildir(fi.DOMAIN, fi.USER)
    (md / "tmp").chmod(0o500)
    try:
        _deliver_expect(root, vmail, 75, b"cannot write mailbox")
    finally:
        (md / "tmp").chmod(0o700)
    (md / "new").rmdir()
    (md / "new").write_bytes(b"")
    os.chown(md / "new", vmail.uid, vmail.gid)
    _deliver_expect(root, vmail, 75, b"not a Maildir")
