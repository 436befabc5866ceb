"""Fault injection harness: kill -9 vdeliver at many points, then check the mailbox.

Two ways of killing, both without any test hook on the delivery path:

- precise points: the delivery functions run in a forked child (as the vmail user
  when we are root); the child wraps os/module functions it is about to call
  (write of the record at byte k, fsync, link, the journal's records...) with one
  that sends itself SIGKILL.  Only the child is patched; the parent never is.
- external timing: the real `vdeliver` program, run like sendmail runs it, is
  killed after a random delay while its stdin is fed slowly, while a peer holds
  the mailbox lock, or while it writes a large message.

After every kill the same message is delivered again by the real program (as
sendmail does after a failed delivery).  At the end the mailbox must hold every
message exactly once, byte-correct, as read by Python's `mailbox` and procmail's
`formail -s`.

By hand: `python -m tests.faultinject --soak 2000` runs the kill loops longer
(it needs root or the vmail user, like the tests).
"""

from __future__ import annotations

import mailbox
import os
import posix  # the delivery path calls os's functions through posix (vdeliver/fileio.py)
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import IS_ROOT, Account, MailRoot, RunAs, install_vdeliver, run_as, run_vdeliver, which

DOMAIN = "crash.test"
USER = "fred"
SENDER = "alice@example.org"

# -- messages ----------------------------------------------------------------------

_WORDS = (b"mail", b"From", b"box", b"lorem", b"ipsum", b"kill", b"nine", b"fsync", b"journal", b">", b"x" * 70)


def make_message(rng: random.Random, n: int, size: int) -> bytes:
    """A message of about `size` bytes with a unique Message-ID and `From ` body lines."""
    head = (
        f"From: Alice <{SENDER}>\nTo: {USER}@{DOMAIN}\nSubject: message {n}\n"
        f"Message-ID: <m{n}.{rng.getrandbits(32):08x}@fault.test>\n\n"
    ).encode()
    lines = [head]
    total = len(head)
    i = 0
    while total < size:
        i += 1
        if i % 7 == 0:
            line = b"From here on, line %d\n" % i  # must be escaped in an mbox
        else:
            line = b" ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 12))) + b"\n"
        line = line.lstrip(b">")  # '>From ' would not survive mboxo; keep originals exact
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def message_id(msg: bytes) -> str:
    for line in msg.split(b"\n\n", 1)[0].split(b"\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    return ""


# -- reading an mbox back ------------------------------------------------------------


def split_mbox(data: bytes) -> list[bytes]:
    """The records of an mbox written by vdeliver (each ends with its blank line)."""
    if not data:
        return []
    assert data.startswith(b"From "), f"mbox does not start with a From_ line: {data[:60]!r}"
    pieces = data[5:].split(b"\nFrom ")
    return [b"From " + p + b"\n" for p in pieces[:-1]] + [b"From " + pieces[-1]]


def unstore(record: bytes) -> bytes:
    """The original message from a vdeliver record: undo From_, added headers, escaping."""
    assert record.endswith(b"\n\n"), f"record does not end with a blank line: {record[-60:]!r}"
    body = record.split(b"\n", 1)[1][:-1]
    for name in (b"Return-Path:", b"Delivered-To:"):
        if body.startswith(name):
            body = body.split(b"\n", 1)[1]
    return body.replace(b"\n>From ", b"\nFrom ")


def formail_ids(path: Path) -> list[str]:
    formail = which("formail")
    assert formail is not None
    with open(path, "rb") as f:
        # The inner formail reads only the header; cat drains the body so the outer one can write it.
        inner = f"{formail} -c -x Message-ID: ; cat >/dev/null"
        out = subprocess.run([formail, "-s", "/bin/sh", "-c", inner], stdin=f, capture_output=True,
                             check=True, timeout=60).stdout
    return [line.strip().decode() for line in out.splitlines() if line.strip()]


def check_mbox(path: Path, expected: list[bytes]) -> None:
    """The mbox holds exactly `expected`, in order, byte-correct; no journal is left."""
    data = path.read_bytes()
    got = [unstore(r) for r in split_mbox(data)]
    want_ids = [message_id(m) for m in expected]
    got_ids = [message_id(m) for m in got]
    assert got_ids == want_ids, (f"messages differ: missing {set(want_ids) - set(got_ids)}, "
                                 f"extra {set(got_ids) - set(want_ids)}, {len(got_ids)} vs {len(want_ids)}")
    for g, w in zip(got, expected, strict=True):
        assert g == w, f"message {message_id(w)} is not byte-correct"
    box = mailbox.mbox(str(path), create=False)
    try:
        py_ids = [str(m["Message-ID"]).strip() for m in box]
    finally:
        box.close()
    assert py_ids == want_ids, "Python's mailbox module reads other messages"
    if which("formail"):
        assert formail_ids(path) == want_ids, "formail -s reads other messages"
    from vdeliver import recovery

    assert recovery.state(str(path)) in ("none", "idle"), "a busy journal was left behind"
    for name in recovery.companions(str(path))[1:]:
        assert not os.path.lexists(name), f"{name} was left"


def check_maildir(md: Path, expected: list[bytes], maybe: list[bytes]) -> int:
    """new/ holds every expected message once, byte-correct, plus at most copies of `maybe`.

    Returns how many extra (unacknowledged but complete) copies were found.
    """
    want = {message_id(m): m for m in expected}
    extra_ok = {message_id(m): m for m in maybe}
    seen: dict[str, int] = {}
    extra = 0
    for name in os.listdir(md / "new"):
        data = (md / "new" / name).read_bytes()
        body = data
        for hdr in (b"Return-Path:", b"Delivered-To:"):
            if body.startswith(hdr):
                body = body.split(b"\n", 1)[1]
        mid = message_id(body)
        ref = want.get(mid) or extra_ok.get(mid)
        assert ref is not None, f"unknown message in new/: {name}"
        assert body == ref, f"message {mid} in new/{name} is not byte-correct"
        seen[mid] = seen.get(mid, 0) + 1
        if mid not in want or seen[mid] > 1:
            extra += 1
    missing = set(want) - set(seen)
    assert not missing, f"acknowledged messages missing: {missing}"
    return extra


# -- running deliveries ------------------------------------------------------------------


def deliver_cli(root: MailRoot, msg: bytes, as_user: Account) -> subprocess.CompletedProcess[bytes]:
    return run_vdeliver(["-f", SENDER, "-a", DOMAIN, "-a", USER], msg, config=root.config, as_user=as_user)


def _become(account: Account) -> None:
    if IS_ROOT and account.uid != 0:
        os.setgroups([])
        os.setgid(account.gid)
        os.setuid(account.uid)


def _suicide() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def in_child(account: Account, fn: Callable[[], None]) -> str:
    """Run fn in a forked child as account; 'killed', 'ok' or 'error:<code>'."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _become(account)
            fn()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - report through the exit code
            try:
                os.write(2, f"child: {type(exc).__name__}: {exc}\n".encode())
            except OSError:
                pass
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal:{os.WTERMSIG(status)}"
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else f"error:{code}"


def _stdin_fd(msg: bytes) -> int:
    r, w = os.pipe()
    if len(msg) <= 60000:
        os.write(w, msg)
        os.close(w)
        return r
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            view = memoryview(msg)
            while view:
                view = view[os.write(w, view):]
        finally:
            os._exit(0)
    os.close(w)
    return r


def deliver_in_child(root: MailRoot, account: Account, msg: bytes, patch: Callable[[], None]) -> str:
    """vdeliver.deliver.deliver() in a child that first applies `patch` (its kill point)."""

    def run() -> None:
        from vdeliver import config, deliver, recipient

        cfg = config.load(str(root.config))
        rcpt = recipient.parse(DOMAIN, USER)
        fd = _stdin_fd(msg)
        patch()
        deliver.deliver(cfg, rcpt, fd, SENDER)

    return in_child(account, run)


# Kill points inside an mbox append.  Each returns a patch for the child.
def kill_at_record_byte(k: int, module: str = "mbox") -> Callable[[], None]:
    """Write exactly k bytes of the record (mbox: separator included), then die."""

    def patch() -> None:
        import importlib

        # Any: the patch replaces a module attribute, which ModuleType does not declare.
        target: Any = importlib.import_module(f"vdeliver.{module}")
        real = target.write_all
        state = {"left": k}

        def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
            view = memoryview(data)
            if len(view) >= state["left"]:
                real(fd, view[: state["left"]])
                _suicide()
            state["left"] -= len(view)
            real(fd, view)

        target.write_all = write_all

    return patch


def kill_at_fsync(n: int, after: bool = False) -> Callable[[], None]:
    """Die at the n-th fsync of the delivery, before or after it (Maildir: 0 is the file's)."""

    def patch() -> None:
        real = os.fsync
        state = {"n": 0}

        def fsync(fd: int) -> None:
            i = state["n"]
            state["n"] += 1
            if i == n and not after:
                _suicide()
            real(fd)
            if i == n and after:
                _suicide()

        os.fsync = fsync  # type: ignore[assignment]
        posix.fsync = fsync  # type: ignore[assignment]

    return patch


def _fd_kind(fd: int) -> str:
    """What a descriptor of an mbox delivery is: "journal", "dir" or "mbox"."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
    if ".vdeliver-journal" in os.path.basename(target):
        return "journal"
    return "dir" if os.path.isdir(target) else "mbox"


def kill_at_sync(kind: str, call: str = "fsync", after: bool = False) -> Callable[[], None]:
    """Die at the first `call` (fsync or fdatasync) of a descriptor of that kind, before or after it."""

    def patch() -> None:
        real = getattr(os, call)

        def sync(fd: int) -> None:
            hit = _fd_kind(fd) == kind
            if hit and not after:
                _suicide()
            real(fd)
            if hit:
                _suicide()

        setattr(os, call, sync)
        setattr(posix, call, sync)

    return patch


def kill_at_journal_write(state: str, k: int | None = None, after: bool = False) -> Callable[[], None]:
    """Die at the pwrite of the journal's busy or idle record: before it, after its first k
    bytes (a torn record), or after it."""
    prefix = f"vdeliver-journal 3 {state} ".encode()

    def patch() -> None:
        real = os.pwrite

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if not (bytes(data).startswith(prefix) and _fd_kind(fd) == "journal"):
                return real(fd, data, offset)
            if k is not None:
                real(fd, data[:k], offset)
                _suicide()
            if not after:
                _suicide()
            n = real(fd, data, offset)
            _suicide()
            return n

        os.pwrite = pwrite  # type: ignore[assignment]
        posix.pwrite = pwrite  # type: ignore[assignment]

    return patch


def kill_after_idle() -> Callable[[], None]:
    """Die right after the journal went back to idle: the commit, before the exit."""
    return kill_at_journal_write("idle", after=True)


def kill_on_journal_create() -> Callable[[], None]:
    """Die right after the journal file was created, before anything is written to it."""

    def patch() -> None:
        real = os.open

        def opener(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real(path, flags, mode, dir_fd=dir_fd)
            if ".vdeliver-journal" in str(path) and flags & os.O_CREAT:
                _suicide()
            return fd

        os.open = opener  # type: ignore[assignment]
        posix.open = opener  # type: ignore[assignment]

    return patch


def kill_on_ftruncate(after: bool) -> Callable[[], None]:
    """Die during recovery: just before or just after the mbox is cut back."""

    def patch() -> None:
        real = os.ftruncate

        def ftruncate(fd: int, length: int) -> None:
            if not after:
                _suicide()
            real(fd, length)
            _suicide()

        os.ftruncate = ftruncate
        posix.ftruncate = ftruncate

    return patch


# Kill points inside a Maildir delivery (maildir.deliver() called directly).
def maildir_in_child(root: MailRoot, account: Account, msg: bytes, point: str, k: int = 0,
                     spool_threshold: int = 1 << 20) -> str:
    """spool_threshold below the message's size: the record is spooled to an unnamed file on
    the Maildir's file system, which becomes tmp/NAME by a link (no write in maildir.py)."""

    def run() -> None:
        from vdeliver import maildir, message

        fd = _stdin_fd(msg)
        prepared = message.prepare(fd, sender=SENDER, recipient=f"{USER}@{DOMAIN}", mbox=False,
                                   spool_dir=str(root.base / "spool"), spool_threshold=spool_threshold)
        before_link = None
        if point == "write":
            kill_at_record_byte(k, "maildir")()
        elif point == "fsync":
            kill_at_fsync(0)()
        elif point == "link":
            before_link = _suicide
        elif point == "unlink":
            real_link = os.link

            def link(src: str, dst: str, **kw: object) -> None:
                real_link(src, dst, **kw)  # type: ignore[arg-type]
                _suicide()

            os.link = link  # type: ignore[assignment]
            posix.link = link  # type: ignore[assignment]
        maildir.deliver(str(root.home / DOMAIN / USER / "Maildir"), prepared, host="fault.test",
                        before_link=before_link)

    return in_child(account, run)


# -- external timing ------------------------------------------------------------------------


def popen_vdeliver(root: MailRoot, as_user: Account) -> subprocess.Popen[bytes]:
    launcher = install_vdeliver() / "bin" / "vdeliver"
    kwargs: RunAs = {}
    if IS_ROOT and as_user.uid != 0:
        kwargs = run_as(as_user.uid, as_user.gid)
    return subprocess.Popen(
        [str(launcher), "-c", str(root.config), "-f", SENDER, "-a", DOMAIN, "-a", USER],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "LANG": "C"}, cwd="/", **kwargs,
    )


def kill_while_feeding(root: MailRoot, as_user: Account, msg: bytes, rng: random.Random) -> str:
    """Feed part of stdin, pause, SIGKILL: the kill lands during the read of stdin."""
    proc = popen_vdeliver(root, as_user)
    assert proc.stdin is not None
    cut = rng.randint(0, len(msg) - 1)
    try:
        proc.stdin.write(msg[:cut])
        proc.stdin.flush()
    except BrokenPipeError:
        pass
    time.sleep(rng.uniform(0.0, 0.05))
    proc.kill()
    proc.wait()
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    return "killed" if proc.returncode == -signal.SIGKILL else f"exit:{proc.returncode}"


def kill_after_delay(root: MailRoot, as_user: Account, msg: bytes, delay: float) -> str:
    """Give the whole message, SIGKILL `delay` after the start (lands anywhere: read, lock, write, fsync)."""
    import threading

    started = time.monotonic()
    proc = popen_vdeliver(root, as_user)
    assert proc.stdin is not None
    stdin = proc.stdin

    def feed() -> None:
        try:
            stdin.write(msg)
            stdin.close()
        except (BrokenPipeError, ValueError, OSError):
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        proc.wait(timeout=max(0.0, started + delay - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    if proc.returncode is None:
        proc.kill()
    proc.wait()
    feeder.join()
    try:
        stdin.close()
    except (BrokenPipeError, OSError):
        pass
    if proc.returncode == -signal.SIGKILL:
        return "killed"
    return "ok" if proc.returncode == 0 else f"exit:{proc.returncode}"


class FcntlHolder:
    """A process holding a whole-file fcntl write lock on a file, as Dovecot does."""

    def __init__(self, path: Path) -> None:
        code = (
            "import fcntl, os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
            "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
            "sys.stdout.write('locked\\n'); sys.stdout.flush()\n"
            "sys.stdin.read()\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"locked\n"

    def release(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        self.proc.stdout.close()


# -- the soak loop (also used by the tests with small counts) -----------------------------------


class Tally:
    """What the kill loops did, for the table in docs/crash-safety.md."""

    def __init__(self) -> None:
        self.rows: dict[str, list[int]] = {}  # fault -> [runs, killed, completed before the kill]

    def add(self, fault: str, outcome: str) -> None:
        row = self.rows.setdefault(fault, [0, 0, 0])
        row[0] += 1
        if outcome == "killed":
            row[1] += 1
        elif outcome == "ok":
            row[2] += 1

    def report(self) -> str:
        return "\n".join(f"{k}: runs={v[0]} killed={v[1]} finished-first={v[2]}" for k, v in sorted(self.rows.items()))


# Every record boundary of an mbox append.  The first three make the journal (the first
# delivery into an mbox: the loop removes the idle journal before them); the others use it.
MBOX_POINTS = ("journal-create", "journal-create-fsync", "journal-create-dir-fsync",
               "before-record", "torn-record", "record-before-sync", "after-record-sync",
               "before-write", "mid-write", "write-done-before-fsync", "after-mbox-fsync", "after-idle")
COMMITTED_POINTS = ("after-idle",)  # killed after the commit: the message is stored, not delivered again


def mbox_patch(point: str, rng: random.Random, record_len: int) -> Callable[[], None]:
    if point == "journal-create":
        return kill_on_journal_create()
    if point == "journal-create-fsync":
        return kill_at_sync("journal")
    if point == "journal-create-dir-fsync":
        return kill_at_sync("dir")
    if point == "before-record":
        return kill_at_journal_write("busy")
    if point == "torn-record":
        return kill_at_journal_write("busy", k=rng.randint(1, 511))
    if point == "record-before-sync":
        return kill_at_sync("journal", "fdatasync")
    if point == "after-record-sync":
        return kill_at_sync("journal", "fdatasync", after=True)
    if point == "before-write":
        return kill_at_record_byte(0)
    if point == "mid-write":
        return kill_at_record_byte(rng.randint(1, max(1, record_len - 1)))
    if point == "write-done-before-fsync":
        return kill_at_sync("mbox")
    if point == "after-mbox-fsync":
        return kill_at_sync("mbox", after=True)
    if point == "after-idle":
        return kill_after_idle()
    raise ValueError(point)


def mbox_precise_loop(root: MailRoot, account: Account, rng: random.Random, kills: int, tally: Tally,
                      max_size: int = 200_000) -> list[bytes]:
    """kill -9 at precise points, each followed by the real program delivering it again
    (unless the kill came after the commit: then the message is stored and acknowledged
    by nobody, the documented window)."""
    delivered: list[bytes] = []
    mbox = root.vbox / DOMAIN / USER
    from vdeliver import recovery

    journal = Path(recovery.journal_path(str(mbox)))
    for i in range(kills):
        point = MBOX_POINTS[i % len(MBOX_POINTS)]
        size = rng.choice((rng.randint(50, 2000), rng.randint(2000, max_size)))
        msg = make_message(rng, len(delivered) + 100000 * (i + 1), size)
        if point.startswith("journal-create") and journal.exists():
            journal.unlink()  # idle: as before the first delivery into this mbox
        before = mbox.read_bytes()
        outcome = deliver_in_child(root, account, msg, mbox_patch(point, rng, len(msg)))
        tally.add(f"mbox {point}", outcome)
        assert outcome == "killed", f"{point}: child ended {outcome}"
        # The killed delivery's bytes may still be there (that is the fault); the rest is untouched.
        assert mbox.read_bytes()[: len(before)] == before
        if point in COMMITTED_POINTS:
            assert committed(mbox, msg), f"{point}: the message is not stored whole"
        else:
            res = deliver_cli(root, msg, account)
            assert res.returncode == 0, res.stderr.decode()
        delivered.append(msg)
    return delivered


def maildir_precise_loop(root: MailRoot, account: Account, rng: random.Random, kills: int,
                         tally: Tally, spooled: bool = False) -> tuple[list[bytes], list[bytes]]:
    """Returns (acknowledged, killed after the link: complete but unacknowledged).  spooled:
    every record goes through a spool file linked in as tmp/NAME (nothing is written in
    maildir.py, so there is no "write" point: a kill while spooling is a kill while reading)."""
    acked: list[bytes] = []
    linked: list[bytes] = []
    points = ("fsync", "link", "unlink") if spooled else ("write", "fsync", "link", "unlink")
    for i in range(kills):
        point = points[i % len(points)]
        size = rng.randint(2000 if spooled else 50, 100_000)
        msg = make_message(rng, (700000 if spooled else 500000) + i, size)
        outcome = maildir_in_child(root, account, msg, point, rng.randint(0, size),
                                   spool_threshold=1000 if spooled else 1 << 20)
        tally.add(f"maildir {point}{' (spooled)' if spooled else ''}", outcome)
        assert outcome == "killed", f"{point}: child ended {outcome}"
        if point == "unlink":
            linked.append(msg)
        res = deliver_cli(root, msg, account)
        assert res.returncode == 0, res.stderr.decode()
        acked.append(msg)
    return acked, linked


def timing_loop(root: MailRoot, account: Account, rng: random.Random, kills: int, tally: Tally) -> list[bytes]:
    """The real program killed after random delays; returns the acknowledged messages in order.

    "anywhere" kills are timed from the last clean delivery's duration, so they
    land in start-up, reading, locking, writing and fsync alike.
    """
    delivered: list[bytes] = []
    mbox = root.vbox / DOMAIN / USER
    last = 0.2
    for i in range(kills):
        kind = ("stdin", "lock-wait", "anywhere")[i % 3]
        if kind == "anywhere":
            size = rng.choice((rng.randint(5000, 400_000), rng.randint(1_100_000, 3_000_000)))
        else:
            size = rng.choice((rng.randint(100, 5000), rng.randint(5000, 400_000), rng.randint(1_100_000, 3_000_000)))
        msg = make_message(rng, 900000 + i, size)
        if kind == "stdin":
            outcome = kill_while_feeding(root, account, msg, rng)
        elif kind == "lock-wait":
            # A peer holds the fcntl lock (like Dovecot) or the dotlock (like procmail's lockfile).
            if i % 2:
                holder: FcntlHolder | None = FcntlHolder(mbox)
            else:
                holder = None
                lock = Path(str(mbox) + ".lock")
                lock.write_bytes(b"0")
            try:
                outcome = kill_after_delay(root, account, msg, rng.uniform(0.05, 0.4))
            finally:
                if holder is not None:
                    holder.release()
                else:
                    lock.unlink()
        else:
            t0 = time.monotonic()
            outcome = kill_after_delay(root, account, msg, rng.uniform(0.6, 1.02) * last)
            if outcome == "ok":
                last = time.monotonic() - t0
        tally.add(f"cli {kind}", outcome)
        if outcome == "ok":
            delivered.append(msg)  # finished before the kill: acknowledged, sendmail is done with it
            continue
        assert outcome == "killed", outcome
        if _journal_busy(mbox):
            tally.add(f"cli {kind} (killed inside the append)", "killed")
        if committed(mbox, msg):
            # Killed after the journal's reset to idle, in the last microseconds before exit:
            # the message is stored (sendmail, not told, would deliver a second copy).
            tally.add(f"cli {kind} (killed after commit)", "ok")
            delivered.append(msg)
            continue
        started = time.monotonic()
        res = deliver_cli(root, msg, account)
        assert res.returncode == 0, res.stderr.decode()
        if kind == "anywhere":
            last = time.monotonic() - started
        delivered.append(msg)
    return delivered


def _journal_busy(mbox: Path) -> bool:
    from vdeliver import recovery

    return recovery.state(str(mbox)) not in ("none", "idle")


def committed(mbox: Path, msg: bytes) -> bool:
    """The killed delivery had completed: no busy journal, and its message is the last record."""
    if _journal_busy(mbox):
        return False
    records = split_mbox(mbox.read_bytes())
    try:
        return bool(records) and unstore(records[-1]) == msg
    except AssertionError:
        return False


def main(argv: list[str]) -> int:
    import argparse
    import shutil

    from tests.helpers import ensure_vmail, world_tmpdir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--soak", type=int, default=200, help="kills per loop (default 200)")
    parser.add_argument("--seed", type=int, default=None)
    opts = parser.parse_args(argv)
    seed = opts.seed if opts.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    account = ensure_vmail()
    tally = Tally()
    base = world_tmpdir("vdeliver-soak-")
    try:
        root = MailRoot(base, account)
        root.add_mbox(DOMAIN, USER)
        root.add_maildir(DOMAIN, "maildir-unused")
        start = time.monotonic()
        msgs = mbox_precise_loop(root, account, rng, opts.soak, tally)
        msgs += timing_loop(root, account, rng, opts.soak, tally)
        check_mbox(root.vbox / DOMAIN / USER, msgs)
        shutil.rmtree(root.vbox / DOMAIN)
        root.add_maildir(DOMAIN, USER)
        acked, linked = maildir_precise_loop(root, account, rng, opts.soak, tally)
        extra = check_maildir(root.home / DOMAIN / USER / "Maildir", acked, linked)
        print(f"seed {seed}: {len(msgs)} mbox messages correct; maildir: {len(acked)} correct, "
              f"{extra} unacknowledged complete copies; {time.monotonic() - start:.0f}s")
        print(tally.report())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
