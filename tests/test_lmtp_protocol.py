"""The LMTP state machine without sockets: table-driven (bytes in -> events and replies out).

Every case runs twice: with the input in one piece and fed one byte at a time, so that
no rule depends on how the client's writes were split into packets.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vdeliver.lmtp import protocol as p

HOST = "mx.test"


def accept_all(address: str) -> p.Reply:
    if address.startswith("unknown"):
        return p.Reply(550, "5.1.1", f"<{address}> user unknown")
    return p.Reply(250, "2.1.5", f"<{address}> ok")


def drive(data: bytes, *, bytewise: bool = False, **kwargs: object) -> tuple[list[object], bytes, p.Connection]:
    """Feed data, answer like a server that knows every address but unknown*; return events and output."""
    conn = p.Connection(HOST, **kwargs)  # type: ignore[arg-type]
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    pieces.append(b"")  # end of file
    events: list[object] = []
    out = bytearray()
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                break
            if isinstance(ev, p.Data) and events and isinstance(events[-1], p.Data):
                events[-1] = p.Data(events[-1].data + ev.data)
            else:
                events.append(ev)
            if isinstance(ev, p.RcptTo):
                conn.answer_rcpt(accept_all(ev.address))
            elif isinstance(ev, p.EndOfData) and ev.error is None:
                for rcpt in ev.recipients:
                    conn.answer_data(p.Reply(250, "2.0.0", f"<{rcpt}> delivered"))
            if isinstance(ev, p.ConnectionClosed) or conn.closed:
                break
        out += conn.data_to_send()
        if conn.closed:
            break
    return events, bytes(out), conn


def codes(out: bytes) -> list[str]:
    """The reply codes (with the enhanced code) of every final reply line."""
    result = []
    for line in out.split(b"\r\n"):
        if len(line) >= 4 and line[3:4] == b" ":
            parts = line.split(b" ")
            code = parts[0].decode()
            if len(parts) > 1 and parts[1][:1].isdigit() and b"." in parts[1]:
                code += " " + parts[1].decode()
            result.append(code)
    return result


LHLO = b"LHLO client.test\r\n"
MAIL = b"MAIL FROM:<s@example.org>\r\n"
HELLO = p.Hello("client.test")
FROM = p.MailFrom("s@example.org", None, None)

CASES: list[tuple[str, bytes, dict[str, object], list[object], list[str]]] = [
    (
        "one transaction, two recipients, one reply each, dot-unstuffing",
        LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n"
        b"Subject: t\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n",
        {},
        [HELLO, FROM, p.RcptTo("a@x.test"), p.RcptTo("b@x.test"), p.DataStart(),
         p.Data(b"Subject: t\n\n.leading dot\n"), p.EndOfData(("a@x.test", "b@x.test"), None), p.Quit()],
        ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0", "250 2.0.0", "221 2.0.0"],
    ),
    (
        "unknown recipient refused at RCPT, only the known one answered after DATA",
        LHLO + MAIL + b"RCPT TO:<unknown@x.test>\r\nRCPT TO:<a@x.test>\r\nDATA\r\nhi\r\n.\r\n",
        {},
        [HELLO, FROM, p.RcptTo("unknown@x.test"), p.RcptTo("a@x.test"), p.DataStart(), p.Data(b"hi\n"),
         p.EndOfData(("a@x.test",), None), p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "550 5.1.1", "250 2.1.5", "354", "250 2.0.0"],
    ),
    (
        "DATA with no accepted recipient",
        LHLO + MAIL + b"RCPT TO:<unknown@x.test>\r\nDATA\r\n",
        {},
        [HELLO, FROM, p.RcptTo("unknown@x.test"), p.Rejected("DATA", p.Reply(503, "5.5.1", "no valid recipients")),
         p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "550 5.1.1", "503 5.5.1"],
    ),
    (
        "commands out of order",
        b"MAIL FROM:<a@b>\r\nLHLO c\r\nRCPT TO:<a@x.test>\r\nDATA\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\n",
        {},
        [p.Rejected("MAIL", p.Reply(503, "5.5.1", "send LHLO first")), p.Hello("c"),
         p.Rejected("RCPT", p.Reply(503, "5.5.1", "need MAIL before RCPT")),
         p.Rejected("DATA", p.Reply(503, "5.5.1", "need MAIL before DATA")),
         p.MailFrom("a@b", None, None), p.Rejected("MAIL", p.Reply(503, "5.5.1", "nested MAIL command")),
         p.ConnectionClosed(False)],
        ["503 5.5.1", "250", "503 5.5.1", "503 5.5.1", "250 2.1.0", "503 5.5.1"],
    ),
    (
        "SMTP greetings are refused: this is LMTP",
        b"HELO c\r\nEHLO c\r\n",
        {},
        [p.Rejected("HELO", p.Reply(500, "5.5.1", "this is LMTP: use LHLO")),
         p.Rejected("EHLO", p.Reply(500, "5.5.1", "this is LMTP: use LHLO")), p.ConnectionClosed(False)],
        ["500 5.5.1", "500 5.5.1"],
    ),
    (
        "declared SIZE over the limit",
        LHLO + b"MAIL FROM:<s@example.org> SIZE=1001 BODY=8BITMIME\r\n",
        {"max_size": 1000},
        [HELLO, p.Rejected("MAIL", p.Reply(552, "5.3.4", "message too big (limit 1000 bytes)")),
         p.ConnectionClosed(False)],
        ["250", "552 5.3.4"],
    ),
    (
        "SIZE and BODY accepted, unknown parameters refused",
        LHLO + b"MAIL FROM:<> SIZE=10 BODY=8bitmime\r\nRSET\r\nMAIL FROM:<s@x> NOTIFY=NEVER\r\n"
        b"MAIL FROM:<s@x> SIZE=ten\r\n",
        {"max_size": 1000},
        [HELLO, p.MailFrom("", 10, "8BITMIME"), p.Reset(),
         p.Rejected("MAIL", p.Reply(555, "5.5.4", "unsupported parameter NOTIFY")),
         p.Rejected("MAIL", p.Reply(501, "5.5.4", "bad SIZE parameter")), p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "250 2.0.0", "555 5.5.4", "501 5.5.4"],
    ),
    (
        "message over the limit as sent: one 552 per recipient, nothing handed over",
        LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n" + b"x" * 60 + b"\r\n" + b"y" * 60
        + b"\r\n.\r\nNOOP\r\n",
        {"max_size": 100},
        [HELLO, FROM, p.RcptTo("a@x.test"), p.RcptTo("b@x.test"), p.DataStart(), p.Data(b"x" * 60 + b"\n"),
         p.EndOfData(("a@x.test", "b@x.test"), p.Reply(552, "5.3.4", "message too big (limit 100 bytes)")),
         p.Noop(), p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "552 5.3.4", "552 5.3.4", "250 2.0.0"],
    ),
    (
        "bare LF ending a command: accepted, as Postfix and Dovecot do",
        LHLO + b"NOOP\n",
        {},
        [HELLO, p.Noop(), p.ConnectionClosed(False)],
        ["250", "250 2.0.0"],
    ),
    (
        "bare LF in the message: a line end like CRLF; LF.LF does not end the data (no smuggling)",
        LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\nok\r\nbare\n.\nstill data\r\n.\r\nNOOP\r\n",
        {},
        [HELLO, FROM, p.RcptTo("a@x.test"), p.DataStart(), p.Data(b"ok\nbare\n\nstill data\n"),
         p.EndOfData(("a@x.test",), None), p.Noop(), p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "250 2.0.0"],
    ),
    (
        "command line longer than 512 octets",
        LHLO + b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n",
        {},
        [HELLO, p.Rejected("", p.Reply(500, "5.5.2", "line too long (limit 512 octets)")), p.Noop(),
         p.ConnectionClosed(False)],
        ["250", "500 5.5.2", "250 2.0.0"],
    ),
    (
        "text line longer than 1000 octets: accepted (peers do; sendmail would bounce a refusal)",
        LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\n" + b"z" * 1999 + b"\r\n.\r\n",
        {},
        [HELLO, FROM, p.RcptTo("a@x.test"), p.DataStart(), p.Data(b"z" * 1999 + b"\n"),
         p.EndOfData(("a@x.test",), None), p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"],
    ),
    (
        "pipelined garbage: each line refused, then 421 after ten errors",
        b"".join(b"GARBAGE %d\r\n" % i for i in range(12)),
        {},
        [p.Rejected("GARBAGE", p.Reply(500, "5.5.1", "command unrecognized"))] * 10,
        ["500 5.5.1"] * 10 + ["421 4.7.0"],
    ),
    (
        "8-bit and control characters in commands",
        b"LHLO \xff\r\nNO\x00OP\r\n",
        {},
        [p.Rejected("", p.Reply(500, "5.5.2", "8-bit characters in a command")),
         p.Rejected("", p.Reply(500, "5.5.2", "control characters in a command")), p.ConnectionClosed(False)],
        ["500 5.5.2", "500 5.5.2"],
    ),
    (
        "client disconnects in the middle of DATA",
        LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\npartial line\r\nand no final dot",
        {},
        [HELLO, FROM, p.RcptTo("a@x.test"), p.DataStart(), p.Data(b"partial line\n"), p.ConnectionClosed(True)],
        ["250", "250 2.1.0", "250 2.1.5", "354"],
    ),
    (
        "RSET ends the transaction; RCPT then needs a new MAIL",
        LHLO + MAIL + b"RSET\r\nRCPT TO:<a@x.test>\r\nNOOP\r\nVRFY a\r\nHELP\r\nBDAT 10\r\n",
        {},
        [HELLO, FROM, p.Reset(), p.Rejected("RCPT", p.Reply(503, "5.5.1", "need MAIL before RCPT")), p.Noop(),
         p.Noop(), p.Noop(), p.Rejected("BDAT", p.Reply(502, "5.5.1", "BDAT not implemented")),
         p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "250 2.0.0", "503 5.5.1", "250 2.0.0", "252 2.5.0", "214 2.0.0", "502 5.5.1"],
    ),
    (
        "malformed paths",
        LHLO + b"MAIL FROM:s@x\r\nMAIL TO:<s@x>\r\n" + MAIL + b"RCPT TO:<>\r\nRCPT TO:<a@x.test> NOTIFY=NEVER\r\n"
        b"RCPT TO:<a@x.test\r\nRCPT TO:<@relay:a@x.test>\r\n",
        {},
        [HELLO, p.Rejected("MAIL", p.Reply(501, "5.5.4", "syntax: MAIL FROM:<address> (address must be in <>)")),
         p.Rejected("MAIL", p.Reply(501, "5.5.4", "syntax: MAIL FROM:<address> (expected FROM:)")), FROM,
         p.Rejected("RCPT", p.Reply(501, "5.1.3", "bad recipient address syntax")),
         p.Rejected("RCPT", p.Reply(555, "5.5.4", "RCPT parameters are not supported")),
         p.Rejected("RCPT", p.Reply(501, "5.5.4", "syntax: RCPT TO:<address> (missing >)")),
         p.RcptTo("a@x.test"), p.ConnectionClosed(False)],
        ["250", "501 5.5.4", "501 5.5.4", "250 2.1.0", "501 5.1.3", "555 5.5.4", "501 5.5.4", "250 2.1.5"],
    ),
    (
        "too many recipients: 452, the rest go in the next transaction",
        LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nRCPT TO:<c@x.test>\r\n",
        {"max_recipients": 2},
        [HELLO, FROM, p.RcptTo("a@x.test"), p.RcptTo("b@x.test"),
         p.Rejected("RCPT", p.Reply(452, "4.5.3", "too many recipients")), p.ConnectionClosed(False)],
        ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3"],
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(("name", "data", "kwargs", "events", "replies"), CASES, ids=[c[0] for c in CASES])
def test_table(name: str, data: bytes, kwargs: dict[str, object], events: list[object], replies: list[str],
               bytewise: bool) -> None:
    got, out, _conn = drive(data, bytewise=bytewise, **kwargs)
    assert got == events
    assert codes(out) == replies


def test_lhlo_advertises_the_extensions() -> None:
    _events, out, _ = drive(LHLO, max_size=5000)
    assert out == (b"250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
                   b"250 SIZE 5000\r\n")


def test_long_line_streamed_in_pieces_is_accepted() -> None:
    """A line longer than any buffer is never held whole, and accepted whole at the end."""
    conn = p.Connection(HOST)
    conn.receive_data(LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\n")
    for _ in range(3):
        ev = conn.next_event()
    conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))
    assert conn.next_event() == p.DataStart()
    got = b""
    for _ in range(5):
        conn.receive_data(b"w" * 50000)
        while (ev := conn.next_event()) is not p.NEED_DATA:
            assert isinstance(ev, p.Data)
            got += ev.data
        assert len(conn._in) < 1 << 17
    conn.receive_data(b"\r\n.\r\n")
    while isinstance(ev := conn.next_event(), p.Data):
        got += ev.data
    assert isinstance(ev, p.EndOfData) and ev.error is None
    assert got == b"w" * 250000 + b"\n"


def test_greeting() -> None:
    conn = p.Connection(HOST)
    conn.greeting()
    assert conn.data_to_send() == b"220 mx.test LMTP vdeliver ready\r\n"


def test_stopping_answers_421_and_closes() -> None:
    conn = p.Connection(HOST)
    conn.receive_data(LHLO + MAIL)
    assert conn.next_event() == HELLO
    conn.stopping = True
    ev = conn.next_event()
    assert isinstance(ev, p.Rejected) and ev.reply.code == 421
    assert conn.closed
    assert conn.data_to_send().endswith(b"421 4.3.2 mx.test shutting down, try again later\r\n")


def test_server_must_answer_before_more_events() -> None:
    conn = p.Connection(HOST)
    conn.receive_data(LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\n")
    for _ in range(3):
        conn.next_event()
    with pytest.raises(p.LocalProtocolError):
        conn.next_event()
    with pytest.raises(p.LocalProtocolError):
        conn.answer_data(p.Reply(250, "2.0.0", "no"))
    conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))
    assert conn.next_event() == p.DataStart()


def test_data_replies_in_order_then_ready() -> None:
    conn = p.Connection(HOST)
    conn.receive_data(LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n.\r\n")
    while True:
        ev = conn.next_event()
        if isinstance(ev, p.RcptTo):
            conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))
        if isinstance(ev, p.EndOfData):
            break
    assert ev == p.EndOfData(("a@x.test", "b@x.test"), None)
    conn.data_to_send()
    conn.answer_data(p.Reply(452, "4.2.2", "<a@x.test> mailbox full"))
    assert conn.state == p.WAIT_DATA
    conn.answer_data(p.Reply(250, "2.0.0", "<b@x.test> delivered"))
    assert conn.state == p.READY and conn.recipients == []
    assert conn.data_to_send() == b"452 4.2.2 <a@x.test> mailbox full\r\n250 2.0.0 <b@x.test> delivered\r\n"


_line = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(lines=st.lists(_line, max_size=30), cuts=st.lists(st.integers(1, 50), max_size=40))
def test_stuffing_round_trip(lines: list[bytes], cuts: list[int]) -> None:
    """Whatever the lines and however the stream is cut, DATA yields exactly the message."""
    body = b"".join(b"." + line + b"\r\n" if line.startswith(b".") else line + b"\r\n" for line in lines)
    stream = LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\n" + body + b".\r\n"
    conn = p.Connection(HOST)
    got = bytearray()
    pos = 0
    sizes = iter(cuts)
    ended = False
    while not ended:
        step = next(sizes, 4096)
        conn.receive_data(stream[pos : pos + step])
        pos += step
        while True:
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                break
            if isinstance(ev, p.RcptTo):
                conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))
            elif isinstance(ev, p.Data):
                got += ev.data
            elif isinstance(ev, p.EndOfData):
                assert ev.error is None
                ended = True
                break
    assert bytes(got) == b"".join(line + b"\n" for line in lines)


_tokens = st.sampled_from([b"LHLO c\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<a@x.test>\r\n", b"DATA\r\n", b".\r\n",
                           b"RSET\r\n", b"\r\n", b"\n", b"..x\r\n", b"MAIL FROM:<a@b> SIZE=99999999\r\n", b"QUIT\r\n"])


@given(chunks=st.lists(st.one_of(_tokens, st.binary(max_size=40)), max_size=40))
def test_any_input_gets_replies_never_an_exception(chunks: list[bytes]) -> None:
    """Whatever a client sends, the protocol answers with well-formed replies and never raises."""
    events, out, conn = drive(b"".join(chunks), max_size=1000)
    for line in out.split(b"\r\n")[:-1]:
        assert len(line) >= 4 and line[:3].isdigit() and line[3:4] in (b" ", b"-"), line
    # The input ended (drive() feeds end of file): the session is over, never stuck waiting.
    assert conn.closed
    event_types = (p.Hello, p.MailFrom, p.RcptTo, p.DataStart, p.Data, p.EndOfData, p.Reset, p.Noop, p.Quit,
                   p.Rejected, p.ConnectionClosed)
    assert all(isinstance(e, event_types) for e in events)
    # Every refusal the protocol reports to the server was also said to the client.
    assert all(bytes(e.reply) in out for e in events if isinstance(e, p.Rejected))
    # Exactly one final reply per command, and one per recipient at the end of the data (a
    # client that sent ten bad commands also gets the 421 that closes the session).
    expected = 0
    for e in events:
        if isinstance(e, p.EndOfData):
            expected += len(e.recipients)
        elif not isinstance(e, (p.Data, p.ConnectionClosed)):
            expected += 1
    finals = sum(1 for line in out.split(b"\r\n") if len(line) >= 4 and line[3:4] == b" ")
    closing = b"421 4.7.0 too many errors" in out
    assert finals == expected + closing, (finals, expected, events)


# -- the transition table, walked --------------------------------------------------------

# How to reach each state a client's command can arrive in, and a well-formed line per command.
_REACH = {p.INIT: b"", p.READY: b"LHLO c\r\n", p.MAIL: b"LHLO c\r\nMAIL FROM:<a@b>\r\n"}
_LINES = {"LHLO": b"LHLO c\r\n", "MAIL": b"MAIL FROM:<a@b>\r\n", "RCPT": b"RCPT TO:<a@x.test>\r\n",
          "DATA": b"DATA\r\n", "RSET": b"RSET\r\n", "NOOP": b"NOOP\r\n", "HELP": b"HELP\r\n",
          "VRFY": b"VRFY a\r\n", "QUIT": b"QUIT\r\n"}


def _in_state(state: str) -> p.Connection:
    conn = p.Connection(HOST)
    if _REACH[state]:  # b"" would be the end of file
        conn.receive_data(_REACH[state])
    for _ in range(5):
        if conn.next_event() is p.NEED_DATA:
            break
    assert conn.state == state
    conn.data_to_send()
    return conn


def test_the_table_names_every_command_and_handler() -> None:
    assert set(_LINES) == p.COMMANDS
    assert all(state in (p.INIT, p.READY, p.MAIL, p.WAIT_RCPT, p.DATA, p.WAIT_DATA) and
               nxt in (p.INIT, p.READY, p.MAIL, p.WAIT_RCPT, p.DATA, p.WAIT_DATA, p.CLOSED)
               for (state, _event), nxt in p.TRANSITIONS.items())


@pytest.mark.parametrize("state", [p.INIT, p.READY, p.MAIL])
@pytest.mark.parametrize("verb", sorted(_LINES))
@pytest.mark.parametrize("bytewise", [False, True])
def test_every_command_in_every_state_does_what_the_table_says(state: str, verb: str, bytewise: bool) -> None:
    """A command the table allows takes its transition; any other is answered 503 and
    changes nothing.  (DATA with no accepted recipient is the one allowed command that a
    rule of its own refuses, also with 503.)"""
    conn = _in_state(state)
    line = _LINES[verb]
    for piece in ([line[i:i + 1] for i in range(len(line))] if bytewise else [line]):
        conn.receive_data(piece)
    event = conn.next_event()
    out = conn.data_to_send()
    allowed = (state, verb) in p.TRANSITIONS
    if allowed and not (verb == "DATA" and not conn.recipients):
        assert not isinstance(event, p.Rejected), (event, out)
        assert conn.state == p.TRANSITIONS[(state, verb)]
    else:
        assert isinstance(event, p.Rejected) and event.reply.code == 503, (event, out)
        assert out.startswith(b"503 5.5.1 ") and conn.state == state


def test_the_server_steps_follow_the_table() -> None:
    """RCPT waits for the server's answer; the end of the data waits for one answer per
    recipient; then the transaction is over."""
    conn = _in_state(p.MAIL)
    conn.receive_data(_LINES["RCPT"])
    assert isinstance(conn.next_event(), p.RcptTo) and conn.state == p.WAIT_RCPT
    with pytest.raises(p.LocalProtocolError):
        conn.next_event()  # the server must answer first
    conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))
    assert conn.state == p.TRANSITIONS[(p.WAIT_RCPT, "rcpt answered")]
    conn.receive_data(b"DATA\r\nhello\r\n.\r\n")
    assert isinstance(conn.next_event(), p.DataStart) and conn.state == p.DATA
    assert isinstance(conn.next_event(), p.Data)
    assert isinstance(conn.next_event(), p.EndOfData) and conn.state == p.TRANSITIONS[(p.DATA, "end of data")]
    with pytest.raises(p.LocalProtocolError):
        conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))  # not the step this state waits for
    conn.answer_data(p.Reply(250, "2.0.0", "delivered"))
    assert conn.state == p.TRANSITIONS[(p.WAIT_DATA, "all answered")]


def reference_data(body: bytes) -> tuple[bytes, int] | None:
    """What DATA means, line by line (RFC 5321 4.5.2 with LMTP's line ends): (the message with
    LF line ends and stuffed dots removed, the size as sent less the stuffed dots), or None when
    the body has no ".\r\n" at a line start."""
    out, size, pos, bol = bytearray(), 0, 0, True
    while pos < len(body):
        if bol and body[pos:pos + 3] == b".\r\n":
            return bytes(out), size
        if bol and body[pos] == 0x2E:
            pos += 1
        lf = body.find(b"\n", pos)
        if lf < 0:
            return None
        line = body[pos:lf + 1]
        size += len(line)
        out += line[:-2] + b"\n" if line.endswith(b"\r\n") else line
        bol, pos = True, lf + 1
    return None


_body_piece = st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\n.\r\n", b"x", b"From ", b"\r\r"])


@given(pieces=st.lists(st.one_of(_body_piece, st.binary(max_size=20)), max_size=60),
       cuts=st.lists(st.integers(1, 40), max_size=60), max_size=st.sampled_from([0, 50, 10**6]))
def test_data_equals_the_line_by_line_reading(pieces: list[bytes], cuts: list[int], max_size: int) -> None:
    """Block-wise DATA (bytes.find/replace over whatever arrived) gives exactly what reading the
    body line by line gives, however the stream is cut: the same message, the same end, and
    the message refused for its size exactly when the line-by-line size is over the limit."""
    body = b"".join(pieces) + b"\r\n.\r\n"
    expected = reference_data(body)
    assert expected is not None
    want, size = expected
    stream = LHLO + MAIL + b"RCPT TO:<a@x.test>\r\nDATA\r\n" + body + b"NOOP\r\n"
    conn = p.Connection(HOST, max_size=max_size)
    got = bytearray()
    pos, sizes = 0, iter(cuts)
    end: p.EndOfData | None = None
    while end is None and pos < len(stream) + 1:
        step = next(sizes, 4096)
        conn.receive_data(stream[pos:pos + step])
        pos += step
        while True:
            ev = conn.next_event()
            if ev is p.NEED_DATA:
                break
            if isinstance(ev, p.RcptTo):
                conn.answer_rcpt(p.Reply(250, "2.1.5", "ok"))
            elif isinstance(ev, p.Data):
                got += ev.data
            elif isinstance(ev, p.EndOfData):
                end = ev
                break
    assert end is not None
    too_big = bool(max_size) and size > max_size
    assert (end.error is not None) == too_big
    if not too_big:
        assert bytes(got) == want


@given(st.text(alphabet=st.sampled_from([chr(i) for i in range(0x80)] + ["é", "\u2028", "\udc80"]), max_size=12))
def test_printable_check_equals_the_character_rule(text: str) -> None:
    """The C check of an address (isascii, isprintable, no space) says what the loop said."""
    assert p._printable(text) == all(" " < ch < "\x7f" for ch in text)
