"""Crash safety of mbox appends: the journal, recovery's decisions, kill -9 at precise points.

Recovery cases are built by hand (an mbox and a journal as a killed delivery
leaves them, or as another program changes them afterwards) and each decision is
checked; then the delivery functions are killed in forked children at every step
of an append, and the real program delivers the message again.  VDELIVER_SOAK=N
multiplies the kill counts (default: CI sizes).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests import faultinject as fi
from tests.helpers import Account, MailRoot, run_vdeliver
from tests.unit_helpers import RecordingLog
from vdeliver import recovery

SOAK = int(os.environ.get("VDELIVER_SOAK", "1") or "1")


RECORD = b"From alice@example.org  Wed Nov 25 03:53:52 2026\nReturn-Path: <alice@example.org>\nSubject: new\n\nbody\n\n"
OLD = b"From bob@example.org  Tue Nov 24 10:00:00 2026\nSubject: old\n\nold body\n\n"
FOREIGN = b"From carol@example.org  Wed Nov 25 04:00:00 2026\nSubject: procmail\n\nother\n\n"


# The journal format the hand-made cases are written in: the persistent journal (version 3)
# or the one-line file of versions 1 and 2, which is still recovered.  Set by the jfmt fixture.
_FMT = ["persistent"]


@pytest.fixture(params=["persistent", "v2"])
def jfmt(request: pytest.FixtureRequest) -> Iterator[str]:
    _FMT[0] = request.param
    yield request.param
    _FMT[0] = "persistent"


def _journal(mbox: Path) -> Path:
    """Where the hand-made journal goes: an old version's name for the v2 line."""
    return Path(recovery.journal_path(str(mbox), recovery.OLD_SUFFIX if _FMT[0] == "v2" else recovery.SUFFIX))


def _unresolved(mbox: Path) -> Path:
    return Path(recovery.aside_path(str(mbox), recovery.UNRESOLVED))


def _journal_bytes(rec: recovery.Record) -> bytes:
    if _FMT[0] == "v2":
        return rec.line()
    return rec.block() + bytes(recovery.SIZE - recovery.RECLEN)


def _setup(tmp_path: Path, content: bytes, orig: int, end: int, head: bytes, boot: str = "") -> tuple[Path, int]:
    mbox = tmp_path / "fred"
    mbox.write_bytes(content)
    fd = os.open(mbox, os.O_RDWR)
    st = os.fstat(fd)
    rec = recovery.Record(st.st_dev, st.st_ino, orig, end, 4242, head, boot)
    _journal(mbox).write_bytes(_journal_bytes(rec))
    return mbox, fd


def _retired(mbox: Path) -> bool:
    """The journal's record was dealt with: the persistent journal is idle, an old one gone."""
    return recovery.state(str(mbox)) == ("none" if _FMT[0] == "v2" else "idle")


def _recover(mbox: Path, fd: int) -> tuple[str, str, RecordingLog]:
    log = RecordingLog()
    try:
        outcome, text = recovery.recover(fd, str(mbox), os.fstat(fd), log)
    finally:
        os.close(fd)
    return outcome, text, log


def test_no_journal_is_clean(tmp_path: Path) -> None:
    mbox = tmp_path / "fred"
    mbox.write_bytes(OLD)
    fd = os.open(mbox, os.O_RDWR)
    outcome, _text, log = _recover(mbox, fd)
    assert outcome == recovery.CLEAN and not log.lines and mbox.read_bytes() == OLD


@pytest.mark.parametrize("written", [1, 5, 60, len(RECORD) - 1, len(RECORD)])
def test_partial_record_is_cut(tmp_path: Path, jfmt: str, written: int) -> None:
    end = len(OLD) + len(RECORD)
    mbox, fd = _setup(tmp_path, OLD + RECORD[:written], len(OLD), end, RECORD[: recovery.HEAD])
    outcome, text, log = _recover(mbox, fd)
    assert outcome == recovery.CUT
    assert mbox.read_bytes() == OLD
    assert _retired(mbox)
    assert f"cut {written} bytes at offsets {len(OLD)}..{len(OLD) + written}" in text
    assert log.lines and log.lines[0][0] == "warning"


def test_nothing_written_drops_journal(tmp_path: Path, jfmt: str) -> None:
    mbox, fd = _setup(tmp_path, OLD, len(OLD), len(OLD) + len(RECORD), RECORD[: recovery.HEAD])
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.NOTHING and mbox.read_bytes() == OLD and _retired(mbox)


def _torn_blocks() -> list[bytes]:
    """Busy records of the persistent journal cut at a byte over the idle one (a torn write
    by a power loss, at sector or byte granularity), and one with a bit flipped."""
    busy = recovery.Record(1, 2, len(OLD), len(OLD) + len(RECORD), 7, RECORD[:60], "b").block()
    pad = bytes(recovery.SIZE - recovery.RECLEN)
    # Cut after the common prefix "vdeliver-journal 3 " and before the last byte (a newline in both).
    blocks = [busy[:k] + recovery.IDLE[k:] + pad for k in (20, 24, 100, 256, 508, 510)]
    assert busy + pad not in blocks and recovery.IDLE + pad not in blocks
    flipped = bytearray(busy)
    flipped[40] ^= 1
    return [*blocks, bytes(flipped) + pad, bytes(recovery.SIZE), recovery.IDLE[:300]]


@pytest.mark.parametrize("data", [b"", b"vdeliver-journal 1 1 2", b"vdeliver-journal 1 1 2 3 4 5 zz\n", b"vdel",
                                  *_torn_blocks()])
def test_torn_journal_means_no_append(tmp_path: Path, data: bytes) -> None:
    """A record that is not whole (its CRC does not match) was never synced: the append never
    started.  The persistent journal goes back to idle; anything else is removed."""
    mbox = tmp_path / "fred"
    mbox.write_bytes(OLD)
    _journal(mbox).write_bytes(data)
    fd = os.open(mbox, os.O_RDWR)
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.NOTHING and mbox.read_bytes() == OLD
    assert recovery.state(str(mbox)) == ("idle" if len(data) == recovery.SIZE else "none")


@pytest.mark.parametrize("data", [b"garbage\n", b"From x  Wed Nov 25 03:53:52 2026\n\nsomeone's folder\n\n",
                                  b"x" * recovery.SIZE])
def test_a_file_that_is_not_a_journal_is_set_aside_never_deleted(tmp_path: Path, data: bytes) -> None:
    """A file by the journal's name that vdeliver cannot have written (an IMAP user's folder of
    that name, say) is moved aside with its bytes, never reset or removed; the mbox untouched."""
    mbox = tmp_path / "fred"
    mbox.write_bytes(OLD)
    _journal(mbox).write_bytes(data)
    fd = os.open(mbox, os.O_RDWR)
    outcome, text, log = _recover(mbox, fd)
    assert outcome == recovery.UNTRUSTED and mbox.read_bytes() == OLD and "not a vdeliver journal" in text
    assert Path(recovery.aside_path(str(mbox), recovery.UNTRUSTED_SUFFIX)).read_bytes() == data
    assert log.lines[0][0] == "error"


def test_shrunk_by_another_program(tmp_path: Path, jfmt: str) -> None:
    """Dovecot expunged after the crash: the file is shorter than before our append."""
    mbox, fd = _setup(tmp_path, OLD[:20], len(OLD), len(OLD) + len(RECORD), RECORD[: recovery.HEAD])
    outcome, _text, log = _recover(mbox, fd)
    assert outcome == recovery.DROPPED and mbox.read_bytes() == OLD[:20] and not _journal(mbox).exists()
    assert log.lines[0][0] == "warning"


def test_replaced_file_is_not_cut(tmp_path: Path, jfmt: str) -> None:
    mbox, fd = _setup(tmp_path, OLD + RECORD[:30], len(OLD), len(OLD) + len(RECORD), RECORD[: recovery.HEAD])
    os.close(fd)
    line = _journal(mbox).read_bytes()
    new = tmp_path / "fred.new"
    new.write_bytes(OLD + RECORD[:30])
    os.rename(new, mbox)  # same content, another inode: a rewrite by someone else
    _journal(mbox).write_bytes(line)
    fd = os.open(mbox, os.O_RDWR)
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.DROPPED and mbox.read_bytes() == OLD + RECORD[:30]


def test_rewritten_bytes_are_not_cut(tmp_path: Path, jfmt: str) -> None:
    """The size is in range but the bytes at the original end are someone else's."""
    content = OLD + FOREIGN
    mbox, fd = _setup(tmp_path, content, len(OLD), len(OLD) + len(FOREIGN) + 10, b"\0" + RECORD[:50])
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.DROPPED and mbox.read_bytes() == content and _retired(mbox)


def test_foreign_append_after_partial_record_is_kept(tmp_path: Path, jfmt: str) -> None:
    """procmail appended after our cut-off record (size still within our range)."""
    content = OLD + RECORD[:70] + FOREIGN
    end = len(OLD) + len(RECORD) + len(FOREIGN) + 100
    mbox, fd = _setup(tmp_path, content, len(OLD), end, RECORD[:60])
    outcome, text, log = _recover(mbox, fd)
    assert outcome == recovery.UNRESOLVED_STATE
    assert mbox.read_bytes() == content
    assert not _journal(mbox).exists()  # set aside; the next delivery makes a new one
    assert _unresolved(mbox).exists()
    assert log.lines[0][0] == "error" and f"offset {len(OLD) + 70}" in text


def test_foreign_append_mid_line_is_recognised(tmp_path: Path, jfmt: str) -> None:
    content = OLD + RECORD[:75] + FOREIGN  # RECORD[:75] ends mid-line
    assert not RECORD[:75].endswith(b"\n")
    mbox, fd = _setup(tmp_path, content, len(OLD), len(content) + 5, RECORD[:60])
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.UNRESOLVED_STATE and mbox.read_bytes() == content


def test_foreign_append_beyond_our_end_is_kept(tmp_path: Path, jfmt: str) -> None:
    content = OLD + RECORD[:40] + FOREIGN * 3
    end = len(OLD) + 50
    mbox, fd = _setup(tmp_path, content, len(OLD), end, RECORD[:40])
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.UNRESOLVED_STATE and mbox.read_bytes() == content


def test_escaped_from_lines_in_our_record_are_ours(tmp_path: Path, jfmt: str) -> None:
    record = RECORD[:-1] + b">From the start of time Wed Nov 25 03:53:52 2026\nMore From here\n\n"
    mbox, fd = _setup(tmp_path, OLD + record[:-3], len(OLD), len(OLD) + len(record), record[: recovery.HEAD])
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.CUT and mbox.read_bytes() == OLD


def test_from_line_shape_mid_line_in_our_body_is_not_cut(tmp_path: Path, jfmt: str) -> None:
    """The one false alarm of the mid-line check, on the safe side: nothing is cut, the log says why."""
    record = RECORD[:-1] + b"see: From bob@example.org Wed Nov 25 03:53:52 2026 above\n\n"
    content = OLD + record[:-2]
    mbox, fd = _setup(tmp_path, content, len(OLD), len(OLD) + len(record), record[: recovery.HEAD])
    outcome, _text, log = _recover(mbox, fd)
    assert outcome == recovery.UNRESOLVED_STATE and mbox.read_bytes() == content
    assert log.lines[0][0] == "error"


def test_journal_written_by_begin_parses(tmp_path: Path) -> None:
    from vdeliver.message import Prepared, Spool

    mbox = tmp_path / "fred"
    mbox.write_bytes(OLD)
    spool = Spool(1 << 20, str(tmp_path))
    spool.write(RECORD)
    msg = Prepared(spool, "alice@example.org", len(RECORD), RECORD.count(b"\n"), len(RECORD), False)
    fd = os.open(mbox, os.O_RDWR | os.O_APPEND)
    try:
        j = recovery.MboxJournal()
        j.begin(fd, str(mbox), len(OLD), os.fstat(fd), b"", msg)
        rec = recovery.parse(_journal(mbox).read_bytes())
        assert rec is not None
        assert (rec.orig, rec.end, rec.head) == (len(OLD), len(OLD) + len(RECORD), RECORD[: recovery.HEAD])
        os.write(fd, RECORD[:33])
        assert j.recover(fd, str(mbox), os.fstat(fd)).st_size == len(OLD)
        assert j.outcome == recovery.CUT and _retired(mbox)
    finally:
        os.close(fd)


# -- the real program and --repair ------------------------------------------------------------


@pytest.fixture
def crashroot(mailroot: MailRoot, vmail: Account, vdeliver_install: object) -> MailRoot:
    mailroot.add_mbox(fi.DOMAIN, fi.USER)
    return mailroot


def _plant(root: MailRoot, account: Account, content: bytes, orig: int, end: int, head: bytes,
           old: bool = False) -> Path:
    """The mbox and the busy journal a killed delivery leaves (old: a version 2 journal)."""
    mbox = root.vbox / fi.DOMAIN / fi.USER
    mbox.write_bytes(content)
    st = os.stat(mbox)
    rec = recovery.Record(st.st_dev, st.st_ino, orig, end, 4242, head)
    j = Path(recovery.journal_path(str(mbox), recovery.OLD_SUFFIX if old else recovery.SUFFIX))
    j.write_bytes(rec.line() if old else rec.block() + bytes(recovery.SIZE - recovery.RECLEN))
    os.chown(j, account.uid, account.gid)
    return mbox


def test_next_delivery_cuts_partial_record(crashroot: MailRoot, vmail: Account) -> None:
    first = fi.make_message(random.Random(1), 1, 300)
    assert fi.deliver_cli(crashroot, first, vmail).returncode == 0
    mbox = crashroot.vbox / fi.DOMAIN / fi.USER
    good = mbox.read_bytes()
    _plant(crashroot, vmail, good + RECORD[:57], len(good), len(good) + len(RECORD), RECORD[:57])
    second = fi.make_message(random.Random(2), 2, 300)
    res = fi.deliver_cli(crashroot, second, vmail)
    assert res.returncode == 0, res.stderr
    assert b"mbox recovery:" in res.stderr and b"cut 57 bytes" in res.stderr
    fi.check_mbox(mbox, [first, second])


def test_the_journal_is_one_block_of_the_vmail_user_kept_idle(crashroot: MailRoot, vmail: Account) -> None:
    """The real program leaves beside the mbox one journal: 4096 bytes, mode 0600, owned by
    the delivering user, idle; the next delivery reuses the same file (same inode)."""
    import stat

    mbox = crashroot.vbox / fi.DOMAIN / fi.USER
    msgs = [fi.make_message(random.Random(7), n, 300) for n in (1, 2)]
    assert fi.deliver_cli(crashroot, msgs[0], vmail).returncode == 0
    jpath = Path(recovery.journal_path(str(mbox)))
    st1 = jpath.lstat()
    assert stat.S_ISREG(st1.st_mode) and stat.S_IMODE(st1.st_mode) == 0o600
    assert (st1.st_uid, st1.st_size, st1.st_nlink) == (vmail.uid, recovery.SIZE, 1)
    assert recovery.state(str(mbox)) == "idle"
    assert fi.deliver_cli(crashroot, msgs[1], vmail).returncode == 0
    assert jpath.lstat().st_ino == st1.st_ino and recovery.state(str(mbox)) == "idle"
    fi.check_mbox(mbox, msgs)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _repair(root: MailRoot, account: Account, *paths: str) -> tuple[int, str]:
    res = run_vdeliver(["--repair", *paths], config=root.config, as_user=account)
    return res.returncode, res.stdout.decode() + res.stderr.decode()


def test_repair_exit_codes(crashroot: MailRoot, vmail: Account) -> None:
    mbox = crashroot.vbox / fi.DOMAIN / fi.USER
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 0 and out.startswith("clean:")
    _plant(crashroot, vmail, OLD + RECORD[:99], len(OLD), len(OLD) + len(RECORD), RECORD[:60])
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 0 and out.startswith("cut:") and mbox.read_bytes() == OLD, out
    assert recovery.state(str(mbox)) == "idle"
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 0 and out.startswith("clean:")
    # An earlier version's journal (its own name, one line) is recovered and removed.
    _plant(crashroot, vmail, OLD + RECORD[:99], len(OLD), len(OLD) + len(RECORD), RECORD[:60], old=True)
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 0 and out.startswith("cut:") and mbox.read_bytes() == OLD, out
    assert not os.path.lexists(recovery.journal_path(str(mbox), recovery.OLD_SUFFIX))
    # Temporary dotlock files of killed processes are tidied away; a live one's are not.
    host = os.uname().nodename
    gone = mbox.parent / f".{mbox.name}.lock.{host}.{_dead_pid()}.abcd1234"
    alive = mbox.parent / f".{mbox.name}.lock.{host}.{os.getpid()}.abcd1234"
    for p in (gone, alive):
        p.write_bytes(b"1:x")
        os.chown(p, vmail.uid, vmail.gid)
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 0 and "removed 1 temporary lock file" in out, out
    assert not gone.exists() and alive.exists()
    alive.unlink()
    # Someone else's message after our partial one: not cut, reported until looked at.
    _plant(crashroot, vmail, OLD + RECORD[:70] + FOREIGN, len(OLD), len(OLD) + 4000, RECORD[:60])
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 75 and out.startswith("unresolved:") and mbox.read_bytes() == OLD + RECORD[:70] + FOREIGN
    code, out = _repair(crashroot, vmail, str(mbox))
    assert code == 75 and "unresolved" in out
    _unresolved(mbox).unlink()
    code, out = _repair(crashroot, vmail, str(mbox), str(mbox) + "-missing")
    assert code == 75 and "clean:" in out and "error:" in out


def test_repair_usage(crashroot: MailRoot, vmail: Account) -> None:
    res = run_vdeliver(["--repair"], config=crashroot.config, as_user=vmail)
    assert res.returncode == 75 and b"--repair needs" in res.stderr
    res = run_vdeliver(["-a", "x", "-a", "y", "stray"], config=crashroot.config, as_user=vmail)
    assert res.returncode == 75 and b"unexpected argument" in res.stderr


# -- kill -9 at precise points -----------------------------------------------------------------


def test_kill_at_every_step_of_an_mbox_append(crashroot: MailRoot, vmail: Account) -> None:
    rng = random.Random(int(os.environ.get("VDELIVER_SEED", "0")) or None)
    tally = fi.Tally()
    kills = 14 * len(fi.MBOX_POINTS) * SOAK
    delivered = fi.mbox_precise_loop(crashroot, vmail, rng, kills, tally)
    fi.check_mbox(crashroot.vbox / fi.DOMAIN / fi.USER, delivered)
    print(tally.report())


@pytest.mark.parametrize("after", [False, True])
def test_kill_during_recovery(crashroot: MailRoot, vmail: Account, after: bool) -> None:
    """Recovery killed before or after its ftruncate: the next one still ends right."""
    rng = random.Random(3)
    expected = [fi.make_message(rng, 1, 500)]
    assert fi.deliver_cli(crashroot, expected[0], vmail).returncode == 0
    mbox = crashroot.vbox / fi.DOMAIN / fi.USER
    for i in range(5):
        msg = fi.make_message(rng, 10 + i, rng.randint(100, 50_000))
        assert fi.deliver_in_child(crashroot, vmail, msg, fi.kill_at_record_byte(rng.randint(1, len(msg)))) == "killed"
        assert recovery.state(str(mbox)) == "busy"
        other = fi.make_message(rng, 100 + i, 300)
        assert fi.deliver_in_child(crashroot, vmail, other, fi.kill_on_ftruncate(after)) == "killed"
        assert recovery.state(str(mbox)) == "busy"
        res = fi.deliver_cli(crashroot, msg, vmail)  # sendmail's retry of the first kill
        assert res.returncode == 0, res.stderr
        expected.append(msg)
        res = fi.deliver_cli(crashroot, other, vmail)  # and of the second
        assert res.returncode == 0, res.stderr
        expected.append(other)
    fi.check_mbox(mbox, expected)


def test_kill_after_commit_keeps_the_message(crashroot: MailRoot, vmail: Account) -> None:
    """Killed after the journal's reset to idle (the commit): the message is whole, the journal idle."""
    msg = fi.make_message(random.Random(4), 1, 2000)
    mbox = crashroot.vbox / fi.DOMAIN / fi.USER
    assert fi.deliver_in_child(crashroot, vmail, msg, fi.kill_after_idle()) == "killed"
    assert recovery.state(str(mbox)) == "idle"
    fi.check_mbox(mbox, [msg])


def test_kill_at_every_step_of_a_maildir_delivery(mailroot: MailRoot, vmail: Account,
                                                  vdeliver_install: object) -> None:
    md = mailroot.add_maildir(fi.DOMAIN, fi.USER)
    rng = random.Random(int(os.environ.get("VDELIVER_SEED", "0")) or None)
    tally = fi.Tally()
    acked, linked = fi.maildir_precise_loop(mailroot, vmail, rng, 60 * SOAK, tally)
    extra = fi.check_maildir(md, acked, linked)
    # Killed between link and unlink: the message is whole in new/ but was never
    # acknowledged; sendmail's retry finds the linked tmp file with the same bytes and
    # finishes that delivery instead of adding a second copy.
    assert linked and extra == 0
    left = os.listdir(md / "tmp")
    assert left  # killed before the unlink: the tmp file is still there
    # The 36-hour sweep removes them (and only old ones).
    from vdeliver import maildir

    fresh = md / "tmp" / "fresh"
    fresh.write_bytes(b"in progress")
    old = time.time() - 37 * 3600
    for name in left:
        os.utime(md / "tmp" / name, (old, old))
    assert maildir.clean_tmp(str(md / "tmp"), 36 * 3600) == len(left)
    assert os.listdir(md / "tmp") == ["fresh"]
    assert fi.check_maildir(md, acked, linked) == extra  # new/ untouched by the sweep
    print(tally.report())


def test_kill_at_every_step_of_a_maildir_delivery_from_a_linked_spool_file(mailroot: MailRoot, vmail: Account,
                                                                          vdeliver_install: object) -> None:
    """A record spooled to an unnamed file on the Maildir's file system is linked in as
    tmp/NAME instead of being copied (a 10 MB message written once): killed at its fsync,
    at the link into new/ or before the tmp/ name goes, the Maildir holds each acknowledged
    message once, and sendmail's retry after a kill past the link adds no second copy."""
    md = mailroot.add_maildir(fi.DOMAIN, fi.USER)
    rng = random.Random(int(os.environ.get("VDELIVER_SEED", "0")) or None)
    tally = fi.Tally()
    acked, linked = fi.maildir_precise_loop(mailroot, vmail, rng, 30 * SOAK, tally, spooled=True)
    assert linked and fi.check_maildir(md, acked, linked) == 0
    print(tally.report())


def test_tmp_sweep_runs_from_deliveries(mailroot: MailRoot, vmail: Account, vdeliver_install: object) -> None:
    """Deliveries sweep tmp/ now and then (about 1 in 32), not every time."""
    md = mailroot.add_maildir(fi.DOMAIN, fi.USER)
    stale = md / "tmp" / "1.M1P1.killed"
    stale.write_bytes(b"partial")
    os.chown(stale, vmail.uid, vmail.gid)
    old = time.time() - 40 * 3600
    os.utime(stale, (old, old))
    rng = random.Random(5)
    n = 0
    while stale.exists() and n < 400:
        n += 1
        msg = fi.make_message(rng, n, 100)
        assert fi.deliver_in_child(mailroot, vmail, msg, lambda: None) == "ok"
    assert not stale.exists()
    assert len(os.listdir(md / "new")) == n


# -- property: recovery never cuts what is not ours ------------------------------------------------


_LINE = st.lists(st.sampled_from([b"word", b" ", b"From ", b">From ", b"x" * 30, b"Wed Nov 25 03:53:52 2026"]),
                 max_size=8).map(b"".join)


def _escaped_body(lines: list[bytes]) -> bytes:
    out = []
    for line in lines:
        if line.startswith(b"From ") or (line.startswith(b">") and line.lstrip(b">").startswith(b"From ")):
            line = b">" + line
        out.append(line + b"\n")
    return b"".join(out)


def test_a_foreign_message_right_after_a_cut_ending_in_gt_is_never_cut(tmp_path: Path, jfmt: str) -> None:
    """Found by hypothesis: our partial record ends with '>' and another program's From_ line
    follows without a newline; the lookbehind took it for one of our escaped body lines and
    recovery cut the other program's message with ours."""
    record = (b"From alice@example.org  Wed Nov 25 03:53:52 2026\nSubject: s\n\n" + b"w" * 120
              + b"\n2026>From x\n" + b"z" * 400 + b"\n\n")  # longer than what follows the cut
    k = record.index(b">From x") + 1  # the cut lands just after the '>'
    content = record[:k] + FOREIGN
    mbox, fd = _setup(tmp_path, content, 0, len(record), record[: recovery.HEAD])
    outcome, _text, _log = _recover(mbox, fd)
    assert mbox.read_bytes() == content
    assert outcome in (recovery.DROPPED, recovery.UNRESOLVED_STATE)


@given(
    old_lines=st.lists(_LINE, max_size=5),
    body_lines=st.lists(_LINE, min_size=1, max_size=40),
    cut=st.floats(min_value=0.0, max_value=1.0),
    foreign_lines=st.one_of(st.none(), st.lists(_LINE, max_size=5)),
    newline_first=st.booleans(),
)
def test_recovery_cuts_only_its_own_partial_record(tmp_path_factory: pytest.TempPathFactory, old_lines: list[bytes],
                                                    body_lines: list[bytes], cut: float,
                                                    foreign_lines: list[bytes] | None, newline_first: bool) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    old = (OLD + _escaped_body(old_lines) + b"\n") if old_lines else b""
    record = b"From alice@example.org  Wed Nov 25 03:53:52 2026\nSubject: s\n\n" + _escaped_body(body_lines) + b"\n"
    k = int(cut * len(record))
    content = old + record[:k]
    foreign = b""
    if foreign_lines is not None:
        foreign = (b"\n" if newline_first else b"") + FOREIGN[:-1] + _escaped_body(foreign_lines) + b"\n"
        content += foreign
    mbox, fd = _setup(tmp, content, len(old), len(old) + len(record), record[: recovery.HEAD])
    outcome, _text, _log = _recover(mbox, fd)
    after = mbox.read_bytes()
    if foreign_lines is None:
        if outcome == recovery.UNRESOLVED_STATE:
            # The safe-side false alarm: our own body holds a From_-shaped string mid-line.
            assert after == content
            assert re.search(rb"[^>\n]>*From \S+ +(Mon|Tue|Wed|Thu|Fri|Sat|Sun) ", record[:k] + foreign)
        else:
            assert after == old
            assert outcome == (recovery.CUT if k else recovery.NOTHING)
    else:
        assert after == content  # another program's message after ours: nothing is cut
        assert outcome in (recovery.DROPPED, recovery.UNRESOLVED_STATE)
    assert recovery.state(str(mbox)) == ("none" if outcome == recovery.UNRESOLVED_STATE else "idle")


# -- Dovecot reads the mailbox after the kills -------------------------------------------------------


def _imap_messages(dc: object, address: str, password: str) -> list[bytes]:
    imap = dc.login(address, password)  # type: ignore[attr-defined]
    try:
        typ, data = imap.select("INBOX")
        assert typ == "OK", data
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK", data
        return [item[1].replace(b"\r\n", b"\n") for item in data if isinstance(item, tuple)]
    finally:
        imap.logout()


@pytest.mark.peers
def test_dovecot_reads_exactly_the_acknowledged_messages(mailroot: MailRoot, vmail: Account,
                                                         vdeliver_install: object) -> None:
    """Kills, then Dovecot reads (and writes its X-UID headers into the mbox), then more
    kills on the file Dovecot changed: IMAP shows every acknowledged message once, intact."""
    from tests.dovecot_harness import Dovecot, bad_log_lines, passwd_file_auth
    from tests.helpers import require_root

    require_root("Dovecot's mail processes switch to the vmail user")
    mailroot.add_mbox(fi.DOMAIN, fi.USER)
    address, password = f"{fi.USER}@{fi.DOMAIN}", "crash-secret"
    passwd = mailroot.base / "passwd"
    passwd.write_text(f"{address}:{password}:{vmail.uid}:{vmail.gid}::{mailroot.home}/{fi.DOMAIN}/{fi.USER}::\n")
    passwd.chmod(0o644)
    rng = random.Random(int(os.environ.get("VDELIVER_SEED", "0")) or None)
    tally = fi.Tally()
    prefix = b"Return-Path: <" + fi.SENDER.encode() + b">\nDelivered-To: " + address.encode() + b"\n"

    def shown(msgs: list[bytes]) -> list[bytes]:
        # Dovecot shows the mbox bytes: body `From ` lines keep their `>` (mboxo).
        return [prefix + m.replace(b"\nFrom ", b"\n>From ") for m in msgs]

    with Dovecot(mailroot, vmail, auth=passwd_file_auth(passwd)) as dc:
        delivered = fi.mbox_precise_loop(mailroot, vmail, rng, 2 * len(fi.MBOX_POINTS) * SOAK, tally, 50_000)
        assert _imap_messages(dc, address, password) == shown(delivered)
        delivered += fi.mbox_precise_loop(mailroot, vmail, rng, 2 * len(fi.MBOX_POINTS) * SOAK, tally, 50_000)
        assert _imap_messages(dc, address, password) == shown(delivered)
        log = dc.log_text()
    assert not bad_log_lines(log), log
    print(tally.report())


def test_foreign_from_line_right_after_our_head(tmp_path: Path, jfmt: str) -> None:
    """Another program's `From ` line starting exactly where our recorded head ends."""
    head = RECORD[: RECORD.index(b"\n", 50) + 1]  # From_ line and Return-Path
    content = OLD + head + FOREIGN
    mbox, fd = _setup(tmp_path, content, len(OLD), len(OLD) + len(RECORD) + len(FOREIGN), head)
    outcome, text, _log = _recover(mbox, fd)
    assert outcome == recovery.UNRESOLVED_STATE and mbox.read_bytes() == content
    assert f"offset {len(OLD) + len(head)}" in text


def test_mbox_journal_off_writes_none_but_still_recovers(mailroot: MailRoot) -> None:
    """mbox_journal = false: no journal is written; one left from before is still honoured."""
    from tests.helpers import mbox_messages
    from vdeliver import recovery

    box = mailroot.add_mbox("away.com", "fred", b"")
    mailroot.write_config(mbox_journal=False)
    done = run_vdeliver(["-a", "away.com", "-a", "fred"], b"Subject: a\n\nx\n", config=mailroot.config,
                        as_user=mailroot.owner)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(recovery.journal_path(str(box)))
    # A partial record from an earlier (journalling) delivery is still cut back.
    good = box.read_bytes()
    partial = b"From x  Wed Nov 25 02:56:49 2026\nSubject: half"
    with open(box, "ab") as f:
        f.write(partial)
    record = recovery.Record(os.stat(box).st_dev, os.stat(box).st_ino, len(good), len(good) + 500, 999999,
                             partial[:40])
    jpath = recovery.journal_path(str(box), recovery.OLD_SUFFIX)  # where versions 1 and 2 wrote it
    with open(jpath, "wb") as f:
        f.write(record.line())
    os.chown(jpath, mailroot.owner.uid, mailroot.owner.gid)
    done = run_vdeliver(["-a", "away.com", "-a", "fred"], b"Subject: b\n\ny\n", config=mailroot.config,
                        as_user=mailroot.owner)
    assert done.returncode == 0, done.stderr
    assert [m.split(b"\n\n", 1)[1] for m in mbox_messages(box)] == [b"x\n", b"y\n"]
    assert not os.path.exists(jpath)


def test_complete_record_from_an_earlier_boot_is_kept(tmp_path: Path, jfmt: str) -> None:
    """After a power loss an unlinked journal may come back: a whole record is kept, not cut."""
    content = OLD + RECORD
    mbox, fd = _setup(tmp_path, content, len(OLD), len(content), RECORD[:40], boot="an-earlier-boot")
    outcome, _text, log = _recover(mbox, fd)
    assert outcome == recovery.KEPT and mbox.read_bytes() == content and _retired(mbox)
    assert log.lines and log.lines[0][0] == "warning"


def test_partial_record_from_an_earlier_boot_is_still_cut(tmp_path: Path, jfmt: str) -> None:
    content = OLD + RECORD[:30]
    mbox, fd = _setup(tmp_path, content, len(OLD), len(OLD) + len(RECORD), RECORD[:40], boot="an-earlier-boot")
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.CUT and mbox.read_bytes() == OLD


def test_complete_record_of_this_boot_is_cut(tmp_path: Path, jfmt: str) -> None:
    """Same boot: the journal's removal would be visible had the delivery finished, so the
    whole record was never acknowledged (killed before the exit): cut, sendmail retries."""
    content = OLD + RECORD
    mbox, fd = _setup(tmp_path, content, len(OLD), len(content), RECORD[:40], boot=recovery.boot_id())
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.CUT and mbox.read_bytes() == OLD


def test_version_1_journal_is_still_read(tmp_path: Path, jfmt: str) -> None:
    content = OLD + RECORD
    mbox, fd = _setup(tmp_path, content, len(OLD), len(content), RECORD[:40])
    line = f"vdeliver-journal 1 {os.fstat(fd).st_dev} {os.fstat(fd).st_ino} {len(OLD)} {len(content)} 7 "
    _journal(mbox).write_bytes(line.encode() + RECORD[:40].hex().encode() + b"\n")
    outcome, _text, _log = _recover(mbox, fd)
    assert outcome == recovery.CUT and mbox.read_bytes() == OLD


# -- the persistent journal: arbitrary bytes, and a power loss at any point ---------------------------

ACKED = OLD + FOREIGN  # two acknowledged messages, written by other programs


@st.composite
def _journal_content(draw: st.DrawFn, dev: int, ino: int) -> bytes:
    """Bytes a journal file may hold: anything, or a record (version 3 or 2) with any fields,
    perhaps naming this mailbox and copying its bytes, perhaps torn or with bytes changed."""
    kind = draw(st.sampled_from(["raw", "persistent", "v2", "changed"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=600), st.binary(min_size=recovery.SIZE, max_size=recovery.SIZE)))
    orig = draw(st.one_of(st.sampled_from([0, len(OLD), len(OLD) + 3, len(ACKED)]), st.integers(0, len(ACKED) + 20)))
    end = orig + draw(st.integers(0, 3000))
    copied = ACKED[orig: orig + draw(st.integers(1, recovery.HEAD))]
    head = draw(st.one_of(st.binary(min_size=1, max_size=recovery.HEAD), st.just(copied or b"x")))
    rec = recovery.Record(draw(st.sampled_from([dev, dev, dev + 1])), draw(st.sampled_from([ino, ino, ino + 1, 0])),
                          orig, end, draw(st.integers(0, 1 << 22)), head,
                          draw(st.sampled_from(["", "an-earlier-boot", recovery.boot_id()])))
    if kind == "v2":
        return rec.line()
    data = bytearray(rec.block() + bytes(recovery.SIZE - recovery.RECLEN))
    if kind == "changed":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, recovery.SIZE - 1))] = draw(st.integers(0, 255))
        data = data[: draw(st.sampled_from([recovery.SIZE, recovery.RECLEN, recovery.RECLEN - 1, 100]))]
    return bytes(data)


@given(data=st.data())
def test_a_journal_not_ours_never_cuts_and_raises_only_delivery_errors(tmp_path_factory: pytest.TempPathFactory,
                                                                       data: st.DataObject) -> None:
    """Whatever the journal file holds, recovery cuts only bytes that start with the head its
    record names, at the offset it names, in the file it names; and it fails only with a
    DeliveryError (a status), never a traceback."""
    from vdeliver.errors import DeliveryError

    tmp = tmp_path_factory.mktemp("anyjournal")
    mbox = tmp / "fred"
    mbox.write_bytes(ACKED)
    fd = os.open(mbox, os.O_RDWR)
    st_ = os.fstat(fd)
    content = data.draw(_journal_content(st_.st_dev, st_.st_ino))
    _journal(mbox).write_bytes(content)
    try:
        outcome, _text = recovery.recover(fd, str(mbox), st_)
    except DeliveryError:
        outcome = "error"
    finally:
        os.close(fd)
    event(outcome)
    after = mbox.read_bytes()
    if after != ACKED:
        rec = recovery.parse(content)
        assert outcome == recovery.CUT and rec is not None, outcome
        assert (rec.dev, rec.ino) == (st_.st_dev, st_.st_ino) and after == ACKED[: rec.orig]
        assert ACKED[rec.orig: rec.orig + len(rec.head)] == rec.head, "cut bytes that do not start with its head"
        assert rec.head and b"\nFrom " not in ACKED[rec.orig + len(rec.head) - 1:]
    assert recovery.state(str(mbox)) in ("none", "idle")


def test_idle_record_is_a_sealed_record() -> None:
    """IDLE is spelled out in recovery.py (recognising it costs no import); it must be what
    _seal() makes, so that a journal reset by any version reads as idle."""
    assert recovery._seal(f"{recovery.MAGIC} {recovery.PERSISTENT} idle") == recovery.IDLE
    assert len(recovery.IDLE) == recovery.RECLEN


class _Disk:
    """What each write and sync of a delivery did, to build what a power loss leaves."""

    def __init__(self, box: Path) -> None:
        self.events: list[tuple[str, bytes]] = []  # (what, data): jwrite, jsync, mwrite, msync
        self.box = str(box)

    def _kind(self, fd: int) -> str:
        kind = fi._fd_kind(fd)
        return kind if kind != "mbox" or os.readlink(f"/proc/self/fd/{fd}") == self.box else "other"

    def record(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_pwrite, real_write = os.pwrite, os.write
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            assert self._kind(fd) == "journal" and offset == 0
            self.events.append(("jwrite", bytes(data)))
            return real_pwrite(fd, data, offset)

        def write(fd: int, data: bytes) -> int:
            n = real_write(fd, data)
            if self._kind(fd) == "mbox":
                self.events.append(("mwrite", bytes(memoryview(data)[:n])))
            return n

        def sync(real: object) -> object:
            def call(fd: int) -> None:
                kind = self._kind(fd)
                if kind in ("journal", "mbox"):
                    self.events.append((kind[0] + "sync", b""))
                real(fd)  # type: ignore[operator]
            return call

        import posix  # the delivery path calls os's functions through posix

        for module in (os, posix):
            monkeypatch.setattr(module, "pwrite", pwrite)
            monkeypatch.setattr(module, "write", write)
            monkeypatch.setattr(module, "fsync", sync(real_fsync))
            monkeypatch.setattr(module, "fdatasync", sync(real_fdatasync))

    def states(self, p: int, journal0: bytes, mbox0: bytes) -> list[tuple[bytes, bytes]]:
        """Every (journal, mbox) a power loss after the first p events may leave: what was
        synced, plus any unsynced write (the last journal record whole or torn at a byte;
        any prefix of the unsynced appended bytes)."""
        jsynced, jlatest = journal0, journal0
        msynced = mwritten = mbox0
        for what, data in self.events[:p]:
            if what == "jwrite":
                jlatest = data + journal0[len(data):]
            elif what == "jsync":
                jsynced = jlatest
            elif what == "mwrite":
                mwritten += data
            else:
                msynced = mwritten
        journals = {jsynced, jlatest}
        if jlatest != jsynced:
            journals |= {jlatest[:k] + jsynced[k:] for k in (20, 100, 300, 510)}
        extra = mwritten[len(msynced):]
        boxes = {msynced + extra[:k] for k in (0, 1, len(extra) // 2, len(extra))}
        return [(j, m) for j in sorted(journals) for m in sorted(boxes)]


def test_power_loss_at_any_point_leaves_whole_records_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A power loss after any write or sync of a delivery into an mbox whose journal exists,
    with anything unsynced lost, kept or torn: after the next boot's recovery the mailbox holds
    the old mail and either nothing or the whole new record; once the delivery returned
    (acknowledged), always the whole record."""
    from tests.unit_helpers import prepared
    from vdeliver import mbox as mbox_mod

    box = tmp_path / "fred"
    box.write_bytes(OLD)
    first = prepared(FOREIGN, str(tmp_path))
    mbox_mod.deliver(str(box), first, host="h", journal=recovery.MboxJournal())  # makes the journal
    base, journal0 = box.read_bytes(), _journal(box).read_bytes()
    assert recovery.state(str(box)) == "idle"
    disk = _Disk(box)
    with monkeypatch.context() as m:
        disk.record(m)
        mbox_mod.deliver(str(box), prepared(RECORD, str(tmp_path)), host="h", journal=recovery.MboxJournal())
    whole = box.read_bytes()
    assert whole == base + RECORD
    kinds = [what for what, _ in disk.events]
    assert kinds.count("jsync") + kinds.count("msync") == 2, kinds  # the point of the persistent journal
    assert kinds.index("jsync") < kinds.index("mwrite"), kinds  # the record is durable before the append
    monkeypatch.setattr(recovery, "_BOOT", ["after-the-power-loss"])
    seen = set()
    for p in range(len(disk.events) + 1):
        for journal, content in disk.states(p, journal0, base):
            with open(box, "r+b") as f:  # the same inode, as the disk would have it
                f.truncate(0)
                f.write(content)
            _journal(box).write_bytes(journal)
            fd = os.open(box, os.O_RDWR)
            try:
                outcome, text = recovery.recover(fd, str(box), os.fstat(fd))
            finally:
                os.close(fd)
            after = box.read_bytes()
            assert after in (base, whole), (p, outcome, text)
            if p == len(disk.events):
                assert after == whole, (p, outcome, text)  # acknowledged
            assert recovery.state(str(box)) == "idle"
            seen.add(outcome)
    assert {recovery.CLEAN, recovery.NOTHING, recovery.CUT, recovery.KEPT} <= seen, seen
