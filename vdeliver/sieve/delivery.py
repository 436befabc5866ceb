"""Running a user's Sieve script at delivery: the script -> where the message is stored.

Called by deliver.deliver() once `[sieve] enabled = true` and the user has an active script
(`<home>/.dovecot.sieve`, managesieved's link).  It decides and does no storing itself:
plan() returns the mailboxes to store into, each once; deliver.py stores into all of them
and undoes the ones done when a later one fails, so a retry never finds a copy.

Nothing here loses or bounces mail: a script that does not compile or fails while it runs
is logged (syslog, and `<script>.log` beside the script, where Pigeonhole writes it and
webmail shows it) and the message goes to the INBOX.  Folder names come from the user: a
name that could leave the mailbox tree (`..`, a leading `.` or `/`, control characters) is
refused the same way.  IMAP system flags (\\Seen, \\Flagged, ...) are stored for Maildir
users (cur/NAME:2,FS).  Not yet carried out at delivery (issue 17 goes on): redirect (the
message is kept in the INBOX instead, and the log says so), keywords, and flags for mbox users.

    [sieve]
    enabled = false          # run users' scripts (in progress: opt in)
    script = ".dovecot.sieve"
    max_actions = 32
    max_redirects = 4
    # spamtest / virustest (RFC 5235): Pigeonhole's sieve_spamtest_* and sieve_virustest_*
    # settings without the prefix; by default SpamAssassin's X-Spam-Status (score, required)
    # and clamav-milter's X-Virus-Status (docs/sieve.md, vdeliver/sieve/spamtest.py)
    spamtest_status_type = "score"   # score, strlen or text
    spamtest_status_header = "X-Spam-Status: ^[[:alpha:]]+, score=(...)"
    spamtest_max_header = "..."      # or spamtest_max_value = 5.0; spamtest_text_value0..10
    virustest_status_type = "text"   # and virustest_status_header, ..., virustest_text_value0..5
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from vdeliver.config import Config, ConfigError, read_table
from vdeliver.hooks import Log
from vdeliver.message import Prepared
from vdeliver.recipient import Recipient
from vdeliver.sieve import spamtest

KEYS = {"enabled": "bool", "script": "str", "max_actions": "int", "max_redirects": "int", "max_script_size": "int",
        **spamtest.KEYS}
MAX_LOG = 64 << 10  # the <script>.log starts again past this size


@dataclass(frozen=True, slots=True)
class Settings:
    enabled: bool = False
    script: str = ".dovecot.sieve"
    max_actions: int = 32
    max_redirects: int = 4
    max_script_size: int = 1 << 20
    spam: spamtest.SpamConfig = spamtest.DEFAULT


@dataclass(frozen=True, slots=True)
class Store:
    """One mailbox to store into: its format, path, and whether it may be created."""

    format: str
    path: str
    create: bool
    folder: str  # as the script named it ("INBOX" for keep and the implicit keep)
    flags: tuple[str, ...] = ()  # imap4flags: stored with the message (Maildir system flags)


def settings(cfg: Config) -> Settings:
    values = read_table(cfg, "sieve", KEYS)
    spam = {k: values.pop(k) for k in list(values) if k in spamtest.KEYS}
    try:
        values["spam"] = spamtest.from_settings(spam)
    except ValueError as exc:
        raise ConfigError(cfg.where("sieve", str(exc).split()[0]), str(exc)) from None
    s = Settings(**values)  # type: ignore[arg-type]
    if "/" in s.script or s.script in ("", ".", ".."):
        raise ConfigError(cfg.where("sieve", "script"), "must be a file name in the home directory")
    return s


def plan(cfg: Config, rcpt: Recipient, home: str, inbox: Store, msg: Prepared,
         log: Log | None, folders: str = "") -> list[Store] | None:
    """The mailboxes to store the message into, in order; None when the user has no script.
    `home` is the user's home (config.home_template() expanded); `folders` where the folders
    `fileinto` names live: the user's Maildir (Maildir++ `.NAME` directories; by default the
    INBOX's path) or, for mbox users, `<home>/mail`."""
    if not folders:
        folders = inbox.path if inbox.format == "maildir" else os.path.join(home, "mail")
    opts = settings(cfg)
    script = os.path.join(home, opts.script)
    try:
        os.lstat(script)
    except OSError:
        return None  # no active script: the common case costs one lstat
    try:
        return _run(cfg, opts, rcpt, inbox, msg, folders, script, log)
    except _KeepInbox as why:
        _report(log, script, rcpt, str(why))
        return [inbox]


class _KeepInbox(Exception):
    """The script cannot decide: the message goes to the INBOX."""


def _run(cfg: Config, opts: Settings, rcpt: Recipient, inbox: Store, msg: Prepared, folders: str, script: str,
         log: Log | None) -> list[Store]:
    from vdeliver.sieve import interpreter
    from vdeliver.sieve.errors import SieveError
    from vdeliver.sieve.validator import compile_script

    source = _read(script, opts.max_script_size)
    try:
        compiled = compile_script(source)
        data = b"".join(msg.spool.chunks()) if "body" in compiled.extensions else msg.spool.head(1 << 20)
        if data.startswith(b"From "):
            data = data.partition(b"\n")[2]  # the mbox From_ line is not a header
        envelope = interpreter.Envelope(msg.sender, rcpt.address)
        result = interpreter.run(compiled, interpreter.Message.from_bytes(data), envelope,
                                 max_actions=opts.max_actions, max_redirects=opts.max_redirects, spam=opts.spam,
                                 mailbox_exists=lambda name: _folder(inbox, folders, name, False) is not None)
    except SieveError as exc:
        raise _KeepInbox("; ".join(str(e) for e in exc.errors)) from None
    if any(a.type == "redirect" for a in result.actions):
        raise _KeepInbox("redirect is not carried out at delivery yet; kept in the INBOX")
    stores: list[Store] = []
    for folder in result.stores():
        create = any(a.type == "fileinto" and a.mailbox == folder and a.create for a in result.actions)
        flags = next((a.flags for a in result.actions
                      if (a.type == "keep" and folder == "INBOX") or (a.type == "fileinto" and a.mailbox == folder)),
                     result.implicit_flags)
        store = _folder(inbox, folders, folder, create)
        if store is None:
            _report(log, script, rcpt, f"fileinto {folder!r}: no such mailbox; kept in the INBOX")
            store = inbox
        if all(s.path != store.path for s in stores):
            stores.append(Store(store.format, store.path, store.create, store.folder, flags))
    return stores


def _read(path: str, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # the active link is followed, as Dovecot does
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _KeepInbox("the active script is not a regular file")
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise _KeepInbox(f"cannot read the script: {exc.strerror}") from None
    if len(data) > limit:
        raise _KeepInbox(f"script is too large (more than {limit} bytes)")
    return data


def _folder(inbox: Store, folders: str, name: str, create: bool) -> Store | None:
    """Where a folder of that name lives for this user, or None if it does not exist and may
    not be created (or the name is not a safe one: it must stay inside `folders`)."""
    if name.upper() == "INBOX":
        return inbox
    if inbox.format == "maildir" and "/" in name:
        return None  # Maildir++ separates levels with '.'; a '/' would make a directory path
    parts = name.split("/") if inbox.format == "mbox" else name.split(".")
    if any(not p or p in (".", "..") or p.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in p)
           for p in parts) or "\x00" in name:
        return None
    if inbox.format == "maildir":
        path = os.path.join(folders, "." + ".".join(_mutf7(p) for p in parts))
        exists = os.path.isdir(os.path.join(path, "new"))
    else:
        path = os.path.join(folders, *parts)
        exists = os.path.isfile(path)
    if not exists and not create:
        return None
    if not exists and inbox.format == "mbox":
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # the folders of Lists/dev
        except OSError:
            return None
    return Store(inbox.format, path, create and not exists, name)


def _mutf7(text: str) -> str:
    """IMAP's modified UTF-7 (RFC 3501 5.1.3), as Dovecot names Maildir++ folders on disk."""
    import base64

    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if " " <= ch <= "~":
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _report(log: Log | None, script: str, rcpt: Recipient, text: str) -> None:
    """One syslog line, and the same line appended to <script>.log for the user to read."""
    if log is not None:
        try:
            log.warning(f"sieve: to=<{rcpt.address}>: {script}: {text}")
        except Exception:  # noqa: BLE001 - a log line never changes a delivery
            pass
    try:
        line = time.strftime("%Y-%m-%d %H:%M:%S ") + text.replace("\n", " ") + "\n"
        path = script + ".log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size > MAX_LOG:
                os.ftruncate(fd, 0)
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)
    except OSError:
        pass
