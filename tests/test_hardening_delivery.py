"""Issue 14 on the delivery command: what a hostile envelope, closed standard streams and a
hostile mail tree must never achieve.  Every test runs the installed vdeliver as the vmail
user, as sendmail does."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DevLog, MailRoot, install_vdeliver, mbox_messages, run_vdeliver

MSG = b"Subject: test\n\nHello\n"


@pytest.fixture
def devlog() -> Iterator[DevLog]:
    log = DevLog()
    try:
        yield log
    finally:
        log.close()


def _printable_lines(text: str) -> None:
    for line in text.splitlines():
        assert line.isascii() and line.isprintable(), repr(line)


@pytest.mark.parametrize("how", ["-f", "From_"])
def test_delivered_message_with_8bit_sender_exits_0_once(mailroot: MailRoot, devlog: DevLog, how: str) -> None:
    """An 8-bit envelope sender made syslog(3) raise after the fsync: exit 75, and a new copy
    on every queue run.  Now: exit 0, one copy, and the line shows the bytes as \\xNN."""
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(log="syslog")
    sender = "j\udce9r\udcf4me\x1b@exa\udcffmple.org"  # bytes e9 f4 1b ff: not UTF-8, one ESC
    if how == "-f":
        args, msg = ["-f", sender, "-a", "away.com", "-a", "fred"], MSG
    else:
        from_line = b"From " + os.fsencode(sender) + b" Wed Nov 25 02:56:49 2026\n"
        args, msg = ["-a", "away.com", "-a", "fred"], from_line + MSG
    for _ in range(3):  # what three queue runs did
        done = run_vdeliver(args, msg, config=mailroot.config, as_user=mailroot.owner)
        assert done.returncode == 0, done.stderr
        if len(mbox_messages(box)) == 1:
            break
    assert len(mbox_messages(box)) == 1
    lines = devlog.lines(wait_for="to=<fred@away.com>")
    if devlog.sock is not None:
        (line,) = [x for x in lines if "to=<fred@away.com>" in x]
        assert "status=sent" in line and "\\xe9" in line and "\\xff" in line and "\x1b" not in line
        _printable_lines(line)


def test_log_fields_cannot_be_forged(mailroot: MailRoot) -> None:
    """On the error path the raw -f value was logged: `a>, status=sent (x` forged a field."""
    mailroot.add_domain("away.com")
    mailroot.write_config(log="stderr")
    forged = "evil>, status=sent (delivered)\x1b[2K"
    done = run_vdeliver(["-f", forged, "-a", "away.com", "-a", "nobody"], MSG, config=mailroot.config,
                        as_user=mailroot.owner)
    assert done.returncode == 67
    text = done.stderr.decode("ascii")
    _printable_lines(text)
    (line,) = [x for x in text.splitlines() if "to=<" in x]
    fields = line.split(": ", 1)[1].split(", ")
    assert [f.split("=", 1)[0] for f in fields] == ["to", "sender", "size", "delay", "dsn", "status"], fields
    assert fields[-1].startswith("status=bounced ")


@pytest.mark.parametrize("closed", [(0,), (1,), (2,), (1, 2), (0, 1, 2)])
@pytest.mark.parametrize("log", ["syslog", "stderr"])
def test_every_run_ends_with_standard_streams_closed(mailroot: MailRoot, devlog: DevLog, closed: tuple[int, ...],
                                                     log: str) -> None:
    """sendmail may run a mailer with a standard stream closed: no AttributeError (exit 1,
    a bounce), no drain of the syslog socket taking fd 0 (a hang).  Without stdin there is
    no message: 75; otherwise the message is delivered once: 0."""
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(log=log)
    launcher = install_vdeliver() / "bin" / "vdeliver"
    argv = [str(launcher), "-c", str(mailroot.config), "-f", "a@b.org", "-a", "away.com", "-a", "fred"]

    def close_them() -> None:
        for fd in closed:
            os.close(fd)

    proc = subprocess.run(argv, input=MSG, capture_output=True, timeout=30, preexec_fn=close_them, cwd="/",
                          env={"PATH": "/usr/bin:/bin"}, user=mailroot.owner.uid, group=mailroot.owner.gid,
                          extra_groups=[])
    if 0 in closed:
        assert proc.returncode == 75, proc
        assert mbox_messages(box) == []
    else:
        assert proc.returncode == 0, proc
        assert len(mbox_messages(box)) == 1
    if 2 not in closed:
        _printable_lines(proc.stderr.decode("ascii"))


def test_maildir_new_swapped_for_a_symlink_never_redirects(tmp_path: Path) -> None:
    """Between the checks and link(), vmail swaps new/ for a symlink: the file still lands in
    the Maildir it was checked in (directory descriptors), never where the link points."""
    from vdeliver import maildir, message

    md = tmp_path / "Maildir"
    for sub in ("", "tmp", "new", "cur"):
        (md / sub).mkdir(mode=0o700)
    outside = tmp_path / "outside"
    outside.mkdir()
    r, w = os.pipe()
    os.write(w, MSG)
    os.close(w)
    prepared = message.prepare(r, sender="a@b.org", recipient="fred@away.com", mbox=False, spool_dir=str(tmp_path))
    os.close(r)

    def swap() -> None:
        (md / "new").rename(md / "new.real")
        (md / "new").symlink_to(outside)

    name = maildir.deliver(str(md), prepared, host="test", before_link=swap)
    assert os.listdir(outside) == []
    assert os.listdir(md / "new.real") == [name]
    assert os.listdir(md / "tmp") == []


@pytest.mark.parametrize("planted", ["mbox.lock", "maildirsize", "journal", "old-journal"])
def test_a_fifo_planted_in_the_mail_tree_never_hangs_delivery(mailroot: MailRoot, planted: str) -> None:
    """A FIFO as the dotlock, as maildirsize or as the crash journal blocked open() for ever.
    Now every run ends: the lock wait times out (75), the quota file and the journal are
    refused or set aside."""
    mailroot.write_config(lock_timeout=2, stale_lock_age=3600)
    if planted == "maildirsize":
        md = mailroot.add_maildir("away.com", "fred")
        fifo = md / "maildirsize"
    else:
        box = mailroot.add_mbox("away.com", "fred")
        names = {"mbox.lock": "fred.lock", "journal": ".fred.vdeliver-journal.lock",
                 "old-journal": ".fred.vdeliver-journal"}
        fifo = box.with_name(names[planted])
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, mailroot.owner.uid, mailroot.owner.gid)
    done = run_vdeliver(["-f", "a@b.org", "-a", "away.com", "-a", "fred"], MSG, config=mailroot.config,
                        as_user=mailroot.owner, timeout=30)
    if planted.endswith("journal"):
        assert done.returncode == 0, done.stderr  # an untrusted journal never blocks delivery
        assert b"not a regular file" in done.stderr
    else:
        assert done.returncode == 75, done.stderr
        assert len(done.stderr.decode("ascii").strip().splitlines()) <= 2


def test_a_stale_lock_that_cannot_be_removed_still_times_out(mailroot: MailRoot) -> None:
    """A stale dotlock that unlink() cannot remove (here: a non-empty directory) made the wait
    loop skip its deadline and spin for ever.  Now it gives up after lock_timeout: 75."""
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(lock_timeout=2, stale_lock_age=1)
    lock = box.with_name("fred.lock")
    lock.mkdir()
    (lock / "x").write_text("x")
    os.utime(lock, (1, 1))
    os.utime(box, (1, 1))
    done = run_vdeliver(["-f", "a@b.org", "-a", "away.com", "-a", "fred"], MSG, config=mailroot.config,
                        as_user=mailroot.owner, timeout=30)
    assert done.returncode == 75, done.stderr
    assert b"mailbox is locked" in done.stderr


# -- item 3: a crash journal is trusted only if we wrote it ------------------------------------

OLD = (b"From a@b  Wed Nov 25 02:56:49 2026\nSubject: one\n\nfirst\n\n"
       b"From a@b  Wed Nov 25 02:57:49 2026\nSubject: two\n\nacknowledged\n\n")


def _forge_journal(box: Path, how: str, owner: tuple[int, int], fmt: str = "persistent") -> Path:
    """A journal that, if trusted, would cut the second (acknowledged) message: the
    persistent journal's busy record, or a version 2 line."""
    from vdeliver import recovery

    st = os.stat(box)
    orig = OLD.index(b"From a@b  Wed Nov 25 02:57")
    head = OLD[orig:orig + recovery.HEAD]
    dev, ino, end = st.st_dev, st.st_ino, len(OLD)
    if how == "wrong-inode":
        ino += 1
    if how == "cut-outside":
        orig, end = len(OLD) + 10, len(OLD) + 200
    rec = recovery.Record(dev, ino, orig, end, 12345, head)
    line = rec.line() if fmt == "v2" else rec.block() + bytes(recovery.SIZE - recovery.RECLEN)
    jpath = Path(recovery.journal_path(str(box), recovery.OLD_SUFFIX if fmt == "v2" else recovery.SUFFIX))
    if how == "symlink":
        target = box.parent / "elsewhere"
        target.write_bytes(line)
        os.chown(target, *owner)
        jpath.symlink_to(target)
        os.lchown(jpath, *owner)
        return jpath
    jpath.write_bytes(line)
    os.chown(jpath, *((0, 0) if how == "other-owner" else owner))
    if how == "hard-link":
        os.link(jpath, box.parent / "second-link")
    return jpath


@pytest.mark.parametrize("fmt", ["persistent", "v2"])
@pytest.mark.parametrize("how", ["other-owner", "hard-link", "symlink", "wrong-inode", "cut-outside"])
def test_forged_crash_journal_never_cuts_and_never_blocks(mailroot: MailRoot, how: str, fmt: str) -> None:
    box = mailroot.add_mbox("away.com", "fred", OLD)
    _forge_journal(box, how, (mailroot.owner.uid, mailroot.owner.gid), fmt)
    other = {"symlink": box.parent / "elsewhere", "hard-link": box.parent / "second-link"}.get(how)
    planted = other.read_bytes() if other else b""
    for _ in range(2):  # and every later delivery goes through too
        done = run_vdeliver(["-f", "x@y.org", "-a", "away.com", "-a", "fred"], MSG, config=mailroot.config,
                            as_user=mailroot.owner)
        assert done.returncode == 0, done.stderr
    data = box.read_bytes()
    assert data.startswith(OLD), "acknowledged mail was cut"
    assert len(mbox_messages(box)) == 4
    from vdeliver import recovery

    assert os.path.lexists(recovery.aside_path(str(box), recovery.UNTRUSTED_SUFFIX))
    # A new journal of our own took its place; the planted file was never written through.
    new = Path(recovery.journal_path(str(box)))
    assert recovery.state(str(box)) == "idle" and not new.is_symlink() and new.stat().st_nlink == 1
    if other:
        assert other.read_bytes() == planted


def test_repair_as_root_never_cuts_with_a_journal_it_did_not_write(mailroot: MailRoot) -> None:
    """--repair switches to the configured user before it looks at a journal, and a journal
    owned by anyone else is set aside, not acted upon."""
    box = mailroot.add_mbox("away.com", "fred", OLD)
    jpath = _forge_journal(box, "other-owner", (mailroot.owner.uid, mailroot.owner.gid))
    done = run_vdeliver(["--repair", str(box)], config=mailroot.config)  # started as root
    assert box.read_bytes() == OLD
    assert done.returncode == 75, done.stderr  # a forged journal needs the administrator's look
    assert b"untrusted" in done.stdout
    from vdeliver import recovery

    assert not os.path.lexists(jpath) and os.path.lexists(recovery.aside_path(str(box), recovery.UNTRUSTED_SUFFIX))


# -- item 4: a mailbox can never be mistaken for a lock -----------------------------------------

RESERVED = ["fred.lock", "FRED.LOCK", "x.vdeliver-journal", "dovecot.index", "dovecot.index.log",
            "dovecot-uidlist", "dovecot-keywords", "maildirsize", "fred.lock.unresolved"]


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_user_names_are_refused_at_delivery(mailroot: MailRoot, name: str) -> None:
    """`fred.lock`'s mbox is fred's dotlock: delivering to it (or breaking it as stale) loses mail."""
    fred = mailroot.add_mbox("away.com", "fred", OLD)
    mailroot.write_config(create_mailbox=True)
    done = run_vdeliver(["-f", "a@b.org", "-a", "away.com", "-a", name], MSG, config=mailroot.config,
                        as_user=mailroot.owner)
    assert done.returncode == 75, done.stderr
    lines = done.stderr.decode().strip().splitlines()
    assert any("reserved" in line for line in lines), lines
    assert fred.read_bytes() == OLD
    assert sorted(os.listdir(fred.parent)) == ["fred"]


@pytest.mark.parametrize("name", RESERVED)
def test_reserved_user_names_are_refused_by_vmailctl(name: str) -> None:
    from vdeliver.accounts import names
    from vdeliver.accounts.errors import InvalidName

    with pytest.raises(InvalidName, match="reserved"):
        names.user(name)
    with pytest.raises(InvalidName, match="reserved"):
        names.address(f"{name}@away.com")


def test_idn_domain_delivers_to_its_idna2008_directory(mailroot: MailRoot) -> None:
    """straße.de is xn--strae-oqa.de (IDNA 2008, UTS 46 non-transitional); IDNA 2003 made it
    strasse.de, somebody else's domain.  Run as sendmail runs it (-IS launcher, as vmail)."""
    mine = mailroot.add_mbox("xn--strae-oqa.de", "fred")
    other = mailroot.add_mbox("strasse.de", "fred")
    done = run_vdeliver(["-f", "a@b.org", "-a", "straße.de", "-a", "fred"], MSG, config=mailroot.config,
                        as_user=mailroot.owner)
    assert done.returncode == 0, done.stderr
    assert len(mbox_messages(mine)) == 1 and other.read_bytes() == b""


# -- item 16: a sender cannot file mail into special-use folders ---------------------------------


def _folder(md: Path, name: str, mailroot: MailRoot) -> Path:
    folder = md / f".{name}"
    for sub in ("", "tmp", "new", "cur"):
        (folder / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(folder / sub, mailroot.owner.uid, mailroot.owner.gid)
    return folder


@pytest.mark.parametrize("detail", ["Trash", "sent", "Drafts", "Junk", "Spam", "Sent Messages", "Trash.old"])
def test_detail_never_files_into_special_use_folders(mailroot: MailRoot, detail: str) -> None:
    md = mailroot.add_maildir("away.com", "fred")
    special = _folder(md, detail, mailroot)
    mailroot.write_config(detail_folders=True)
    done = run_vdeliver(["-f", "a@b.org", "-a", "away.com", "-a", f"fred+{detail}"], MSG, config=mailroot.config,
                        as_user=mailroot.owner)
    if done.returncode == 75:  # a detail with a space is refused as an argument: never filed either
        assert b"invalid character" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert os.listdir(special / "new") == [] and len(os.listdir(md / "new")) == 1


def test_detail_folders_allow_list(mailroot: MailRoot) -> None:
    md = mailroot.add_maildir("away.com", "fred")
    lists, shop = _folder(md, "lists", mailroot), _folder(md, "shop", mailroot)
    mailroot.write_config(detail_folders=True, detail_folders_allow="lists")
    for detail in ("lists", "shop"):
        done = run_vdeliver(["-f", "a@b.org", "-a", "away.com", "-a", f"fred+{detail}"], MSG,
                            config=mailroot.config, as_user=mailroot.owner)
        assert done.returncode == 0, done.stderr
    assert len(os.listdir(lists / "new")) == 1
    assert os.listdir(shop / "new") == [] and len(os.listdir(md / "new")) == 1


# -- the fuzz test: hostile envelopes and header blocks --------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_BYTES = st.binary(min_size=0, max_size=40)
_TEXTISH = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
    _BYTES.map(lambda b: os.fsdecode(b.replace(b"\x00", b""))),  # undecodable bytes as surrogates
    st.sampled_from(["<>", "MAILER-DAEMON", "a>, status=sent (x", "\x1b[31mred", "x" * 600, "@", "<a@b>"]),
)
_HEADER_LINE = st.one_of(
    st.sampled_from([b"Status: RO", b"X-Status: DF", b"X-IMAPbase: 1 2", b"X-UID: 9", b"Content-Length: 1",
                     b"Delivered-To: fred@away.com", b"Subject: hi", b" folded", b"From x", b""]),
    _BYTES.map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(
    sender=_TEXTISH,
    via=st.sampled_from(["-f", "From_", "none"]),
    user=st.one_of(st.sampled_from(["fred", "fred+x", "Fred", "nobody", "fred.lock", "dovecot.index"]), _TEXTISH),
    lines=st.lists(_HEADER_LINE, max_size=8),
    huge=st.sampled_from([0, 0, 0, 300_000, 1_100_000]),
    crlf=st.booleans(),
)
def test_fuzz_hostile_envelopes_and_headers(mailroot: MailRoot, sender: str, via: str, user: str,
                                           lines: list[bytes], huge: int, crlf: bool) -> None:
    """Whatever a remote sender chooses: a defined exit code, one copy per success and none on
    a failure, and every log line one printable line."""
    box = mailroot.vbox / "away.com" / "fred"
    if not box.exists():
        mailroot.add_mbox("away.com", "fred")
        mailroot.write_config(log="stderr", max_message_size=4_000_000)
    before = len(mbox_messages(box))
    end = b"\r\n" if crlf else b"\n"
    head = end.join(lines) + end
    if huge:
        head += (b"X-Pad: " + b"p" * 990 + end) * (huge // 1000) + b"Status: RO" + end
    msg = head + end + b"body" + end
    args = ["-a", "away.com", "-a", user]
    if via == "-f":
        args = ["-f", sender, *args]
    elif via == "From_":
        envelope = os.fsencode(sender).replace(b"\n", b"").replace(b"\x00", b"")
        msg = b"From " + envelope + b" Wed Nov 25 02:56:49 2026\n" + msg
    if "\x00" in user:
        return  # argv cannot carry NUL
    done = run_vdeliver(args, msg, config=mailroot.config, as_user=mailroot.owner, timeout=60)
    assert done.returncode in (0, 67, 69, 73, 75), done
    after = len(mbox_messages(box))
    if done.returncode == 0:
        assert after - before <= 1
    else:
        assert after == before
    text = done.stderr.decode("ascii")  # printable ASCII only: a non-ASCII byte fails here
    for line in text.splitlines():
        assert line.isprintable(), repr(line)
    for stored in mbox_messages(box):  # no mailbox control header in any header block
        block = stored.split(b"\n\n", 1)[0].lower()
        for name in (b"status:", b"x-status:", b"x-imapbase:", b"x-uid:", b"content-length:", b"x-keywords:"):
            assert not block.startswith(name) and b"\n" + name not in block
