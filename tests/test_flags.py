"""IMAP flags stored with a new message (vdeliver.flags) and the header view that puts an mbox
copy's flag lines in (message.HeaderView).  Dovecot reading them back is in
test_sieve_delivery.py::test_dovecot_shows_the_folders_the_script_filed_into."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit_helpers import prepared
from vdeliver import flags, maildir
from vdeliver.message import HeaderView, Spool


def test_split_keeps_system_flags_and_atoms_once() -> None:
    system, keywords = flags.split(["\\SEEN", "\\Seen", "$Label1", "Work", "work", "\\Recent", "a b", "x(y", "",
                                    "caf\u00e9", "\\Flagged"])
    assert system == ["\\Seen", "\\Flagged"]
    assert keywords == ["$Label1", "Work"]  # \Recent is not settable; spaces, specials, non-ASCII are no atoms


def test_mbox_header_lines() -> None:
    assert flags.mbox_header([]) == b""
    assert flags.mbox_header(["\\Seen"]) == b"Status: R\n"
    assert flags.mbox_header(["\\Deleted", "\\Draft", "\\Flagged", "\\Answered"]) == b"X-Status: AFTD\n"
    notes: list[str] = []
    header = flags.mbox_header(["\\Seen", "Later", "new"], {"later": "later"}, notes)
    assert header == b"Status: R\nX-Keywords: later\n"
    assert notes == ["keywords not stored (an mbox takes only those its X-IMAPbase line names): new"]


def test_mbox_keywords_come_from_the_first_x_imapbase(tmp_path: Path) -> None:
    box = tmp_path / "box"
    assert flags.mbox_keywords(str(box)) == {}
    box.write_bytes(b"From a Sat Dec  5 10:00:00 2026\nX-IMAPbase: 1764928800 0000000009 Later $Junk\n Work\n"
                    b"Subject: x\n\nX-IMAPbase: 1 2 body\n\n")
    assert flags.mbox_keywords(str(box)) == {"later": "Later", "$junk": "$Junk", "work": "Work"}
    link = tmp_path / "link"
    link.symlink_to(box)
    assert flags.mbox_keywords(str(link)) == {}  # never followed


def test_maildir_keywords_are_numbered_in_dovecot_keywords(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    maildir.create(str(md))
    (md / "dovecot-keywords").write_text("0 $Label1\n2 Old\nbroken line\n99 out-of-range\n")
    before = (md / "dovecot-keywords").stat().st_mtime
    assert flags.maildir_info(str(md), ["\\Seen", "$label1", "New", "\\Draft"]) == "DSab"
    assert (md / "dovecot-keywords").read_text() == "0 $Label1\n1 New\n2 Old\n"
    assert (md / "dovecot-keywords").stat().st_mtime > before  # Dovecot re-reads only a newer file
    assert flags.maildir_info(str(md), ["old", "new"]) == "bc"  # known ones: nothing written
    assert not (md / "dovecot-keywords.lock").exists() and not (md / "dovecot-uidlist.lock").exists()


def test_maildir_has_26_keyword_letters(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    maildir.create(str(md))
    notes: list[str] = []
    letters = flags.maildir_info(str(md), [f"k{i}" for i in range(30)], notes)
    assert letters == "abcdefghijklmnopqrstuvwxyz"
    assert notes == [f"keywords not stored in {md}: more than 26 keywords"]


def test_a_held_lock_stores_no_keywords_and_a_stale_one_is_broken(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    md = tmp_path / "Maildir"
    maildir.create(str(md))
    lock = md / "dovecot-uidlist.lock"
    lock.write_text("")
    monkeypatch.setattr(flags, "LOCK_WAIT", 0.2)
    notes: list[str] = []
    assert flags.maildir_info(str(md), ["\\Seen", "kw"], notes) == "S"
    assert notes and "dovecot-uidlist.lock held for more than 0.2 s" in notes[0]
    assert lock.exists() and not (md / "dovecot-keywords").exists()  # someone else's lock stays
    old = time.time() - flags.STALE - 10
    os.utime(lock, (old, old))
    assert flags.maildir_info(str(md), ["kw"]) == "a"
    assert not lock.exists()


@given(st.binary(max_size=300), st.binary(max_size=40), st.integers(1, 64), st.integers(0, 400),
       st.booleans())
def test_header_view_inserts_after_the_first_line(body: bytes, lines: bytes, size: int, n: int,
                                                  from_line: bool) -> None:
    spool = Spool(1 << 20, "/tmp")
    data = (b"From a@b Sat Dec  5 10:00:00 2026\n" if from_line else b"") + body
    spool.write(data)
    view = HeaderView(spool, lines)
    cut = data.index(b"\n") + 1 if from_line else 0
    want = data[:cut] + lines + data[cut:]
    assert b"".join(view.chunks(size)) == want
    assert view.head(n) == want[:n]
    assert view.length == len(want)


def test_with_header_of_a_spooled_record(tmp_path: Path) -> None:
    record = b"From a@b Sat Dec  5 10:00:00 2026\nSubject: x\n\n" + b"line\n" * 5000 + b"\n"
    msg = prepared(record, str(tmp_path), threshold=64)
    try:
        flagged = msg.with_header(b"Status: R\n")
        assert b"".join(flagged.spool.chunks(100)) == record.replace(b"2026\n", b"2026\nStatus: R\n", 1)
        assert flagged.length == msg.length + 10 and flagged.lf_count == msg.lf_count + 1
        assert msg.with_header(b"") is msg
    finally:
        msg.close()


@given(st.binary(max_size=200).filter(lambda b: b"\n\n" not in b and not b.startswith((b"\n", b"From "))
                                      and not b.endswith(b"\n")), st.binary(max_size=200),
       st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b), max_size=5),
       st.integers(1, 64), st.integers(0, 500), st.booleans())
def test_a_new_header_replaces_exactly_the_old_one(header: bytes, body: bytes, lines: list[bytes], size: int,
                                                   n: int, from_line: bool) -> None:
    """message.Prepared.with_new_header (editheader): the record is the From_ line, the new
    header, and the rest from the empty line on, byte for byte; its sizes agree."""
    from_ = b"From a@b Sat Dec  5 10:00:00 2026\n" if from_line else b""
    record = from_ + header + b"\n\n" + body
    new = b"".join(b"X-" + line.replace(b"From ", b"") + b"\n" for line in lines)
    msg = prepared(record, "/tmp")
    edited = msg.with_new_header(new, mbox=False)
    want = from_ + new + b"\n" + body
    if not header:  # the record starts with its empty line: header + "\n\n" puts one more before it
        want = from_ + new + b"\n\n" + body
    assert b"".join(edited.spool.chunks(size)) == want
    assert edited.spool.head(n) == want[:n]
    assert edited.length == len(want) and edited.lf_count == want.count(b"\n")
