"""Resolve a recipient to a mailbox, read the message, store it.  Never exits.

The mailbox format is detected from what is on disk, so users and domains can mix
formats without configuration: a directory with new/ is a Maildir (at either
template's path), a regular file at the mbox path is an mbox.  When neither
exists, the domain directory decides between "unknown domain", "unknown user" and
(with create_mailbox) a new mailbox in the default format.

Over 400 lines on purpose: resolve, read, store and undo are one sequence whose every
step decides an exit code; kept in one place so the order of the steps (and what a failure
leaves behind) reads top to bottom.  Only the stdlib modules it needs are imported here.
"""

import _stat as stat  # the C module: `stat` is a Python module over it, 50 us more a process
import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py

from vdeliver.config import Config
from vdeliver.errors import fail
from vdeliver.fileio import dirname, isdir, islink, join, lexists
from vdeliver.log import phase
from vdeliver.recipient import Recipient

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.groupjournal import Group
    from vdeliver.hooks import Log
    from vdeliver.message import Prepared
    from vdeliver.sieve.delivery import Plan
    from vdeliver.sieve.interpreter import Action

# vdeliver-lmtpd's group commit (vdeliver.groupjournal.Group), set at its start when on: its mbox
# appends write their busy record into a slot of the group journal and share its syncs.
GROUP: "list[Group]" = []


class Target:
    __slots__ = ("format", "path", "create")

    def __init__(self, fmt: str, path: str, create: bool = False) -> None:
        self.format = fmt
        self.path = path
        self.create = create

    def __repr__(self) -> str:
        return f"Target({self.format!r}, {self.path!r}, create={self.create})"


def expand(template: str, rcpt: Recipient) -> str:
    return template.replace("{domain}", rcpt.domain).replace("{user}", rcpt.user)


def domain_dir(template: str, rcpt: Recipient) -> str:
    """The directory above the first path component that holds {user}."""
    parts = template.split("/")
    for i, part in enumerate(parts):
        if "{user}" in part:
            return expand("/".join(parts[:i]) or "/", rcpt)
    return dirname(expand(template, rcpt))



def _probe(fmt: str, path: str) -> "Target | None":
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise fail("mailbox path is broken", f"a parent of {path} is not a directory") from None
    except OSError as exc:
        raise fail("cannot look up mailbox", f"{path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise fail("mailbox is a symbolic link", path)
    if stat.S_ISDIR(st.st_mode):
        return Target("maildir", path)  # maildir.deliver() checks tmp/ and new/
    if fmt == "mbox" and stat.S_ISREG(st.st_mode):
        return Target("mbox", path)
    if fmt == "maildir":
        raise fail("mailbox is not a Maildir", f"{path} is not a directory")
    raise fail("mailbox is not a regular file", path)


def resolve(cfg: Config, rcpt: Recipient) -> Target:
    paths = {"mbox": expand(cfg.mbox_path, rcpt), "maildir": expand(cfg.maildir_path, rcpt)}
    order = ("maildir", "mbox") if cfg.format == "maildir" else ("mbox", "maildir")
    for fmt in order:
        found = _probe(fmt, paths[fmt])
        if found is not None:
            return _with_detail(cfg, rcpt, found)
    default = cfg.format
    template = cfg.maildir_path if default == "maildir" else cfg.mbox_path
    ddir = domain_dir(template, rcpt)
    other = domain_dir(cfg.mbox_path if default == "maildir" else cfg.maildir_path, rcpt)
    if not isdir(ddir) and not isdir(other):
        raise fail("domain unknown", f"no domain directory {ddir}", "5.1.2")
    if not cfg.create_mailbox or not isdir(ddir):
        raise fail("user unknown", f"no mailbox for {rcpt.address} in {ddir}", "5.1.1")
    return Target(default, paths[default], create=True)


# Folders a sender must never file into by choosing a +detail: what the user keeps there
# (sent mail, drafts, deleted mail) or what a spam filter reads.  Compared case-insensitively,
# with Maildir++ subfolders (`.Trash.old`) by their first name.
SPECIAL_USE = frozenset((
    "inbox", "trash", "deleted", "deleted items", "deleted messages", "sent", "sent items", "sent messages",
    "sent mail", "drafts", "draft", "junk", "junk e-mail", "junk email", "spam", "archive", "archives",
    "all mail", "templates", "outbox", "virtual",
))


def detail_folder_allowed(cfg: Config, detail: str) -> bool:
    """May `user+detail` be filed into the folder `.detail`?  With detail_folders_allow set,
    only the folders it names (comma or space separated); otherwise any existing folder that
    is not special-use."""
    if detail.startswith(".") or ".." in detail or "/" in detail or not detail.isprintable():
        return False
    allow = cfg.detail_folders_allow.replace(",", " ").split()
    if allow:
        return detail.lower() in {a.lower() for a in allow}
    return detail.split(".", 1)[0].lower() not in SPECIAL_USE


def _with_detail(cfg: Config, rcpt: Recipient, target: Target) -> Target:
    if cfg.detail_folders and rcpt.detail and target.format == "maildir" and detail_folder_allowed(cfg, rcpt.detail):
        from vdeliver.maildir import is_maildir

        folder = join(target.path, "." + rcpt.detail)
        if is_maildir(folder) and not islink(folder):
            return Target("maildir", folder)
    return target


class Result:
    """What was stored where, for the log line: the mailbox, the size read, the envelope
    sender used, notes (stale locks broken on the way), and when a Sieve script decided,
    every mailbox it stored into (none: discarded)."""

    __slots__ = ("target", "size", "sender", "notes", "sieve", "redirected", "duplicate")

    def __init__(self, target: Target, size: int, sender: str, notes: "list[str]") -> None:
        self.target = target
        self.size = size
        self.sender = sender
        self.notes = notes
        self.sieve: "list[str] | None" = None
        self.redirected: "list[str]" = []
        self.duplicate = False  # dropped by dedup_seconds

    def where(self) -> str:
        """The log line's `(...)`: the mailbox, or what the script did."""
        if self.duplicate:
            return "duplicate dropped (dedup_seconds)"
        if self.sieve is None:
            return f"{self.target.format} {self.target.path}"
        where = [f"{self.target.format} " + ", ".join(self.sieve)] if self.sieve else []
        where += [f"redirected to <{a}>" for a in self.redirected]
        return "; ".join(where) + " (sieve)" if where else "discarded by sieve"


class Copies:
    """One record stored for several recipients (the LMTP server's transaction, prepared once):
    where the first Maildir copy of `msg` went, so that the others are hard links to it
    (maildir.link_copy) instead of copies.  Only a store of `msg` itself, unedited and without
    flags, may link: any other record's bytes differ."""

    __slots__ = ("msg", "source")

    def __init__(self, msg: "Prepared") -> None:
        self.msg = msg
        self.source: "tuple[str, str] | None" = None  # (Maildir, name in its new/); set once


def _store(cfg: Config, target: Target, msg: "Prepared", log: "Log | None", notes: "list[str]",
           flags: "tuple[str, ...]" = (), copies: "Copies | None" = None) -> object:
    """Store into one mailbox; returns what _undo() needs to take it back.  IMAP flags (from
    a Sieve script) go where Dovecot reads them (vdeliver.flags)."""
    bounce = cfg.over_quota == "bounce"
    if target.format == "mbox":
        from vdeliver import mbox
        from vdeliver.config import group_journal
        from vdeliver.recovery import MboxJournal

        if flags:
            from vdeliver.flags import mbox_header, mbox_keywords

            msg = msg.with_header(mbox_header(flags, mbox_keywords(target.path), notes))
        hook = GROUP[0].hook(log, cfg.mbox_journal) if GROUP else MboxJournal(log, cfg.mbox_journal,
                                                                              group_journal(cfg))
        receipt = mbox.Recorded(hook)
        notes += mbox.deliver(
            target.path,
            msg,
            host=cfg.host(),
            create=target.create,
            lock_timeout=cfg.lock_timeout,
            stale_age=cfg.stale_lock_age,
            over_quota_bounce=bounce,
            journal=receipt,
        )
        return receipt
    from vdeliver import maildir

    linkable = copies is not None and msg is copies.msg and not flags and not target.create
    name = None
    if linkable and copies is not None and copies.source is not None:
        name = maildir.link_copy(target.path, *copies.source, msg, host=cfg.host(), over_quota_bounce=bounce)
    if name is None:
        name = maildir.deliver(
            target.path, msg, host=cfg.host(), create_missing=target.create, over_quota_bounce=bounce,
            tmp_max_age=cfg.maildir_tmp_max_age,
        )
        if linkable and copies is not None and copies.source is None:
            copies.source = (target.path, name)  # two threads may race here: either copy will do
    letters = ""
    if flags:
        from vdeliver.flags import maildir_info

        letters = maildir_info(target.path, flags, notes)
    if letters:
        try:
            name = maildir.set_flags(target.path, name, letters)
        except OSError:
            pass  # delivered, without its flags: a mail reader can still set them
    return name


def _undo(cfg: Config, target: Target, receipt: object, log: "Log | None") -> None:
    """Take back a store that succeeded (a later one failed); never raises."""
    try:
        if isinstance(receipt, str):
            from vdeliver import maildir

            maildir.undo(target.path, receipt)
        else:
            from vdeliver import mbox

            if isinstance(receipt, mbox.Recorded) and receipt.span is not None:
                mbox.undo(target.path, receipt.span, host=cfg.host(), lock_timeout=cfg.lock_timeout,
                          stale_age=cfg.stale_lock_age)
    except Exception as exc:  # noqa: BLE001 - the delivery fails anyway; say what stays behind
        if log is not None:
            try:
                log.error(f"cannot take back the copy in {target.path}: {exc}")
            except Exception:  # noqa: BLE001
                pass


def _dedup_claim(cfg: Config, rcpt: Recipient, msg: "Prepared",
                 log: "Log | None") -> "tuple[object, str] | None":
    """dedup_seconds (as maildrop's `reformail -D` is used): claim (Message-ID, envelope
    sender) for this mailbox on the tracking store.  None: no deduplication for this message
    (no Message-ID, or the store cannot answer: the message is delivered, and the log says
    why); (None, key): a copy was delivered within the window; (tracker, key): claimed."""
    from vdeliver.message import header_value
    from vdeliver.tracking import Tracker, TrackingError

    message_id = header_value(msg.spool.head(1 << 20), b"message-id").strip()
    if not message_id:
        return None
    key = f"{msg.sender}\x1f{message_id.decode('utf-8', 'replace')}"
    try:
        tracker = Tracker.from_config(cfg)
        if tracker.claim("dedup", rcpt.address, key, cfg.dedup_seconds):
            return tracker, key
        tracker.close()
    except TrackingError as exc:
        _say(log, f"dedup: to=<{rcpt.address}>: the tracking store cannot answer ({exc}); delivered")
        return None
    _say(log, f"dedup: to=<{rcpt.address}>: duplicate of {message_id.decode('utf-8', 'replace')} from "
              f"<{msg.sender}> within {cfg.dedup_seconds} s: dropped")
    return None, key


def _dedup_release(dedup: "tuple[object, str]", rcpt: Recipient, log: "Log | None") -> None:
    from vdeliver.tracking import Tracker, TrackingError

    tracker, key = dedup
    if isinstance(tracker, Tracker):
        try:
            tracker.release("dedup", rcpt.address, key)
        except TrackingError as exc:
            _say(log, f"dedup: to=<{rcpt.address}>: claim not released ({exc}): a retry within the window "
                      "will be dropped as a duplicate")
        tracker.close()


def _say(log: "Log | None", text: str) -> None:
    from vdeliver.log import tell

    tell(log, text)


def _respond(cfg: Config, rcpt: Recipient, home: str, msg: "Prepared", planned: "Plan", target: Target,
             folders: str, log: "Log | None") -> None:
    """A script's vacation reply and notifications (vdeliver.sieve.respond), after the message
    is stored; nothing here can fail the delivery."""
    from vdeliver.sieve import respond

    for action in ([planned.vacation] if planned.vacation is not None else []) + planned.notify:
        try:
            if action.type == "vacation":
                said, sent = respond.reply(cfg, rcpt, home, msg, action, log)
            else:
                said, sent = respond.notify(cfg, rcpt, msg, action, log)
            if sent and action.vacation is not None and action.vacation.fcc is not None:
                said += _fcc(cfg, rcpt, home, target, folders, action, sent, log)
        except Exception as exc:  # noqa: BLE001 - the message is stored: a sending problem is only logged
            said = f"{action.type}: not sent ({type(exc).__name__}: {exc})"
        _say(log, f"sieve: to=<{rcpt.address}>: {said}")


def _fcc(cfg: Config, rcpt: Recipient, home: str, target: Target, folders: str, action: "Action", sent: bytes,
         log: "Log | None") -> str:
    """RFC 8580: the copy of what was sent, stored as any message is (\\Seen and :flags)."""
    from vdeliver.sieve import delivery as sieve

    inbox = sieve.Store(target.format, target.path, target.create, "INBOX")
    store = sieve.fcc_target(cfg, rcpt, home, inbox, folders, action)
    if store is None:
        fcc = action.vacation.fcc if action.vacation is not None else None
        why = sieve.folder_problem(target.format, fcc.mailbox) if fcc is not None else ""
        return f"; the :fcc folder name is invalid ({why}): no copy kept" if why else (
            "; the :fcc folder does not exist: no copy kept")
    from vdeliver import message
    from vdeliver.fileio import anonymous_spool, write_all

    fd = anonymous_spool(cfg.spool_dir, "fcc.")
    try:
        write_all(fd, sent)
        os.lseek(fd, 0, 0)  # SEEK_SET
        copy = message.prepare(fd, sender="", recipient=rcpt.address, mbox=store.format == "mbox",
                               escape=cfg.mbox_escape, return_path=False, delivered_to=False,
                               spool_threshold=cfg.spool_threshold, spool_dir=cfg.spool_dir)
    finally:
        os.close(fd)
    try:
        _store(cfg, Target(store.format, store.path, store.create), copy, log, [], store.flags)
    finally:
        copy.close()
    return f"; a copy in {store.folder}"


def _rejected(cfg: Config, rcpt: Recipient, home: str, msg: "Prepared", planned: "Plan", refuse: bool,
              target: Target, log: "Log | None") -> "tuple[list[Target], list[str]]":
    """What a script's reject comes to (docs/sieve.md): refused in the protocol (LMTP's 550,
    the CLI's exit 77 and its reason in sendmail's DSN), or after acceptance ([sieve]
    reject_mode) a notification to the sender instead of the message, or the message kept.
    Returns the stores and redirects left."""
    reason = planned.reject or "rejected"
    if refuse or planned.reject_mode == "refuse":
        raise fail(f"rejected by the recipient's filter: {reason}", "", "5.7.1")
    if planned.reject_mode == "mdn":
        from vdeliver.sieve import redirect

        if redirect.reject_mdn(cfg, rcpt, home, msg, reason, log):
            return [], []
    else:
        from vdeliver.log import tell

        tell(log, f"sieve: to=<{rcpt.address}>: reject not carried out (reject_mode = keep): {reason}", info=True)
    return [target], []


def deliver(cfg: Config, rcpt: Recipient, fd: "int | bytes", sender: "str | None", target: "Target | None" = None,
            log: "Log | None" = None, shared: "dict[str, object] | None" = None, refuse: bool = False,
            prepared: "Prepared | None" = None, copies: "Copies | None" = None) -> Result:
    """Read the message from fd (or take it as bytes: the LMTP server's small message) and
    store it for rcpt.  Raises DeliveryError.  `log` hears what crash recovery did to the
    mailbox (the caller's logger).  `shared`: one dict for all the recipients of one message
    (the LMTP server's transaction), where Sieve keeps the message parsed once.  `refuse`:
    the caller can still refuse the message in its protocol (LMTP, before its reply), so a
    script's reject always refuses.  `prepared`: the record already prepared by the caller
    (fd is not read; the caller closes it): the LMTP server prepares a message once for all
    its Maildir recipients (message.for_recipient()), and `copies` lets the stores of that
    very record be hard links to its first copy."""
    from vdeliver import message

    if target is None:
        target = resolve(cfg, rcpt)
    is_mbox = target.format == "mbox"
    msg = prepared or message.prepare(
        fd,
        sender=sender,
        recipient=rcpt.address,
        mbox=is_mbox,
        escape=cfg.mbox_escape,
        return_path=cfg.return_path,
        delivered_to=cfg.delivered_to,
        max_size=cfg.max_message_size,
        spool_threshold=cfg.spool_threshold,
        spool_dir=cfg.spool_dir,
        # A large Maildir record is spooled in the Maildir's own tmp/: linked in, not copied.
        near=f"{target.path}/tmp" if target.format == "maildir" and not target.create else "",
        over_quota_bounce=cfg.over_quota == "bounce",
    )
    phase("read")
    spooled = None if prepared else msg  # closed at the end, whatever copy of the record was stored
    try:
        dedup = _dedup_claim(cfg, rcpt, msg, log) if cfg.dedup_seconds > 0 else None
        if dedup is not None and dedup[0] is None:
            dropped = Result(target, msg.input_size, msg.sender, [])  # delivered here within dedup_seconds
            dropped.sieve = []
            dropped.duplicate = True
            return dropped
        stores = [target]
        flags: "dict[str, tuple[str, ...]]" = {}
        redirects: "list[str]" = []
        planned = None
        table = cfg.tables.get("sieve") or {}
        if table.get("enabled", True) is not False:  # users' Sieve scripts run unless switched off
            from vdeliver.config import home_template

            home = expand(home_template(cfg), rcpt)
            script = join(home, str(table.get("script", ".dovecot.sieve")))
            # Without an active script or global ones, nothing of vdeliver.sieve is imported.
            if lexists(script) or table.get("before") or table.get("after"):
                from vdeliver.sieve import delivery as sieve

                inbox = sieve.Store(target.format, target.path, target.create, "INBOX")
                # Folders hang off the Maildir itself, even when +detail chose a folder as the INBOX.
                folders = expand(cfg.maildir_path, rcpt) if target.format == "maildir" else ""
                planned = sieve.plan(cfg, rcpt, home, inbox, msg, log, folders, shared)
                if planned is not None:
                    stores = [Target(s.format, s.path, s.create) for s in planned.stores]
                    flags = {s.path: s.flags for s in planned.stores}
                    redirects = planned.redirects
                    if planned.header is not None:  # editheader: every copy carries the edited header
                        msg = msg.with_new_header(planned.header, is_mbox)
                    if planned.reject is not None:  # reject / ereject (RFC 5429): nothing is stored
                        stores, redirects = _rejected(cfg, rcpt, home, msg, planned, refuse, target, log)
                    # The INBOX first: a Maildir it creates must exist before folders inside it.
                    stores.sort(key=lambda t: t.path != target.path)
        notes: list[str] = []
        done: list[tuple[Target, object]] = []
        try:
            for store in stores:
                done.append((store, _store(cfg, store, msg, log, notes, flags.get(store.path, ()), copies)))  # noqa: PERF401 - recorded as each completes, for the undo
            # Redirects go once every store stands (a store can be taken back, a sent message
            # cannot).  One that is not sent leaves the message in the INBOX.
            sent: "list[str]" = []
            if redirects:
                from vdeliver.sieve import redirect

                sent = redirect.send(cfg, rcpt, home, msg, redirects, log)
            if len(sent) < len(redirects) and all(s.path != target.path for s in stores):
                stores.append(target)
                done.append((target, _store(cfg, target, msg, log, notes, copies=copies)))
        except BaseException:
            for store, receipt in reversed(done):  # a later store failed: no copy may stay behind
                _undo(cfg, store, receipt, log)
            if dedup is not None and dedup[0] is not None:
                _dedup_release(dedup, rcpt, log)  # not delivered: the retry must not be dropped
            raise
        if planned is not None and planned.subscribe:
            sieve.subscribe(planned.subscribe, log)  # folders the script created: IMAP clients show them
        if planned is not None and planned.track is not None:
            sieve.record(planned, log)  # duplicate (RFC 7352): this message is seen now
        if planned is not None and (planned.vacation is not None or planned.notify) and stores:
            _respond(cfg, rcpt, home, msg, planned, target, folders, log)  # stored: the replies may go
        if dedup is not None and hasattr(dedup[0], "close"):
            dedup[0].close()  # the claim stands: a copy is stored
        stored = stores[0] if stores else target
        result = Result(stored, msg.input_size, msg.sender, notes)
        if len(stores) != 1 or stores[0] is not target or redirects:
            result.sieve = [s.path for s in stores]
            result.redirected = sent
        return result
    finally:
        try:
            if spooled is not None:
                spooled.close()
        except OSError:  # the spool only; whatever the store did stands
            pass
