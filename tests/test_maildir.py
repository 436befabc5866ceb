"""maildir.py in-process: creation, names, delivery into new/, refusals, Maildir++ quota,
the tmp/ sweep, and faults injected through `vdeliver.maildir.write_all`, `os.link` and
`os.fsync` (the seams tests/faultinject.py kills at), which must leave nothing in new/ or
tmp/ and the status sendmail needs."""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit_helpers import fail_at_byte, fail_at_call, open_fds, patch_os, prepared, spooled
from vdeliver import maildir
from vdeliver.errors import DeliveryError
from vdeliver.message import Prepared

HOST = "unit.test"
RECORD = b"Return-Path: <alice@example.org>\nDelivered-To: fred@example.org\nSubject: hi\n\nbody\nmore\n"


def listing(md: Path) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(md / sub)) for sub in ("tmp", "new", "cur")}


@pytest.fixture
def md(tmp_path: Path) -> Path:
    path = tmp_path / "example.org" / "fred" / "Maildir"
    maildir.create(str(path))
    return path


@pytest.fixture
def msg(tmp_path: Path) -> Iterator[Prepared]:
    yield from spooled(RECORD, str(tmp_path))


def deliver(md: Path, m: Prepared, **kw: Any) -> str:
    return maildir.deliver(str(md), m, host=HOST, **kw)


# -- create, is_maildir, names ------------------------------------------------------------


def test_create_makes_the_three_directories_0700(md: Path) -> None:
    for sub in ("", "tmp", "new", "cur"):
        st_ = (md / sub).lstat()
        assert stat.S_ISDIR(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o700
    assert maildir.is_maildir(str(md))
    maildir.create(str(md))  # again: nothing changes, nothing raised
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_create_completes_a_partial_maildir(tmp_path: Path) -> None:
    (tmp_path / "md" / "new").mkdir(parents=True)
    maildir.create(str(tmp_path / "md"))
    assert sorted(os.listdir(tmp_path / "md")) == ["cur", "new", "tmp"]


def test_create_under_a_file_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        maildir.create(str(tmp_path / "file" / "Maildir"))
    assert info.value.status.dsn == "4.3.0" and info.value.status.reason == "cannot create mailbox"


def test_is_maildir(tmp_path: Path) -> None:
    assert not maildir.is_maildir(str(tmp_path / "missing"))
    assert not maildir.is_maildir(str(tmp_path))
    (tmp_path / "new").write_bytes(b"")
    assert not maildir.is_maildir(str(tmp_path))
    os.unlink(tmp_path / "new")
    (tmp_path / "new").mkdir()
    assert maildir.is_maildir(str(tmp_path))


NAME = re.compile(r"^(\d+)\.M(\d{1,6})P(\d+)R([0-9a-f]{12})\.([^,/]+),S=(\d+),W=(\d+)$")


def test_unique_name_format() -> None:
    before = int(time.time())
    name = maildir.unique_name("mail.example.org", 123, 130)
    m = NAME.match(name)
    assert m is not None, name
    assert before <= int(m.group(1)) <= int(time.time())
    assert int(m.group(3)) == os.getpid()
    assert (m.group(5), m.group(6), m.group(7)) == ("mail.example.org", "123", "130")
    assert len({maildir.unique_name(HOST, 1, 1) for _ in range(200)}) == 200


def test_host_is_escaped_in_names() -> None:
    assert maildir.escape_host("a/b:c") == "a\\057b\\072c"
    name = maildir.unique_name("evil/host:x", 1, 2)
    assert "/" not in name and ":" not in name
    assert name.endswith(".evil\\057host\\072x,S=1,W=2")


# -- deliver ------------------------------------------------------------------------------


def test_deliver_into_new(md: Path, msg: Prepared) -> None:
    before = open_fds()
    name = deliver(md, msg)
    assert listing(md) == {"tmp": [], "new": [name], "cur": []}
    assert (md / "new" / name).read_bytes() == RECORD
    crlf_size = len(RECORD) + RECORD.count(b"\n")
    assert f",S={len(RECORD)}," in name and name.endswith(f",W={crlf_size}")
    assert NAME.match(name) is not None
    st_ = (md / "new" / name).stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_nlink == 1
    assert open_fds() == before


def test_deliver_from_a_spool_file(md: Path, tmp_path: Path) -> None:
    big = RECORD + b"line\n" * 5000
    m = prepared(big, str(tmp_path), threshold=64)
    try:
        name = deliver(md, m)
    finally:
        m.close()
    assert (md / "new" / name).read_bytes() == big


def test_two_deliveries_two_files(md: Path, msg: Prepared) -> None:
    a = deliver(md, msg)
    b = deliver(md, msg)
    assert a != b and listing(md)["new"] == sorted([a, b])


def test_missing_maildir(tmp_path: Path, msg: Prepared) -> None:
    path = tmp_path / "d" / "u" / "Maildir"
    with pytest.raises(DeliveryError) as info:
        deliver(path, msg)
    assert info.value.status.dsn == "5.1.1"
    name = deliver(path, msg, create_missing=True)
    assert (path / "new" / name).read_bytes() == RECORD


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_symlinked_subdirectory_is_refused(md: Path, tmp_path: Path, msg: Prepared, sub: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (md / sub).rmdir()
    (md / sub).symlink_to(elsewhere)
    before = open_fds()
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg)
    status = info.value.status
    assert status.dsn == "4.3.0" and status.reason == "mailbox is not a Maildir"
    assert status.detail.startswith(f"{md}/{sub}: ")
    assert os.listdir(elsewhere) == []
    assert open_fds() == before


# O_DIRECTORY|O_NOFOLLOW on a symbolic link fails with ENOTDIR on Linux, not ELOOP, so the
# ELOOP branches of _open_dir() and _open_sub() never run and the log blames the wrong thing.
@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_symlinked_subdirectory_is_named_as_such(md: Path, tmp_path: Path, msg: Prepared, sub: str) -> None:
    (tmp_path / "elsewhere").mkdir()
    (md / sub).rmdir()
    (md / sub).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg)
    assert info.value.status.detail == f"{md}/{sub}: is a symbolic link"


@pytest.mark.parametrize("sub", ["tmp", "new"])
def test_missing_or_file_subdirectory_is_refused(md: Path, msg: Prepared, sub: str) -> None:
    (md / sub).rmdir()
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg)
    assert info.value.status.reason == "mailbox is not a Maildir"
    (md / sub).write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg)
    assert info.value.status.detail.endswith("is not a directory")


def test_symlinked_maildir_is_refused_and_named_as_such(md: Path, tmp_path: Path, msg: Prepared) -> None:
    link = tmp_path / "link"
    link.symlink_to(md)
    with pytest.raises(DeliveryError) as info:
        deliver(link, msg)
    assert info.value.status.dsn == "4.3.0"
    assert info.value.status.reason == "mailbox is a symbolic link"
    assert listing(md)["new"] == []


def test_maildir_that_is_a_file(tmp_path: Path, msg: Prepared) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(DeliveryError) as info:
        deliver(tmp_path / "f", msg)
    assert info.value.status.reason == "mailbox is not a Maildir"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_wrong_owner_is_refused(md: Path, msg: Prepared) -> None:
    os.chown(md, 12345, 12345)
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg)
    assert info.value.status.reason == "mailbox has the wrong owner"
    assert listing(md)["new"] == []


def test_leftover_of_a_killed_delivery_is_finished_not_copied(md: Path, msg: Prepared) -> None:
    """Killed between link() and unlink(): the retry finds tmp/NAME == new/NAME and stops."""
    from tests.test_locking import dead_pid

    name = maildir.unique_name(HOST, msg.length, msg.rfc822_size).replace(f"P{os.getpid()}R", f"P{dead_pid()}R")
    (md / "tmp" / name).write_bytes(RECORD)
    os.link(md / "tmp" / name, md / "new" / name)
    assert deliver(md, msg) == name
    assert listing(md) == {"tmp": [], "new": [name], "cur": []}


def test_the_same_bytes_delivered_at_once_are_two_messages(md: Path, msg: Prepared) -> None:
    """A linked tmp/ file whose writer still runs (this host, its pid alive) is a concurrent
    delivery of the same message (two envelopes for one mailbox, say), not a leftover: both
    copies stay."""
    name = maildir.unique_name(HOST, msg.length, msg.rfc822_size)  # this process: alive
    (md / "tmp" / name).write_bytes(RECORD)
    os.link(md / "tmp" / name, md / "new" / name)
    new = deliver(md, msg)
    assert new != name and (md / "new" / new).read_bytes() == RECORD
    assert len(listing(md)["new"]) == 2


def test_leftover_check_stats_no_file_of_a_running_delivery(md: Path, msg: Prepared,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load tmp/ holds a file per delivery in flight, all of one size when the messages
    are alike (32 LMTP clients into one Maildir): whether one is a leftover is asked by the pid
    in its name first, so a delivery costs no stat() per concurrent delivery (issue 21)."""
    for _ in range(32):
        name = maildir.unique_name(HOST, msg.length, msg.rfc822_size)  # this process: alive
        (md / "tmp" / name).write_bytes(RECORD)
        os.link(md / "tmp" / name, md / "new" / name)
    real_stat = os.stat
    looked: list[object] = []

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if kwargs.get("dir_fd") is not None:
            looked.append(path)
        return real_stat(path, *args, **kwargs)

    patch_os(monkeypatch, "stat", counting_stat)
    new = deliver(md, msg)
    assert looked == []
    assert (md / "new" / new).read_bytes() == RECORD and len(listing(md)["new"]) == 33


def test_a_different_linked_tmp_file_is_not_taken_for_ours(md: Path, msg: Prepared) -> None:
    other = RECORD.replace(b"body", b"BODY")
    name = maildir.unique_name(HOST, len(other), len(other))
    (md / "tmp" / name).write_bytes(other)
    os.link(md / "tmp" / name, md / "cur" / name)
    new = deliver(md, msg)
    assert new != name and (md / "new" / new).read_bytes() == RECORD
    assert listing(md)["tmp"] == [name]


# -- quota --------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("1000000S,1000C", (1000000, 1000)), ("1000S", (1000, 0)), ("5C", (0, 5)), ("", (0, 0)),
    (" 100S , 3C \n", (100, 3)), ("xS,5C", (0, 5)), ("100X,2C", (0, 2)), ("-5S", (0, 0)), ("S,C", (0, 0)),
    ("3C,7S", (7, 3)), ("1S,2S", (2, 0)),
])
def test_parse_quota_definition(line: str, expected: tuple[int, int]) -> None:
    assert maildir.parse_quota_definition(line) == expected


@given(st.text())
def test_parse_quota_definition_never_raises(line: str) -> None:
    limit_bytes, limit_count = maildir.parse_quota_definition(line)
    assert limit_bytes >= 0 and limit_count >= 0


def test_read_quota(md: Path) -> None:
    assert maildir.read_quota(str(md)) is None
    data = b"1000S,10C\n100 1\n200 2\nnot a line\n-50 -1\nx y\n"
    (md / "maildirsize").write_bytes(data)
    assert maildir.read_quota(str(md)) == (1000, 10, 250, 2, len(data))
    fd = os.open(md, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert maildir.read_quota(str(md), fd) == (1000, 10, 250, 2, len(data))
    finally:
        os.close(fd)


@pytest.mark.timeout(20)
def test_quota_file_that_is_a_fifo_does_not_hang(md: Path, msg: Prepared) -> None:
    os.mkfifo(md / "maildirsize", 0o600)
    with pytest.raises(DeliveryError) as info:
        maildir.read_quota(str(md))
    assert info.value.status.reason == "quota file is not a regular file"
    with pytest.raises(DeliveryError):
        deliver(md, msg)
    assert listing(md)["new"] == []


def _fill(md: Path) -> None:
    (md / "new" / "1.M1P1R1.h,S=100,W=105").write_bytes(b"x")
    (md / "cur" / "2.M1P1R1.h,S=50,W=52:2,S").write_bytes(b"x")
    (md / "cur" / "plain-name").write_bytes(b"y" * 7)  # no S=: its size counts
    sub = md / ".Lists"
    for d in ("new", "cur", "tmp"):
        (sub / d).mkdir(parents=True)
    (sub / "cur" / "3.M1P1R1.h,S=1000:2,").write_bytes(b"z")
    (sub / "tmp" / "4.M1P1R1.h,S=99999").write_bytes(b"z")  # tmp/ never counts
    trash = md / ".Trash"
    (trash / "cur").mkdir(parents=True)
    (trash / "cur" / "5.M1P1R1.h,S=77777").write_bytes(b"z")  # the Trash never counts


def test_recalculate(md: Path) -> None:
    _fill(md)
    assert maildir.recalculate(str(md), "5000S,10C") == (1157, 4)
    assert (md / "maildirsize").read_bytes() == b"5000S,10C\n1157 4\n"
    assert stat.S_IMODE((md / "maildirsize").stat().st_mode) == 0o600
    assert listing(md)["tmp"] == []  # its temporary file was renamed into place


def test_check_quota(md: Path) -> None:
    assert maildir.check_quota(str(md), 10**9, False) is False  # no maildirsize: no quota
    (md / "maildirsize").write_bytes(b"1000S,3C\n500 1\n")
    assert maildir.check_quota(str(md), 500, False) is True
    for bounce, dsn in ((False, "4.2.2"), (True, "5.2.2")):
        with pytest.raises(DeliveryError) as info:
            maildir.check_quota(str(md), 501, bounce)
        assert info.value.status.dsn == dsn and info.value.status.reason == "mailbox full"
    (md / "maildirsize").write_bytes(b"1000S,3C\n10 3\n")
    with pytest.raises(DeliveryError) as info:
        maildir.check_quota(str(md), 1, False)
    assert info.value.status.dsn == "4.2.2"
    (md / "maildirsize").write_bytes(b"0S,0C\n99999999 99999\n")  # 0: no limit
    assert maildir.check_quota(str(md), 10**9, False) is True


def test_large_quota_file_is_recalculated(md: Path) -> None:
    _fill(md)
    lines = b"".join(b"1000 1\n" for _ in range(1000))  # says 1000000 used: far over
    (md / "maildirsize").write_bytes(b"5000S\n" + lines)
    assert maildir.check_quota(str(md), 100, False) is True  # the real use is 1157
    assert (md / "maildirsize").read_bytes() == b"5000S\n1157 4\n"


@pytest.mark.parametrize(("bounce", "dsn"), [(False, "4.2.2"), (True, "5.2.2")])
def test_deliver_over_quota_stores_nothing(md: Path, msg: Prepared, bounce: bool, dsn: str) -> None:
    quota = f"{len(RECORD) + 9}S\n10 1\n".encode()
    (md / "maildirsize").write_bytes(quota)
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg, over_quota_bounce=bounce)
    assert info.value.status.dsn == dsn
    assert listing(md) == {"tmp": [], "new": [], "cur": []}
    assert (md / "maildirsize").read_bytes() == quota


def test_deliver_under_quota_adds_a_line(md: Path, msg: Prepared) -> None:
    (md / "maildirsize").write_bytes(b"100000S,10C\n0 0\n")
    deliver(md, msg)
    assert (md / "maildirsize").read_bytes() == b"100000S,10C\n0 0\n" + f"{len(RECORD)} 1\n".encode()
    assert maildir.read_quota(str(md)) == (100000, 10, len(RECORD), 1, 16 + len(f"{len(RECORD)} 1\n"))


def test_deliver_without_quota_creates_no_quota_file(md: Path, msg: Prepared) -> None:
    deliver(md, msg)
    assert not (md / "maildirsize").exists()


# -- tmp/ sweep -----------------------------------------------------------------------------


def _aged(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_clean_tmp_removes_only_old_files(md: Path, tmp_path: Path) -> None:
    tmp = md / "tmp"
    (tmp / "old").write_bytes(b"x")
    _aged(tmp / "old", 1000)
    (tmp / "fresh").write_bytes(b"x")
    (tmp / "olddir").mkdir()
    _aged(tmp / "olddir", 1000)
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    _aged(target, 1000)
    (tmp / "oldlink").symlink_to(target)
    _aged(tmp / "oldlink", 1000)
    assert maildir.clean_tmp(str(tmp), 500) == 1
    assert sorted(os.listdir(tmp)) == ["fresh", "olddir", "oldlink"]
    assert target.read_bytes() == b"keep"


def test_clean_tmp_with_a_descriptor_and_a_clock(md: Path) -> None:
    tmp = md / "tmp"
    (tmp / "a").write_bytes(b"x")
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert maildir.clean_tmp(fd, 500) == 0
        assert maildir.clean_tmp(fd, 500, now=time.time() + 1000) == 1
        assert os.listdir(tmp) == []
        os.fstat(fd)  # the caller's descriptor stays open
    finally:
        os.close(fd)
    assert maildir.clean_tmp(str(md / "missing"), 1) == 0


def test_a_recently_read_file_is_kept(md: Path) -> None:
    tmp = md / "tmp"
    (tmp / "read").write_bytes(b"x")
    then = time.time() - 1000
    os.utime(tmp / "read", (time.time(), then))  # old mtime, fresh atime
    assert maildir.clean_tmp(str(tmp), 500) == 0


# -- faults -----------------------------------------------------------------------------------


ERRORS = [(errno.ENOSPC, False, "4.3.1"), (errno.EDQUOT, False, "4.2.2"), (errno.EDQUOT, True, "5.2.2"),
          (errno.EFBIG, True, "5.2.2"), (errno.EIO, False, "4.3.0")]
ERROR_IDS = ["ENOSPC", "EDQUOT-defer", "EDQUOT-bounce", "EFBIG-bounce", "EIO"]


@pytest.mark.parametrize(("err", "bounce", "dsn"), ERRORS, ids=ERROR_IDS)
@pytest.mark.parametrize("k", [0, 1, 30, len(RECORD)])
def test_write_failure_leaves_nothing(md: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                      err: int, bounce: bool, dsn: str, k: int) -> None:
    monkeypatch.setattr(maildir, "write_all", fail_at_byte(k, err))
    before = open_fds()
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg, over_quota_bounce=bounce)
    assert info.value.status.dsn == dsn
    assert listing(md) == {"tmp": [], "new": [], "cur": []}
    assert open_fds() == before


@pytest.mark.parametrize(("err", "bounce", "dsn"), ERRORS, ids=ERROR_IDS)
@pytest.mark.parametrize("n", [1, 2], ids=["file", "new-dir"])
def test_fsync_failure_leaves_nothing(md: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                      err: int, bounce: bool, dsn: str, n: int) -> None:
    """fsync 1 is the message file's, 2 is new/'s (after the link: the entry is taken back)."""
    patch_os(monkeypatch, "fsync", fail_at_call(n, err, os.fsync))
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg, over_quota_bounce=bounce)
    assert info.value.status.dsn == dsn
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


@pytest.mark.parametrize(("err", "dsn"), [(errno.EIO, "4.3.0"), (errno.ENOSPC, "4.3.1"), (errno.EDQUOT, "4.2.2"),
                                          (errno.EMLINK, "4.3.0")])
def test_link_failure_leaves_nothing(md: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                     err: int, dsn: str) -> None:
    def link(*args: Any, **kw: Any) -> None:
        raise OSError(err, os.strerror(err))

    patch_os(monkeypatch, "link", link)
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg)
    assert info.value.status.dsn == dsn
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_name_clash_at_link_picks_another_name(md: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.link
    tried: list[str] = []

    def link(src: str, dst: str, **kw: Any) -> None:
        tried.append(dst)
        if len(tried) == 1:
            raise FileExistsError(errno.EEXIST, "File exists")
        real(src, dst, **kw)

    patch_os(monkeypatch, "link", link)
    name = deliver(md, msg)
    assert len(tried) == 2 and tried[1] == name != tried[0]
    assert listing(md) == {"tmp": [], "new": [name], "cur": []}


def test_before_link_hook_failure_leaves_nothing(md: Path, msg: Prepared) -> None:
    def boom() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        deliver(md, msg, before_link=boom)
    assert listing(md) == {"tmp": [], "new": [], "cur": []}


def test_failures_after_the_commit_point_do_not_fail_the_delivery(md: Path, msg: Prepared,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Once new/ is synced, a failing unlink of tmp/NAME or quota line is only housekeeping."""
    (md / "maildirsize").write_bytes(b"100000S\n")

    def unlink(*args: Any, **kw: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    patch_os(monkeypatch, "unlink", unlink)
    name = deliver(md, msg)
    monkeypatch.undo()
    assert (md / "new" / name).read_bytes() == RECORD


@pytest.mark.parametrize(("err", "bounce", "dsn"), [(errno.EDQUOT, False, "4.2.2"), (errno.EDQUOT, True, "5.2.2"),
                                                    (errno.ENOSPC, False, "4.3.1")],
                         ids=["EDQUOT-defer", "EDQUOT-bounce", "ENOSPC"])
def test_quota_hit_creating_the_tmp_file(md: Path, msg: Prepared, monkeypatch: pytest.MonkeyPatch,
                                         err: int, bounce: bool, dsn: str) -> None:
    real = os.open

    def opener(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_CREAT and dir_fd is not None and str(path).startswith(tuple("0123456789")):
            raise OSError(err, os.strerror(err))
        return real(path, flags, mode, dir_fd=dir_fd)

    patch_os(monkeypatch, "open", opener)
    with pytest.raises(DeliveryError) as info:
        deliver(md, msg, over_quota_bounce=bounce)
    monkeypatch.undo()
    assert listing(md) == {"tmp": [], "new": [], "cur": []}
    assert info.value.status.dsn == dsn


@given(record=st.binary(max_size=2000), k=st.integers(min_value=0, max_value=2000))
def test_any_write_failure_leaves_nothing(record: bytes, k: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "Maildir"
        maildir.create(str(path))
        m = prepared(record, d)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(maildir, "write_all", fail_at_byte(k, errno.ENOSPC))
                name = maildir.deliver(str(path), m, host=HOST)
        except DeliveryError as exc:
            assert exc.status.dsn == "4.3.1" and k <= len(record)
            assert listing(path) == {"tmp": [], "new": [], "cur": []}
        else:
            assert k > len(record)
            assert (path / "new" / name).read_bytes() == record
        finally:
            m.close()


# -- a record spooled to a file: linked in, not copied (issue 21, large messages) ------------


def test_spooled_record_becomes_the_maildir_file_without_a_copy(md: Path, tmp_path: Path) -> None:
    """A record past spool_threshold sits in an unnamed file; on the Maildir's file system that
    file is linked in as the message (one write of a 10 MB message, not two): same inode, the
    exact bytes, nothing left in tmp/."""
    record = RECORD + b"x" * 70 + b"\n"
    m = prepared(record, str(tmp_path), threshold=16)
    try:
        spool_ino = os.fstat(m.spool.fd).st_ino  # type: ignore[union-attr]
        name = deliver(md, m)
    finally:
        m.close()
    stored = md / "new" / name
    assert stored.read_bytes() == record
    assert stored.stat().st_ino == spool_ino and stored.stat().st_nlink == 1
    lf = record.count(b"\n")
    assert f",S={len(record)},W={len(record) + lf}" in name
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert listing(md)["tmp"] == []


def test_spooled_record_is_linked_once_and_copied_into_a_second_maildir(md: Path, tmp_path: Path) -> None:
    """The same record stored in two Maildirs (a Sieve fileinto beside the INBOX): the spool
    file becomes the first one's message only; the second gets its own copy, not a hard link."""
    other = tmp_path / "example.org" / "wilma" / "Maildir"
    maildir.create(str(other))
    record = RECORD + b"y" * 70 + b"\n"
    m = prepared(record, str(tmp_path), threshold=16)
    try:
        first, second = deliver(md, m), deliver(other, m)
    finally:
        m.close()
    a, b = md / "new" / first, other / "new" / second
    assert a.read_bytes() == b.read_bytes() == record
    assert a.stat().st_ino != b.stat().st_ino and a.stat().st_nlink == b.stat().st_nlink == 1


def test_spool_on_another_file_system_is_copied(md: Path) -> None:
    """A spool directory on another file system (/dev/shm, a tmpfs) cannot be linked from: the
    record is copied as before, byte for byte."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == md.stat().st_dev:
        pytest.skip("no second file system at /dev/shm")
    record = RECORD + b"z" * 70 + b"\n"
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        m = prepared(record, shm, threshold=16)
        try:
            name = deliver(md, m)
        finally:
            m.close()
    assert (md / "new" / name).read_bytes() == record and listing(md)["tmp"] == []
