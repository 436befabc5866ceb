"""One LMTP connection: the protocol machine fed from a socket, each recipient delivered.

The rules of the protocol are protocol.py's (no I/O); a Session owns the socket, the
deadlines, the transaction's spool file and the calls into the delivery core:
deliver.resolve() at RCPT time (an unknown user is refused before the data) and
deliver.deliver() after DATA, one reply per recipient in RCPT order.  Once deliver()
returned, the answer is 250 whatever happens next: a 4xx would make the client send the
message again.

A message up to HOLD bytes (most mail) is kept in memory; a longer one is streamed to an
unnamed spool file (fileio.anonymous_spool).  Either way a client that disconnects mid-DATA
leaves nothing behind, and nothing is delivered.

Several Maildir recipients share one prepared record (message.for_recipient() adds each
one's Delivered-To), and when their bytes are the same (delivered_to = false) one file is
hard-linked into their Maildirs, as Dovecot does (docs/lmtp.md).

What a Session needs from the server that runs it is the `Host` protocol below, so this
module never imports the daemon.  Over 400 lines on purpose: the transaction's spool, its
recipients' deliveries and their replies in RCPT order share the session's state.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from vdeliver.config import Config
from vdeliver.deliver import Copies, Target, deliver, resolve
from vdeliver.errors import DeliveryError, Status
from vdeliver.fileio import anonymous_spool, write_all, writev_all
from vdeliver.lmtp import protocol as p
from vdeliver.lmtp.settings import Settings
from vdeliver.log import Logger, delivery_line
from vdeliver.message import Prepared, for_recipient
from vdeliver.recipient import Recipient, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdeliver.metrics import Registry

POLL = 0.5  # how often a waiting connection looks at the stop flag
RECV = 1 << 16
# A message up to this size stays in memory: creating, writing, reading back and releasing
# a spool file cost more than handling a 4 KB message itself (a tenth of a millisecond).
HOLD = 1 << 16


class Host(Protocol):
    """What a session uses of the server running it (the daemon's Server)."""

    cfg: Config
    opts: Settings
    log: Logger
    stopping: threading.Event
    metrics: Registry

    def mailbox_lock(self, path: str) -> threading.Lock: ...

    def pool(self) -> ThreadPoolExecutor: ...


# -- status -> LMTP reply ---------------------------------------------------------------

_BASIC = {"4.2.2": 452, "4.3.1": 452, "5.2.2": 552, "5.3.4": 552, "5.4.6": 554}


def reply_for(status: Status, address: str) -> p.Reply:
    """The one place a delivery Status becomes an LMTP reply (sendmail acts on the class)."""
    if status.ok:
        return p.Reply(250, status.dsn, f"<{address}> delivered")
    code = _BASIC.get(status.dsn) or (550 if status.permanent else 451)
    return p.Reply(code, status.dsn, f"<{address}> {status.reason}")


# -- the server ---------------------------------------------------------------------------


class _Txn:
    """What a transaction has learnt so far: the resolved recipients, the spool."""

    def __init__(self, cfg: Config, sender: str) -> None:
        self.cfg = cfg  # a SIGHUP mid-transaction does not change this message
        self.sender = sender
        self.started = time.time()
        self.targets: list[tuple[str, Recipient, Target]] = []  # (as given, parsed, mailbox) per accepted RCPT
        self.held: list[bytes | bytearray | memoryview] | None = None  # the message while it is within HOLD
        self.spool = -1  # past HOLD, the spool file; -2: it could not be made or written
        self.size = 0
        self.shared: dict[str, object] = {}  # Sieve: the message parsed once for all recipients
        self.declared = 0  # MAIL FROM's SIZE=, if the client gave one

    def message(self) -> int | bytes:
        """What deliver() reads the message from: the bytes in memory, or the spool at its start."""
        if self.held is not None:
            return b"".join(self.held)
        os.lseek(self.spool, 0, os.SEEK_SET)
        return self.spool

    def reader(self) -> int | bytes:
        """A reader of its own for a delivery in another thread: the bytes in memory, or a
        second open file description of the spool, with its own offset (-1 if impossible)."""
        return b"".join(self.held) if self.held is not None else _reopen(self.spool)

    def close(self) -> None:
        self.held = None
        if self.spool >= 0:
            os.close(self.spool)
            self.spool = -1


class Session:
    def __init__(self, server: Host, sock: socket.socket, name: str) -> None:
        self.server = server
        self.sock = sock
        self.name = name
        cfg, opts = server.cfg, server.opts
        self.conn = p.Connection(cfg.host(), max_size=opts.max_message_size, max_recipients=opts.max_recipients)
        self.txn: _Txn | None = None
        # Silence is not the only way to hold a slot: a client sending a byte a second is
        # never silent.  So a command must be complete within command_time_limit of the
        # previous answer, and a message within transaction_time_limit of DATA.
        self.command_started = time.monotonic()
        self.data_started = 0.0
        self.kernel_timeouts = False  # SO_RCVTIMEO/SO_SNDTIMEO set (run())

    def run(self) -> None:
        conn = self.conn
        conn.greeting()
        self.kernel_timeouts = _kernel_timeouts(self.sock, POLL, self.server.opts.timeout)
        if not self.kernel_timeouts:
            self.sock.settimeout(POLL)
        try:
            while True:
                if self.server.stopping.is_set():
                    conn.stopping = True  # pipelined commands still buffered get 421
                event = conn.next_event()
                if event is p.NEED_DATA:
                    if not self._send() or not self._receive():
                        break
                    continue
                if isinstance(event, p.ConnectionClosed):
                    if event.mid_data:
                        self.server.log.warning(f"{self.name}: lost connection in DATA, message discarded")
                    break
                self._handle(event)
                self.command_started = time.monotonic()
                if isinstance(event, p.DataStart):
                    self.data_started = self.command_started
                if conn.closed:
                    break
            self._send()
        finally:
            if self.txn is not None:
                self.txn.close()

    def _send(self) -> bool:
        out = self.conn.data_to_send()
        if not out:
            return True
        if self.kernel_timeouts:  # SO_SNDTIMEO is the command timeout already
            try:
                self.sock.sendall(out)
                return True
            except OSError:
                return False
        try:
            # A client may be slow to read (it pipelines): give it the command timeout, not POLL.
            self.sock.settimeout(self.server.opts.timeout)
            self.sock.sendall(out)
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(POLL)

    def _receive(self) -> bool:
        """Feed the protocol; False when the connection is over."""
        server, conn = self.server, self.conn
        waited = 0.0
        while True:
            if server.stopping.is_set() and not conn.busy:
                # Between commands: whatever the client sends next would be new work.
                conn.close_with(p.Reply(421, "4.3.2", f"{conn.hostname} shutting down, try again later"))
                self._send()
                return False
            now = time.monotonic()
            opts = server.opts
            if conn.state == p.DATA:
                over = now - self.data_started > opts.transaction_time_limit
                what = f"message not complete after {opts.transaction_time_limit}s"
            else:
                over = now - self.command_started > opts.command_time_limit
                what = f"command not complete after {opts.command_time_limit}s"
            if over:
                server.log.warning(f"{self.name}: {what}, closing connection")
                conn.close_with(p.Reply(421, "4.4.2", f"{what}, closing connection"))
                self._send()
                return False
            try:
                data = self.sock.recv(RECV)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO ran out
                waited += POLL
                limit = server.opts.data_timeout if conn.state == p.DATA else server.opts.timeout
                if waited >= limit:
                    if conn.state == p.DATA:
                        server.log.warning(f"{self.name}: timeout in DATA, message discarded")
                    conn.close_with(p.Reply(421, "4.4.2", "timeout, closing connection"))
                    self._send()
                    return False
                continue
            except OSError:
                data = b""
            conn.receive_data(data)
            return True

    def _handle(self, event: object) -> None:
        if isinstance(event, p.MailFrom):
            self._reset()
            self.txn = _Txn(self.server.cfg, event.sender)
            self.txn.declared = event.size or 0
        elif isinstance(event, p.RcptTo):
            self.conn.answer_rcpt(self._rcpt(event.address))
        elif isinstance(event, p.DataStart):
            assert self.txn is not None
            self.txn.held = []  # in memory until it is longer than HOLD (_spool)
        elif isinstance(event, p.Data):
            self._spool(event.data)
        elif isinstance(event, p.EndOfData):
            if event.error is not None:
                self._log_refused(event)
                self._reset()
            else:
                self._deliver_all()
        elif isinstance(event, (p.Reset, p.Hello)):
            self._reset()

    def _reset(self) -> None:
        if self.txn is not None:
            self.txn.close()
            self.txn = None

    # -- RCPT: resolve now, so that an unknown user is refused before the data --------

    def _rcpt(self, address: str) -> p.Reply:
        txn = self.txn
        assert txn is not None
        cfg = txn.cfg
        try:
            rcpt = parse(None, address, keep_case=cfg.keep_user_case, delimiter=cfg.recipient_delimiter)
            target = resolve(cfg, rcpt)
        except DeliveryError as exc:
            status = exc.status
            self._log(address, status, 0, status.reason + (f": {status.detail}" if status.detail else ""))
            return reply_for(status, address)
        except Exception as exc:  # noqa: BLE001
            status = Status("4.3.0", "internal error", f"{type(exc).__name__}: {exc}{where(exc)}")
            self._log(address, status, 0, f"{status.reason}: {status.detail}")
            return reply_for(status, address)
        if self.server.opts.rcpt_check_quota and target.format == "maildir":
            full = _over_quota(target.path, txn.declared, cfg.over_quota == "bounce")
            if full is not None:
                self._log(address, full, 0, f"{full.reason}: {full.detail}")
                self.server.metrics.inc("rcpt_over_quota_total", "Recipients refused at RCPT: mailbox full.")
                return reply_for(full, address)
        txn.targets.append((address, rcpt, target))
        self.server.metrics.inc("rcpt_accepted_total", "Recipients accepted at RCPT.")
        return p.Reply(250, "2.1.5", f"<{address}> recipient ok")

    # -- DATA ------------------------------------------------------------------------------

    def _spool(self, data: bytes) -> None:
        txn = self.txn
        if txn is None or txn.spool == -2:
            return
        txn.size += len(data)
        if txn.held is not None:
            txn.held.append(data)
            if txn.size <= HOLD:
                return
        if txn.spool == -1 and not self._open_spool(txn):
            return
        try:
            if txn.held is not None:
                writev_all(txn.spool, txn.held)  # what was held, now that the message is long
                txn.held = None
            else:
                write_all(txn.spool, data)
        except OSError as exc:
            self.server.log.error(f"{self.name}: cannot spool: {exc.strerror}")
            os.close(txn.spool)
            txn.spool = -2
            # The log's size= says what was spooled: none of what was held, or up to this piece.
            txn.size = 0 if txn.held is not None else txn.size - len(data)
            txn.held = None

    def _open_spool(self, txn: _Txn) -> bool:
        spool_dir = txn.cfg.spool_dir
        try:
            txn.spool = anonymous_spool(spool_dir, "lmtp.")
            return True
        except OSError as exc:
            self.server.log.error(f"{self.name}: cannot spool in {spool_dir}: {exc.strerror}")
            txn.spool = -2  # remembered: every recipient gets 451 after the data
            txn.held = None
            txn.size = 0  # nothing spooled
            return False

    def _deliver_all(self) -> None:
        txn = self.txn
        assert txn is not None
        targets = txn.targets
        if txn.spool == -2:
            for address, rcpt, _target in targets:
                status = Status("4.3.0", "cannot spool message", txn.cfg.spool_dir)
                self._log(rcpt.address, status, txn.size, f"{status.reason}: {status.detail}")
                self.conn.answer_data(reply_for(status, address))
            self._reset()
            return
        if sum(1 for _a, _r, target in targets if target.format == "maildir") > 1:
            self._deliver_shared(txn)
            self._reset()
            return
        readers = [txn.reader() for _ in targets] if len(targets) > 1 else []
        if len(targets) > 1 and all(not isinstance(fd, int) or fd >= 0 for fd in readers):
            # Several recipients: deliver in parallel, answer in RCPT order as each is ready.
            pool = self.server.pool()
            futures = [
                pool.submit(self._deliver_one, txn, address, rcpt, target, fd)
                for (address, rcpt, target), fd in zip(targets, readers, strict=True)
            ]
            for fut in futures:
                self.conn.answer_data(fut.result())
                self._send()
        else:
            for fd in readers:
                if isinstance(fd, int) and fd >= 0:
                    os.close(fd)
            for address, rcpt, target in targets:
                self.conn.answer_data(self._deliver_one(txn, address, rcpt, target, txn.message(), own=False))
                self._send()
        self._reset()

    def _deliver_shared(self, txn: _Txn) -> None:
        """Several Maildir recipients: the message is read and prepared once for all of them
        (message.for_recipient() adds each one's Delivered-To).  When every recipient's bytes
        are the same (delivered_to = false), the first copy is written and the others are hard
        links to it (maildir.link_copy), as Dovecot's LMTP does; with Delivered-To each copy
        differs, so each is written, from the one prepared record, all in parallel.  For links
        the first Maildir recipient is stored first, here; the others then in parallel (links,
        or their own copies when a link cannot be made).  mbox recipients as usual.  Replies in
        RCPT order, each recipient's its own."""
        from vdeliver.message import prepare

        cfg = txn.cfg
        shared: Prepared | Status
        try:
            shared = prepare(txn.message(), sender=txn.sender, recipient="", mbox=False, escape=cfg.mbox_escape,
                             return_path=cfg.return_path, delivered_to=False, max_size=cfg.max_message_size,
                             spool_threshold=cfg.spool_threshold, spool_dir=cfg.spool_dir)
        except DeliveryError as exc:
            shared = exc.status  # the same for every Maildir recipient: each is answered with it
        except OSError as exc:
            shared = Status("4.3.0", "cannot read spool", exc.strerror or str(exc))
        copies = None if isinstance(shared, Status) else Copies(shared)
        pool = self.server.pool()
        answers: list[p.Reply | Future[p.Reply]] = []
        # Links need a first copy to link to: it is stored before the others start.  Copies
        # that differ (Delivered-To) are all written at once: their fsyncs overlap.
        first = not cfg.delivered_to
        try:
            for address, rcpt, target in txn.targets:
                if target.format != "maildir":
                    fd = txn.reader()
                    if not isinstance(fd, int) or fd >= 0:
                        answers.append(pool.submit(self._deliver_one, txn, address, rcpt, target, fd))
                    else:
                        answers.append(self._deliver_one(txn, address, rcpt, target, txn.message(), own=False))
                elif copies is None:
                    assert isinstance(shared, Status)
                    self._log(rcpt.address, shared, txn.size, shared.reason + (f": {shared.detail}"
                                                                               if shared.detail else ""))
                    answers.append(reply_for(shared, address))
                elif first:
                    first = False
                    answers.append(self._deliver_one(txn, address, rcpt, target, -1, own=False, copies=copies))
                else:
                    answers.append(pool.submit(self._deliver_one, txn, address, rcpt, target, -1, False, copies))
            for answer in answers:
                self.conn.answer_data(answer if isinstance(answer, p.Reply) else answer.result())
                self._send()
        finally:
            for answer in answers:
                if not isinstance(answer, p.Reply):
                    answer.exception()  # every delivery over before the record is closed
            if copies is not None:
                copies.msg.close()

    def _deliver_one(self, txn: _Txn, given: str, rcpt: Recipient, target: Target, fd: int | bytes,
                     own: bool = True, copies: Copies | None = None) -> p.Reply:
        """Deliver one copy; the reply names the address as the client gave it, the log as resolved.
        With `copies`, the record prepared once for the transaction (fd is not read)."""
        address = rcpt.address
        try:
            # An mbox takes fcntl locks, which are per process: two of our threads must never
            # meet inside them.  A Maildir needs no lock (unique names, link(), rename()), and
            # deliveries to one Maildir in parallel let their fsyncs share journal commits.
            lock = self.server.mailbox_lock(target.path) if target.format == "mbox" else None
            if lock is not None and not lock.acquire(timeout=txn.cfg.lock_timeout):
                raise DeliveryError(Status("4.2.0", "mailbox is locked", f"{target.path}: busy in this server"))
            try:
                msg = None if copies is None else for_recipient(copies.msg, address, txn.cfg.return_path,
                                                                txn.cfg.delivered_to)
                result = deliver(txn.cfg, rcpt, fd, txn.sender, target, self.server.log, txn.shared, refuse=True,
                                 prepared=msg, copies=copies)
            finally:
                if lock is not None:
                    lock.release()
        except DeliveryError as exc:
            status = exc.status
            self._log(address, status, txn.size, status.reason + (f": {status.detail}" if status.detail else ""))
            return reply_for(status, given)
        except Exception as exc:  # noqa: BLE001 - a bug defers this recipient, never crashes the server
            status = Status("4.3.0", "internal error", f"{type(exc).__name__}: {exc}{where(exc)}")
            self.server.log.error(f"{self.name}: to=<{address}>: {status.detail}")
            self._log(address, status, txn.size, f"{status.reason}: {status.detail}")
            return reply_for(status, given)
        finally:
            if own and isinstance(fd, int):
                try:
                    os.close(fd)
                except OSError:
                    pass
        # Durable: the answer is 250 whatever happens to the log lines (a 4xx would make the
        # client send it again).
        try:
            for note in result.notes:
                self.server.log.warning(f"{self.name}: to=<{address}>, broke stale lock {note}")
            why = result.where()
            self._log(address, Status("2.0.0", "delivered"), result.size, why, result.sender)
        except Exception:  # noqa: BLE001
            pass
        return reply_for(Status("2.0.0", "delivered"), given)

    def _log(self, address: str, status: Status, size: int, why: str, sender: str | None = None) -> None:
        txn = self.txn
        if sender is None:
            sender = txn.sender if txn is not None else ""
        delay = time.time() - txn.started if txn is not None else 0.0
        if self.server.log.enabled:  # log = "none": no line to build (the metrics still count)
            line = delivery_line(address, sender, size, delay, status.dsn, status.word, why)
            self.server.log.info(f"{self.name}: {line}")
        metrics = self.server.metrics
        metrics.inc("deliveries_total", "Recipients by result (sent, deferred, bounced), RCPT refusals included.",
                    status=status.word)
        if status.word == "sent":
            metrics.inc("delivered_bytes_total", "Bytes delivered (each recipient's copy).", size)
            metrics.observe("delivery_seconds", "From MAIL FROM to a recipient's message being durable.", delay)

    def _log_refused(self, event: p.EndOfData) -> None:
        assert event.error is not None
        for address in event.recipients:
            status = Status(event.error.dsn, event.error.text)
            self._log(address, status, self.txn.size if self.txn else 0, event.error.text)



# -- helpers ------------------------------------------------------------------------------


def _over_quota(path: str, declared: int, bounce: bool) -> Status | None:
    """At RCPT, as Dovecot's lmtp_rcpt_check_quota: the Maildir++ quota already reached (or
    too small for the SIZE the client declared) -> 452 4.2.2, or 552 5.2.2 with over_quota =
    "bounce".  A quota that cannot be read refuses nothing here: DATA checks it again."""
    from vdeliver import maildir

    reached = maildir.quota_reached(path, declared)
    if reached is None:
        return None
    return Status("5.2.2" if bounce else "4.2.2", "mailbox full",
                  f"{path}: {reached}" + (f", SIZE={declared}" if declared else ""))


def _kernel_timeouts(sock: socket.socket, receive: float, send: float) -> bool:
    """A blocking socket whose recv() gives up after `receive` seconds and send() after `send`
    (SO_RCVTIMEO, SO_SNDTIMEO).  Python's own socket timeout would poll() before every recv()
    and send() and switch the descriptor's blocking mode around each reply: three system calls
    a command that, with many connections, each hand the interpreter lock to another thread.
    False if the kernel refuses (the caller uses settimeout())."""
    import struct

    try:
        sock.settimeout(None)
        for option, seconds in ((socket.SO_RCVTIMEO, receive), (socket.SO_SNDTIMEO, send)):
            sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))
    except OSError:
        return False
    return True


def _reopen(fd: int) -> int:
    """A second open file description of the spool, with its own offset (-1 if impossible)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
