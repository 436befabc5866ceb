"""One message for several Maildir recipients in one LMTP transaction (issue 21).

The server reads and prepares the message once for all of its Maildir recipients.  Each
recipient's record differs only by its `Delivered-To:` line; with delivered_to = false the
records are the same bytes, and the other recipients get hard links to the first copy (as
Dovecot's LMTP does), never across owners or file systems.  Each recipient keeps its own
reply, and Dovecot reads the linked messages as any other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.dovecot_harness import Dovecot, bad_log_lines, fetch_all, lf, passwd_file_auth
from tests.helpers import IS_ROOT, Account, MailRoot, require_root
from tests.test_lmtp_server import Lmtpd, maildir_files, transaction
from vdeliver import maildir, message
from vdeliver.errors import DeliveryError

MSG = (b"Subject: for three\r\nFrom: s@example.org\r\nMessage-ID: <three@t>\r\n\r\n"
       b"Hello all\r\n.leading dot\r\nFrom the body\r\n")
USERS = ["ann", "bob", "cid"]


@pytest.fixture
def lmtpd(mailroot: MailRoot) -> Iterator[list[Lmtpd]]:
    if not IS_ROOT:
        pytest.skip("the server tests start vdeliver-lmtpd as root serving as vmail")
    servers: list[Lmtpd] = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def start(servers: list[Lmtpd], root: MailRoot, **lmtp: object) -> Lmtpd:
    server = Lmtpd(root, None, **lmtp).start()
    servers.append(server)
    return server


def new_files(md: Path) -> list[Path]:
    return sorted((md / "new").iterdir())


def test_maildir_recipients_share_one_file_without_delivered_to(lmtpd: list[Lmtpd], mailroot: MailRoot) -> None:
    mailroot.extra["delivered_to"] = False
    boxes = [mailroot.add_maildir("away.com", u) for u in USERS]
    server = start(lmtpd, mailroot)
    with server.client() as c:
        replies = transaction(c, "s@example.org", [f"{u}@away.com" for u in USERS], MSG)
    assert [replies[f"{u}@away.com"][0] for u in USERS] == [250, 250, 250], replies
    files = [new_files(md) for md in boxes]
    assert all(len(f) == 1 for f in files), files
    inodes = {f[0].stat().st_ino for f in files}
    assert len(inodes) == 1, "the recipients' copies are not one file"
    st = files[0][0].stat()
    assert st.st_nlink == 3 and st.st_uid == mailroot.owner.uid and st.st_mode & 0o777 == 0o600
    assert files[0][0].read_bytes().startswith(b"Return-Path: <s@example.org>\nSubject: for three\n")
    # Each name is its own (and says the size), and tmp/ is left empty.
    assert len({f[0].name for f in files}) == 3 and all(",S=" in f[0].name for f in files)
    assert all(os.listdir(md / "tmp") == [] for md in boxes)


def test_maildir_recipients_get_what_a_single_delivery_writes(lmtpd: list[Lmtpd], mailroot: MailRoot) -> None:
    """With Delivered-To (the default) the copies differ, so each is written, from one parse:
    byte for byte what the recipient alone would have got."""
    boxes = [mailroot.add_maildir("away.com", u) for u in USERS]
    server = start(lmtpd, mailroot)
    with server.client() as c:
        alone = transaction(c, "s@example.org", ["bob@away.com"], MSG)
        single = maildir_files(boxes[1])
        replies = transaction(c, "s@example.org", [f"{u}@away.com" for u in USERS], MSG)
    assert alone["bob@away.com"][0] == 250 and [replies[f"{u}@away.com"][0] for u in USERS] == [250] * 3
    for user, md in zip(USERS, boxes, strict=True):
        want = single[0].replace(b"bob@away.com", f"{user}@away.com".encode())
        assert maildir_files(md) == [want] * (2 if user == "bob" else 1), user
    assert len({f.stat().st_ino for md in boxes for f in new_files(md)}) == 4


def test_loop_for_one_recipient_leaves_the_others_delivered(lmtpd: list[Lmtpd], mailroot: MailRoot) -> None:
    boxes = [mailroot.add_maildir("away.com", u) for u in USERS]
    server = start(lmtpd, mailroot)
    looped = b"Delivered-To: bob@away.com\r\n" + MSG
    with server.client() as c:
        replies = transaction(c, "s@example.org", [f"{u}@away.com" for u in USERS], looped)
    assert replies["bob@away.com"][0] == 554 and replies["bob@away.com"][1].startswith(b"5.4.6"), replies
    assert replies["ann@away.com"][0] == 250 and replies["cid@away.com"][0] == 250
    assert [len(new_files(md)) for md in boxes] == [1, 0, 1]
    assert maildir_files(boxes[2])[0].startswith(b"Return-Path: <s@example.org>\nDelivered-To: cid@away.com\n"
                                                 b"Delivered-To: bob@away.com\n")


def test_full_maildir_among_linked_recipients_gets_its_own_452(lmtpd: list[Lmtpd], mailroot: MailRoot) -> None:
    mailroot.extra["delivered_to"] = False
    boxes = [mailroot.add_maildir("away.com", u) for u in USERS]
    for md, definition in zip(boxes, (b"100000S\n", b"100S\n", b"100000S\n"), strict=True):
        (md / "maildirsize").write_bytes(definition)
        os.chown(md / "maildirsize", mailroot.owner.uid, mailroot.owner.gid)
    server = start(lmtpd, mailroot, rcpt_check_quota=False)  # bob is refused after DATA, not at RCPT
    with server.client() as c:
        replies = transaction(c, "s@example.org", [f"{u}@away.com" for u in USERS], MSG + b"x" * 200 + b"\r\n")
    assert replies["bob@away.com"][0] == 452 and replies["bob@away.com"][1].startswith(b"4.2.2"), replies
    assert replies["ann@away.com"][0] == 250 and replies["cid@away.com"][0] == 250
    assert [len(new_files(md)) for md in boxes] == [1, 0, 1]
    ann, cid = new_files(boxes[0])[0], new_files(boxes[2])[0]
    assert ann.stat().st_ino == cid.stat().st_ino and ann.stat().st_nlink == 2
    size = ann.stat().st_size
    # The quota of each linked recipient counts the message, as for a copy.
    for md in (boxes[0], boxes[2]):
        assert (md / "maildirsize").read_bytes() == b"100000S\n" + f"{size} 1\n".encode()


def test_link_copy_never_links_across_owners(tmp_path: Path) -> None:
    require_root("files owned by another user")
    src, dst = tmp_path / "src", tmp_path / "dst"
    for md in (src, dst):
        maildir.create(str(md))
    data = b"Subject: x\n\nbody\n"
    (src / "new" / "m1").write_bytes(data)
    msg = message.Prepared(message.Spool(1 << 20, str(tmp_path)), "s@example.org", len(data), 3, len(data), False)
    assert maildir.link_copy(str(dst), str(src), "m1", msg, host="h") is not None  # same owner: linked
    os.chown(src / "new" / "m1", 12345, 12345)
    assert maildir.link_copy(str(dst), str(src), "m1", msg, host="h") is None  # another owner: never
    assert maildir.link_copy(str(dst), str(src), "gone", msg, host="h") is None  # moved meanwhile
    assert len(os.listdir(dst / "new")) == 1


@pytest.mark.peers
def test_dovecot_reads_linked_messages_with_flags_per_user(lmtpd: list[Lmtpd], mailroot: MailRoot,
                                                           vmail: Account) -> None:
    """Dovecot serves each linked copy as that user's message; a flag or an expunge in one
    mailbox (a rename or unlink of that user's own link) leaves the others as they were."""
    mailroot.extra["delivered_to"] = False
    boxes = [mailroot.add_maildir("away.com", u) for u in USERS]
    passwd = mailroot.base / "passwd"
    passwd.write_text("".join(f"{u}@away.com:pw-{u}:{vmail.uid}:{vmail.gid}::{mailroot.home}/away.com/{u}::"
                              "userdb_mail=maildir:~/Maildir\n" for u in USERS))
    passwd.chmod(0o644)
    server = start(lmtpd, mailroot)
    with server.client() as c:
        replies = transaction(c, "s@example.org", [f"{u}@away.com" for u in USERS], MSG)
    assert all(code == 250 for code, _text in replies.values()), replies
    on_disk = maildir_files(boxes[0])[0]
    assert new_files(boxes[0])[0].stat().st_nlink == 3
    dovecot = Dovecot(mailroot, vmail, auth=passwd_file_auth(passwd))
    dovecot.start()
    try:
        imap = dovecot.login("ann@away.com", "pw-ann")
        imap.select("INBOX")
        got = fetch_all(imap)
        assert [lf(m["body"]) for m in got] == [on_disk] and got[0]["size"] == len(MSG) + len(
            b"Return-Path: <s@example.org>\r\n")
        imap.uid("STORE", str(got[0]["uid"]), "+FLAGS", "(\\Seen \\Deleted)")
        imap.expunge()
        imap.logout()
        for user in ("bob", "cid"):
            imap = dovecot.login(f"{user}@away.com", f"pw-{user}")
            imap.select("INBOX")
            got = fetch_all(imap)
            imap.logout()
            assert [lf(m["body"]) for m in got] == [on_disk], user
            assert "\\Seen" not in got[0]["flags"] and "\\Deleted" not in got[0]["flags"], user
        assert new_files(boxes[0]) == [] and list((boxes[0] / "cur").iterdir()) == []
        assert (new_files(boxes[1]) or list((boxes[1] / "cur").iterdir()))[0].stat().st_nlink == 2
    finally:
        dovecot.stop()
        log = dovecot.log_text()
        dovecot.cleanup()
        shutil.rmtree(mailroot.base / "dovecot", ignore_errors=True)
    assert not bad_log_lines(log), log


# -- one parse for several recipients: the same bytes as a parse per recipient -------------------

_HEADER_LINES = st.sampled_from([
    b"Subject: x\r\n", b"Return-Path: <old@example.org>\r\n", b"Delivered-To: ann@away.com\r\n",
    b"Delivered-To: other@away.com\n", b"DELIVERED-TO:  Bob@Away.com \n", b"\tfolded\r\n", b"X-A: \xe9\n",
    b"From: s@example.org\n", b"Received: by x\r\n\tfor <ann@away.com>\r\n",
])
_BODIES = st.sampled_from([b"", b"\n", b"body\r\n", b"From here\n.dot\r\n", b"no newline at the end"])


def _spooled(data: bytes, tmp: Path) -> int:
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _record(msg: message.Prepared) -> bytes:
    return b"".join(msg.spool.chunks())


@given(st.lists(_HEADER_LINES, max_size=6), st.sampled_from([b"\r\n", b"\n", b""]), _BODIES,
       st.sampled_from(["ann@away.com", "bob@away.com"]), st.booleans(), st.booleans(), st.booleans())
def test_for_recipient_is_byte_for_byte_what_prepare_makes(headers: list[bytes], end: bytes, body: bytes, rcpt: str,
                                                           return_path: bool, delivered_to: bool,
                                                           from_line: bool) -> None:
    """message.for_recipient() on the record prepared once (delivered_to=False) gives what
    prepare() gives for that recipient alone: the same bytes, sizes and line count, or the same
    loop refusal."""
    data = (b"From old@example.org  Wed Nov 25 02:56:49 2026\n" if from_line else b"") + b"".join(headers) + end + body
    kw: dict[str, object] = {"sender": "s@example.org", "mbox": False, "return_path": return_path,
                             "spool_threshold": 64, "spool_dir": tempfile.gettempdir()}
    with tempfile.TemporaryDirectory() as tmp:
        fd = _spooled(data, Path(tmp) / "in")
        try:
            try:
                alone = message.prepare(fd, recipient=rcpt, delivered_to=delivered_to, **kw)  # type: ignore[arg-type]
            except DeliveryError as exc:
                alone_error = exc.status.dsn
                alone = None
            os.lseek(fd, 0, os.SEEK_SET)
            once = message.prepare(fd, recipient="", delivered_to=False, **kw)  # type: ignore[arg-type]
        finally:
            os.close(fd)
        try:
            try:
                mine = message.for_recipient(once, rcpt, return_path, delivered_to)
            except DeliveryError as exc:
                assert alone is None and exc.status.dsn == alone_error == "5.4.6"
                return
            assert alone is not None
            assert _record(mine) == _record(alone)
            assert (mine.length, mine.lf_count, mine.rfc822_size, mine.input_size, mine.sender) == (
                alone.length, alone.lf_count, alone.rfc822_size, alone.input_size, alone.sender)
            alone.close()
        finally:
            once.close()
