"""Sending a script's vacation reply at delivery (RFC 5230), once the message is stored.

In order, each step able to stop the reply (never the delivery, which is done already):

1. the user's addresses: the recipient, the script's `:addresses`, and what the accounts
   database routes to this mailbox (aliases whose target it is, the same user in alias
   domains), read without writing anything; a database that cannot be read leaves the
   first two, and the log says so;
2. RFC 5230 / RFC 3834's rules (vacation.refusal): not to a bounce, a list, an automatic
   message, a `noreply` sender, oneself, spam, or a message not addressed to the user;
3. once per (mailbox, sender, handle) per period, on the tracking store every hub shares:
   one atomic insert-if-absent-or-expired, so two hubs delivering the same sender's mail at
   once send one reply; a store that cannot answer means no reply (logged);
4. the reply (vacation.compose), from `<>` through `[sieve] sendmail -oi -f <>`; one that
   cannot be sent gives the claim back, so the next message may answer.
"""

import os

from vdeliver.config import Config
from vdeliver.message import Prepared
from vdeliver.recipient import Recipient

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.hooks import Log
    from vdeliver.sieve.interpreter import Action


def reply(cfg: Config, rcpt: Recipient, home: str, msg: Prepared, action: "Action",
          log: "Log | None") -> tuple[str, bytes]:
    """Send the vacation reply if the rules allow it: (what happened, for the log line; the
    reply sent, b"" when none was, for `:fcc`)."""
    from vdeliver.sieve import vacation as rules_mod
    from vdeliver.sieve.delivery import _message, settings
    from vdeliver.sieve.redirect import _send
    from vdeliver.tracking import Tracker, TrackingError

    v = action.vacation
    assert v is not None
    opts = settings(cfg)
    sender = msg.sender
    own, note = own_addresses(cfg, rcpt)
    own.update(a.lower() for a in v.addresses)
    message = _message(msg, False)
    rules = rules_mod.Rules()
    rules.never_reply = opts.vacation_never_reply or rules.never_reply
    rules.spam_header = opts.vacation_spam_header
    why = rules_mod.refusal(message.fields, sender, own, rules)
    if why:
        return f"vacation: not sent ({why})" + (f"; {note}" if note else ""), b""
    key = f"{sender.lower()}\x1f{v.handle}"
    try:
        tracker = Tracker.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - a bad [tracking] table: no reply, said
        return f"vacation: not sent (tracking store: {exc})", b""
    try:
        if not tracker.claim("vacation", rcpt.address, key, v.seconds):
            return f"vacation: not sent (<{sender}> was answered within {v.seconds} s)", b""
        data = rules_mod.compose(original=message.fields, sender=sender, recipient=rcpt.address, from_=v.from_,
                                 subject=v.subject or None, reason=action.reason, mime=v.mime, hostname=cfg.host())
        why = _send(opts, "", sender, data)
        if why:
            tracker.release("vacation", rcpt.address, key)  # not sent: the next message may answer
            return f"vacation: not sent to <{sender}> ({why})", b""
        return f"vacation: reply sent to <{sender}>" + (f"; {note}" if note else ""), data
    except TrackingError as exc:
        return f"vacation: not sent (tracking store: {exc})", b""
    finally:
        tracker.close()


def notify(cfg: Config, rcpt: Recipient, msg: Prepared, action: "Action", log: "Log | None") -> tuple[str, bytes]:
    """Send an enotify mailto notification (RFC 5436), once the message is stored: not for an
    automatic message (its Auto-Submitted other than `no`: section 2.7's loop rule), at most
    `[sieve] notify_per_hour` per mailbox (on the tracking store), from `<>`."""
    import time

    from vdeliver.sieve import notify as mailto
    from vdeliver.sieve.delivery import _message, settings
    from vdeliver.sieve.redirect import _send
    from vdeliver.tracking import Tracker, TrackingError

    n = action.vacation
    assert n is not None
    opts = settings(cfg)
    message = _message(msg, False)
    for value in message.values("auto-submitted"):
        if value.split(";", 1)[0].strip().lower() != "no":
            return f"notify: not sent (the message is automatic: Auto-Submitted: {value[:40]})", b""
    try:
        uri = mailto.parse(action.address)
    except ValueError as exc:
        return f"notify: not sent ({exc})", b""
    if not uri.to:
        return "notify: not sent (the mailto URI names no recipient)", b""
    try:
        tracker = Tracker.from_config(cfg)
    except Exception as exc:  # noqa: BLE001 - a bad [tracking] table: no notification, said
        return f"notify: not sent (tracking store: {exc})", b""
    try:
        hour = int(time.time() // 3600)
        if not any(tracker.claim("notify", rcpt.address, f"{hour}:{slot}", 3600)
                   for slot in range(opts.notify_per_hour)):
            return f"notify: not sent (more than {opts.notify_per_hour} this hour)", b""
        subjects = message.values("subject")
        data = mailto.compose(uri=uri, sender_of_message=msg.sender or "<>",
                              subject_of_message=subjects[0] if subjects else "", recipient=rcpt.address,
                              from_=n.from_, message=action.reason, importance=n.seconds, hostname=cfg.host())
        failed = [f"<{to}>: {why}" for to in uri.to if (why := _send(opts, "", to, data))]
        if failed:
            return "notify: not sent to " + "; ".join(failed), b""
        return "notify: sent to " + ", ".join(f"<{to}>" for to in uri.to), data
    except TrackingError as exc:
        return f"notify: not sent (tracking store: {exc})", b""
    finally:
        tracker.close()


def own_addresses(cfg: Config, rcpt: Recipient) -> tuple[set[str], str]:
    """The addresses that route to this mailbox: the recipient's, its aliases', the same user
    in the domain's alias domains, and `@domain` for a domain whose catch-all it is, from the
    accounts database ([accounts] readonly_dsn, dsn or database), read only.  (the addresses,
    a note when the database was not read)."""
    found = {rcpt.address.lower()}
    table = cfg.table("accounts")
    dsn = str(table.get("readonly_dsn") or table.get("dsn") or "")
    database = str(table.get("database") or "/var/lib/vdeliver/accounts.sqlite")
    aliases = "SELECT username, domain FROM aliases WHERE target = ?"
    alias_domains = "SELECT name FROM domains WHERE alias_of = ?"
    catchalls = "SELECT name FROM domains WHERE catchall = ?"
    try:
        if dsn:
            import psycopg

            from vdeliver.config import pg_liveness

            with psycopg.connect(dsn, connect_timeout=5, **pg_liveness(dsn)) as conn:
                rows = conn.execute(aliases.replace("?", "%s"), (rcpt.address.lower(),)).fetchall()
                domains = conn.execute(alias_domains.replace("?", "%s"), (rcpt.domain.lower(),)).fetchall()
                caught = conn.execute(catchalls.replace("?", "%s"), (rcpt.address.lower(),)).fetchall()
        else:
            import sqlite3

            if not os.path.exists(database):
                return found, ""
            lite = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
            try:
                rows = lite.execute(aliases, (rcpt.address.lower(),)).fetchall()
                domains = lite.execute(alias_domains, (rcpt.domain.lower(),)).fetchall()
                caught = lite.execute(catchalls, (rcpt.address.lower(),)).fetchall()
            finally:
                lite.close()
    except Exception as exc:  # noqa: BLE001 - sqlite3's or psycopg's: the reply goes on without them
        return found, f"the accounts database was not read ({exc})"
    found.update(f"{user}@{domain}".lower() for user, domain in rows)
    found.update(f"{rcpt.user}@{name}".lower() for (name,) in domains)
    found.update(f"@{name}".lower() for (name,) in caught)  # every address of a domain whose catch-all it is
    return found, ""
