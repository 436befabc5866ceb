"""The LMTP server's group commit (vdeliver/groupjournal.py): concurrent mbox appends share one
sync of the group journal, and whatever a killed server leaves in it is recovered exactly by
the next vdeliver, `vdeliver --repair` or server start.

Kills: as in tests/faultinject.py, the deliveries run in a forked child (as vmail) with the
server's Group switched on, and the child kills itself at each record boundary of the group
path (before and after the slot's pwrite, a torn slot, before and after the group sync, before
the first byte, mid-append, before and after the mbox's fsync, after the idle write).  Then the
real program delivers what was not acknowledged, and the mbox must hold every message once,
byte-correct, with no busy slot left.
"""

from __future__ import annotations

import fcntl
import os
import posix
import random
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import faultinject as fi
from tests.helpers import IS_ROOT, Account, MailRoot, run_vdeliver, toml_lines
from vdeliver import groupjournal, recovery
from vdeliver.config import GROUP_JOURNAL

BUSY = b"vdeliver-slot 1 busy "
IDLE_PREFIX = b"vdeliver-slot 1 idle "


def group_path(root: MailRoot) -> Path:
    return root.vbox / GROUP_JOURNAL


def busy_slots(root: MailRoot) -> list[int]:
    path = group_path(root)
    if not path.exists():
        return []
    data = path.read_bytes()
    return [i for i in range(recovery.GROUP_SLOTS)
            if not data[i * recovery.GROUP_SLOT:].startswith(recovery.SLOT_IDLE)]


def _is_group(fd: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == GROUP_JOURNAL
    except OSError:
        return False


def _patch(name: str, fn: Callable[..., Any]) -> None:
    setattr(os, name, fn)
    setattr(posix, name, fn)


def kill_at_slot_write(state: bytes, k: int | None = None, after: bool = False) -> Callable[[], None]:
    """Die at the pwrite of a slot's busy or idle record: before it, after k bytes, or after it."""

    def patch() -> None:
        real = os.pwrite

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if not (bytes(data[:32]).startswith(b"vdeliver-slot 1 " + state) and _is_group(fd)):
                return real(fd, data, offset)
            if k is not None:
                real(fd, data[:k], offset)
                fi._suicide()
            if not after:
                fi._suicide()
            n = real(fd, data, offset)
            fi._suicide()
            return n

        _patch("pwrite", pwrite)

    return patch


def kill_at_group_sync(after: bool) -> Callable[[], None]:
    def patch() -> None:
        real = os.fdatasync

        def fdatasync(fd: int) -> None:
            hit = _is_group(fd)
            if hit and not after:
                fi._suicide()
            real(fd)
            if hit:
                fi._suicide()

        _patch("fdatasync", fdatasync)

    return patch


POINTS = ("before-slot", "torn-slot", "slot-before-sync", "after-group-sync", "before-write", "mid-write",
          "write-done-before-fsync", "after-mbox-fsync", "after-idle")


def point_patch(point: str, rng: random.Random, record_len: int) -> Callable[[], None]:
    if point == "before-slot":
        return kill_at_slot_write(b"busy")
    if point == "torn-slot":
        return kill_at_slot_write(b"busy", k=rng.randint(1, recovery.GROUP_SLOT - 1))
    if point == "slot-before-sync":
        return kill_at_group_sync(after=False)
    if point == "after-group-sync":
        return kill_at_group_sync(after=True)
    if point == "after-idle":
        return kill_at_slot_write(b"idle", after=True)
    return fi.mbox_patch(point, rng, record_len)


def deliver_grouped(root: MailRoot, account: Account, msgs: list[tuple[str, bytes]], patch: Callable[[], None],
                    acked: Path) -> str:
    """In a forked child (as vmail), like the server: deliver.GROUP on, one thread per message
    (user, message), all started together; each acknowledged message's index goes to `acked`."""

    def run() -> None:
        from vdeliver import config, deliver, recipient

        cfg = config.load(str(root.config))
        deliver.GROUP[:] = [groupjournal.Group(config.group_journal(cfg), 10)]
        fds = [fi._stdin_fd(m) for _u, m in msgs]
        patch()
        go = threading.Barrier(len(msgs))

        def one(i: int) -> None:
            go.wait(10)
            deliver.deliver(cfg, recipient.parse(fi.DOMAIN, msgs[i][0]), fds[i], fi.SENDER)
            with open(acked, "a") as f:
                f.write(f"{i}\n")
                f.flush()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(msgs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    return fi.in_child(account, run)


@pytest.fixture
def tree(mailroot: MailRoot) -> MailRoot:
    if not IS_ROOT:
        pytest.skip("runs deliveries as the vmail user")
    for user in ("fred", "anna", "bob", "cleo"):
        mailroot.add_mbox(fi.DOMAIN, user)
    # Made as server start makes it (the kill points are those of a delivery, not of its making).
    os.close(recovery.open_journal(str(group_path(mailroot)), True))
    os.chown(group_path(mailroot), mailroot.owner.uid, mailroot.owner.gid)
    return mailroot


def whole_busy_slots(root: MailRoot) -> int:
    data = group_path(root).read_bytes()
    return sum(recovery.parse_slot(data[i * recovery.GROUP_SLOT: (i + 1) * recovery.GROUP_SLOT]) is not None
               for i in range(recovery.GROUP_SLOTS))


def _acked(path: Path) -> set[int]:
    return {int(x) for x in path.read_text().split()} if path.exists() else set()


def _whole_last(mbox: Path, msg: bytes) -> bool:
    records = fi.split_mbox(mbox.read_bytes())
    try:
        return bool(records) and fi.unstore(records[-1]) == msg
    except AssertionError:
        return False


def _named_by_busy_slot(root: MailRoot, mbox: Path) -> bool:
    st_ = os.stat(mbox)
    data = group_path(root).read_bytes()
    for i in range(recovery.GROUP_SLOTS):
        found = recovery.parse_slot(data[i * recovery.GROUP_SLOT: (i + 1) * recovery.GROUP_SLOT])
        if found is not None and (found[0].dev, found[0].ino) == (st_.st_dev, st_.st_ino):
            return True
    return False


def _settle_and_redeliver(root: MailRoot, account: Account, msgs: list[tuple[str, bytes]], acked: set[int],
                          expected: dict[str, list[bytes]], how: str) -> None:
    """Recover (the next CLI delivery, or --repair first), then deliver again what was not
    acknowledged and is not stored whole (a kill after the commit leaves it stored)."""
    if how == "repair":
        boxes = sorted({str(root.vbox / fi.DOMAIN / u) for u, _m in msgs})
        res = run_vdeliver(["--repair", *boxes], config=root.config, as_user=account)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    for i, (user, msg) in enumerate(msgs):
        mbox = root.vbox / fi.DOMAIN / user
        if i not in acked:
            if _whole_last(mbox, msg) and not _named_by_busy_slot(root, mbox):
                pass  # committed (idle written) before the kill, not yet acknowledged: stored
            else:
                res = run_vdeliver(["-f", fi.SENDER, "-a", fi.DOMAIN, "-a", user], msg, config=root.config,
                                   as_user=account)
                assert res.returncode == 0, res.stderr.decode()
        expected[user].append(msg)


@pytest.mark.parametrize("point", POINTS)
def test_killed_group_commit_at_every_record_boundary_is_recovered_by_the_next_cli_delivery(
        tree: MailRoot, vmail: Account, point: str) -> None:
    rng = random.Random(f"{point}-{os.environ.get('VDELIVER_SEED', '1')}")
    users = ["fred", "anna", "bob", "cleo"]
    expected: dict[str, list[bytes]] = {u: [] for u in users}
    rounds = 2 * int(os.environ.get("VDELIVER_SOAK", "1"))
    for r in range(rounds):
        msgs = [(u, fi.make_message(rng, 1000 * r + n, rng.choice((300, 5000, 80000)))) for n, u in enumerate(users)]
        acked_file = tree.base / f"acked-{r}"
        before = {u: (tree.vbox / fi.DOMAIN / u).read_bytes() for u in users}
        outcome = deliver_grouped(tree, vmail, msgs, point_patch(point, rng, len(msgs[0][1])), acked_file)
        assert outcome == "killed", f"{point}: child ended {outcome}"
        for u in users:  # a kill may leave the killed append's bytes; nothing before them changes
            assert (tree.vbox / fi.DOMAIN / u).read_bytes().startswith(before[u])
        acked = _acked(acked_file)
        # The kill landed where it was meant to: between the group sync and the idle write the
        # killed delivery's slot is busy (the other threads may be anywhere).
        if point in ("after-group-sync", "before-write", "mid-write", "write-done-before-fsync", "after-mbox-fsync"):
            assert whole_busy_slots(tree) >= 1, point
        # Every acknowledged message is whole in its mbox before any recovery.
        for i in acked:
            assert msgs[i][1] in fi.unstore(fi.split_mbox((tree.vbox / fi.DOMAIN / msgs[i][0]).read_bytes())[-1]) \
                or any(fi.unstore(rec) == msgs[i][1]
                       for rec in fi.split_mbox((tree.vbox / fi.DOMAIN / msgs[i][0]).read_bytes()))
        _settle_and_redeliver(tree, vmail, msgs, acked, expected, "repair" if point == "after-idle" else "cli")
    for u in users:
        fi.check_mbox(tree.vbox / fi.DOMAIN / u, expected[u])
    assert busy_slots(tree) == [], "a busy slot was left in the group journal"


@pytest.mark.parametrize("point", ["mid-write", "after-mbox-fsync", "after-group-sync"])
def test_killed_group_commit_is_recovered_by_vdeliver_repair(tree: MailRoot, vmail: Account, point: str) -> None:
    rng = random.Random(point)
    users = ["fred", "anna"]
    expected: dict[str, list[bytes]] = {u: [] for u in users}
    msgs = [(u, fi.make_message(rng, n, 20000)) for n, u in enumerate(users)]
    acked_file = tree.base / "acked"
    assert deliver_grouped(tree, vmail, msgs, point_patch(point, rng, 20000), acked_file) == "killed"
    _settle_and_redeliver(tree, vmail, msgs, _acked(acked_file), expected, "repair")
    for u in users:
        fi.check_mbox(tree.vbox / fi.DOMAIN / u, expected[u])
    assert busy_slots(tree) == []


def test_server_start_recovers_every_busy_slot_of_a_killed_server(tree: MailRoot, vmail: Account) -> None:
    """A server killed mid-append: the next server start cuts each partial record (no delivery
    into those mboxes needed) and leaves the group journal idle."""
    rng = random.Random(7)
    users = ["fred", "anna", "bob", "cleo"]
    msgs = [(u, fi.make_message(rng, n, 60000)) for n, u in enumerate(users)]
    assert deliver_grouped(tree, vmail, msgs, fi.kill_at_sync("mbox"), tree.base / "acked") == "killed"
    assert busy_slots(tree), "the kill left no busy slot: the test proves nothing"

    def start() -> None:
        from vdeliver import config
        from vdeliver.lmtp import daemon, settings
        from vdeliver.log import Logger

        cfg = config.load(str(tree.config))
        daemon._start_group(cfg, settings.settings(cfg), Logger("vdeliver-lmtpd", "mail", "stderr"))

    assert fi.in_child(vmail, start) == "ok"
    assert busy_slots(tree) == []
    for u in users:
        fi.check_mbox(tree.vbox / fi.DOMAIN / u, [])


def _flock(slot: int, kind: int) -> bytes:
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, slot * recovery.GROUP_SLOT, recovery.GROUP_SLOT, 0)


def test_cli_never_resets_a_slot_of_a_live_server_process(tree: MailRoot, vmail: Account) -> None:
    """Two live server processes ([lmtp] processes = 2) own their slots: a busy record in one of
    them naming the mbox makes vdeliver and --repair defer (75) and leave the slot as it is;
    once the servers are gone, the next delivery settles it."""
    from tests.test_lmtp_server import Lmtpd, transaction

    server = Lmtpd(tree, None, processes=2, delivery_threads=4, group_commit=True).start()
    try:
        results: list[object] = []

        def client(n: int) -> None:
            c = server.client()
            try:
                results.extend(transaction(c, "s@example.org", [f"{u}@{fi.DOMAIN}" for u in ("fred", "anna")],
                                           b"Subject: %d-%d\r\n\r\nhi\r\n" % (n, k)) for k in range(3))
            finally:
                c.quit()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 18
        journal = group_path(tree)
        fd = os.open(journal, os.O_RDWR)
        try:
            owned = []
            for slot in range(recovery.GROUP_SLOTS):
                try:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(slot, fcntl.F_WRLCK))
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(slot, fcntl.F_UNLCK))
                except OSError:
                    owned.append(slot)
            assert owned, "no slot is held by a live server process"
            mbox = tree.vbox / fi.DOMAIN / "bob"
            st = os.stat(mbox)
            rec = recovery.Record(st.st_dev, st.st_ino, st.st_size, st.st_size + 100, server.proc.pid if server.proc
                                  else 1, b"From x")
            planted = recovery.slot_block(rec, str(mbox))
            os.pwrite(fd, planted, owned[-1] * recovery.GROUP_SLOT)
        finally:
            os.close(fd)
        res = run_vdeliver(["-f", fi.SENDER, "-a", fi.DOMAIN, "-a", "bob"], b"Subject: x\n\nx\n", config=tree.config,
                           as_user=vmail)
        assert res.returncode == 75, res.stderr.decode()
        assert b"not settled yet" in res.stderr
        res = run_vdeliver(["--repair", str(mbox)], config=tree.config, as_user=vmail)
        assert res.returncode == 75
        data = journal.read_bytes()
        assert data[owned[-1] * recovery.GROUP_SLOT:][:recovery.GROUP_SLOT] == planted, "a live owner's slot was reset"
        assert mbox.read_bytes() == b""
    finally:
        server.stop()
    res = run_vdeliver(["-f", fi.SENDER, "-a", fi.DOMAIN, "-a", "bob"], b"Subject: x\n\nx\n", config=tree.config,
                       as_user=vmail)
    assert res.returncode == 0, res.stderr.decode()
    assert busy_slots(tree) == []


def test_concurrent_records_share_one_group_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one sync runs, the records written meanwhile wait for the next one: 8 deliveries,
    the first leads a sync alone, the 7 that join during it share the second."""
    group = groupjournal.Group(str(tmp_path / "group.lock"), 10)
    assert group.open()
    real = os.fdatasync
    entered = threading.Event()
    release = threading.Event()
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    first = threading.Thread(target=group.commit)
    first.start()
    assert entered.wait(10)
    rest = [threading.Thread(target=group.commit) for _ in range(7)]
    for t in rest:
        t.start()
    deadline = threading.Event()
    for _ in range(200):  # until all 7 wait on the condition (no timing assertion: a bounded poll)
        with group.mutex:
            waiting = len(group.cond._waiters)  # type: ignore[attr-defined]
        if waiting == 7:
            break
        deadline.wait(0.05)
    release.set()
    for t in [first, *rest]:
        t.join(10)
    assert len(calls) == 2, calls
    assert group.syncs == 2


def test_group_sync_error_fails_every_record_of_its_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = groupjournal.Group(str(tmp_path / "group.lock"), 10)
    assert group.open()

    def fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(OSError, match="Input/output") as info:
        group.commit()
    assert info.value.errno == 5


def test_slot_record_round_trips_and_a_long_path_falls_back() -> None:
    rec = recovery.Record(2049, 12345, 100, 5000, 77, b"\nFrom a@b Sat Dec  5 20:00:00 2026\n", "boot-1")
    block = recovery.slot_block(rec, "/var/spool/vbox/example.org/fred")
    assert len(block) == recovery.GROUP_SLOT
    found = recovery.parse_slot(block)
    assert found is not None
    got, path = found
    assert (got.dev, got.ino, got.orig, got.end, got.pid, got.head, got.boot) == (
        2049, 12345, 100, 5000, 77, rec.head, "boot-1")
    assert path == "/var/spool/vbox/example.org/fred"
    with pytest.raises(ValueError, match="too long"):
        recovery.slot_block(rec, "/" + "x" * 600)
    torn = block[:300] + bytes(recovery.GROUP_SLOT - 300)
    assert recovery.parse_slot(torn) is None
    assert recovery.parse_slot(recovery.SLOT_IDLE) is None
    assert recovery.SLOT_IDLE.startswith(IDLE_PREFIX)


def test_group_journal_default_path_is_above_the_mbox_domains(tmp_path: Path) -> None:
    from vdeliver import config

    cfg = config.build({"mbox_path": "/var/spool/vbox/{domain}/{user}"})
    assert config.group_journal(cfg) == "/var/spool/vbox/" + GROUP_JOURNAL
    cfg = config.build({"mbox_path": "/var/mail/{user}", "lmtp": {"group_journal": "/var/lib/vdeliver/g.lock"}})
    assert config.group_journal(cfg) == "/var/lib/vdeliver/g.lock"
    cfg = config.build({"mbox_path": "/var/mail/{user}", "lmtp": {"group_journal": "relative"}})
    assert config.group_journal(cfg) == ""


def _layout(tmp: Path, old: bytes, ours: bytes) -> tuple[Path, int]:
    mbox = tmp / "box"
    mbox.write_bytes(old + ours)
    return mbox, len(old)


@settings(max_examples=int(os.environ.get("VDELIVER_HYPOTHESIS", "80")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    junk=st.binary(max_size=3 * recovery.GROUP_SLOT),
    where=st.integers(0, recovery.GROUP_SIZE - 1),
    name_this=st.sampled_from([True, True, True, False]),
    fields=st.tuples(st.integers(0, 400), st.integers(0, 400), st.integers(0, 120)),
    cut_at=st.one_of(st.just(recovery.GROUP_SLOT), st.integers(0, recovery.GROUP_SLOT)),  # whole half the time
)
def test_any_group_journal_bytes_never_raise_nor_cut_someone_elses_data(
        tmp_path_factory: pytest.TempPathFactory, junk: bytes, where: int, name_this: bool,
        fields: tuple[int, int, int], cut_at: int) -> None:
    """Whatever the group journal holds (random bytes, records naming this mbox or not, at any
    offset, cut short), recovery under the mbox's locks raises nothing but DeliveryError, and
    cuts only bytes starting with the head a record names, at its offset, in this file."""
    from vdeliver.errors import DeliveryError

    tmp = tmp_path_factory.mktemp("gj")
    old = b"From someone Sat Dec  5 20:00:00 2026\nSubject: old\n\nold body\n\n"
    ours = b"From x@y Sat Dec  5 20:01:00 2026\nSubject: ours\n\npartial"
    mbox, orig = _layout(tmp, old, ours)
    st_ = os.stat(mbox)
    o, e, h = fields
    rec_orig = orig if o % 2 == 0 else o
    head = (ours if h % 4 else b"From zzz")[: min(h, 96)]
    rec = recovery.Record(st_.st_dev if name_this else st_.st_dev + 1, st_.st_ino, rec_orig,
                          rec_orig + len(head) + e, 1, head)
    block = recovery.slot_block(rec, str(mbox))[:cut_at] if cut_at < recovery.GROUP_SLOT else \
        recovery.slot_block(rec, str(mbox))
    data = bytearray(recovery.SLOT_IDLE * recovery.GROUP_SLOTS)
    data[where: where + len(junk)] = junk
    slot = (where // recovery.GROUP_SLOT) % recovery.GROUP_SLOTS
    data[slot * recovery.GROUP_SLOT: slot * recovery.GROUP_SLOT + len(block)] = block
    journal = tmp / "group.lock"
    journal.write_bytes(bytes(data[: recovery.GROUP_SIZE]))
    journal.chmod(0o600)
    before = mbox.read_bytes()
    fd = os.open(mbox, os.O_RDWR | os.O_APPEND)
    try:
        try:
            recovery.check_group(str(journal), fd, str(mbox), os.fstat(fd), None, True)
        except DeliveryError:
            pass
    finally:
        os.close(fd)
    after = mbox.read_bytes()
    assert before.startswith(after), "recovery added or changed bytes"
    if after != before:
        cut = len(after)
        assert name_this and cut == rec.orig and before[cut:].startswith(rec.head) and cut >= orig, \
            f"cut at {cut}: not a record this journal names"


def test_cli_check_costs_one_open_and_one_pread_without_busy_slots(tree: MailRoot, vmail: Account) -> None:
    """The command line's look into the group journal: with every slot idle it opens the file
    once, reads it once and imports nothing more (vdeliver/groupjournal.py is never opened)."""
    from tests.helpers import install_vdeliver, which

    strace = which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    launcher = install_vdeliver() / "bin" / "vdeliver"
    trace = tree.base / "trace"
    import subprocess

    res = subprocess.run([strace, "-f", "-u", vmail.name, "-o", str(trace), "-e", "trace=openat,pread64",
                          str(launcher), "-c", str(tree.config), "-f", fi.SENDER, "-a", fi.DOMAIN, "-a", "fred"],
                         input=b"Subject: x\n\nx\n", capture_output=True, timeout=60, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "LANG": "C"})
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    lines = trace.read_text().splitlines()
    opens = [line for line in lines if GROUP_JOURNAL in line and "openat" in line]
    assert len(opens) == 1, opens
    fd = opens[0].rsplit("=", 1)[1].strip()
    assert len([line for line in lines if f"pread64({fd}," in line]) == 1
    assert not [line for line in lines if "groupjournal" in line]
    assert (tree.vbox / fi.DOMAIN / "fred").read_bytes().endswith(b"x\n\n")


def test_lmtp_settings_group_commit_keys(tree: MailRoot) -> None:
    from vdeliver import config
    from vdeliver.errors import DeliveryError
    from vdeliver.lmtp import settings

    cfg = config.build({"lmtp": {"group_journal": "relative/path"}})
    with pytest.raises(DeliveryError, match="group_journal"):
        settings.settings(cfg)
    s = settings.settings(config.build({}))
    assert s.group_commit is False and s.group_journal == ""
    assert "group_commit" in "\n".join(toml_lines({"group_commit": False}))


def test_real_server_killed_under_load_then_restarted_keeps_every_acknowledged_message_once(
        tree: MailRoot, vmail: Account) -> None:
    """vdeliver-lmtpd with group commit, 8 clients into 4 mboxes, SIGKILLed (the whole process
    group) while it delivers; started again, it recovers at start: every acknowledged message is
    there once and whole, nothing else but whole unacknowledged ones, no busy slot left."""
    import signal
    import smtplib
    import time

    from tests.test_lmtp_server import Lmtpd

    users = ["fred", "anna", "bob", "cleo"]
    rng = random.Random(int(os.environ.get("VDELIVER_SEED", "5")))
    rounds = 2 * int(os.environ.get("VDELIVER_SOAK", "1"))
    acked: dict[str, list[bytes]] = {u: [] for u in users}
    sent: dict[str, list[bytes]] = {u: [] for u in users}
    lock = threading.Lock()
    for r in range(rounds):
        server = Lmtpd(tree, None, group_commit=True, delivery_threads=8).start()
        stop = threading.Event()

        def client(n: int, server: Lmtpd = server, stop: threading.Event = stop, r: int = r) -> None:
            try:
                c = smtplib.LMTP(str(server.socket), timeout=10)
                c.ehlo("client.test")
                k = 0
                while not stop.is_set():
                    user = users[(n + k) % len(users)]
                    msg = fi.make_message(random.Random(f"{r}-{n}-{k}"), 100000 * r + 1000 * n + k, 3000)
                    with lock:
                        sent[user].append(msg)
                    refused = c.sendmail(fi.SENDER, [f"{user}@{fi.DOMAIN}"], msg)
                    if not refused:
                        with lock:
                            acked[user].append(msg)
                    k += 1
            except (smtplib.SMTPException, OSError):
                pass  # the server was killed

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3 + rng.random() * 0.7)
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(20)
        server.proc = None
        restarted = Lmtpd(tree, None, group_commit=True).start()  # recovers at start
        restarted.stop()
        print(f"round {r}: acknowledged {sum(map(len, acked.values()))};",
              [line.split("group journal: ")[1][-80:] for line in restarted.log().splitlines()
               if "group journal: " in line][-4:])
        assert busy_slots(tree) == [], "server start left a busy slot"
    for u in users:
        data = (tree.vbox / fi.DOMAIN / u).read_bytes()
        stored = [fi.unstore(rec) for rec in fi.split_mbox(data)]
        ids = [fi.message_id(m) for m in stored]
        assert len(ids) == len(set(ids)), f"{u}: a message stored twice"
        known = {fi.message_id(m): m for m in sent[u]}
        for m in stored:  # (LMTP's DATA may not keep empty lines at the very end of a message)
            assert known.get(fi.message_id(m), b"").rstrip(b"\n") == m.rstrip(b"\n"), \
                f"{u}: a record that is not a whole sent message"
        missing = {fi.message_id(m) for m in acked[u]} - set(ids)
        assert not missing, f"{u}: acknowledged messages lost: {missing}"
        assert recovery.state(str(tree.vbox / fi.DOMAIN / u)) in ("none", "idle")


def test_server_start_recovery_stops_at_its_time_limit_and_deliveries_recover_the_rest(
        tree: MailRoot, vmail: Account) -> None:
    """Busy slots of a killed server whose mboxes another process keeps locked: each would cost
    a lock wait at start (min(lock_timeout, 10) s), 40 s for these four, past the start timeout
    of a service manager.  With [lmtp] recovery_time_limit = 2 the server listens after about
    2 s, says how many slots it left, and the next delivery into each mbox recovers its slot."""
    from tests.test_lmtp_server import Lmtpd, transaction

    users = ["fred", "anna", "bob", "cleo"]
    partial = b"From s@example.org  Sat Dec  5 23:00:00 2026\nSubject: cut short\n\n" + b"x" * 300
    gfd = os.open(group_path(tree), os.O_RDWR)
    for slot, u in enumerate(users):  # as a server killed mid-append leaves them (pid 1: not a server)
        box = tree.vbox / fi.DOMAIN / u
        with box.open("ab") as f:
            f.write(partial)
        st_ = os.stat(box)
        rec = recovery.Record(st_.st_dev, st_.st_ino, 0, 5000, 1, partial[:recovery.HEAD])
        os.pwrite(gfd, recovery.slot_block(rec, str(box)), slot * recovery.GROUP_SLOT)
    os.close(gfd)
    assert len(busy_slots(tree)) == 4
    held = []
    for u in users:  # another program (a mail reader, say) holds each mbox's fcntl lock
        fd = os.open(tree.vbox / fi.DOMAIN / u, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        held.append(fd)
    server = Lmtpd(tree, None, group_commit=True, recovery_time_limit=2)  # lock_timeout = 10: 10 s a slot
    try:
        server.start()  # waits 20 s at most for the 220 greeting
        log = server.log()
        assert "[lmtp] recovery_time_limit (2s) reached: " in log, log
        assert len(busy_slots(tree)) == 4
        for fd in held:
            os.close(fd)
        held = []
        with server.client() as c:
            for u in users:
                assert transaction(c, "s@example.org", [f"{u}@{fi.DOMAIN}"])[f"{u}@{fi.DOMAIN}"][0] == 250
        assert busy_slots(tree) == []
        for u in users:  # the killed append was cut: only the new message is there
            data = (tree.vbox / fi.DOMAIN / u).read_bytes()
            assert b"cut short" not in data and data.count(b"\nFrom ") == 0 and data.startswith(b"From s@")
    finally:
        for fd in held:
            os.close(fd)
        server.stop()
