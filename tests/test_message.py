"""message.py: the bytes a mailbox receives, checked against simple reference rules."""

from __future__ import annotations

import mailbox
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import require
from vdeliver import message
from vdeliver.errors import DeliveryError
from vdeliver.message import Escaper, prepare, sanitize_sender

# -- the streaming escaper against a line-by-line reference -----------------------


def reference(data: bytes, mode: str | None) -> bytes:
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return escape_lines(data.replace(b"\r\n", b"\n"), mode)


def escape_lines(data: bytes, mode: str | None) -> bytes:
    if mode is None:
        return data
    pattern = re.compile(rb"From " if mode == "mboxo" else rb">*From ")
    return b"\n".join(b">" + line if pattern.match(line) else line for line in data.split(b"\n"))


def stream(data: bytes, mode: str | None, cuts: list[int]) -> bytes:
    out: list[bytes | bytearray | memoryview] = []
    esc = Escaper(mode, out.append)
    prev = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        esc.feed(data[prev:cut])
        prev = cut
    esc.close()
    result = b"".join(out)
    assert esc.out_bytes == len(result)
    assert esc.out_lf == result.count(b"\n")
    return result


_tokens = st.lists(
    st.sampled_from([b"From ", b"From", b">", b">>From ", b"\n", b"\r", b"\r\n", b"x", b" ", b"F", b"rom ", b"\x00",
                     b"\xff", b"From x\n"]),
    max_size=40,
).map(b"".join)


@pytest.mark.parametrize("mode", [None, "mboxo", "mboxrd"])
@given(data=_tokens, cuts=st.lists(st.integers(0, 400), max_size=8))
def test_streaming_matches_reference(mode: str | None, data: bytes, cuts: list[int]) -> None:
    assert stream(data, mode, cuts) == reference(data, mode)


@pytest.mark.parametrize("mode", [None, "mboxo", "mboxrd"])
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_streaming_matches_reference_on_any_bytes(mode: str | None, data: bytes, cuts: list[int]) -> None:
    assert stream(data, mode, cuts) == reference(data, mode)


_lines = st.lists(
    st.sampled_from([b"From x", b">From x", b"x From y", b"From", b"", b"\r", b"xxxxxxxxxxxxxxxxxxxxxxxx", b"F"]),
    min_size=1, max_size=60,
)


@pytest.mark.parametrize("mode", [None, "mboxo", "mboxrd"])
@given(lines=_lines, repeat=st.integers(1, 400), ending=st.sampled_from([b"\n", b"\r\n"]),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_block_escaping_of_large_messages_matches_the_line_by_line_reading(
        mode: str | None, lines: list[bytes], repeat: int, ending: bytes, cuts: list[int]) -> None:
    """Issue 21: blocks of up to ~100 KB, dense or sparse in `From ` lines (the dense ones take
    the one-pass replace), cut anywhere, give what the line-by-line reading gives."""
    data = ending.join(lines * repeat)
    assert stream(data, mode, [c * 7 for c in cuts]) == reference(data, mode)


def test_prepare_does_not_depend_on_the_read_size(monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"".join(b"From line %d\r\n" % i if i % 7 == 0 else b"text %d\r\n" % i for i in range(30000))
    data = b"From a@b.org Sat Dec  5 10:00:00 2026\r\nSubject: x\r\n\r\n" + body
    for mbox in (True, False):
        records = set()
        for chunk in (1, 7, 4096, 1 << 16, 1 << 22):
            monkeypatch.setattr(message, "CHUNK", chunk)
            record, prepared = run_prepare(data, mbox=mbox, when=0)
            records.add((record, prepared.lf_count, prepared.length))
        assert len(records) == 1
        record = records.pop()[0]
        assert (b"\n>From line 7\n" in record) == mbox and b"\r" not in record


def test_escaping_examples() -> None:
    assert stream(b"a\nFrom x\n>From y\n", "mboxo", []) == b"a\n>From x\n>From y\n"
    assert stream(b"a\nFrom x\n>From y\n", "mboxrd", []) == b"a\n>From x\n>>From y\n"
    assert stream(b"a\r\nb", None, [2]) == b"a\nb\n"


# -- prepare(): whole messages --------------------------------------------------------


def run_prepare(data: bytes, **kw: object) -> tuple[bytes, message.Prepared]:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        args: dict[str, object] = {"sender": None, "recipient": "fred@away.com", "mbox": True}
        args.update(kw)
        prep = prepare(f.fileno(), **args)  # type: ignore[arg-type]
        try:
            out = b"".join(prep.spool.chunks())
        finally:
            prep.close()
    return out, prep


SENDMAIL_INPUT = (
    b"From sender@example.org Wed Nov 25 02:56:49 2026\n"
    b"Received: by vm\nSubject: hi\nStatus: RO\nContent-Length: 5\nX-UID: 3\n"
    b"Return-Path: <forged@x>\n\nbody\nFrom here\n"
)


def test_sendmail_from_line_gives_sender_and_is_replaced() -> None:
    out, prep = run_prepare(SENDMAIL_INPUT, when=0)
    lines = out.split(b"\n")
    assert re.fullmatch(rb"From sender@example\.org  \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", lines[0])
    assert lines[1] == b"Return-Path: <sender@example.org>"
    assert lines[2] == b"Delivered-To: fred@away.com"
    assert b"Status:" not in out and b"Content-Length" not in out and b"X-UID" not in out
    assert b"forged" not in out
    assert out.endswith(b"\n\nbody\n>From here\n\n")
    assert prep.sender == "sender@example.org" and prep.had_from_line
    assert prep.input_size == len(SENDMAIL_INPUT)


def test_dash_f_wins_and_maildir_keeps_mbox_headers() -> None:
    out, prep = run_prepare(SENDMAIL_INPUT, sender="<other@x.org>", mbox=False)
    assert out.startswith(b"Return-Path: <other@x.org>\nDelivered-To: fred@away.com\nReceived: by vm\n")
    assert b"Status: RO" in out and b"\nFrom here\n" in out
    assert prep.length == len(out)
    assert prep.rfc822_size == len(out) + out.count(b"\n")


@pytest.mark.parametrize("sender", ["", "<>", "MAILER-DAEMON", "mailer-daemon"])
def test_null_sender(sender: str) -> None:
    out, _ = run_prepare(b"Subject: x\n\nb\n", sender=sender)
    assert out.startswith(b"From MAILER-DAEMON  ")
    assert b"\nReturn-Path: <>\n" in out


def test_sender_is_sanitised() -> None:
    # dovecot/core#152: control bytes in the From_ line corrupted the mbox.
    out, _ = run_prepare(b"From a\tb\x01c@x  Wed Nov 25 02:56:49 2026\nSubject: x\n\nb\n")
    first = out.split(b"\n")[0]
    assert first.startswith(b"From a_b_c@x  ")
    assert sanitize_sender("a b\nc<d>\x7f") == "a_b_c_d__"
    assert len(sanitize_sender("x" * 5000)) == message.MAX_SENDER


@given(st.text(alphabet=st.sampled_from([chr(i) for i in range(0x80)] + ["é", "\udc80", "\u2028"]), max_size=24))
def test_sanitize_sender_equals_the_character_rule(sender: str) -> None:
    """The shortcut for a sender with nothing to replace gives what the rule gives."""
    s = sender.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    rule = "".join("_" if ch <= " " or ch == "\x7f" or ch in "<>" else ch for ch in s[:message.MAX_SENDER])
    assert sanitize_sender(sender) == rule


def filter_by_line(block: bytes, strip: frozenset[bytes], loop_value: bytes) -> tuple[bytes, bool]:
    """_filter_headers' rule, one line at a time: a named header goes with its continuations."""
    out, keep, loop = [], True, False
    lines = block.split(b"\n")
    partial = lines.pop()
    lines += [partial] if partial else []
    for line in lines:
        if line[:1] not in (b" ", b"\t"):
            name, colon, value = line.partition(b":")
            lname = name.rstrip(b" \t").lower() if colon else b""
            keep = lname not in strip
            loop = loop or (bool(loop_value) and lname == b"delivered-to" and value.strip().lower() == loop_value)
        if keep:
            out.append(line)
    return (b"\n".join(out) + (b"" if partial and keep else b"\n") if out else b""), loop


HEADER_LINES = [b"Subject: x", b"Return-Path: <a>", b"return-path :x", b"Delivered-To: fred@a.com", b" cont",
                b"\tcont", b"DELIVERED-TO: Fred@A.com", b"", b"Status: RO", b"From: a", b"noheader", b"x-uid:"]


@given(st.lists(st.sampled_from(HEADER_LINES), max_size=6), st.booleans(),
       st.sampled_from([frozenset(), frozenset({b"return-path"}), message.MBOX_STRIP]), st.booleans())
def test_header_filter_equals_the_line_rule(lines: list[bytes], newline: bool, strip: frozenset[bytes],
                                            loop: bool) -> None:
    """The shortcut for a header block without any header to drop or check gives what the
    line-by-line rule gives."""
    block = b"\n".join(lines) + (b"\n" if newline else b"")
    want = b"fred@a.com" if loop else b""
    assert message._filter_headers(block, strip, want) == filter_by_line(block, strip, want)


def test_loop_is_a_bounce() -> None:
    with pytest.raises(DeliveryError) as info:
        run_prepare(b"Delivered-To: Fred@Away.com\nSubject: x\n\nb\n")
    assert info.value.status.dsn == "5.4.6"
    assert info.value.status.exit_code() == 69
    # A different Delivered-To is no loop; a body line is not a header.
    run_prepare(b"Delivered-To: joe@away.com\nSubject: x\n\nDelivered-To: fred@away.com\n")


def test_too_big_is_a_bounce() -> None:
    with pytest.raises(DeliveryError) as info:
        run_prepare(b"Subject: x\n\n" + b"y" * 5000, max_size=1000)
    assert info.value.status.dsn == "5.3.4" and info.value.status.permanent


def test_headers_with_continuations_are_stripped_whole() -> None:
    out, _ = run_prepare(b"X-Keywords: a,\n b,\n\tc\nSubject: s\n continued\n\nbody\n")
    assert out.split(b"\n", 1)[1] == (
        b"Return-Path: <>\nDelivered-To: fred@away.com\nSubject: s\n continued\n\nbody\n\n"
    )


def test_options_off() -> None:
    out, _ = run_prepare(b"Return-Path: <kept@x>\nSubject: s\n\nb\n", return_path=False, delivered_to=False)
    assert out.split(b"\n", 1)[1] == b"Return-Path: <kept@x>\nSubject: s\n\nb\n\n"


@pytest.mark.parametrize("threshold", [0, 10, 1 << 20])
def test_spooling_gives_the_same_bytes(threshold: int, tmp_path: Path) -> None:
    data = b"Subject: big\r\n\r\n" + b"".join(b"line %d From x\r\nFrom y\r\n" % i for i in range(3000))
    small, _ = run_prepare(data, spool_threshold=1 << 30, when=0)
    big, _prep = run_prepare(data, spool_threshold=threshold, spool_dir=str(tmp_path), when=0)
    assert big == small


def test_spool_dir_that_does_not_exist_is_temporary() -> None:
    with pytest.raises(DeliveryError) as info:
        run_prepare(b"Subject: x\n\n" + b"y" * 100, spool_threshold=10, spool_dir="/nonexistent/dir")
    assert info.value.status.temporary


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"From \r", b"From x\r\n\r", b"no header line\n", b"Subject: only headers", b"From x\n",
     b"\r\n\r\nbody", b"From x Wed\n\nbody",
     b"Subject: a\r", b"\x00\x01\xff\n\nbin\x00ary\n" * 3, b"Subject: x\n\n" + b"L" * 200000 + b"\n"],
)
def test_edge_messages_read_back_as_one(data: bytes, tmp_path: Path) -> None:
    check_one_message(data, tmp_path)


def _expected_body(data: bytes) -> bytes:
    if data.startswith(b"From "):
        data = data.split(b"\n", 1)[1] if b"\n" in data else b""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    return data.replace(b"\r\n", b"\n")


def check_one_message(data: bytes, tmp_path: Path) -> None:
    out, _ = run_prepare(data, return_path=False, delivered_to=False)
    box = tmp_path / "mbox"
    box.write_bytes(out)
    mb = mailbox.mbox(str(box), create=False)
    try:
        msgs = [mb.get_bytes(k) for k in mb.keys()]
    finally:
        mb.close()
    assert len(msgs) == 1
    expected = escape_lines(_expected_body(data), "mboxo")
    # Python's reader unescapes nothing: compare with the escaped form (mbox headers stripped).
    got = msgs[0]
    if not any(
        expected.lower().startswith(h + b":") or (b"\n" + h + b":") in expected.lower()
        for h in message.MBOX_STRIP
    ):
        assert got == expected


_message = st.lists(
    st.sampled_from([b"Subject: s\n", b"From x\n", b"\n", b"body\n", b"From ", b">From y\n", b"\r\n", b"\r", b"x",
                     b"\xe9t\xe9", b"\x00", b"Status: RO\n", b"  cont\n", b"From MAILER-DAEMON Wed\n"]),
    max_size=30,
).map(b"".join)


@given(data=_message)
def test_any_message_is_one_mbox_message(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        check_one_message(data, Path(d))


@given(data=_message)
def test_maildir_record_is_byte_exact(data: bytes) -> None:
    out, prep = run_prepare(data, mbox=False, return_path=False, delivered_to=False)
    assert out == _expected_body(data)
    assert prep.length == len(out)


@pytest.mark.peers
@given(data=_message)
def test_formail_splits_into_one_message(data: bytes) -> None:
    formail = require("formail")["formail"]
    out, _ = run_prepare(data)
    done = subprocess.run([formail, "-Y", "-s", "sh", "-c", "cat >/dev/null; echo MSG"], input=out,
                          capture_output=True, timeout=30)
    assert done.stdout.count(b"MSG") == 1


@pytest.mark.peers
def test_formail_reads_many_hostile_messages_from_one_mbox(tmp_path: Path) -> None:
    formail = require("formail")["formail"]
    bodies = [b"From x\nFrom y\n", b"no newline", b"\r\n\r\nFrom z", b"Subject: a\n\n>From q\n", b""]
    box = b"".join(run_prepare(b)[0] for b in bodies)
    done = subprocess.run([formail, "-Y", "-s", "sh", "-c", "cat >/dev/null; echo MSG"], input=box,
                          capture_output=True, timeout=30)
    assert done.stdout.count(b"MSG") == len(bodies)
    path = tmp_path / "m"
    path.write_bytes(box)
    mb = mailbox.mbox(str(path))
    try:
        assert len(mb) == len(bodies)
    finally:
        mb.close()


def test_read_error_is_temporary() -> None:
    r, w = os.pipe()
    os.close(w)
    os.close(r)
    with pytest.raises(DeliveryError) as info:
        prepare(r, sender=None, recipient="a@b", mbox=True)
    assert info.value.status.temporary


# -- large messages: no copies, no needless passes (issue 21) ----------------------------


def test_escaped_pieces_are_slices_of_the_read_not_copies() -> None:
    """An escaped block reaches the record as slices of the read itself with a '>' between
    them (memoryviews: a 10 MB message is not copied to insert a few bytes)."""
    out: list[bytes | bytearray | memoryview] = []
    chunk = b"a line\n" * 1000 + b"From here\n" + b"another\n" * 1000
    esc = Escaper("mboxo", out.append, count_lf=False)
    esc.feed(chunk, normalized=True)
    esc.close()
    assert b"".join(out) == reference(chunk, "mboxo")
    big = [piece for piece in out if len(piece) > 100]
    assert len(big) == 2 and all(isinstance(p, memoryview) and p.obj is chunk for p in big)


def test_mbox_record_counts_line_feeds_only_when_asked() -> None:
    """Only a Maildir name needs the line feeds (W=): an mbox record skips the pass over the
    message that counts them, and still gives the right count when something asks."""
    data = b"Subject: x\n\n" + b"line\n" * 5000
    for threshold in (1 << 20, 100):  # in memory, spooled to a file
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            prepared = prepare(f.fileno(), sender=None, recipient="fred@away.com", mbox=True, when=0,
                               spool_threshold=threshold)
        try:
            record = b"".join(prepared.spool.chunks())
            assert prepared._lf is None
            assert prepared.lf_count == record.count(b"\n")
            assert prepared.rfc822_size == len(record) + record.count(b"\n")
        finally:
            prepared.close()
    _, maildir_record = run_prepare(data, mbox=False, when=0)
    assert maildir_record._lf is not None
