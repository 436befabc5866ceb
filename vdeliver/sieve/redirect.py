"""`redirect` at delivery: the message sent on through sendmail, once every store stands.

`sendmail -oi -f <envelope sender> <address>`, the message as it came with our Delivered-To
line (the next hop, vdeliver or not, sees the loop).  A redirect to an address the message
already carries in a Delivered-To line is not sent (a loop); one that fails (sendmail
missing, its exit status, the deadline) is logged.  Either way the caller then stores the
message in the INBOX too: it is never lost.  Imported only for a message a script redirects.
"""

import os

from vdeliver.config import Config
from vdeliver.log import tell
from vdeliver.message import Prepared
from vdeliver.recipient import Recipient
from vdeliver.sieve.delivery import Settings, report, settings

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.hooks import Log


def send(cfg: Config, rcpt: Recipient, home: str, msg: Prepared, addresses: list[str],
             log: "Log | None") -> list[str]:
    """Send the message on to each address; those it was sent to.  Never raises: a redirect
    that cannot be sent is logged (syslog and <script>.log) and the caller keeps the message."""
    opts = settings(cfg)
    script = os.path.join(home, opts.script)
    try:
        data = original(msg, cfg.mbox_escape)
    except OSError as exc:
        report(log, script, rcpt, f"redirect: cannot read the message: {exc.strerror}")
        return []
    seen = _delivered_to(data)
    sent: list[str] = []
    sender = msg.sender
    if opts.srs_domain and sender:
        from vdeliver import srs

        try:
            sender = srs.forward(sender, opts.srs_domain, srs.read_secret(opts.srs_secret_file))
        except srs.SrsError as exc:
            report(log, script, rcpt, f"redirect: SRS not applied ({exc}); the original sender is kept")
    for address in addresses:
        if address.lower() in seen:
            report(log, script, rcpt, f"redirect to <{address}>: not sent, the message was already delivered "
                                       "there (Delivered-To)")
            continue
        why = _send(opts, sender, address, data)
        if why:
            report(log, script, rcpt, f"redirect to <{address}> failed: {why}")
            continue
        sent.append(address)
        tell(log, f"sieve: to=<{rcpt.address}>: redirected to <{address}>", info=True)
    return sent


def original(msg: Prepared, escape: str) -> bytes:
    """The message as it came, from the spool: without the mbox From_ line, its closing empty
    line and our Return-Path, with our Delivered-To line.  mboxrd escaping is undone; mboxo's
    cannot be (a `>From ` it made looks like one that came), so it stays."""
    data = b"".join(msg.spool.chunks())
    mbox = data.startswith(b"From ")
    if mbox:
        data = data.partition(b"\n")[2]
        if data.endswith(b"\n\n"):
            data = data[:-1]
    if data[:12].lower() == b"return-path:":
        data = data.partition(b"\n")[2]
    if mbox and escape == "mboxrd":
        import re

        data = re.sub(rb"(?m)^>(>*From )", rb"\1", data)
    return data


def _delivered_to(data: bytes) -> set[str]:
    """The addresses of the Delivered-To lines in the message's header, lower case."""
    end = data.find(b"\n\n")
    found: set[str] = set()
    for line in data[: end if end >= 0 else len(data)].split(b"\n"):
        if line[:13].lower() == b"delivered-to:":
            found.add(line[13:].strip().decode("utf-8", "replace").lower())
    return found


def _send(opts: "Settings", sender: str, address: str, data: bytes) -> str:
    """Hand the message to sendmail; "" when it took it, else why not."""
    import subprocess

    if not address or address.startswith("-") or any(ord(c) < 33 or c in "<>()," for c in address):
        return "not an address"
    try:
        child = subprocess.Popen([opts.sendmail, "-oi", "-f", sender or "<>", address], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, close_fds=True,
                                 start_new_session=True)  # its own group: all of it ends at the deadline
    except OSError as exc:
        return f"cannot run {opts.sendmail}: {exc.strerror}"
    with child:  # closes the pipes and waits, whatever happens
        try:
            _out, err = child.communicate(data, timeout=opts.sendmail_timeout)
        except subprocess.TimeoutExpired:
            import signal

            try:
                os.killpg(child.pid, signal.SIGKILL)
            except OSError:
                pass
            return f"{opts.sendmail} did not finish in {opts.sendmail_timeout:g} s"
        except OSError as exc:  # it closed its input early (EPIPE)
            child.kill()
            return f"{opts.sendmail} did not take the message: {exc.strerror}"
    done = subprocess.CompletedProcess(child.args, child.returncode, None, err)
    if done.returncode != 0:
        detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return f"{opts.sendmail} exit status {done.returncode}" + (f": {detail[-1][:200]}" if detail else "")
    return ""


def reject_mdn(cfg: Config, rcpt: Recipient, home: str, msg: Prepared, reason: str, log: "Log | None") -> bool:
    """RFC 5429 section 2.1.1 after acceptance: a message disposition notification (RFC 3798,
    `deleted`) to the envelope sender, from `<>`, instead of storing the message.  True when
    sendmail took it; False (nothing sent) for a bounce or an auto-submitted message (never
    answered), or when it could not be sent: then the caller keeps the message."""
    import time
    from email.utils import formatdate, make_msgid

    opts = settings(cfg)
    script = os.path.join(home, opts.script)
    try:
        data = original(msg, cfg.mbox_escape)
    except OSError:
        return False
    head = data.split(b"\n\n", 1)[0]
    auto = [line for line in head.split(b"\n") if line.lower().startswith(b"auto-submitted:")]
    if not msg.sender or any(line.split(b":", 1)[1].strip().lower() != b"no" for line in auto):
        report(log, script, rcpt, "reject: no notification to a bounce or an automatic message; kept")
        return False
    message_id = next((line.split(b":", 1)[1].strip() for line in head.split(b"\n")
                       if line.lower().startswith(b"message-id:")), b"")
    boundary = f"vdeliver-mdn-{os.getpid()}-{int(time.time() * 1000)}"
    host = cfg.host()
    text = (
        f"From: Mail Delivery Subsystem <MAILER-DAEMON@{host}>\n"
        f"To: <{msg.sender}>\n"
        f"Subject: Automatically rejected mail\n"
        f"Date: {formatdate(localtime=True)}\n"
        f"Message-ID: {make_msgid(domain=host)}\n"
        "Auto-Submitted: auto-replied (rejected)\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"\n'
        "\n"
        f"--{boundary}\n"
        "Content-Type: text/plain; charset=us-ascii\n\n"
        f"Your message to <{rcpt.address}> was automatically rejected:\n{reason}\n\n"
        f"--{boundary}\n"
        "Content-Type: message/disposition-notification\n\n"
        f"Reporting-UA: {host}; vdeliver\n"
        f"Final-Recipient: rfc822; {rcpt.address}\n"
        + (f"Original-Message-ID: {message_id.decode('ascii', 'replace')}\n" if message_id else "")
        + "Disposition: automatic-action/MDN-sent-automatically; deleted\n\n"
        f"--{boundary}\n"
        "Content-Type: text/rfc822-headers\n\n"
    ).encode("utf-8", "replace") + head + f"\n\n--{boundary}--\n".encode()
    why = _send(opts, "", msg.sender, text)
    if why:
        report(log, script, rcpt, f"reject: the notification to <{msg.sender}> was not sent ({why}); kept")
        return False
    tell(log, f"sieve: to=<{rcpt.address}>: rejected, notification sent to <{msg.sender}>", info=True)
    return True
