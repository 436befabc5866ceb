"""Dovecot reads exactly what vdeliver wrote: bytes, sizes, flags, UIDs, one user per mailbox.

A private Dovecot (tests/dovecot_harness.py) runs with the generated mail
configuration (`vdeliver.accounts.dovecot.mail_conf`) and a passwd-file of users
made by hand; vdeliver delivers as vmail; stdlib imaplib reads as user@domain.
SQL authentication against the accounts database is in test_dovecot_sql.py.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dovecot_harness import (
    Dovecot,
    bad_log_lines,
    fetch_all,
    lf,
    message_id,
    passwd_file_auth,
    selected_count,
)
from tests.helpers import Account, MailRoot, require_root, run_vdeliver, world_tmpdir

pytestmark = pytest.mark.peers

PASSWORDS = {
    "fred@away.com": "away-secret", "fred@home.com": "home-secret", "busy@away.com": "busy-secret",
    "prop@away.com": "prop-secret", "prop@home.com": "prop-secret", "hdr@away.com": "hdr-secret",
}
MAILDIR_USERS = {"fred@home.com", "prop@home.com"}


class Site:
    def __init__(self, root: MailRoot, vmail: Account, dovecot: Dovecot) -> None:
        self.root = root
        self.vmail = vmail
        self.dovecot = dovecot

    def deliver(self, address: str, message: bytes, sender: str = "sender@example.org") -> None:
        user, domain = address.split("@")
        r = run_vdeliver(["-a", domain, "-a", user, "-f", sender], message, config=self.root.config, as_user=self.vmail)
        assert r.returncode == 0, r.stderr

    def maildir(self, address: str) -> Path:
        user, domain = address.split("@")
        return self.root.home / domain / user / "Maildir"

    def mbox(self, address: str) -> Path:
        user, domain = address.split("@")
        return self.root.vbox / domain / user


@pytest.fixture(scope="module")
def site(vmail: Account) -> Iterator[Site]:
    require_root("Dovecot's mail processes switch to the vmail user")
    root = MailRoot(world_tmpdir(), vmail)
    passwd = root.base / "passwd"
    lines = []
    for address, password in PASSWORDS.items():
        user, domain = address.split("@")
        extra = ""
        if address in MAILDIR_USERS:
            root.add_maildir(domain, user)
            extra = "userdb_mail=maildir:~/Maildir"
        else:
            root.add_mbox(domain, user)
        lines.append(f"{address}:{password}:{vmail.uid}:{vmail.gid}::{root.home}/{domain}/{user}::{extra}\n")
    passwd.write_text("".join(lines))
    passwd.chmod(0o644)
    dovecot = Dovecot(root, vmail, auth=passwd_file_auth(passwd))
    dovecot.start()
    try:
        yield Site(root, vmail, dovecot)
    finally:
        dovecot.stop()
        log = dovecot.log_text()
        dovecot.cleanup()
        shutil.rmtree(root.base, ignore_errors=True)
    assert not bad_log_lines(log), log


# -- bytes -------------------------------------------------------------------------


def test_mbox_messages_read_back_as_delivered(site: Site) -> None:
    """What IMAP returns is the delivered message: vdeliver's two added headers, the input,
    `>From ` escaping of body lines; the mbox state headers a sender put in are gone and the
    ones Dovecot adds to the file (X-IMAPbase, X-UID, Status) are not shown."""
    cases = [
        (b"Message-ID: <m1@t>\nSubject: plain\n\nline one\nline two\n",
         b"Message-ID: <m1@t>\nSubject: plain\n\nline one\nline two\n"),
        (b"Message-ID: <m2@t>\r\nSubject: crlf input\r\n\r\nbody\r\n",
         b"Message-ID: <m2@t>\nSubject: crlf input\n\nbody\n"),
        (b"Message-ID: <m3@t>\nSubject: from lines\n\nFrom x Wed Jan  7 12:00:00 2026\n>From quoted\nFrom\n",
         b"Message-ID: <m3@t>\nSubject: from lines\n\n>From x Wed Jan  7 12:00:00 2026\n>From quoted\nFrom\n"),
        (b"Message-ID: <m4@t>\nStatus: RO\nX-UID: 99\nContent-Length: 3\nX-IMAPbase: 1 2\nSubject: spoof\n\nhi\n",
         b"Message-ID: <m4@t>\nSubject: spoof\n\nhi\n"),
        (b"Message-ID: <m5@t>\nSubject: no final newline\n\nlast",
         b"Message-ID: <m5@t>\nSubject: no final newline\n\nlast\n"),
        (b"Message-ID: <m6@t>\nSubject: empty body\n\n", b"Message-ID: <m6@t>\nSubject: empty body\n\n"),
    ]
    address = "fred@away.com"
    for raw, _ in cases:
        site.deliver(address, raw)
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and selected_count(data) == len(cases)
        got = fetch_all(imap)
    finally:
        imap.logout()
    assert [m["uid"] for m in got] == list(range(1, len(cases) + 1))
    for (_raw, expected), m in zip(cases, got, strict=True):
        body = m["body"]
        assert isinstance(body, bytes)
        want = b"Return-Path: <sender@example.org>\nDelivered-To: fred@away.com\n" + expected
        assert lf(body) == want
        assert body == want.replace(b"\n", b"\r\n")  # IMAP speaks CRLF
        assert m["size"] == len(body)
    # Dovecot kept its state in the file, vdeliver's messages are untouched around it.
    content = site.mbox(address).read_bytes()
    assert content.startswith(b"From sender@example.org  ")
    assert b"X-IMAPbase: " in content and content.count(b"\nFrom sender@example.org  ") == len(cases) - 1


def test_maildir_bytes_and_sizes_match_the_file_names(site: Site) -> None:
    """BODY[] is the file; RFC822.SIZE is the W= of the name vdeliver chose; S= is the file size."""
    address = "fred@home.com"
    messages = [
        b"Message-ID: <d1@t>\nSubject: one\n\nshort\n",
        b"Message-ID: <d2@t>\r\nSubject: two\r\n\r\n" + b"a line of text\r\n" * 300,
        b"Message-ID: <d3@t>\nSubject: three\n\nFrom here on, no escaping in a Maildir\n",
    ]
    for raw in messages:
        site.deliver(address, raw)
    md = site.maildir(address)
    files = {p.name: p.read_bytes() for p in (md / "new").iterdir()}
    assert len(files) == len(messages)
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        imap.select("INBOX")
        got = fetch_all(imap)
    finally:
        imap.logout()
    assert len(got) == len(messages)
    by_content = {content: name for name, content in files.items()}
    for m in got:
        body = m["body"]
        assert isinstance(body, bytes)
        name = by_content[lf(body)]  # the exact bytes on disk
        fields = dict(part.split("=", 1) for part in name.split(":")[0].split(",")[1:])
        assert int(fields["S"]) == len(files[name])
        assert int(fields["W"]) == m["size"] == len(body)
    assert lf(got[2]["body"]).endswith(b"\n\nFrom here on, no escaping in a Maildir\n")


# Lines that mean something to an mbox reader or to vdeliver, mixed with ordinary text.
_LINE = st.one_of(
    st.sampled_from([
        "", "From x Wed Jan  7 12:00:00 2026", "From ", "From", ">From quoted", ">>From deeper", "from lower",
        "Status: RO", "X-UID: 7", "Content-Length: 3", "X-IMAPbase: 1 2", "X-Keywords: $Junk", ".", " ",
        "Subject: inner", "\t folded", "=?utf-8?q?x?=",
    ]),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, exclude_categories=["Cs"]), max_size=60),
)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    headers = draw(st.lists(_LINE.filter(lambda line: not line.startswith("From ")), max_size=6))
    headers = [h for h in headers if h]  # an empty line would end the header block early
    body = draw(st.lists(_LINE, max_size=12))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(["Message-ID: <p@t>", *headers, "", *body])
    if draw(st.booleans()):
        text += eol
    return text.encode()


_COUNTS: dict[str, int] = {}  # messages each property user should have after the next delivery


@pytest.mark.parametrize("address", ["prop@away.com", "prop@home.com"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_messages())
def test_any_message_reads_back_exactly_as_stored(site: Site, address: str, raw: bytes) -> None:
    """Property: whatever the message, the delivery is one more message in the mailbox, and
    IMAP shows exactly the bytes vdeliver stored (mbox: its record minus the From_ line and the
    separating blank line; Maildir: the file) with CRLF line ends, RFC822.SIZE = W= there."""
    is_maildir = address in MAILDIR_USERS
    mbox = site.mbox(address)
    before_files = set((site.maildir(address) / "new").iterdir()) if is_maildir else set()
    before_size = 0 if is_maildir else mbox.stat().st_size
    site.deliver(address, raw)
    if is_maildir:
        (path,) = set((site.maildir(address) / "new").iterdir()) - before_files
        stored = path.read_bytes()
        fields = dict(part.split("=", 1) for part in path.name.split(":")[0].split(",")[1:])
    else:
        record = mbox.read_bytes()[before_size:]
        record = record[1:] if record.startswith(b"\n") else record  # a repaired separator
        assert record.startswith(b"From s") and record.endswith(b"\n\n")
        stored = record[record.index(b"\n") + 1 : -1]
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        typ, data = imap.select("INBOX")
        assert typ == "OK"
        count = selected_count(data)
        newest = fetch_all(imap)[-1]
    finally:
        imap.logout()
    assert count == _COUNTS.setdefault(address, count), "a delivery did not make exactly one more message"
    _COUNTS[address] = count + 1
    body = newest["body"]
    assert isinstance(body, bytes)
    assert body == stored.replace(b"\n", b"\r\n")
    assert newest["size"] == len(body)
    if is_maildir:
        assert int(fields["S"]) == len(stored) and int(fields["W"]) == len(body)


# -- flags and UIDs ------------------------------------------------------------------


@pytest.mark.parametrize("address", ["fred@away.com", "fred@home.com"])
def test_flags_and_uids_survive_new_deliveries(site: Site, address: str) -> None:
    site.deliver(address, b"Message-ID: <f1-%s@t>\nSubject: f1\n\none\n" % address.encode())
    site.deliver(address, b"Message-ID: <f2-%s@t>\nSubject: f2\n\ntwo\n" % address.encode())
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        _typ, _data = imap.select("INBOX")
        validity = imap.response("UIDVALIDITY")[1][0]
        before = fetch_all(imap)
        uids = [m["uid"] for m in before]
        assert uids == sorted(uids) and len(set(uids)) == len(uids)
        first, second = before[-2], before[-1]
        assert imap.uid("STORE", str(first["uid"]), "+FLAGS", r"(\Seen \Flagged $Label1)")[0] == "OK"
        assert imap.uid("STORE", str(second["uid"]), "+FLAGS", r"(\Deleted)")[0] == "OK"
        assert imap.expunge()[0] == "OK"
    finally:
        imap.logout()
    # Mail arriving while the flags sit in the mailbox must not disturb them.
    site.deliver(address, b"Message-ID: <f3-%s@t>\nSubject: f3\n\nthree\n" % address.encode())
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        imap.select("INBOX")
        assert imap.response("UIDVALIDITY")[1][0] == validity
        after = fetch_all(imap)
    finally:
        imap.logout()
    by_uid = {m["uid"]: m for m in after}
    assert second["uid"] not in by_uid
    kept = by_uid[first["uid"]]
    assert {r"\Seen", r"\Flagged", "$Label1"} <= kept["flags"]
    assert lf(kept["body"]) == lf(first["body"])
    newest = after[-1]
    assert newest["uid"] > max(uids)
    assert message_id(newest["body"]) == f"f3-{address}@t"
    assert r"\Seen" not in newest["flags"]


# -- who sees what ---------------------------------------------------------------


def test_same_user_in_two_domains_sees_only_own_mail(site: Site) -> None:
    site.deliver("fred@away.com", b"Message-ID: <only-away@t>\nSubject: a\n\nfor away\n")
    site.deliver("fred@home.com", b"Message-ID: <only-home@t>\nSubject: h\n\nfor home\n")
    seen: dict[str, set[str]] = {}
    for address in ("fred@away.com", "FRED@Home.COM"):
        imap = site.dovecot.login(address, PASSWORDS[address.lower()])
        try:
            imap.select("INBOX")
            seen[address.lower()] = {message_id(m["body"]) for m in fetch_all(imap)}
        finally:
            imap.logout()
    assert "only-away@t" in seen["fred@away.com"] and "only-home@t" not in seen["fred@away.com"]
    assert "only-home@t" in seen["fred@home.com"] and "only-away@t" not in seen["fred@home.com"]
    assert not seen["fred@away.com"] & seen["fred@home.com"]


def test_wrong_password_and_cross_domain_password_fail(site: Site) -> None:
    assert site.dovecot.try_login("fred@away.com", "nope")[0] == "NO"
    assert site.dovecot.try_login("fred@away.com", PASSWORDS["fred@home.com"])[0] == "NO"
    assert site.dovecot.try_login("fred", PASSWORDS["fred@away.com"])[0] == "NO"  # no default domain


# -- Dovecot and vdeliver on one mbox at once ----------------------------------------------


@pytest.mark.slow
def test_concurrent_imap_session_and_deliveries_on_one_mbox(site: Site) -> None:
    """An IMAP client reads, flags and expunges while 200 deliveries append to the same mbox.

    In the end no message appears twice, every delivered message is either still there or
    was deleted by the client, the file holds exactly the listed messages, no flag the
    client stored was lost, and Dovecot logged no corruption (checked at teardown)."""
    address = "busy@away.com"
    total, workers = 200, 4
    delivered: list[str] = []
    errors: list[str] = []
    deferred: list[str] = []  # a deferral leaves the mailbox unchanged; retried below
    lock = threading.Lock()
    site.root.write_config(lock_timeout=60)  # the production default; the machine is shared and busy

    # The client hands out `per_round` deliveries at the start of each of its rounds, so the
    # two always overlap, however fast or slow either side runs on a busy machine.
    per_round = 10
    permits = threading.Semaphore(0)

    def deliver_some(worker: int) -> None:
        for n in range(worker, total, workers):
            if not permits.acquire(timeout=120):
                with lock:
                    errors.append("the IMAP client stopped handing out deliveries")
                return
            mid = f"busy-{n}@t"
            body = b"Message-ID: <%s>\nSubject: load %d\n\nFrom the load test, message %d\n" % (mid.encode(), n, n)
            for _try in range(3):  # as sendmail would: exit 75 means "try again later"
                r = run_vdeliver(["-a", "away.com", "-a", "busy", "-f", "load@example.org"], body,
                                 config=site.root.config, as_user=site.vmail)
                if r.returncode != 75:
                    break
                with lock:
                    deferred.append(r.stderr.decode(errors="replace"))
            with lock:
                if r.returncode == 0:
                    delivered.append(mid)
                else:
                    errors.append(r.stderr.decode(errors="replace"))

    threads = [threading.Thread(target=deliver_some, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    marked: set[str] = set()  # the client stored \Deleted on these
    flagged: set[str] = set()  # ... and \Flagged on these
    lost: list[tuple[int, str, str]] = []  # (round, message, flag) stored earlier, gone now
    rounds = expunges = 0
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        imap.select("INBOX")
        issued = 0
        while any(t.is_alive() for t in threads):
            rounds += 1
            permits.release(per_round)
            issued += per_round
            assert imap.noop()[0] == "OK"
            got = fetch_all(imap, "(UID FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            uids = [m["uid"] for m in got]
            assert len(set(uids)) == len(uids)
            ids = [message_id(m["body"]) for m in got]
            assert len(set(ids)) == len(ids), "a message appears twice"
            for mid, m in zip(ids, got, strict=True):
                for flag, stored in ((r"\Flagged", flagged), (r"\Deleted", marked)):
                    if mid in stored and flag not in m["flags"]:
                        lost.append((rounds, mid, flag))
            # Read the newest in full (sets \Seen), flag the oldest unflagged, delete two (by UID).
            if uids:
                assert imap.uid("FETCH", str(uids[-1]), "(BODY[])")[0] == "OK"
            fresh = [(u, mid) for u, mid in zip(uids, ids, strict=True) if mid not in flagged]
            if fresh:
                assert imap.uid("STORE", str(fresh[0][0]), "+FLAGS", r"(\Flagged)")[0] == "OK"
                flagged.add(fresh[0][1])
            doomed = [(u, mid) for u, mid in zip(uids, ids, strict=True) if mid not in marked][1:3]
            if doomed and rounds % 2 == 0:
                assert imap.uid("STORE", ",".join(str(u) for u, _ in doomed), "+FLAGS", r"(\Deleted)")[0] == "OK"
                marked.update(mid for _, mid in doomed)
                assert imap.expunge()[0] == "OK"
                expunges += 1
            # At most one batch ahead: the next round starts once the last-but-one batch is done.
            deadline = time.monotonic() + 120
            while len(delivered) + len(errors) < min(issued - per_round, total) and time.monotonic() < deadline:
                time.sleep(0.01)
        for t in threads:
            t.join()
        assert imap.noop()[0] == "OK"
        final = [message_id(m["body"]) for m in fetch_all(imap, "(UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")]
    finally:
        permits.release(total)  # a failed round must not leave the workers waiting
        imap.logout()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    assert len(delivered) == total
    assert len(deferred) <= total // 20, deferred[:3]
    assert len(final) == len(set(final)), "a message appears twice"
    assert set(final) <= set(delivered)
    assert set(delivered) - set(final) <= marked, "a message the client did not delete is gone"
    assert set(delivered) - set(final), "nothing was expunged"
    assert rounds >= total // per_round and expunges >= total // per_round // 3, (rounds, expunges)
    assert not lost, f"flags stored by the client were lost: {lost[:5]} ({len(lost)} in {rounds} rounds)"
    # The file agrees: one From_ line per message still listed, bodies escaped.
    content = site.mbox(address).read_bytes()
    assert content.count(b"\nFrom load@example.org  ") + content.startswith(b"From load@example.org  ") == len(final)
    assert content.count(b"\n>From the load test") == len(final)
    assert not Path(str(site.mbox(address)) + ".lock").exists()
    assert not bad_log_lines(site.dovecot.log_text())


def _header_block(size: int, line_end: bytes) -> bytes:
    filler = b"X-Filler: " + b"a" * 989 + line_end  # 1000 bytes stored (LF), 1001 with CRLF
    block = filler * (size // 1000)
    tail = (b"Status: RO", b"X-Status: DF", b"X-Keywords: $Junk", b"X-UID: 7", b"X-IMAPbase: 1 99",
            b"Content-Length: 1", b"Message-ID: <hdr@t>", b"Subject: big header")
    return block + b"".join(t + line_end for t in tail) + line_end + b"body" + line_end


def test_mailbox_control_headers_never_survive_whatever_the_header_size(site: Site) -> None:
    """Past the old 1 MiB header limit, `Status:`, `X-IMAPbase:`... passed into the mbox as
    body, and Dovecot showed the message \\Seen \\Deleted \\Flagged or hid it.  A header block
    under the limit (measured as stored: CRLF input counts as LF) is stripped of them; one over
    the limit is refused with 5.3.4 (exit 69) and the mbox is left as it was."""
    from vdeliver.message import MAX_HEADER

    address = "hdr@away.com"
    under = _header_block(1_048_000, b"\r\n")  # over the limit as sent, under it as stored
    assert len(under) > MAX_HEADER
    site.deliver(address, under)
    before = site.mbox(address).read_bytes()
    assert b"\nStatus:" not in before and b"\nX-IMAPbase:" not in before and b"\nX-UID:" not in before
    user, domain = address.split("@")
    over = _header_block(MAX_HEADER + 8000, b"\n")
    r = run_vdeliver(["-a", domain, "-a", user, "-f", "s@example.org"], over, config=site.root.config,
                     as_user=site.vmail)
    assert r.returncode == 69, r.stderr
    assert b"5.3.4 message header too big" in r.stderr
    assert site.mbox(address).read_bytes() == before
    imap = site.dovecot.login(address, PASSWORDS[address])
    try:
        typ, data = imap.select("INBOX")
        assert typ == "OK" and selected_count(data) == 1
        got = fetch_all(imap)
    finally:
        imap.logout()
    assert len(got) == 1
    flags = got[0]["flags"]
    assert isinstance(flags, set)
    for flag in ("\\Seen", "\\Deleted", "\\Flagged", "\\Draft", "$Junk"):
        assert flag not in flags, flags
    body = got[0]["body"]
    assert isinstance(body, bytes) and b"Subject: big header" in body and b"Status: RO" not in body
