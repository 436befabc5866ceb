"""The sendmail socket map protocol, as a state machine fed bytes: no I/O here.

sendmail (map class `socket`) sends one netstring per lookup and waits for one
netstring back:

    request:  <len>:<map name> <key>,        e.g. 25:virtuser fred@example.org,
    reply:    <len>:OK <value>,  NOTFOUND,  TEMP <why>,  TIMEOUT <why>,  PERM <why>

A connection is persistent: one sendmail process sends lookup after lookup on it.
Following h11, the server feeds whatever it read to `Connection.receive_data()`
and asks `next_event()` for what happened:

    Request(map, key)   a well-formed lookup: answer it
    BadRequest(reason)  framed correctly but unusable (no key, control bytes,
                        non-ASCII, key too long): answer PERM, keep the connection
    ProtocolError(...)  the framing is lost (not a netstring, length over the limit,
                        EOF mid-request): answer PERM once, then close
    NEED_DATA           nothing complete yet
    CLOSED              the peer closed cleanly between requests

Nothing here raises on input from the peer, whatever the bytes: garbage always
becomes an event.  The client side (tests, benchmarks) uses `encode_request()` and
`ReplyReader`.
"""

from __future__ import annotations

from dataclasses import dataclass

# sendmail keys are addresses (at most 320 octets by RFC 5321) or access keys such
# as `Connect:` + an IPv6 literal; 512 leaves room.  The map name adds a little.
MAX_KEY = 512
MAX_MAP_NAME = 64
# A reply value is a rewritten address or an access verdict; sendmail accepts far
# more, but a reader should not buffer without bound.
MAX_REPLY = 64 * 1024

_DIGITS = b"0123456789"
_PRINTABLE = bytes(range(0x20, 0x7F))
_MAP_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

STATUSES = ("OK", "NOTFOUND", "TEMP", "TIMEOUT", "PERM")


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")


@dataclass(frozen=True, slots=True)
class Request:
    map: str
    key: str


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A complete netstring that is not a usable lookup; the connection goes on."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The byte stream is not (or no longer) netstrings: reply once, then close."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    status: str  # one of STATUSES
    text: str = ""

    def encode(self) -> bytes:
        return encode_reply(self)


def ok(value: str) -> Reply:
    return Reply("OK", value)


NOTFOUND = Reply("NOTFOUND")


def temp(reason: str) -> Reply:
    return Reply("TEMP", reason)


def timeout(reason: str) -> Reply:
    return Reply("TIMEOUT", reason)


def perm(reason: str) -> Reply:
    return Reply("PERM", reason)


Event = Request | BadRequest | ProtocolError | _Sentinel


def netstring(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


def encode_reply(reply: Reply) -> bytes:
    """The netstring for a reply; reason texts are flattened to one printable line."""
    if reply.status == "NOTFOUND" or (not reply.text and reply.status != "OK"):
        body = reply.status.encode("ascii")
    else:
        text = "".join(ch if " " <= ch <= "~" else "?" for ch in reply.text)
        body = f"{reply.status} {text}".encode("ascii")
    return netstring(body)


def encode_request(map_name: str, key: str) -> bytes:
    return netstring(f"{map_name} {key}".encode())


class _NetstringReader:
    """Splits a byte stream into netstring payloads of at most `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None
        self._max_digits = len(str(limit))

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
        elif self._error is None:
            self._buf += data

    @property
    def pending(self) -> bool:
        """True while part of a netstring is buffered (a stalled peer is mid-request)."""
        return bool(self._buf) and self._error is None

    def next(self) -> bytes | ProtocolError | _Sentinel:
        if self._error is not None:
            return self._error
        buf = self._buf
        if not buf:  # the common case after each request: nothing more buffered
            return CLOSED if self._eof else NEED_DATA
        colon = buf.find(b":", 0, self._max_digits + 1)
        if colon < 0:
            # No colon yet: legal only while what we have is a short run of digits.
            if buf[: self._max_digits + 1].strip(_DIGITS):
                return self._fail("not a netstring (expected <length>:)")
            if len(buf) > self._max_digits:
                return self._fail(f"request too long (over {self.limit} bytes)")
            return self._need()
        digits = bytes(buf[:colon])
        if not digits or digits.strip(_DIGITS):
            return self._fail("not a netstring (bad length)")
        if len(digits) > 1 and digits[0:1] == b"0":
            return self._fail("not a netstring (leading zero in length)")
        length = int(digits)
        if length > self.limit:
            return self._fail(f"request too long ({length} > {self.limit} bytes)")
        end = colon + 1 + length
        if len(buf) <= end:
            return self._need()
        if buf[end] != 0x2C:  # ","
            return self._fail("not a netstring (missing ',' after payload)")
        payload = bytes(buf[colon + 1 : end])
        del buf[: end + 1]
        return payload

    def _need(self) -> ProtocolError | _Sentinel:
        if self._eof:
            if self._buf:
                return self._fail("connection closed in the middle of a request")
            return CLOSED
        return NEED_DATA

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._buf.clear()
        return self._error


def parse_request(payload: bytes, max_key: int = MAX_KEY) -> Request | BadRequest:
    """`<map> <key>` -> Request, or the reason it cannot be one."""
    name, space, key = payload.partition(b" ")
    if not space:
        return BadRequest("no key in request (expected '<map> <key>')")
    if not name:
        return BadRequest("empty map name")
    if len(name) > MAX_MAP_NAME or not _MAP_NAME_BYTES.issuperset(name):
        return BadRequest("invalid map name")
    if not key:
        return BadRequest("empty key")
    if len(key) > max_key:
        return BadRequest(f"key too long ({len(key)} > {max_key} bytes)")
    if key.translate(None, _PRINTABLE):  # one pass in C; the loop below only names the fault
        for byte in key:
            if byte < 0x20 or byte > 0x7E:
                what = "non-ASCII" if byte > 0x7F else "control character"
                return BadRequest(f"{what} in key")
    return Request(name.decode("ascii"), key.decode("ascii"))


class Connection:
    """Server side of one socket map connection."""

    def __init__(self, max_key: int = MAX_KEY) -> None:
        self.max_key = max_key
        self._reader = _NetstringReader(max_key + MAX_MAP_NAME + 1)

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; b"" means the peer closed its side."""
        self._reader.feed(data)

    @property
    def pending(self) -> bool:
        return self._reader.pending

    @property
    def idle(self) -> bool:
        """Nothing buffered, no framing error: the next bytes start a new request."""
        return not self._reader._buf and self._reader._error is None

    def next_event(self) -> Event:
        item = self._reader.next()
        if isinstance(item, bytes):
            return parse_request(item, self.max_key)
        return item

    def one_request(self, data: bytes) -> Request | BadRequest | None:
        """The common case, short: nothing buffered and `data` is exactly one well-formed
        netstring -> its Request (or BadRequest), the same event receive_data(data) and
        next_event() would give, without buffering.  None for anything else: then call those."""
        reader = self._reader
        if reader._buf or reader._error is not None or data[-1:] != b",":
            return None
        colon = data.find(b":", 0, reader._max_digits + 1)
        if colon <= 0 or (colon > 1 and data[0] == 0x30):
            return None
        digits = data[:colon]
        if not digits.isdigit() or int(digits) != len(data) - colon - 2 or int(digits) > reader.limit:
            return None
        return parse_request(data[colon + 1 : -1], self.max_key)


class ReplyReader:
    """Client side: replies out of a byte stream (for tests and benchmarks)."""

    def __init__(self, limit: int = MAX_REPLY) -> None:
        self._reader = _NetstringReader(limit)

    def receive_data(self, data: bytes) -> None:
        self._reader.feed(data)

    def next_reply(self) -> Reply | ProtocolError | _Sentinel:
        item = self._reader.next()
        if not isinstance(item, bytes):
            return item
        try:
            text = item.decode("ascii")
        except UnicodeDecodeError:
            return ProtocolError("non-ASCII reply")
        status, _, rest = text.partition(" ")
        if status not in STATUSES:
            return ProtocolError(f"unknown reply status {status[:20]!r}")
        return Reply(status, rest)
