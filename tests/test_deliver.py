"""deliver.py in-process: templates, resolve() and its refusals, +detail folders, and
deliver() from a message descriptor to the mailbox bytes, with a Config from
config.build() writing under tmp_path (the end-to-end tests run the real program)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit_helpers import RecordingLog
from vdeliver import config, message, recovery
from vdeliver.config import Config
from vdeliver.deliver import (
    SPECIAL_USE,
    Target,
    deliver,
    detail_folder_allowed,
    domain_dir,
    expand,
    resolve,
)
from vdeliver.errors import DeliveryError
from vdeliver.recipient import Recipient

HOST = "unit.test"
WHEN = 1_764_000_000.0
FRED = Recipient("example.org", "fred")
RAW = b"From: Alice <alice@example.org>\r\nTo: fred@example.org\r\nSubject: hi\r\n\r\nFrom the start\r\nbody\r\n"
OLD = b"From bob@example.org  Tue Nov 24 10:00:00 2026\nSubject: old\n\nold body\n\n"


def make_config(tmp_path: Path, **extra: object) -> Config:
    data: dict[str, object] = {
        "mbox_path": f"{tmp_path}/mbox/{{domain}}/{{user}}",
        "maildir_path": f"{tmp_path}/maildir/{{domain}}/{{user}}/Maildir",
        "spool_dir": str(tmp_path),
        "hostname": HOST,
        "log": "none",
        "lock_timeout": 1,
    }
    data.update(extra)
    return config.build(data)


@pytest.fixture(autouse=True)
def fixed_from_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The From_ line's date is the delivery's time: pin it so records compare exactly."""
    real = message.from_line
    monkeypatch.setattr(message, "from_line", lambda sender, when=None: real(sender, WHEN))


def from_line(sender: str) -> bytes:
    return f"From {sender}  {time.asctime(time.localtime(WHEN))}\n".encode()


def mbox_record(raw: bytes = RAW, sender: str = "alice@example.org", rcpt: str = "fred@example.org") -> bytes:
    body = raw.replace(b"\r\n", b"\n").replace(b"\nFrom ", b"\n>From ")
    return (from_line(sender) + f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode() + body + b"\n")


def maildir_record(raw: bytes = RAW, sender: str = "alice@example.org", rcpt: str = "fred@example.org") -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode() + raw.replace(b"\r\n", b"\n")


@pytest.fixture
def src(tmp_path: Path) -> Iterator[int]:
    p = tmp_path / "message.in"
    p.write_bytes(RAW)
    fd = os.open(p, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def fd_of(tmp_path: Path, data: bytes) -> int:
    p = tmp_path / f"in.{len(os.listdir(tmp_path))}"
    p.write_bytes(data)
    return os.open(p, os.O_RDONLY)


def mbox_of(tmp_path: Path, rcpt: Recipient = FRED, content: bytes = OLD) -> Path:
    p = tmp_path / "mbox" / rcpt.domain / rcpt.user
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content)
    os.chmod(p, 0o600)
    return p


def maildir_of(tmp_path: Path, rcpt: Recipient = FRED) -> Path:
    from vdeliver import maildir

    p = tmp_path / "maildir" / rcpt.domain / rcpt.user / "Maildir"
    maildir.create(str(p))
    return p


def new_files(md: Path) -> list[bytes]:
    return [(md / "new" / n).read_bytes() for n in sorted(os.listdir(md / "new"))]


# -- templates --------------------------------------------------------------------------


def test_expand() -> None:
    assert expand("/var/spool/vbox/{domain}/{user}", FRED) == "/var/spool/vbox/example.org/fred"
    assert expand("/m/{user}@{domain}/{user}", FRED) == "/m/fred@example.org/fred"
    assert expand("/fixed/{user}", Recipient("x.org", "{domain}")) == "/fixed/{domain}"  # one pass


@pytest.mark.parametrize(("template", "expected"), [
    ("/var/spool/vbox/{domain}/{user}", "/var/spool/vbox/example.org"),
    ("/home/vmail-users/{domain}/{user}/Maildir", "/home/vmail-users/example.org"),
    ("/m/{domain}/x{user}y/Maildir", "/m/example.org"),
    ("/m/{user}", "/m"),
    ("/{user}/{domain}", "/"),
    ("/m/{domain}/{domain}-{user}", "/m/example.org"),
    ("/m/{domain}/fixed", "/m/example.org"),  # no {user}: the parent of the path
])
def test_domain_dir(template: str, expected: str) -> None:
    assert domain_dir(template, FRED) == expected


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", ".."))
_PART = st.sampled_from(["{domain}", "{user}", "x{user}", "{user}.d", "Maildir", "spool", "{domain}-{user}"])


@given(domain=_NAME, user=_NAME, parts=st.lists(_PART, min_size=1, max_size=5))
def test_domain_dir_is_a_parent_of_the_mailbox(domain: str, user: str, parts: list[str]) -> None:
    template = "/" + "/".join(parts)
    rcpt = Recipient(domain, user)
    path = expand(template, rcpt)
    ddir = domain_dir(template, rcpt)
    assert ddir == "/" or path.startswith(ddir + "/")
    if "{user}" in template:
        first = next(i for i, p in enumerate(parts) if "{user}" in p)
        assert ddir == "/" + "/".join(expand(p, rcpt) for p in parts[:first])
    else:
        assert ddir == os.path.dirname(path)


# -- resolve ----------------------------------------------------------------------------


def test_resolve_existing_mbox(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    box = mbox_of(tmp_path)
    t = resolve(cfg, FRED)
    assert (t.format, t.path, t.create) == ("mbox", str(box), False)
    assert repr(t) == f"Target('mbox', {str(box)!r}, create=False)"


def test_resolve_existing_maildir(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    md = maildir_of(tmp_path)
    t = resolve(cfg, FRED)
    assert (t.format, t.path, t.create) == ("maildir", str(md), False)


@pytest.mark.parametrize(("fmt", "winner"), [("mbox", "mbox"), ("maildir", "maildir")])
def test_the_default_format_is_probed_first(tmp_path: Path, fmt: str, winner: str) -> None:
    cfg = make_config(tmp_path, format=fmt)
    box = mbox_of(tmp_path)
    md = maildir_of(tmp_path)
    assert resolve(cfg, FRED).path == str(box if winner == "mbox" else md)


def test_a_directory_at_the_mbox_path_is_a_maildir(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    (tmp_path / "mbox" / "example.org" / "fred").mkdir(parents=True)
    t = resolve(cfg, FRED)
    assert (t.format, t.path) == ("maildir", str(tmp_path / "mbox" / "example.org" / "fred"))


def test_unknown_domain(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, create_mailbox=True)
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    status = info.value.status
    assert status.dsn == "5.1.2" and status.reason == "domain unknown" and status.exit_code() == 67
    assert not (tmp_path / "mbox").exists()


@pytest.mark.parametrize("where", ["mbox", "maildir"])
def test_unknown_user_in_an_existing_domain(tmp_path: Path, where: str) -> None:
    (tmp_path / where / "example.org").mkdir(parents=True)
    cfg = make_config(tmp_path)
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    assert info.value.status.dsn == "5.1.1" and info.value.status.reason == "user unknown"


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_create_mailbox_in_an_existing_domain(tmp_path: Path, fmt: str) -> None:
    (tmp_path / fmt / "example.org").mkdir(parents=True)
    cfg = make_config(tmp_path, create_mailbox=True, format=fmt)
    t = resolve(cfg, FRED)
    expected = f"{tmp_path}/mbox/example.org/fred" if fmt == "mbox" else f"{tmp_path}/maildir/example.org/fred/Maildir"
    assert (t.format, t.path, t.create) == (fmt, expected, True)


def test_create_mailbox_needs_the_default_formats_domain_directory(tmp_path: Path) -> None:
    """The domain exists for the other format only: not created there (user unknown)."""
    (tmp_path / "maildir" / "example.org").mkdir(parents=True)
    cfg = make_config(tmp_path, create_mailbox=True, format="mbox")
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    assert info.value.status.dsn == "5.1.1"


def test_symlinked_mailbox_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    real = tmp_path / "elsewhere"
    real.write_bytes(b"")
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    (tmp_path / "mbox" / "example.org" / "fred").symlink_to(real)
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "mailbox is a symbolic link"


def test_fifo_at_the_mbox_path_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    os.mkfifo(tmp_path / "mbox" / "example.org" / "fred")
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    assert info.value.status.reason == "mailbox is not a regular file"


def test_file_at_the_maildir_path_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, format="maildir")
    p = tmp_path / "maildir" / "example.org" / "fred" / "Maildir"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    assert info.value.status.reason == "mailbox is not a Maildir"


def test_a_file_where_the_domain_directory_should_be(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    (tmp_path / "mbox").mkdir()
    (tmp_path / "mbox" / "example.org").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        resolve(cfg, FRED)
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "mailbox path is broken"


# -- +detail folders --------------------------------------------------------------------


@pytest.mark.parametrize(("detail", "allowed"), [
    ("lists", True), ("Lists", True), ("lists.python", True), ("a-b_c", True),
    (".hidden", False), ("a..b", False), ("a/b", False), ("tab\there", False), ("", True),
    ("trash", False), ("Trash", False), ("Trash.old", False), ("sent items", False), ("INBOX", False),
    ("Junk", False), ("spam.x", False), ("trashy", True),
])
def test_detail_folder_allowed_without_a_list(tmp_path: Path, detail: str, allowed: bool) -> None:
    assert detail_folder_allowed(make_config(tmp_path), detail) is allowed


def test_every_special_use_name_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    for name in SPECIAL_USE:
        assert not detail_folder_allowed(cfg, name)
        assert not detail_folder_allowed(cfg, name.upper())


def test_detail_folder_allow_list(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, detail_folders_allow="lists, News  spam")
    assert detail_folder_allowed(cfg, "LISTS") and detail_folder_allowed(cfg, "news")
    assert detail_folder_allowed(cfg, "spam")  # named explicitly: allowed
    assert not detail_folder_allowed(cfg, "other")
    assert not detail_folder_allowed(cfg, "lists.sub")
    assert not detail_folder_allowed(cfg, "../lists")


@given(st.text(max_size=30))
def test_detail_folder_allowed_never_allows_an_escape(detail: str) -> None:
    cfg = Config()
    if detail_folder_allowed(cfg, detail):
        assert "/" not in detail and ".." not in detail and not detail.startswith(".")


def test_resolve_files_into_an_existing_detail_folder(tmp_path: Path) -> None:
    md = maildir_of(tmp_path)
    from vdeliver import maildir

    maildir.create(str(md / ".lists"))
    maildir.create(str(md / ".Trash"))
    (md / ".linked").symlink_to(md / ".lists")
    cfg = make_config(tmp_path, detail_folders=True)
    assert resolve(cfg, Recipient("example.org", "fred", "lists")).path == str(md / ".lists")
    assert resolve(cfg, Recipient("example.org", "fred", "Trash")).path == str(md)  # special use
    assert resolve(cfg, Recipient("example.org", "fred", "missing")).path == str(md)
    assert resolve(cfg, Recipient("example.org", "fred", "linked")).path == str(md)  # a symlink
    off = make_config(tmp_path, detail_folders=False)
    assert resolve(off, Recipient("example.org", "fred", "lists")).path == str(md)


def test_detail_is_ignored_for_an_mbox(tmp_path: Path) -> None:
    box = mbox_of(tmp_path)
    cfg = make_config(tmp_path, detail_folders=True)
    assert resolve(cfg, Recipient("example.org", "fred", "lists")).path == str(box)


# -- deliver ----------------------------------------------------------------------------


def test_deliver_to_an_mbox(tmp_path: Path, src: int) -> None:
    box = mbox_of(tmp_path)
    result = deliver(make_config(tmp_path), FRED, src, "alice@example.org")
    assert box.read_bytes() == OLD + mbox_record()
    assert (result.target.format, result.target.path) == ("mbox", str(box))
    assert (result.size, result.sender, result.notes) == (len(RAW), "alice@example.org", [])
    assert sorted(os.listdir(box.parent)) == [".fred.vdeliver-journal.lock", "fred"]  # no lock
    assert recovery.state(str(box)) == "idle"  # the persistent journal, reused by the next delivery


def test_deliver_to_a_maildir(tmp_path: Path, src: int) -> None:
    md = maildir_of(tmp_path)
    result = deliver(make_config(tmp_path), FRED, src, "<alice@example.org>")
    assert new_files(md) == [maildir_record()]
    assert result.target.format == "maildir" and result.sender == "alice@example.org"
    name = os.listdir(md / "new")[0]
    assert re.search(rf"\.{re.escape(HOST)},S={len(maildir_record())},W=\d+$", name)


def test_deliver_to_a_detail_folder(tmp_path: Path, src: int) -> None:
    md = maildir_of(tmp_path)
    from vdeliver import maildir

    maildir.create(str(md / ".lists"))
    deliver(make_config(tmp_path, detail_folders=True), Recipient("example.org", "fred", "lists"), src, "a@b.c")
    assert new_files(md) == [] and len(new_files(md / ".lists")) == 1


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_deliver_creates_a_mailbox(tmp_path: Path, src: int, fmt: str) -> None:
    (tmp_path / fmt / "example.org").mkdir(parents=True)
    result = deliver(make_config(tmp_path, create_mailbox=True, format=fmt), FRED, src, "alice@example.org")
    assert result.target.create
    if fmt == "mbox":
        box = tmp_path / "mbox" / "example.org" / "fred"
        assert box.read_bytes() == mbox_record()
        assert box.stat().st_mode & 0o777 == 0o600
    else:
        assert new_files(tmp_path / "maildir" / "example.org" / "fred" / "Maildir") == [maildir_record()]


def test_deliver_to_an_explicit_target(tmp_path: Path, src: int) -> None:
    other = tmp_path / "other-box"
    other.write_bytes(b"")
    result = deliver(make_config(tmp_path), FRED, src, "alice@example.org", target=Target("mbox", str(other)))
    assert other.read_bytes() == mbox_record()
    assert result.target.path == str(other)


def test_envelope_sender_from_the_from_line(tmp_path: Path) -> None:
    box = mbox_of(tmp_path, content=b"")
    fd = fd_of(tmp_path, b"From bounce@example.net Mon Jan  5 00:00:00 2026\n" + RAW)
    try:
        result = deliver(make_config(tmp_path), FRED, fd, None)
    finally:
        os.close(fd)
    assert result.sender == "bounce@example.net"
    assert box.read_bytes() == mbox_record(sender="bounce@example.net")


def test_settings_reach_the_record(tmp_path: Path) -> None:
    """mbox_escape, return_path and delivered_to come from the Config."""
    box = mbox_of(tmp_path, content=b"")
    raw = b"Subject: x\n\n>From quoted\nFrom plain\n"
    fd = fd_of(tmp_path, raw)
    cfg = make_config(tmp_path, mbox_escape="mboxrd", return_path=False, delivered_to=False)
    try:
        deliver(cfg, FRED, fd, "alice@example.org")
    finally:
        os.close(fd)
    assert box.read_bytes() == from_line("alice@example.org") + b"Subject: x\n\n>>From quoted\n>From plain\n\n"


def test_a_large_message_goes_through_the_spool_file(tmp_path: Path) -> None:
    box = mbox_of(tmp_path)
    raw = RAW + b"x" * 70 + b"\n" * 3 + b"line\n" * 3000
    fd = fd_of(tmp_path, raw)
    try:
        deliver(make_config(tmp_path, spool_threshold=100), FRED, fd, "alice@example.org")
    finally:
        os.close(fd)
    assert box.read_bytes() == OLD + mbox_record(raw)


def test_mail_loop_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    box = mbox_of(tmp_path)
    fd = fd_of(tmp_path, b"Delivered-To: FRED@example.org\n" + RAW)
    try:
        with pytest.raises(DeliveryError) as info:
            deliver(make_config(tmp_path), FRED, fd, "alice@example.org")
    finally:
        os.close(fd)
    assert info.value.status.dsn == "5.4.6"
    assert box.read_bytes() == OLD


def test_message_too_big(tmp_path: Path, src: int) -> None:
    md = maildir_of(tmp_path)
    with pytest.raises(DeliveryError) as info:
        deliver(make_config(tmp_path, max_message_size=10), FRED, src, "alice@example.org")
    assert info.value.status.dsn == "5.3.4"
    assert new_files(md) == []


def test_unknown_user_stores_nothing(tmp_path: Path, src: int) -> None:
    (tmp_path / "mbox" / "example.org").mkdir(parents=True)
    with pytest.raises(DeliveryError) as info:
        deliver(make_config(tmp_path), FRED, src, "alice@example.org")
    assert info.value.status.dsn == "5.1.1"
    assert os.listdir(tmp_path / "mbox" / "example.org") == []


@pytest.mark.parametrize(("over_quota", "dsn"), [("defer", "4.2.2"), ("bounce", "5.2.2")])
def test_over_quota_setting(tmp_path: Path, src: int, over_quota: str, dsn: str) -> None:
    md = maildir_of(tmp_path)
    (md / "maildirsize").write_bytes(b"10S\n0 0\n")
    with pytest.raises(DeliveryError) as info:
        deliver(make_config(tmp_path, over_quota=over_quota), FRED, src, "alice@example.org")
    assert info.value.status.dsn == dsn
    assert new_files(md) == []


def test_stale_lock_is_reported_in_the_notes(tmp_path: Path, src: int) -> None:
    from tests.test_locking import dead_pid

    box = mbox_of(tmp_path)
    pid = dead_pid()
    Path(f"{box}.lock").write_bytes(f"{pid}:{HOST}".encode())
    result = deliver(make_config(tmp_path), FRED, src, "alice@example.org")
    assert result.notes == [f"{box}.lock (holder pid {pid} is dead)"]
    assert box.read_bytes() == OLD + mbox_record()


# -- the log hears crash recovery --------------------------------------------------------


def _plant_journal(box: Path, orig: int, end: int, head: bytes) -> Path:
    st_ = box.stat()
    rec = recovery.Record(st_.st_dev, st_.st_ino, orig, end, 4242, head)
    jpath = Path(recovery.journal_path(str(box)))
    jpath.write_bytes(rec.line())
    return jpath


def test_log_hears_a_partial_record_being_cut(tmp_path: Path, src: int) -> None:
    left = mbox_record(b"Subject: killed\n\nhalf\n")
    box = mbox_of(tmp_path, content=OLD + left[:40])
    _plant_journal(box, len(OLD), len(OLD) + len(left), left[: recovery.HEAD])
    log = RecordingLog()
    deliver(make_config(tmp_path), FRED, src, "alice@example.org", log=log)
    assert box.read_bytes() == OLD + mbox_record()
    assert recovery.state(str(box)) == "idle"  # the old journal removed, the persistent one made
    assert len(log.lines) == 1
    level, text = log.lines[0]
    assert level == "warning" and text.startswith("mbox recovery: ")
    assert f"cut 40 bytes at offsets {len(OLD)}..{len(OLD) + 40}" in text and "pid 4242" in text


def test_log_hears_an_untrusted_journal(tmp_path: Path, src: int) -> None:
    box = mbox_of(tmp_path)
    target = tmp_path / "target"
    target.write_bytes(b"vdeliver-journal garbage\n")
    jpath = Path(recovery.journal_path(str(box)))
    jpath.symlink_to(target)
    log = RecordingLog()
    deliver(make_config(tmp_path), FRED, src, "alice@example.org", log=log)
    assert box.read_bytes() == OLD + mbox_record()
    assert [lvl for lvl, _ in log.lines] == ["error"]
    assert "symbolic link" in log.lines[0][1] and "mailbox untouched" in log.lines[0][1]
    assert target.read_bytes() == b"vdeliver-journal garbage\n"


def test_no_journal_no_log_lines(tmp_path: Path, src: int) -> None:
    mbox_of(tmp_path)
    log = RecordingLog()
    deliver(make_config(tmp_path), FRED, src, "alice@example.org", log=log)
    assert log.lines == []


def test_mbox_journal_off_still_recovers(tmp_path: Path, src: int) -> None:
    left = mbox_record(b"Subject: killed\n\nhalf\n")
    box = mbox_of(tmp_path, content=OLD + left[:10])
    _plant_journal(box, len(OLD), len(OLD) + len(left), left[: recovery.HEAD])
    log = RecordingLog()
    deliver(make_config(tmp_path, mbox_journal=False), FRED, src, "alice@example.org", log=log)
    assert box.read_bytes() == OLD + mbox_record()
    assert [lvl for lvl, _ in log.lines] == ["warning"]


def test_mbox_journal_off_removes_the_journal_and_writes_none(tmp_path: Path, src: int) -> None:
    """Turned off, the journal a journalling delivery left (idle) goes, and none is made."""
    box = mbox_of(tmp_path)
    deliver(make_config(tmp_path), FRED, src, "alice@example.org")
    assert recovery.state(str(box)) == "idle"
    os.lseek(src, 0, os.SEEK_SET)
    deliver(make_config(tmp_path, mbox_journal=False), FRED, src, "alice@example.org")
    assert recovery.state(str(box)) == "none" and sorted(os.listdir(box.parent)) == ["fred"]
    assert box.read_bytes() == OLD + mbox_record() * 2


def test_a_large_maildir_message_is_copied_from_the_spool_file_byte_for_byte(tmp_path: Path) -> None:
    """Issue 21: a spooled message goes into tmp/ by copy_file_range (in the kernel); the
    stored file, its S= and W= are those of the record, as through Python's buffers."""
    md = maildir_of(tmp_path)
    raw = RAW + b"x" * 70 + b"\n" * 3 + b"line\r\n" * 30000
    fd = fd_of(tmp_path, raw)
    try:
        deliver(make_config(tmp_path, spool_threshold=100), FRED, fd, "alice@example.org")
    finally:
        os.close(fd)
    expected = maildir_record(raw.replace(b"\r\n", b"\n"))
    assert new_files(md) == [expected]
    name = os.listdir(md / "new")[0]
    lines = expected.count(b"\n")
    assert name.endswith(f",S={len(expected)},W={len(expected) + lines}")


def test_spooled_mbox_messages_are_copied_in_the_kernel_and_appends_stay_whole(tmp_path: Path) -> None:
    """Issue 21: a spooled message goes into the mbox by copy_file_range at the end found under
    the locks (O_APPEND off for the copy only); records before and after it stay whole."""
    box = mbox_of(tmp_path)
    big = RAW + b"From the middle\n" + b"line\r\n" * 5000
    for raw, threshold in ((big, 100), (RAW, 1 << 20), (big, 100)):
        fd = fd_of(tmp_path, raw)
        try:
            deliver(make_config(tmp_path, spool_threshold=threshold), FRED, fd, "alice@example.org")
        finally:
            os.close(fd)
    assert box.read_bytes() == OLD + mbox_record(big) + mbox_record(RAW) + mbox_record(big)
    assert b"\n>From the middle\n" in mbox_record(big)


def test_large_maildir_message_spools_in_the_maildirs_tmp_and_is_linked_not_copied(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21, large messages: with spool_dir on another file system (/dev/shm here), a
    spooled Maildir record is spooled in the Maildir's own tmp/ (unnamed) and linked in as the
    message: no copy_file_range, no write of the record in maildir.py, the exact bytes stored,
    nothing left in tmp/."""
    import posix

    from vdeliver import maildir as maildir_mod

    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    md = maildir_of(tmp_path)
    raw = RAW + b"line\r\n" * 30000

    def no_copy(*args: object, **kw: object) -> None:
        raise AssertionError("the record was copied")

    monkeypatch.setattr(posix, "copy_file_range", no_copy)
    monkeypatch.setattr(maildir_mod, "write_all", no_copy)
    fd = fd_of(tmp_path, raw)
    try:
        deliver(make_config(tmp_path, spool_threshold=100, spool_dir="/dev/shm"), FRED, fd, "alice@example.org")
    finally:
        os.close(fd)
    assert new_files(md) == [maildir_record(raw.replace(b"\r\n", b"\n"))]
    assert os.listdir(md / "tmp") == []


@pytest.mark.parametrize(("over_quota", "dsn"), [("bounce", "5.2.2"), ("defer", "4.2.2")])
def test_full_quota_while_spooling_in_the_maildir_is_the_mailboxs_full_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over_quota: str, dsn: str) -> None:
    """A large Maildir record is spooled in the Maildir's tmp/: a full quota (EDQUOT) there is
    the mailbox's, answered as the store answers it (a bounce with over_quota = "bounce"),
    never as a spool fault; the Maildir is left as it was."""
    import errno

    md = maildir_of(tmp_path)

    def full(fd: int, parts: object) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(message, "writev_all", full)
    fd = fd_of(tmp_path, RAW + b"line\n" * 3000)
    try:
        with pytest.raises(DeliveryError) as info:
            deliver(make_config(tmp_path, spool_threshold=100, over_quota=over_quota), FRED, fd, "alice@example.org")
    finally:
        os.close(fd)
    assert info.value.status.dsn == dsn and "mailbox full" in info.value.status.text()
    assert os.listdir(md / "new") == [] and os.listdir(md / "tmp") == []
