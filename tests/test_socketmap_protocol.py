"""The socket map protocol module with plain bytes: table-driven cases and properties."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.socketmap import protocol as p

# (bytes in, events out) - the whole input is fed at once, then EOF.
CASES: list[tuple[bytes, list[object]]] = [
    (b"", [p.CLOSED]),
    (b"25:virtuser fred@example.org,", [p.Request("virtuser", "fred@example.org"), p.CLOSED]),
    (b"10:access a:b,3:x y,", [p.Request("access", "a:b"), p.Request("x", "y"), p.CLOSED]),
    (b"7:a b c d,", [p.Request("a", "b c d"), p.CLOSED]),
    (b"8:virtuser,", [p.BadRequest("no key in request (expected '<map> <key>')"), p.CLOSED]),
    (b"9:virtuser ,", [p.BadRequest("empty key"), p.CLOSED]),
    (b"2: x,", [p.BadRequest("empty map name"), p.CLOSED]),
    (b"5:a/b x,", [p.BadRequest("invalid map name"), p.CLOSED]),
    (b"5:v \xc3\xa9x,", [p.BadRequest("non-ASCII in key"), p.CLOSED]),
    (b"4:v a\tb,", [p.ProtocolError("not a netstring (missing ',' after payload)")]),
    (b"5:v a\tb,", [p.BadRequest("control character in key"), p.CLOSED]),
    (b"0:,", [p.BadRequest("no key in request (expected '<map> <key>')"), p.CLOSED]),
    (b"x", [p.ProtocolError("not a netstring (expected <length>:)")]),
    (b"3:abc;", [p.ProtocolError("not a netstring (missing ',' after payload)")]),
    (b"03:a b,", [p.ProtocolError("not a netstring (leading zero in length)")]),
    (b":a b,", [p.ProtocolError("not a netstring (bad length)")]),
    (b"999:", [p.ProtocolError("request too long (999 > 577 bytes)")]),
    (b"99999", [p.ProtocolError("request too long (over 577 bytes)")]),
    (b"5:v ab", [p.ProtocolError("connection closed in the middle of a request")]),
    (b"12", [p.ProtocolError("connection closed in the middle of a request")]),
]


def events(data: bytes, chunks: list[int] | None = None, max_key: int = p.MAX_KEY, eof: bool = True) -> list[object]:
    """Feed data (split at the given offsets), collect events until NEED_DATA/CLOSED/error."""
    conn = p.Connection(max_key)
    out: list[object] = []
    cuts = [*sorted(set(chunks or [])), len(data)]
    start = 0
    for cut in cuts:
        if cut > start:
            conn.receive_data(data[start:cut])
            start = cut
        while True:
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                break
            out.append(ev)
            if isinstance(ev, p.ProtocolError) or ev is p.CLOSED:
                return out
    if eof:
        conn.receive_data(b"")
        while True:
            ev = conn.next_event()
            out.append(ev)
            if isinstance(ev, p.ProtocolError) or ev is p.CLOSED:
                break
    return out


@pytest.mark.parametrize(("data", "expected"), CASES)
def test_table(data: bytes, expected: list[object]) -> None:
    assert events(data) == expected


def test_oversize_key_is_a_bad_request_and_connection_goes_on() -> None:
    key = "k" * 40
    data = p.encode_request("virtuser", key) + p.encode_request("virtuser", "ok")
    assert events(data, max_key=30) == [p.BadRequest("key too long (40 > 30 bytes)"),
                                        p.Request("virtuser", "ok"), p.CLOSED]


def test_protocol_error_is_sticky() -> None:
    conn = p.Connection()
    conn.receive_data(b"zz")
    first = conn.next_event()
    assert isinstance(first, p.ProtocolError)
    conn.receive_data(b"3:a b,")
    assert conn.next_event() == first


def test_pending_tracks_a_half_request() -> None:
    conn = p.Connection()
    assert not conn.pending
    conn.receive_data(b"4:v a")
    assert conn.next_event() is p.NEED_DATA and conn.pending
    conn.receive_data(b"b,")
    assert conn.next_event() == p.Request("v", "ab") and not conn.pending


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (p.ok("fred@example.org.virtuser."), b"29:OK fred@example.org.virtuser.,"),
        (p.NOTFOUND, b"8:NOTFOUND,"),
        (p.temp("database unavailable"), b"25:TEMP database unavailable,"),
        (p.timeout("lookup timed out"), b"24:TIMEOUT lookup timed out,"),
        (p.perm("unknown map"), b"16:PERM unknown map,"),
        (p.perm("a\nb\xe9"), b"9:PERM a?b?,"),
        (p.ok(""), b"3:OK ,"),
    ],
)
def test_reply_encoding_round_trips(reply: p.Reply, wire: bytes) -> None:
    assert reply.encode() == wire
    reader = p.ReplyReader()
    reader.receive_data(wire)
    back = reader.next_reply()
    assert isinstance(back, p.Reply) and back.status == reply.status


def test_reply_reader_rejects_unknown_status() -> None:
    reader = p.ReplyReader()
    reader.receive_data(b"5:HELLO,")
    assert isinstance(reader.next_reply(), p.ProtocolError)


# -- properties ---------------------------------------------------------------

map_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.-0123456789", min_size=1, max_size=20)
keys = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=80)
requests = st.lists(st.tuples(map_names, keys), max_size=12)


def answer(ev: object) -> bytes:
    """A stand-in server: the reply each event would get."""
    if isinstance(ev, p.Request):
        return p.ok(f"{ev.map}|{ev.key}").encode()
    if isinstance(ev, (p.BadRequest, p.ProtocolError)):
        return p.perm(ev.reason).encode()
    return b""


@given(requests, st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_any_split_gives_the_same_replies(reqs: list[tuple[str, str]], cuts: list[int]) -> None:
    data = b"".join(p.encode_request(m, k) for m, k in reqs)
    whole = events(data)
    split = events(data, [c % (len(data) + 1) for c in cuts])
    assert split == whole
    assert whole == [p.Request(m, k) for m, k in reqs] + [p.CLOSED]
    assert b"".join(map(answer, split)) == b"".join(map(answer, whole))


@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=10))
def test_garbage_never_raises(data: bytes, cuts: list[int]) -> None:
    out = events(data, [c % (len(data) + 1) for c in cuts])
    assert out, "every input ends in an event"
    assert out[-1] is p.CLOSED or isinstance(out[-1], p.ProtocolError)
    for ev in out:
        assert isinstance(ev, (p.Request, p.BadRequest, p.ProtocolError)) or ev is p.CLOSED
        answer(ev)  # encodable


@given(st.binary(max_size=200))
def test_garbage_after_valid_requests_still_answers_them_first(garbage: bytes) -> None:
    good = p.encode_request("virtuser", "a@b")
    out = events(good + garbage)
    assert out[0] == p.Request("virtuser", "a@b")


@given(st.binary(max_size=200))
def test_reply_reader_never_raises(data: bytes) -> None:
    reader = p.ReplyReader()
    reader.receive_data(data)
    reader.receive_data(b"")
    for _ in range(len(data) + 2):
        r = reader.next_reply()
        if r is p.CLOSED or isinstance(r, p.ProtocolError):
            break
        assert isinstance(r, p.Reply)


@given(st.one_of(st.binary(max_size=80),
                 st.builds(lambda m, k: p.encode_request(m, k), st.text(min_size=0, max_size=12),
                           st.text(min_size=0, max_size=40)),
                 st.builds(lambda b: p.netstring(b), st.binary(max_size=80))))
def test_one_request_short_path_gives_what_the_buffered_reader_gives(data: bytes) -> None:
    """The answer loop's short path for one whole request (Connection.one_request) never
    disagrees with receive_data() + next_event(): the same event, or None (use those)."""
    short = p.Connection(max_key=32).one_request(data)
    if short is None:
        return
    slow = p.Connection(max_key=32)
    slow.receive_data(data)
    assert slow.next_event() == short
    assert slow.next_event() is p.NEED_DATA
