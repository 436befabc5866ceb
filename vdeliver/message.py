"""Read the message from stdin and prepare the exact bytes a mailbox will receive.

The message is bytes from start to end: it is never parsed into objects and never
re-serialised, so signed headers keep their folding.  What changes:

- CRLF becomes LF; a missing final newline is added.
- A leading `From ` line (sendmail prepends one) gives the envelope sender and is
  replaced by our own (mbox only): `From <sender>  <asctime>`.
- `Return-Path:` and `Delivered-To:` are added on top; an incoming Return-Path is
  dropped when we add ours, and a Delivered-To equal to ours is a mail loop.
- mbox only: headers a sender could use to confuse readers are dropped, and body
  lines that would read as a message separator are escaped (mboxo or mboxrd).

All of it is read before any lock is taken.  The record is a list of pieces (the reads,
slices of them, the lines we add), never joined: escaping inserts a '>' between two
slices instead of copying the message.  Above `spool_threshold` bytes the record goes to
an unnamed temporary file (O_TMPFILE), so a 100 MB message does not sit in memory; a
Maildir on the same file system then takes that file itself as its new message (a link,
no copy: maildir.py).  Fresh memory is dearer than the page cache (a page fault per 4
KB), so a large message is better spooled than held.  Nothing here imports more than os
and time.

Over 400 lines on purpose: the envelope, the From_ line, the added headers, escaping and the
spool are one streaming pass over the message; apart they would each need the others' state.
"""

import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py

from vdeliver.errors import DeliveryError, Status, fail, status_for_errno
from vdeliver.fileio import anonymous_spool, writev_all

TYPE_CHECKING = False  # typing costs an import on the hot path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from vdeliver.hooks import Sink

# Reads of 64 KB (a pipe's size): larger ones cost more CPU (os.read allocates the whole size,
# then shrinks it), and each pass of the escaper over a block stays in the CPU's cache.
CHUNK = 1 << 16
JOIN_MAX = 1 << 20  # a record held in memory up to this size is written in one piece (one write call)
WRITE_BATCH = 1 << 18  # a spool file is written this much at a time (writev of the pieces)
LF_BLOCK = 1 << 16  # line feeds are counted in pieces this size, which stay in the CPU's cache
COPY_BLOCK = 8 << 20  # copy_file_range in pieces, so that a writer can refresh its lock between them
MAX_HEADER = 1 << 20  # a longer header block is refused (5.3.4): see prepare()
MAX_SENDER = 512

# Headers an mbox reader keeps its own state in (Dovecot, mutt, Pine, UW-IMAP).
MBOX_STRIP = frozenset(
    (b"content-length", b"status", b"x-status", b"x-keywords", b"x-uid", b"x-imap", b"x-imapbase")
)



def header_value(data: bytes, name: bytes) -> bytes:
    """The first value of a header field (`name` in lower case) in a record's header block,
    unfolded; b"" when there is none."""
    end = data.find(b"\n\n")
    lines = data[: end if end >= 0 else len(data)].split(b"\n")
    for i, line in enumerate(lines):
        if line[: len(name) + 1].lower() == name + b":":
            value = line[len(name) + 1:]
            for more in lines[i + 1:]:
                if more[:1] not in (b" ", b"\t"):
                    break
                value += more
            return value.strip()
    return b""


def sanitize_sender(sender: str) -> str:
    """Make an envelope sender safe for a From_ line and a header value."""
    s = sender.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    if len(s) > MAX_SENDER:
        s = s[:MAX_SENDER]
    if s.isascii() and s.isprintable() and " " not in s and "<" not in s and ">" not in s:
        return s  # nothing to replace (nearly every sender): no loop over its characters
    out = []
    for ch in s:
        if ch <= " " or ch == "\x7f" or ch in "<>":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def from_line(sender: str, when: "float | None" = None) -> bytes:
    import time

    stamp = time.asctime(time.localtime(when))
    shown = sender or "MAILER-DAEMON"
    return f"From {shown}  {stamp}\n".encode("utf-8", "surrogateescape")


def count_lf(data: "bytes | bytearray | memoryview") -> int:
    """The line feeds in data: len - len(without LFs), a third of the time of bytes.count(b"\n")
    on CPython 3.11, in pieces that stay in the CPU's cache."""
    if len(data) <= LF_BLOCK and not isinstance(data, memoryview):
        return len(data) - len(data.replace(b"\n", b""))
    view = memoryview(data)
    n = 0
    for at in range(0, len(view), LF_BLOCK):
        piece = bytes(view[at:at + LF_BLOCK])
        n += len(piece) - len(piece.replace(b"\n", b""))
    return n


class Escaper:
    """Streaming CRLF normalisation and mbox From_-escaping of a byte stream.

    Feed chunks with `feed()`, end with `close()`.  Output goes to `sink(piece)`, in pieces
    that are the chunks themselves or slices of them (memoryviews: nothing is copied), so a
    chunk must not change once fed.  mode is None (no escaping, Maildir), "mboxo" (`From `
    -> `>From `) or "mboxrd" (`>*From ` gains one more `>`).  Line feeds are counted
    (out_lf) only with count_lf: a Maildir name needs them, an mbox does not.
    """

    __slots__ = ("mode", "sink", "at_bol", "carry", "pending_cr", "out_bytes", "out_lf", "last", "count_lf")

    def __init__(self, mode: "str | None", sink: "Sink", count_lf: bool = True) -> None:
        self.mode = mode
        self.sink = sink
        self.at_bol = True
        self.carry = b""
        self.pending_cr = False
        self.out_bytes = 0
        self.out_lf = 0
        self.last = 10  # the last byte written: pretend a newline before the start
        self.count_lf = count_lf

    def _emit(self, data: "bytes | bytearray | memoryview") -> None:
        if data:
            self.out_bytes += len(data)
            if self.count_lf:
                self.out_lf += count_lf(data)
            self.last = data[-1]
            self.sink(data)

    def feed(self, chunk: "bytes | bytearray", normalized: bool = False) -> None:
        """Take the next chunk; normalized=True for text whose CRLFs are already LFs."""
        if not normalized:
            if self.pending_cr:
                chunk = b"\r" + chunk
                self.pending_cr = False
            if chunk.endswith(b"\r"):
                self.pending_cr = True
                chunk = chunk[:-1]
            if b"\r" in chunk:  # a memchr: most messages have no CR at all (sendmail passes LF)
                chunk = chunk.replace(b"\r\n", b"\n")
        if not chunk:
            return
        if self.mode is None:
            self._emit(chunk)
            return
        data = self.carry + chunk if self.carry else chunk
        self.carry = b""
        # Hold back a trailing partial line that could still become `From `.
        nl = data.rfind(b"\n")
        tail = data[nl + 1 :]
        line_start = nl >= 0 or self.at_bol
        rest = tail.lstrip(b">") if self.mode == "mboxrd" else tail
        held = b""
        if line_start and len(rest) < 5 and b"From ".startswith(rest):
            held = bytes(rest)
            next_bol = True
        else:
            next_bol = False
        self._escape(data, len(data) - len(held))
        self.carry = held
        self.at_bol = next_bol

    def _escape(self, data: "bytes | bytearray", end: int) -> None:
        """Emit data[:end] with a '>' before each `From ` that starts a line (mboxrd: after '>'s)."""
        # Searching for `From ` and looking at the byte before is about four times faster than
        # searching for `\nFrom ` (a needle that starts with the commonest byte).  The loop runs
        # once per `From ` in the block, never per line; a block made of them (more than one
        # in a KB) takes the one-pass replace for what is left of it.
        view = None
        start = 0
        marked = False  # a '>' emitted for the `From ` at `start`
        p = data.find(b"From ", 0, end)
        budget = (end >> 10) + 16 if self.mode == "mboxo" else -1
        while p >= 0:
            q = p
            if self.mode == "mboxrd":
                while q > 0 and data[q - 1] == 62:  # '>'
                    q -= 1
            if (q == 0 and self.at_bol) or (q > 0 and data[q - 1] == 10):
                if view is None:
                    view = memoryview(data)
                self._emit(view[start:p])
                self._emit(b">")
                start, marked = p, True
            if budget >= 0:
                budget -= 1
                if budget < 0:
                    rest = bytes(data[start:end])
                    if not marked and self.at_bol and start == 0 and rest.startswith(b"From "):
                        self._emit(b">")
                    self._emit(rest.replace(b"\nFrom ", b"\n>From "))
                    return
            p = data.find(b"From ", p + 5, end)
        if start == 0 and end == len(data):
            self._emit(data)
        else:
            self._emit((view if view is not None else memoryview(data))[start:end])

    def close(self) -> None:
        """Flush what is held back and make sure the stream ends with a newline."""
        if self.pending_cr:
            self.pending_cr = False
            self.carry += b"\n"  # a CR at the very end: the CRLF lost its LF
        if self.carry:
            carry, self.carry = self.carry, b""
            self._emit(carry)
        if self.last != 10:
            self._emit(b"\n")


class Spool:
    """Collects output in memory as a list of pieces (never joined, never copied: each piece
    must not change once written), moving to an unnamed file past a threshold."""

    __slots__ = ("threshold", "spool_dir", "near", "in_near", "parts", "held", "fd", "length", "linked")

    def __init__(self, threshold: int, spool_dir: str, near: str = "") -> None:
        self.threshold = threshold
        self.spool_dir = spool_dir
        self.near = near  # tried first: the target Maildir's tmp/ (see prepare())
        self.in_near = False  # the file is there
        self.parts: "list[bytes | bytearray | memoryview]" = []
        self.held = 0  # file mode: bytes in parts, not written yet
        self.fd = -1
        self.length = 0
        self.linked = False  # the file was given a name (link_into): it is a stored message now

    def write(self, data: "bytes | bytearray | memoryview") -> None:
        self.length += len(data)
        self.parts.append(data)
        if self.fd < 0:
            if self.length > self.threshold:
                self._open_file()
                self.flush()
            return
        # To the file a few reads at a time, in one writev: an escaped read is many pieces.
        self.held += len(data)
        if self.held >= WRITE_BATCH:
            self.flush()

    def flush(self) -> None:
        """Write out the pieces held back (file mode); before anyone reads the file."""
        if self.fd >= 0 and self.parts:
            writev_all(self.fd, self.parts)
            self.parts = []
            self.held = 0

    def _open_file(self) -> None:
        if self.near:
            try:
                # Unnamed, in a directory of ours (we never run as root here); never through a
                # symbolic link.  Any failure: spool_dir, as without `near`.
                self.fd = os.open(self.near, os.O_TMPFILE | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                self.in_near = True
                return
            except OSError:
                pass
        try:
            self.fd = anonymous_spool(self.spool_dir, "vdeliver.")
        except OSError as exc:
            raise fail("cannot spool message", f"{self.spool_dir}: {exc.strerror}") from None

    def head(self, n: int) -> bytes:
        """The first n bytes collected (fewer if there are fewer)."""
        self.flush()
        if self.fd < 0:
            out = bytearray()
            for part in self.parts:
                out += part[:n - len(out)]
                if len(out) >= n:
                    break
            return bytes(out)
        return os.pread(self.fd, n, 0)

    def chunks(self, size: int = 1 << 20) -> "Iterator[bytes | bytearray | memoryview]":
        """Yield the collected bytes from the start (memory: the pieces themselves; file: reads)."""
        self.flush()
        if self.fd < 0:
            if len(self.parts) > 1 and self.length <= JOIN_MAX:
                yield b"".join(self.parts)  # one write for a small record
            else:
                yield from self.parts
            return
        offset = 0
        while offset < self.length:
            data = os.pread(self.fd, min(size, self.length - offset), offset)
            if not data:
                raise OSError(5, "spool file shrank")
            offset += len(data)
            yield data

    def copy_file(self, out: int, at: "int | None" = None, tick: "Callable[[], None] | None" = None) -> bool:
        """Copy a spooled file to `out` (at its position, or at offset `at`) inside the kernel (copy_file_range:
        no pass through Python's memory, a reflink where the file system has them).  False,
        with nothing written, when the spool is in memory or the kernel refuses the pair (an
        O_APPEND target, another file system on an old kernel): then use chunks()."""
        self.flush()
        if self.fd < 0:
            return False
        offset = 0
        while offset < self.length:
            try:
                n = os.copy_file_range(self.fd, out, min(self.length - offset, COPY_BLOCK), offset,
                                       None if at is None else at + offset)
            except OSError as exc:
                if offset == 0 and exc.errno in (9, 18, 22, 38, 95):  # EBADF EXDEV EINVAL ENOSYS EOPNOTSUPP
                    return False
                raise
            if n == 0:
                raise OSError(5, "spool file shrank")
            offset += n
            if tick is not None:
                tick()
        return True

    def link_into(self, dir_fd: int, name: str) -> bool:
        """Give the spool file the name `name` in dir_fd (a Maildir's tmp/), so that it is the
        message itself, not a copy of it: no second write of 10 MB.  Once only: a second
        mailbox gets a copy (hard links between mailboxes are maildir.link_copy()'s decision).
        False, with nothing done, when the record is in memory or the file cannot be linked
        there (another file system, no /proc, a named spool file already unlinked); a name
        that exists raises FileExistsError (pick another)."""
        self.flush()
        if self.fd < 0 or self.linked:
            return False
        try:
            # /proc/self/fd/N with AT_SYMLINK_FOLLOW: linkat(2) of an O_TMPFILE file without
            # CAP_DAC_READ_SEARCH (which AT_EMPTY_PATH needs).
            os.link(f"/proc/self/fd/{self.fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            raise
        except OSError:
            return False
        self.linked = True
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.parts = []


class HeaderView:
    """A spool read with header lines put in after its first line (an mbox record's From_
    line): the flags of one copy of a message stored in several mailboxes."""

    __slots__ = ("spool", "lines", "cut", "length")

    def __init__(self, spool: "Spool | HeaderView | Spliced", lines: bytes) -> None:
        first = spool.head(1 << 16)
        nl = first.find(b"\n")
        self.spool, self.lines = spool, lines
        self.cut = nl + 1 if first.startswith(b"From ") and nl >= 0 else 0
        self.length: int = spool.length + len(lines)

    def head(self, n: int) -> bytes:
        data = self.spool.head(n)
        return (data[: self.cut] + self.lines + data[self.cut:])[:n]

    def chunks(self, size: int = 1 << 20) -> "Iterator[bytes | bytearray | memoryview]":
        pending = self.cut
        if not pending:
            yield self.lines
        for chunk in self.spool.chunks(size):
            if 0 < pending <= len(chunk):
                yield bytes(chunk[:pending]) + self.lines
                chunk = chunk[pending:]
                pending = 0
            elif pending:
                pending -= len(chunk)
            if chunk:
                yield chunk

    def close(self) -> None:
        pass  # the spool is the message's own, closed with it


class Spliced:
    """A spool read with its first `skip` bytes replaced by `prefix`: a record whose header
    a Sieve script edited (the body is never copied)."""

    __slots__ = ("spool", "prefix", "skip", "length")

    def __init__(self, spool: "Spool | HeaderView | Spliced", prefix: bytes, skip: int) -> None:
        self.spool, self.prefix, self.skip = spool, prefix, skip
        self.length: int = len(prefix) + spool.length - skip

    def head(self, n: int) -> bytes:
        return (self.prefix + self.spool.head(n + self.skip)[self.skip:])[:n]

    def chunks(self, size: int = 1 << 20) -> "Iterator[bytes | bytearray | memoryview]":
        yield self.prefix
        pending = self.skip
        for chunk in self.spool.chunks(size):
            if pending >= len(chunk):
                pending -= len(chunk)
                continue
            yield chunk[pending:]
            pending = 0

    def close(self) -> None:
        pass  # the spool is the message's own, closed with it


class Prepared:
    """The record to store: `spool` holds it; sizes for Maildir names and logs."""

    __slots__ = ("spool", "sender", "length", "_lf", "input_size", "had_from_line")

    def __init__(self, spool: "Spool | HeaderView | Spliced", sender: str, length: int, lf_count: "int | None",
                 input_size: int,
                 had_from_line: bool) -> None:
        self.spool, self.sender = spool, sender
        self.length = length  # the record as stored
        self._lf = lf_count  # its line feeds; None: not counted yet (an mbox record needs no count)
        self.input_size = input_size  # as read from sendmail (the log's size=)
        self.had_from_line = had_from_line

    @property
    def lf_count(self) -> int:
        if self._lf is None:
            self._lf = sum(count_lf(chunk) for chunk in self.spool.chunks())
        return self._lf

    def _lf_plus(self, delta: int) -> "int | None":
        """The line feeds of a record made from this one with `delta` more (None stays None)."""
        return None if self._lf is None else self._lf + delta

    @property
    def rfc822_size(self) -> int:
        """Size with every LF counted as CRLF: Maildir's W= and IMAP's RFC822.SIZE."""
        return self.length + self.lf_count

    def close(self) -> None:
        self.spool.close()

    def with_new_header(self, block: bytes, mbox: bool) -> "Prepared":
        """The same record with its header block replaced by `block` (LF line ends, without
        the empty line that ends it): a Sieve script's editheader.  For an mbox the lines a
        mail reader keeps its state in are taken out again (a script never sets a flag that
        way), and a header line that would read as a From_ line is escaped."""
        head = self.spool.head(MAX_HEADER + (1 << 16))
        start = head.find(b"\n") + 1 if head.startswith(b"From ") else 0
        if head[start:start + 1] == b"\n":
            end = start - 1  # no header at all: the empty line comes first
        else:
            end = head.find(b"\n\n", start)
            if end < 0:
                return self  # no end of the header in reach: leave the record as it is
        if block and not block.endswith(b"\n"):
            block += b"\n"
        if mbox:
            block = _filter_headers(block, MBOX_STRIP, b"")[0]
            block = b"".join(b">" + line if line.startswith(b"From ") else line
                             for line in block.splitlines(keepends=True))
        prefix = head[:start] + block
        view = Spliced(self.spool, prefix, end + 1)
        old_lf = head[:end + 1].count(b"\n")
        return Prepared(view, self.sender, view.length, self._lf_plus(prefix.count(b"\n") - old_lf),
                        self.input_size, self.had_from_line)

    def with_header(self, lines: bytes) -> "Prepared":
        """The same record with header lines after its From_ line (the start for Maildir)."""
        if not lines:
            return self
        return Prepared(HeaderView(self.spool, lines), self.sender, self.length + len(lines),
                        self._lf_plus(lines.count(b"\n")), self.input_size, self.had_from_line)


class _Reader:
    """Raw reads from a file descriptor, or the message itself already in memory (the LMTP
    server holds a small one), counting bytes and enforcing a size limit."""

    def __init__(self, source: "int | bytes", max_size: int) -> None:
        self.fd = source if isinstance(source, int) else -1
        self.held = b"" if isinstance(source, int) else source
        self.max_size = max_size
        self.total = 0
        self.eof = False

    def read(self) -> bytes:
        if self.eof:
            return b""
        if self.fd < 0:
            return self._next_held()
        try:
            data = os.read(self.fd, CHUNK)
        except OSError as exc:
            raise DeliveryError(Status("4.3.0", "cannot read message", exc.strerror or "")) from None
        if not data:
            self.eof = True
            return b""
        self._count(len(data))
        return data

    def _next_held(self) -> bytes:
        """The next CHUNK of the message in memory, as os.read() would give it."""
        data, self.held = self.held[:CHUNK], self.held[CHUNK:]
        if not data:
            self.eof = True
            return b""
        self._count(len(data))
        return data

    def _count(self, n: int) -> None:
        self.total += n
        if self.max_size and self.total > self.max_size:
            raise DeliveryError(
                Status("5.3.4", "message too big", f"more than {self.max_size} bytes")
            )


def _filter_headers(block: bytes, strip: "frozenset[bytes]", loop_value: bytes) -> "tuple[bytes, bool]":
    """Drop the named headers (with their continuation lines); report a loop."""
    low = block.lower()
    if not any(name in low for name in strip) and not (loop_value and b"delivered-to" in low):
        return block, False  # no such header at all (one pass in C): no loop over the lines
    out = []
    keep = True
    loop = False
    lines = block.split(b"\n")
    partial = lines.pop()  # a last line without its newline (only at the end of input)
    if partial:
        lines.append(partial)
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line)
            continue
        name, colon, value = line.partition(b":")
        lname = name.rstrip(b" \t").lower() if colon else b""
        keep = lname not in strip
        if loop_value and lname == b"delivered-to" and value.strip().lower() == loop_value:
            loop = True
        if keep:
            out.append(line)
    if not out:
        return b"", loop
    ending = b"" if partial and keep else b"\n"
    return b"\n".join(out) + ending, loop


def prepare(
    fd: "int | bytes",
    *,
    sender: "str | None",
    recipient: str,
    mbox: bool,
    escape: str = "mboxo",
    return_path: bool = True,
    delivered_to: bool = True,
    max_size: int = 0,
    spool_threshold: int = 1 << 20,
    spool_dir: str = "/var/tmp",
    near: str = "",
    over_quota_bounce: bool = False,
    when: "float | None" = None,
) -> Prepared:
    """Read the whole message from fd (or take it as bytes) and build the record for one mailbox.

    recipient is `user@domain` for Delivered-To and the loop check.  `near`: a directory to
    spool a large record in first, the target Maildir's tmp/: the spool file is then on the
    Maildir's file system and becomes the message by a link (maildir.py), wherever
    spool_dir is; a full disk or quota there is the Maildir's, answered as its store would
    (over_quota_bounce: 5.2.2, else 4.2.2; a full disk 4.3.1).
    """
    reader = _Reader(fd, max_size)
    # 1. Collect the first line and the header block (CRLF normalised).  The header block is
    #    measured as stored (LF line ends, after sendmail's From_ line), whatever the read
    #    sizes or line ends: more than MAX_HEADER bytes without the empty line that ends it
    #    is refused.  Treating the rest as body would let `Status:` or `X-IMAPbase:` lines
    #    past the limit reach the mbox, where Dovecot would read them as its own state.
    head = bytearray()
    while True:
        data = reader.read()
        if data:
            head += data
        probe = head.replace(b"\r\n", b"\n") if b"\r" in head else head
        skip = 0
        if probe.startswith(b"From "):
            nl = probe.find(b"\n")
            skip = nl + 1 if nl >= 0 else len(probe)
        if not data or probe.startswith(b"\n", skip) or probe.find(b"\n\n", skip) >= 0:
            break
        if len(probe) - skip > MAX_HEADER + 1:
            break
    text = bytes(head)
    pending_cr = text.endswith(b"\r")  # its LF may be in the next read (or be missing at EOF)
    if pending_cr:
        text = text[:-1]
    text = text.replace(b"\r\n", b"\n")

    # 2. The envelope sender from a leading From_ line, unless -f gave one.
    had_from = text.startswith(b"From ")
    if had_from:
        nl = text.find(b"\n")
        first = text[: nl if nl >= 0 else len(text)]
        text = text[nl + 1 :] if nl >= 0 else b""
        if nl < 0:
            pending_cr = False  # that CR ended the From_ line, which is dropped
        if sender is None:
            parts = first.split(b" ", 2)
            sender = parts[1].decode("utf-8", "surrogateescape") if len(parts) > 1 else ""
    clean = sanitize_sender(sender or "")
    if clean.upper() == "MAILER-DAEMON":
        clean = ""

    # 3. The header block: up to the first empty line.
    if text.startswith(b"\n"):
        header_end = 0
    else:
        idx = text.find(b"\n\n")
        header_end = idx + 1 if idx >= 0 else -1
    if header_end < 0:
        # No empty line: at EOF the headers run to the end; otherwise the block is too big.
        header_end = len(text) if reader.eof else MAX_HEADER + 1
    if header_end > MAX_HEADER:
        while reader.read():  # drain, so sendmail is not left writing into a closed pipe
            pass
        raise DeliveryError(
            Status("5.3.4", "message header too big", f"header block over {MAX_HEADER} bytes")
        )
    block, body = text[:header_end], text[header_end:]
    strip: frozenset[bytes] = MBOX_STRIP if mbox else frozenset()
    if return_path:
        strip = strip | {b"return-path"}
    loop_value = recipient.lower().encode("utf-8", "surrogateescape") if delivered_to else b""
    block, loop = _filter_headers(block, strip, loop_value)
    if loop:
        # Drain the rest so sendmail is not left writing into a closed pipe.
        while reader.read():
            pass
        raise DeliveryError(
            Status("5.4.6", "mail forwarding loop", f"Delivered-To: {recipient} already present")
        )

    # 4. Write the record: [From_ line] + our headers + the rest, escaped.
    spool = Spool(spool_threshold, spool_dir, near)
    try:
        if mbox:
            spool.write(from_line(clean, when))
        added = b""
        if return_path:
            added += b"Return-Path: <" + clean.encode("utf-8", "surrogateescape") + b">\n"
        if delivered_to:
            added += b"Delivered-To: " + recipient.encode("utf-8", "surrogateescape") + b"\n"
        esc = Escaper((escape if mbox else None), spool.write, count_lf=not mbox)
        esc.feed(added + block + body, normalized=True)
        if pending_cr:
            esc.feed(b"\r")
        while True:
            data = reader.read()
            if not data:
                break
            esc.feed(data)
        esc.close()
        if mbox:
            spool.write(b"\n")  # the empty line that ends an mbox message
        spool.flush()
        return Prepared(spool, clean, spool.length, None if mbox else esc.out_lf, reader.total, had_from)
    except OSError as exc:
        spool.close()
        if spool.in_near and exc.errno is not None:  # the Maildir's own disk or quota
            raise DeliveryError(status_for_errno(exc.errno, spool.near, over_quota_bounce)) from None
        raise DeliveryError(Status("4.3.0", "cannot spool message", exc.strerror or str(exc))) from None
    except BaseException:
        spool.close()
        raise


def for_recipient(msg: Prepared, recipient: str, return_path: bool, delivered_to: bool) -> Prepared:
    """One recipient's record from a Maildir record prepared once for every recipient of a
    message (prepare(..., mbox=False, delivered_to=False)): the same bytes prepare() would
    have made for this recipient alone, i.e. its `Delivered-To:` line after our
    `Return-Path:` line, and a `Delivered-To:` already naming it refused as a loop (5.4.6).
    Without delivered_to every recipient's record is `msg` itself (byte for byte the same:
    the LMTP server may then hard-link one file into several Maildirs).  The body is never
    copied; the caller closes `msg` once, after the last recipient."""
    if not delivered_to:
        return msg
    head = msg.spool.head(MAX_HEADER + (1 << 16))
    if head.startswith(b"\n"):
        block = b""  # no header at all
    else:
        end = head.find(b"\n\n")
        block = head[:end + 1] if end >= 0 else head  # no empty line: the header runs to the end
    want = recipient.lower().encode("utf-8", "surrogateescape")
    if _filter_headers(block, frozenset(), want)[1]:
        raise DeliveryError(Status("5.4.6", "mail forwarding loop", f"Delivered-To: {recipient} already present"))
    at = head.find(b"\n") + 1 if return_path and head.startswith(b"Return-Path: <") else 0
    line = b"Delivered-To: " + recipient.encode("utf-8", "surrogateescape") + b"\n"
    view = Spliced(msg.spool, head[:at] + line, at)
    return Prepared(view, msg.sender, view.length, msg._lf_plus(1), msg.input_size, msg.had_from_line)
