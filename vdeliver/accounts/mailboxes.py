"""Mailboxes on disk: create them for `user add`, move them aside for `user remove`.

Paths come from the vdeliver configuration templates (mbox_path, maildir_path),
expanded exactly as delivery expands them, so vmailctl creates what vdeliver will
look for.  Everything created belongs to the configured vmail user, directories
0700 and files 0600: delivery runs as vmail and refuses mailboxes it does not own.
Mail is never unlinked by default: a removed mailbox is renamed to
`.removed-<user>-<UTC time>` in its domain directory, a name no user can have.
An mbox has a crash journal beside it (`.<mbox>.vdeliver-journal`, made by its first
delivery and kept, see vdeliver/recovery.py; perhaps also `.unresolved`/`.untrusted`
copies set aside for the administrator): it goes wherever its mbox goes, so that a
journal left by a killed delivery still names its mailbox, and none is left behind.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

from vdeliver.accounts.errors import AccountsError, ConfigurationError, TemporaryError
from vdeliver.accounts.settings import Settings
from vdeliver.config import Config
from vdeliver.deliver import domain_dir, expand
from vdeliver.recipient import Recipient

REMOVED_PREFIX = ".removed-"


@dataclass
class Owner:
    uid: int
    gid: int


def owner(settings: Settings) -> Owner:
    """The vmail user and group; when not root, only ourselves can own what we create."""
    from vdeliver.privileges import DaemonError, RunUser

    try:
        run_user = RunUser(settings.vmail_user, settings.vmail_group)
    except DaemonError as exc:
        raise ConfigurationError(f"[accounts] vmail_user/vmail_group: {exc.strerror}") from None
    uid = run_user.uid if settings.vmail_user else os.geteuid()
    gid = run_user.gid if settings.vmail_user else os.getegid()
    if os.geteuid() != 0 and uid != os.geteuid():
        raise AccountsError(f"creating mailboxes owned by {settings.vmail_user} needs root")
    return Owner(uid, gid)


def mailbox_path(cfg: Config, fmt: str, user: str, domain: str) -> str:
    return expand(cfg.maildir_path if fmt == "maildir" else cfg.mbox_path, Recipient(domain, user))


def user_root(cfg: Config, fmt: str, user: str, domain: str) -> str:
    """The first path component that names the user: what `user remove` moves aside."""
    template = cfg.maildir_path if fmt == "maildir" else cfg.mbox_path
    parts = template.split("/")
    for i, part in enumerate(parts):
        if "{user}" in part:
            return expand("/".join(parts[: i + 1]), Recipient(domain, user))
    return mailbox_path(cfg, fmt, user, domain)


def _mkdir(path: str, who: Owner) -> None:
    """mkdir, then chown/chmod through a descriptor opened O_NOFOLLOW: the parent may belong
    to vmail, who could swap the new directory for a symlink before a path-based chown."""
    os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchown(fd, who.uid, who.gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _makedirs(path: str, who: Owner) -> None:
    """Create path and its missing parents, each owned by vmail, 0700."""
    missing: list[str] = []
    p = path
    while not os.path.isdir(p):
        if os.path.lexists(p):
            raise AccountsError(f"{p} exists and is not a directory")
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        _mkdir(d, who)


def create(cfg: Config, settings: Settings, fmt: str, user: str, domain: str, quota: int = 0) -> str:
    """Create an empty Maildir or mbox; returns its path.  An existing one is kept (and checked)."""
    who = owner(settings)
    path = mailbox_path(cfg, fmt, user, domain)
    rcpt = Recipient(domain, user)
    try:
        for template in (cfg.mbox_path, cfg.maildir_path):
            _makedirs(domain_dir(template, rcpt), who)
        if fmt == "maildir":
            _makedirs(path, who)
            for sub in ("tmp", "new", "cur"):
                if not os.path.isdir(os.path.join(path, sub)):
                    _mkdir(os.path.join(path, sub), who)
            set_quota(cfg, settings, fmt, user, domain, quota)
        else:
            _makedirs(os.path.dirname(path), who)
            if os.path.lexists(path):
                if os.path.islink(path) or not os.path.isfile(path):
                    raise AccountsError(f"{path} exists and is not a regular file")
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    os.fchown(fd, who.uid, who.gid)
                    os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
    except OSError as exc:
        raise TemporaryError(f"cannot create mailbox {path}: {exc.strerror}") from None
    return path


def set_quota(cfg: Config, settings: Settings, fmt: str, user: str, domain: str, quota: int) -> str | None:
    """Write (or remove, for 0) the Maildir++ maildirsize that vdeliver.maildir enforces."""
    if fmt != "maildir":
        return None
    path = mailbox_path(cfg, fmt, user, domain)
    size_file = os.path.join(path, "maildirsize")
    from vdeliver.maildir import recalculate
    from vdeliver.unixd import as_user

    who = owner(settings)
    # With vmail's ids, not root's: vmail owns every directory on this path and could swap one.
    with as_user(who.uid, who.gid):
        if not os.path.isdir(os.path.join(path, "tmp")):
            return None
        if quota <= 0:
            try:
                os.unlink(size_file)
            except FileNotFoundError:
                pass
            return None
        recalculate(path, f"{quota}S")  # counts the mail already there; a tmp file renamed into place
    return size_file


def move_aside(cfg: Config, fmt: str, user: str, domain: str, unlink: bool = False) -> str | None:
    """Rename the user's mail out of delivery's way (or delete it when unlink); returns the new name.
    An mbox's crash journal goes with it (under the new name's journal name, so that recovery
    still finds it), or is deleted with it."""
    root = user_root(cfg, fmt, user, domain)
    if not os.path.lexists(root):
        return None
    outside = _journals_outside(cfg, fmt, user, domain, root)
    if unlink:
        if os.path.isdir(root) and not os.path.islink(root):
            shutil.rmtree(root)
        else:
            os.unlink(root)
        for path, _suffix in outside:
            os.unlink(path)
        return ""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    new = os.path.join(os.path.dirname(root), f"{REMOVED_PREFIX}{user}-{stamp}")
    n = 1
    while os.path.lexists(new):
        n += 1
        new = os.path.join(os.path.dirname(root), f"{REMOVED_PREFIX}{user}-{stamp}-{n}")
    os.rename(root, new)
    if outside:
        from vdeliver.recovery import journal_path

        moved_mbox = new + mailbox_path(cfg, fmt, user, domain)[len(root):]
        for path, suffix in outside:
            os.rename(path, journal_path(moved_mbox, suffix))
    return new


def _journals_outside(cfg: Config, fmt: str, user: str, domain: str, root: str) -> list[tuple[str, str]]:
    """The mbox's journal files that do not live under `root` (the usual layout: the mbox is
    a file in its domain directory, its journal a hidden file beside it): (path, suffix)."""
    if fmt != "mbox":
        return []
    from vdeliver.recovery import companions, journal_path

    path = mailbox_path(cfg, fmt, user, domain)
    prefix = journal_path(path, "")  # <dir>/.<mbox>
    return [(c, c[len(prefix):]) for c in companions(path)
            if not c.startswith(root.rstrip("/") + "/") and os.path.lexists(c)]


def journal_problems(cfg: Config, user: str, domain: str) -> list[str]:
    """What the crash journal of a user's mbox says that needs the administrator: an
    interrupted delivery nobody recovered yet, or a journal set aside."""
    from vdeliver import recovery

    path = mailbox_path(cfg, "mbox", user, domain)
    jpath = recovery.journal_path(path)
    found: list[str] = []
    state = recovery.state(path)
    if state == "busy":
        found.append(f"{user}@{domain}: {jpath} records a delivery in progress or interrupted;"
                     f" the next delivery recovers it, or `vdeliver --repair {path}`")
    elif state == "not a regular file":
        found.append(f"{user}@{domain}: {jpath} is not a regular file; the next delivery moves it aside")
    for kind, what in ((recovery.UNRESOLVED, "an interrupted record lies under another program's mail"),
                       (recovery.UNTRUSTED_SUFFIX, "a journal vdeliver did not write was set aside")):
        asides = (recovery.aside_path(path, kind), recovery.journal_path(path, recovery.OLD_SUFFIX + kind))
        found.extend(f"{user}@{domain}: {aside}: {what}; look at the mailbox, then remove it"
                     for aside in asides if os.path.lexists(aside))
    return found


def group_journal_problems(cfg: Config) -> list[str]:
    """What vdeliver-lmtpd's group journal ([lmtp] group_commit) says that needs the
    administrator: a slot recording a delivery in progress or interrupted (a server killed
    mid-append; the next delivery into that mbox, the server's next start or `vdeliver --repair`
    recovers it), a torn slot, or a file that is not one.  Read-only, never followed."""
    import stat

    from vdeliver import recovery
    from vdeliver.config import group_journal

    jpath = group_journal(cfg)
    if not jpath:
        return []
    try:
        fd = os.open(jpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [(f"{jpath}: group journal cannot be read ({exc.strerror}); the LMTP server and every mbox"
                " delivery read it")]
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return [f"{jpath}: group journal is not a regular file; the LMTP server refuses it"]
        data = os.pread(fd, recovery.GROUP_SIZE, 0)
    finally:
        os.close(fd)
    found: list[str] = []
    for slot in range(len(data) // recovery.GROUP_SLOT):
        block = data[slot * recovery.GROUP_SLOT:(slot + 1) * recovery.GROUP_SLOT]
        if not block.startswith(recovery.GROUP_BUSY):
            continue
        parsed = recovery.parse_slot(block)
        if parsed is None:
            found.append(f"{jpath}: slot {slot} is torn (a power loss while it was written); the LMTP"
                         " server's next start resets it")
            continue
        rec, path = parsed
        found.append(f"{jpath}: slot {slot} records a delivery into {path} (pid {rec.pid}) in progress or"
                     f" interrupted; the next delivery into it recovers it, or `vdeliver --repair {path}`")
    return found


def inspect(cfg: Config, fmt: str, user: str, domain: str, who: Owner | None) -> list[str]:
    """Problems with one user's mailbox on disk ([] when it is as delivery expects)."""
    path = mailbox_path(cfg, fmt, user, domain)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        other = mailbox_path(cfg, "mbox" if fmt == "maildir" else "maildir", user, domain)
        if os.path.lexists(other):
            return [f"{user}@{domain}: mailbox is {other}, but the database says {fmt}"]
        return [f"{user}@{domain}: user without a mailbox ({path} is missing)"]
    import stat

    problems: list[str] = []
    if fmt == "maildir":
        if not stat.S_ISDIR(st.st_mode):
            return [f"{user}@{domain}: {path} is not a Maildir directory"]
        problems.extend(f"{user}@{domain}: {path}/{sub} is missing"
                        for sub in ("tmp", "new", "cur") if not os.path.isdir(os.path.join(path, sub)))
    elif not stat.S_ISREG(st.st_mode):
        return [f"{user}@{domain}: {path} is not a regular file (mbox)"]
    if who is not None and st.st_uid != who.uid:
        problems.append(f"{user}@{domain}: {path} is owned by uid {st.st_uid}, not the vmail user ({who.uid})")
    return problems


def tree_root(template: str) -> str | None:
    """`/var/spool/vbox/{domain}/{user}` -> `/var/spool/vbox`: where domain directories live."""
    parts = template.split("/")
    if "{domain}" not in parts:
        return None
    i = parts.index("{domain}")
    if i + 1 >= len(parts) or "{user}" not in parts[i + 1]:
        return None
    return "/".join(parts[:i]) or "/"


def on_disk(cfg: Config) -> dict[str, set[tuple[str, str]]]:
    """Names found under each template's root: {"mbox": {(user, domain)}, "maildir": {...}}.
    Hidden names (crash journals, removed mailboxes, lock temporaries) are never mailboxes."""
    found: dict[str, set[tuple[str, str]]] = {"mbox": set(), "maildir": set()}
    for fmt, template in (("mbox", cfg.mbox_path), ("maildir", cfg.maildir_path)):
        root = tree_root(template)
        if root is None or not os.path.isdir(root):
            continue
        for dom in os.listdir(root):
            ddir = os.path.join(root, dom)
            if dom.startswith(".") or not os.path.isdir(ddir):
                continue
            for name in os.listdir(ddir):
                if name.startswith(".") or name.endswith(".lock"):
                    continue
                if os.path.lexists(mailbox_path(cfg, fmt, name, dom)):
                    found[fmt].add((name, dom))
    return found


def orphan_journals(cfg: Config) -> list[str]:
    """Crash journals in the mbox tree whose mbox is gone (removed by hand): safe to delete."""
    from vdeliver.recovery import OLD_SUFFIX, SUFFIX

    root = tree_root(cfg.mbox_path)
    if root is None or not os.path.isdir(root):
        return []
    orphans: list[str] = []
    for dom in sorted(os.listdir(root)):
        ddir = os.path.join(root, dom)
        if dom.startswith(".") or not os.path.isdir(ddir):
            continue
        for name in sorted(os.listdir(ddir)):
            suffix = SUFFIX if name.endswith(SUFFIX) else OLD_SUFFIX
            mbox = os.path.join(ddir, name[1: -len(suffix)])
            if name.startswith(".") and name.endswith(suffix) and not os.path.lexists(mbox):
                orphans.append(os.path.join(ddir, name))
    return orphans
