"""Running a user's Sieve script at delivery: the script -> where the message is stored.

Called by deliver.deliver() (unless `[sieve] enabled = false`) when the user has an active script
(`<home>/.dovecot.sieve`, managesieved's link).  It decides and does no storing itself:
plan() returns the mailboxes to store into, each once; deliver.py stores into all of them
and undoes the ones done when a later one fails, so a retry never finds a copy.

Nothing here loses or bounces mail: a script that does not compile or fails while it runs
is logged (syslog, and `<script>.log` beside the script, where Pigeonhole writes it and
webmail shows it) and the message goes to the INBOX.  Folder names come from the user: a
name that could leave the mailbox tree (`..`, a leading `.` or `/`, control characters) is
refused the same way.  IMAP system flags (\\Seen, \\Flagged, ...) are stored for Maildir
users (cur/NAME:2,FS).

`redirect` is sent after every store succeeded (a store can be taken back, a sent message
cannot), through `sendmail -oi -f <envelope sender> <address>`, the message as it came with
our Delivered-To line: the next hop, vdeliver or not, sees the loop.  A redirect to an
address the message already carries in a Delivered-To line is not sent (a loop); one that
fails (sendmail missing, its exit status, the deadline) is logged.  Either way the message
is then also stored in the INBOX: it is never lost.

    [sieve]
    enabled = true           # run users' scripts (false: never, whatever they have)
    script = ".dovecot.sieve"
    max_actions = 32
    max_redirects = 4
    sendmail = "/usr/sbin/sendmail"
    sendmail_timeout = 60    # seconds
    # spamtest / virustest (RFC 5235): Pigeonhole's sieve_spamtest_* and sieve_virustest_*
    # settings without the prefix; by default SpamAssassin's X-Spam-Status (score, required)
    # and clamav-milter's X-Virus-Status (docs/sieve.md, vdeliver/sieve/spamtest.py)
    spamtest_status_type = "score"   # score, strlen or text
    spamtest_status_header = "X-Spam-Status: ^[[:alpha:]]+, score=(...)"
    spamtest_max_header = "..."      # or spamtest_max_value = 5.0; spamtest_text_value0..10
    virustest_status_type = "text"   # and virustest_status_header, ..., virustest_text_value0..5

About 650 lines on purpose: the plan, the folder-name rules (which names Dovecot hides,
per format) and the sending actions' envelope are one decision per message, kept where the
deliver step calls it.
"""


import os
import time

from vdeliver.config import Config, ConfigError, read_table
from vdeliver.log import tell
from vdeliver.message import Prepared
from vdeliver.recipient import Recipient

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.hooks import Log
    from vdeliver.sieve.compiled import Compiled
    from vdeliver.sieve.interpreter import Action, Message
    from vdeliver.sieve.spamtest import SpamConfig
    from vdeliver.tracking import Tracker

# The [sieve] keys, and spamtest.KEYS: read only when one of them is set.
KEYS = {"enabled": "bool", "script": "str", "max_actions": "int", "max_redirects": "int", "max_script_size": "int",
        "sendmail": "str", "sendmail_timeout": "float", "before": "strs", "after": "strs", "global_dir": "str",
        "max_cpu_time": "float", "special_use": "table", "max_create": "int", "reject_mode": "str",
        "duplicate_period": "int", "duplicate_max_period": "int", "vacation_default_period": "int",
        "vacation_min_period": "int", "vacation_max_period": "int", "vacation_never_reply": "strs",
        "vacation_spam_header": "str", "notify_per_hour": "int", "srs_domain": "str", "srs_secret_file": "str"}
REJECT_MODES = ("refuse", "mdn", "keep")
SPAM_PREFIXES = ("spamtest_", "virustest_")
# The folders Debian's Dovecot names in conf.d/15-mailboxes.conf, by their special-use flag.
SPECIAL_USE = {"\\Drafts": "Drafts", "\\Junk": "Junk", "\\Trash": "Trash", "\\Sent": "Sent"}
MAX_LOG = 64 << 10  # the <script>.log starts again past this size


class Settings:
    """[sieve], checked (plain classes here: dataclasses cost more to import than a script
    costs to run)."""

    __slots__ = ("enabled", "script", "max_actions", "max_redirects", "max_script_size", "sendmail",
                 "sendmail_timeout", "before", "after", "global_dir", "max_cpu_time", "spam", "special_use",
                 "max_create", "reject_mode", "duplicate_period", "duplicate_max_period", "vacation_default_period",
                 "vacation_min_period", "vacation_max_period", "vacation_never_reply", "vacation_spam_header",
                 "notify_per_hour", "srs_domain", "srs_secret_file")

    def __init__(self, enabled: bool = True, script: str = ".dovecot.sieve", max_actions: int = 32,
                 max_redirects: int = 4, max_script_size: int = 1 << 20, sendmail: str = "/usr/sbin/sendmail",
                 sendmail_timeout: float = 60.0, before: tuple[str, ...] = (), after: tuple[str, ...] = (),
                 global_dir: str = "", max_cpu_time: float = 30.0, spam: "SpamConfig | None" = None,
                 special_use: "dict[str, str] | None" = None, max_create: int = 10,
                 reject_mode: str = "refuse", duplicate_period: int = 43200,
                 duplicate_max_period: int = 172800, vacation_default_period: int = 7 * 86400,
                 vacation_min_period: int = 86400, vacation_max_period: int = 0,
                 vacation_never_reply: tuple[str, ...] = (), vacation_spam_header: str = "X-Spam-Flag: YES",
                 notify_per_hour: int = 10, srs_domain: str = "", srs_secret_file: str = "") -> None:
        self.enabled = enabled
        self.script = script
        self.max_actions = max_actions
        self.max_redirects = max_redirects
        self.max_script_size = max_script_size
        self.sendmail = sendmail
        self.sendmail_timeout = sendmail_timeout
        self.before = before  # global scripts (files, or directories of *.sieve) run first
        self.after = after  # and last
        self.global_dir = global_dir  # where `include :global "NAME"` finds NAME.sieve
        self.max_cpu_time = max_cpu_time
        self.spam = spam  # None: the defaults (SpamAssassin's and clamav-milter's headers)
        # special-use flag -> folder (RFC 6154, 8579): Debian's Dovecot defaults unless set
        self.special_use = special_use if special_use is not None else dict(SPECIAL_USE)
        self.max_create = max_create  # folders one message may create (fileinto :create)
        self.reject_mode = reject_mode  # the CLI's reject: refuse (exit 77), mdn, or keep
        self.duplicate_period = duplicate_period  # RFC 7352 without :seconds (Pigeonhole: 12 h)
        self.duplicate_max_period = duplicate_max_period  # and at most (Pigeonhole: 2 days)
        # vacation (RFC 5230): Pigeonhole's sieve_vacation_{default,min,max}_period; 0: no most
        self.vacation_default_period = vacation_default_period
        self.vacation_min_period = vacation_min_period
        self.vacation_max_period = vacation_max_period
        self.vacation_never_reply = vacation_never_reply  # () : vacation.Rules' list
        self.vacation_spam_header = vacation_spam_header  # "Field: value" that marks spam ("": none)
        self.notify_per_hour = notify_per_hour  # enotify: notifications per mailbox and hour
        self.srs_domain = srs_domain  # redirect: SRS0 envelope senders at this domain ("": off)
        self.srs_secret_file = srs_secret_file


class Store:
    """One mailbox to store into: its format, path, and whether it may be created."""

    __slots__ = ("format", "path", "create", "folder", "flags")

    def __init__(self, format: str, path: str, create: bool, folder: str,
                 flags: tuple[str, ...] = ()) -> None:
        self.format = format
        self.path = path
        self.create = create
        self.folder = folder  # as the script named it ("INBOX" for keep and the implicit keep)
        self.flags = flags  # imap4flags: stored with the message


def settings(cfg: Config) -> "Settings":
    kinds = KEYS
    if any(key.startswith(SPAM_PREFIXES) for key in cfg.table("sieve")):
        from vdeliver.sieve import spamtest

        kinds = {**KEYS, **spamtest.KEYS}
    values = read_table(cfg, "sieve", kinds)
    spam = {k: values.pop(k) for k in list(values) if k.startswith(SPAM_PREFIXES)}
    if spam:
        try:
            values["spam"] = spamtest.from_settings(spam)
        except ValueError as exc:
            raise ConfigError(cfg.where("sieve", str(exc).split()[0]), str(exc)) from None
    s = Settings(**values)  # type: ignore[arg-type]
    if "/" in s.script or s.script in ("", ".", ".."):
        raise ConfigError(cfg.where("sieve", "script"), "must be a file name in the home directory")
    if not s.sendmail.startswith("/"):
        raise ConfigError(cfg.where("sieve", "sendmail"), "must be an absolute path")
    if s.sendmail_timeout <= 0:
        raise ConfigError(cfg.where("sieve", "sendmail_timeout"), "must be more than 0 seconds")
    if s.max_cpu_time <= 0:
        raise ConfigError(cfg.where("sieve", "max_cpu_time"), "must be more than 0 seconds")
    for key in ("before", "after", "global_dir"):
        value = getattr(s, key)
        for path in (value,) if isinstance(value, str) else value:
            if (path or key != "global_dir") and not path.startswith("/"):
                raise ConfigError(cfg.where("sieve", key), f"must be an absolute path (got {path!r})")
    if bool(s.srs_domain) != bool(s.srs_secret_file):
        raise ConfigError(cfg.where("sieve", "srs_domain" if not s.srs_domain else "srs_secret_file"),
                          "srs_domain and srs_secret_file go together")
    if s.srs_secret_file and not s.srs_secret_file.startswith("/"):
        raise ConfigError(cfg.where("sieve", "srs_secret_file"), "must be an absolute path")
    if s.reject_mode not in REJECT_MODES:
        raise ConfigError(cfg.where("sieve", "reject_mode"), f"must be one of {', '.join(REJECT_MODES)}")
    from vdeliver.flags import valid_special_use

    for flag, folder in s.special_use.items():
        if not valid_special_use(flag) or not folder or "\n" in folder:
            raise ConfigError(cfg.where("sieve", "special_use"),
                              f"{flag!r} = {folder!r}: needs a special-use flag (\\Junk) and a folder name")
    return s


def global_scripts(paths: tuple[str, ...]) -> list[str]:
    """The scripts of `before` or `after`: each file, and each directory's *.sieve files in
    byte order (as Pigeonhole reads a directory)."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            try:
                names = sorted(n for n in os.listdir(path) if n.endswith(".sieve") and not n.startswith("."))
            except OSError:
                continue
            found += [os.path.join(path, n) for n in names]
        else:
            found.append(path)
    return found


class Plan:
    """What the script decided: the mailboxes to store into, in order, and the addresses to
    redirect to once they are all stored."""

    __slots__ = ("stores", "redirects", "subscribe", "header", "reject", "reject_mode", "track", "vacation",
                 "notify")

    def __init__(self, stores: "list[Store]", redirects: list[str],
                 subscribe: "list[tuple[str, list[str]]] | None" = None, header: "bytes | None" = None) -> None:
        self.stores = stores
        self.redirects = redirects
        self.header = header  # editheader: the header block every copy is stored and sent with
        self.reject: str | None = None  # reject / ereject (RFC 5429): the reason, one line
        self.reject_mode = "refuse"  # [sieve] reject_mode: what the CLI does with it
        # duplicate (RFC 7352): (tracker, mailbox, [(key, seconds, last)]) to record once stored
        self.track: "tuple[Tracker, str, list[tuple[str, int, bool]]] | None" = None
        self.vacation: "Action | None" = None  # a vacation action: answered once the message is stored
        self.notify: "list[Action]" = []  # enotify actions: sent once the message is stored
        # Folders `fileinto :create` makes: (subscriptions file, the name's levels), to be
        # subscribed once the message is stored, so that IMAP clients show them.
        self.subscribe = subscribe if subscribe is not None else []


def plan(cfg: Config, rcpt: Recipient, home: str, inbox: "Store", msg: Prepared,
         log: "Log | None", folders: str = "", shared: "dict[str, object] | None" = None) -> "Plan | None":
    """The mailboxes to store the message into, in order, and the addresses to redirect to;
    None when no script runs (the user has none, and there are no global ones).  `home` is
    the user's home (config.home_template() expanded); `folders` where the folders `fileinto`
    names live: the user's Maildir (Maildir++ `.NAME` directories; by default the INBOX's
    path) or, for mbox users, `<home>/mail`.  `shared`: one dict for all the recipients of a
    message (LMTP), so that it is parsed once."""
    if not folders:
        folders = inbox.path if inbox.format == "maildir" else os.path.join(home, "mail")
    opts = settings(cfg)
    script = os.path.join(home, opts.script)
    try:
        os.lstat(script)
        personal = [script]
    except OSError:
        personal = []  # no active script: the common case costs one lstat
    sequence = [(p, False) for p in global_scripts(opts.before)] + [(p, True) for p in personal] + [
        (p, False) for p in global_scripts(opts.after)]
    if not sequence:
        return None
    try:
        return _run(cfg, opts, rcpt, inbox, msg, folders, home, sequence, log, shared)
    except _KeepInbox as why:
        report(log, why.script or script, rcpt, str(why), why.personal)
        return Plan([inbox], [])


class _KeepInbox(Exception):
    """The scripts cannot decide: the message goes to the INBOX."""

    def __init__(self, text: str, script: str = "", personal: bool = True) -> None:
        super().__init__(text)
        self.script = script
        self.personal = personal


def _run(cfg: Config, opts: "Settings", rcpt: Recipient, inbox: "Store", msg: Prepared, folders: str, home: str,
         sequence: list[tuple[str, bool]], log: "Log | None", shared: "dict[str, object] | None") -> "Plan":
    """Run the scripts in order on one result (interpreter.run_sequence: Pigeonhole's rule for
    sieve_before and sieve_after).  A script that does not compile is skipped (and reported),
    as if it kept; one that fails while it runs sends the message to the INBOX alone."""
    from vdeliver.sieve import interpreter
    from vdeliver.sieve.errors import SieveError

    compiled: "list[Compiled]" = []
    paths: list[tuple[str, bool]] = []
    for path, personal in sequence:
        try:
            compiled.append(_compile(opts, path, home))
            paths.append((path, personal))
        except _KeepInbox as why:
            report(log, path, rcpt, f"{why}; script skipped", personal)
        except SieveError as exc:
            report(log, path, rcpt, "; ".join(str(e) for e in exc.errors) + "; script skipped", personal)
    if not compiled:
        return Plan([inbox], [])
    message = _message(msg, any("body" in c.extensions for c in compiled), shared)
    own_script = next((p for p, personal in paths if personal), paths[-1][0])
    tracked: list[tuple[str, int, bool]] = []
    tracker: list[Tracker] = []  # opened when a duplicate test first runs

    def duplicate(key: str, seconds: int | None, last: bool) -> bool:
        from vdeliver.tracking import Tracker, TrackingError

        period = min(opts.duplicate_period if seconds is None else seconds, opts.duplicate_max_period)
        try:
            if not tracker:
                tracker.append(Tracker.from_config(cfg))
            tracked.append((key, period, last))
            return tracker[0].seen("duplicate", rcpt.address, key)
        except (TrackingError, ConfigError) as exc:
            report(log, own_script, rcpt, f"duplicate: cannot read the tracking store ({exc}); taken as not seen")
            return False


    def special_use(flag: str) -> str | None:
        """The folder with that special-use flag ([sieve] special_use), if it exists."""
        folder = next((f for k, f in opts.special_use.items() if k.lower() == flag.lower()), None)
        return folder if folder is not None and _folder(inbox, folders, folder, False) is not None else None

    envelope = interpreter.Envelope(msg.sender, rcpt.address)
    try:
        result = interpreter.run_sequence(compiled, message, envelope, max_actions=opts.max_actions,
                                          max_redirects=opts.max_redirects, max_cpu_time=opts.max_cpu_time,
                                          spam=opts.spam, special_use=special_use, duplicate=duplicate,
                                          vacation_periods=(opts.vacation_default_period, opts.vacation_min_period,
                                                            opts.vacation_max_period),
                                          mailbox_exists=lambda name: _folder(inbox, folders, name, False) is not None)
    except interpreter.SieveRuntimeError as exc:
        path, personal = paths[exc.script]
        raise _KeepInbox("; ".join(str(e) for e in exc.errors), path, personal) from None
    own = next((p for p, personal in paths if personal), paths[-1][0])  # where the user reads about it
    for i, a in enumerate(result.actions):  # fileinto :specialuse: the folder with that flag, if any
        target = special_use(a.specialuse) if a.type == "fileinto" and a.specialuse else None
        if target is not None:
            result.actions[i] = interpreter.Action("fileinto", target, copy=a.copy, flags=a.flags, line=a.line)
    planned: "list[tuple[str, Store | None, tuple[str, ...]]]" = []
    for folder in result.stores():
        create = any(a.type == "fileinto" and a.mailbox == folder and a.create for a in result.actions)
        flags = next((a.flags for a in result.actions
                      if (a.type == "keep" and folder == "INBOX") or (a.type == "fileinto" and a.mailbox == folder)),
                     result.implicit_flags)
        planned.append((folder, _folder(inbox, folders, folder, create), flags))
    stores: "list[Store]" = []
    for folder, store, flags in planned:
        # Checked once every folder is planned: "Lists/dev" made the directory Lists, so "Lists"
        # filed into in the same message can no longer be an mbox.
        if store is not None and store is not inbox and _holds_folders(inbox, folders, folder):
            store = None
        if store is None:
            problem = folder_problem(inbox.format, folder) or _holds_folders(inbox, folders, folder)
            what = f"invalid folder name ({problem})" if problem else "no such mailbox"
            report(log, own, rcpt, f"fileinto {folder!r}: {what}; kept in the INBOX")
            store = inbox
        if all(s.path != store.path for s in stores):
            stores.append(Store(store.format, store.path, store.create, store.folder, flags))
    created = sum(1 for s in stores if s.create and s.folder.upper() != "INBOX")
    if created > opts.max_create:
        raise _KeepInbox(f"the script creates {created} folders for one message, more than {opts.max_create}; "
                         "kept in the INBOX", own)
    subscribe = [_subscription(inbox.format, folders, s.folder) for s in stores
                 if s.create and s.folder.upper() != "INBOX"]
    header = result.header
    if header is not None:
        ours = b"delivered-to: " + rcpt.address.lower().encode("utf-8", "surrogateescape")
        if msg.spool.head(4096).lower().find(ours) >= 0 and ours not in header.lower():
            header = b"Delivered-To: " + rcpt.address.encode("utf-8", "surrogateescape") + b"\n" + header
    plan = Plan(stores, [a.address for a in result.actions if a.type == "redirect"], subscribe, header)
    if tracked and tracker:
        plan.track = (tracker[0], rcpt.address, tracked)
    plan.vacation = next((a for a in result.actions if a.type == "vacation"), None)
    plan.notify = [a for a in result.actions if a.type == "notify"]
    rejected = next((a for a in result.actions if a.type in ("reject", "ereject")), None)
    if rejected is not None:
        plan.reject = one_line(rejected.reason) or "rejected"
        plan.reject_mode = opts.reject_mode
    return plan


def one_line(text: str, limit: int = 400) -> str:
    """A reason as an SMTP reply or a DSN can carry it: printable ASCII on one line."""
    flat = " ".join(text.split())
    return "".join(c if " " <= c <= "~" else "?" for c in flat)[:limit]


def _subscription(fmt: str, folders: str, name: str) -> tuple[str, list[str]]:
    """Where Dovecot keeps the subscriptions of this layout, and the folder's levels as it
    writes them there (modified UTF-7): Maildir++ `<Maildir>/subscriptions`, mbox
    `<home>/mail/.subscriptions`."""
    if fmt == "maildir":
        return os.path.join(folders, "subscriptions"), [_mutf7(p) for p in name.split(".")]
    return os.path.join(folders, ".subscriptions"), [_mutf7(p) for p in name.split("/")]


def record(plan: "Plan", log: "Log | None") -> None:
    """After the message is stored: the IDs its duplicate tests looked at are recorded (RFC
    7352: only a message that was delivered counts as seen).  Never raises."""
    if plan.track is None:
        return
    from vdeliver.tracking import TrackingError

    tracker, mailbox, tracked = plan.track
    try:
        for key, seconds, last in tracked:
            tracker.claim("duplicate", mailbox, key, seconds, refresh=last)
    except TrackingError as exc:
        tell(log, f"sieve: to=<{mailbox}>: duplicate: not recorded ({exc})")
    finally:
        tracker.close()


def fcc_target(cfg: Config, rcpt: Recipient, home: str, inbox: "Store", folders: str,
               action: "Action") -> "Store | None":
    """Where `:fcc` (RFC 8580) stores the copy of what a vacation or notify sent: the folder it
    names (or the one with its :specialuse flag), created only with :create; None when there
    is none."""
    fcc = action.vacation.fcc if action.vacation is not None else None
    if fcc is None:
        return None
    opts = settings(cfg)
    if not folders:
        folders = inbox.path if inbox.format == "maildir" else os.path.join(home, "mail")
    name = fcc.mailbox
    if fcc.specialuse:
        special = next((f for k, f in opts.special_use.items() if k.lower() == fcc.specialuse.lower()), None)
        if special is not None and _folder(inbox, folders, special, False) is not None:
            name = special
    store = _folder(inbox, folders, name, fcc.create)
    if store is None:
        return None
    return Store(store.format, store.path, store.create, store.folder, ("\\Seen", *fcc.flags))


def subscribe(entries: list[tuple[str, list[str]]], log: "Log | None") -> None:
    """Add folders to Dovecot's subscriptions file, as Dovecot writes it (version 2: a `V\t2`
    line, an empty line, then one folder a line with its levels separated by tabs; a file in
    the old form, one name a line with the hierarchy separator, stays in that form), under
    its `subscriptions.lock` dotlock, replaced whole.  Never raises: a folder that could not
    be subscribed is still there, and the log says so."""
    from vdeliver.flags import DotLock

    for path, levels in entries:
        try:
            with DotLock(path + ".lock") as lock:
                try:
                    with open(path, "rb") as f:
                        old = f.read(1 << 20)
                except FileNotFoundError:
                    old = b""
                lines = old.decode("utf-8", "replace").split("\n")
                v2 = not old or lines[0] == "V\t2"
                sep = "\t" if v2 else ("." if os.path.basename(path) == "subscriptions" else "/")
                entry = sep.join(levels)
                names = [n for n in (lines[2:] if v2 and old else lines) if n]
                if entry in names:
                    continue
                names.append(entry)
                text = ("V\t2\n\n" if v2 else "") + "".join(n + "\n" for n in names)
                lock.replace(path, text.encode("utf-8"))
        except OSError as exc:
            tell(log, f"sieve: cannot subscribe {'/'.join(levels)!r} in {path}: {exc.strerror or exc}")


_OURS = (b"return-path:", b"delivered-to:")


def _message(msg: Prepared, whole: bool, shared: "dict[str, object] | None" = None) -> "Message":
    """What the scripts see of the message.  `shared` (an LMTP transaction's, one for all its
    recipients): the message as it came is parsed once, and each recipient's own lines (our
    Return-Path and Delivered-To, which lead the record) are parsed and put in front."""
    from vdeliver.sieve import interpreter

    data = b"".join(msg.spool.chunks()) if whole else msg.spool.head(1 << 20)
    if data.startswith(b"From "):
        data = data.partition(b"\n")[2]  # the mbox From_ line is not a header
    if shared is None:
        return interpreter.Message.from_bytes(data)
    cut = 0
    for _ in _OURS:  # our lines: at most one of each, first
        nl = data.find(b"\n", cut)
        if nl < 0 or not data[cut:cut + 13].lower().startswith(_OURS):
            break
        cut = nl + 1
    rest = data[cut:]
    base = shared.get("message")
    if not (isinstance(base, interpreter.Message) and shared.get("rest") == rest):
        base = interpreter.Message.from_bytes(rest)
        shared["message"], shared["rest"] = base, rest
    own = interpreter.Message.from_bytes(data[:cut] + b"\n").fields if cut else []
    return interpreter.Message(own + base.fields, len(data), data)


def _compile(opts: "Settings", path: str, home: str) -> "Compiled":
    """A script compiled, with the scripts it includes: personal ones from <home>/sieve (the
    user's, as managesieved keeps them), global ones from [sieve] global_dir.  From the cache
    (compiled.load_cached) when the script and all it includes are as they were."""
    from vdeliver.sieve import compiled as form

    source = _read(path, opts.max_script_size)

    def reread(key: tuple[str, str]) -> bytes | None:
        location, name = key
        folder = os.path.join(home, "sieve") if location == "personal" else opts.global_dir
        if not folder:
            return None
        try:
            return _read(os.path.join(folder, name + ".sieve"), opts.max_script_size, follow=False)
        except _KeepInbox:
            return None

    included: dict[tuple[str, str], bytes | None] = {}  # what was read, for the memo and the cache

    def read_now(key: tuple[str, str]) -> bytes | None:
        included[key] = text = reread(key)
        return text

    memo = _MEMO.get(path)  # a resident server (LMTP): the script as this process last compiled it
    if memo is not None and memo[0] == source and all(read_now(key) == text for key, text in memo[1].items()):
        return memo[2]
    included.clear()
    hit = form.load_cached(path, source, read_now)
    if hit is None:
        from vdeliver.sieve.validator import compile_script

        included.clear()
        hit = compile_script(source, resolve=lambda location, name: read_now((location, name)),
                             max_size=opts.max_script_size)
        form.store_cached(path, source, included, hit)
    _remember(path, source, dict(included), hit)
    return hit


# Scripts this process compiled, by path, with the bytes they were compiled from: the LMTP
# server reuses them while the files read the same (checked at every delivery, as the cache).
_MEMO: dict[str, tuple[bytes, dict[tuple[str, str], bytes | None], "Compiled"]] = {}
MEMO_SIZE = 1000


def _remember(path: str, source: bytes, included: dict[tuple[str, str], bytes | None], compiled: "Compiled") -> None:
    if len(_MEMO) >= MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)), None)  # the oldest goes
    _MEMO[path] = (source, included, compiled)


def _read(path: str, limit: int, follow: bool = True) -> bytes:
    try:
        # The active link is followed, as Dovecot does; an included script is not a link.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
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


# One file name on Linux file systems, in bytes: a folder's name on disk must fit in it.
NAME_MAX = 255
# What an mbox folder's file name must leave free for the names vdeliver makes from it: the
# dotlock's temporary `.NAME.lock.HOST.PID.RANDOM` (locking.py; a host name of up to 64 bytes,
# a 7-digit pid) is the longest, longer than the journal's `.NAME.vdeliver-journal.unresolved.lock`.
MBOX_ROOM = len("..lock...") + 64 + 7 + 8


def folder_problem(fmt: str, name: str) -> str:
    """Why `name` cannot be a folder of this format (mbox or maildir), "" if it can: names that
    could leave the mailbox tree, and names Dovecot 2.3 refuses to CREATE or SELECT (measured
    over IMAP, tests/test_sieve_delivery.py), which would hide the mail from the user."""
    if fmt == "maildir" and "/" in name:
        return "'/' in a Maildir++ name"  # Maildir++ separates levels with '.'; '/' would make a path
    parts = name.split("/") if fmt == "mbox" else name.split(".")
    if any(not p or p in (".", "..") or p.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in p)
           for p in parts) or "\x00" in name:
        return "an empty level, a level starting with '.', or a control character"
    if name.startswith("~"):
        return "Dovecot refuses names that begin with '~'"  # its home-directory shorthand
    if fmt == "mbox" and any(p.endswith(".lock") for p in parts):
        # Dovecot's mbox storage takes these for lock files: it never lists them, and beside a
        # folder "Foo", "Foo.lock" is that folder's dotlock, broken as stale, mail and all.
        return "Dovecot reserves mbox names ending in '.lock' for lock files"
    # Modified UTF-7 is ASCII: characters are bytes.  Dovecot counts a name's levels the same way.
    on_disk = [_mutf7(p) for p in parts] if fmt == "mbox" else ["." + ".".join(_mutf7(p) for p in parts)]
    if any(len(n) > NAME_MAX for n in on_disk):
        return f"its name on disk is longer than {NAME_MAX} bytes"
    if fmt == "mbox" and len(on_disk[-1]) > NAME_MAX - MBOX_ROOM:
        return f"its name on disk is longer than {NAME_MAX - MBOX_ROOM} bytes, which leaves no room for its lock file"
    return ""


def _folder(inbox: "Store", folders: str, name: str, create: bool) -> "Store | None":
    """Where a folder of that name lives for this user, or None if it does not exist and may
    not be created, or the name cannot be a folder (folder_problem())."""
    if name.upper() == "INBOX":
        return inbox
    if folder_problem(inbox.format, name):
        return None
    parts = name.split("/") if inbox.format == "mbox" else name.split(".")
    if inbox.format == "maildir":
        path = os.path.join(folders, "." + ".".join(_mutf7(p) for p in parts))
        exists = os.path.isdir(os.path.join(path, "new"))
    else:
        # Dovecot names mbox folders on disk in modified UTF-7 too: "Projects/Büro" is Projects/B&APw-ro.
        path = os.path.join(folders, *(_mutf7(p) for p in parts))
        exists = os.path.isfile(path)
    if not exists and (not create or (inbox.format == "mbox" and os.path.lexists(path))):
        return None  # an mbox path that is a directory (of folders: _holds_folders) is no mailbox
    if not exists and inbox.format == "mbox":
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # the folders of Lists/dev
        except OSError:
            return None
    return Store(inbox.format, path, create and not exists, name)


def _holds_folders(inbox: "Store", folders: str, name: str) -> str:
    """Why an mbox folder name cannot take mail when it names a directory (of subfolders:
    Dovecot lists it \\Noselect and never opens it), else ""."""
    if inbox.format != "mbox" or name.upper() == "INBOX":
        return ""
    path = os.path.join(folders, *(_mutf7(p) for p in name.split("/")))
    return "a directory of folders, which Dovecot cannot open as an mbox" if os.path.isdir(path) else ""


def _mutf7(text: str) -> str:
    """IMAP's modified UTF-7 (RFC 3501 5.1.3), as Dovecot names Maildir++ and mbox folders on disk."""
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


def report(log: "Log | None", script: str, rcpt: Recipient, text: str, personal: bool = True) -> None:
    """One syslog line, and for the user's own script the same line appended to <script>.log
    for the user to read (a global script's errors are the administrator's: syslog only)."""
    tell(log, f"sieve: to=<{rcpt.address}>: {script}: {text}")
    if not personal:
        return
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
