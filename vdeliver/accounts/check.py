"""`vmailctl check`: compare the database, the maps and the mailboxes on disk.

Reports every mismatch it finds, one line each: a user without a mailbox, a
mailbox without a user, a mailbox of the wrong format or owner, a maildirsize
that disagrees with the quota, an mbox crash journal that needs a look (an
interrupted delivery not yet recovered, one set aside, one whose mbox is gone),
maps never built, older than the database, or edited by hand, and a compiled .db
older than its text.
"""

from __future__ import annotations

import os

from vdeliver.accounts import mailboxes, maps
from vdeliver.accounts.errors import BadRow
from vdeliver.accounts.settings import Settings
from vdeliver.accounts.snapshot import Snapshot
from vdeliver.config import Config


def _quota_line(path: str) -> str | None:
    try:
        with open(os.path.join(path, "maildirsize"), encoding="ascii", errors="replace") as f:
            return f.readline().strip()
    except FileNotFoundError:
        return None


def problems(cfg: Config, settings: Settings, snap: Snapshot) -> list[str]:
    found: list[str] = []
    try:
        who: mailboxes.Owner | None = mailboxes.owner(settings)
    except Exception as exc:  # noqa: BLE001 - reported, the other checks still run
        found.append(f"cannot resolve the vmail user: {exc}")
        who = None
    known = set()
    for m in snap.mailboxes:
        user, dom, fmt = m["username"], m["domain"], m["format"]
        known.add((fmt, user, dom))
        issues = mailboxes.inspect(cfg, fmt, user, dom, who)
        found += issues
        if fmt == "mbox":
            found += mailboxes.journal_problems(cfg, user, dom)
        if fmt == "maildir" and not issues:
            path = mailboxes.mailbox_path(cfg, fmt, user, dom)
            line = _quota_line(path)
            quota = int(m["quota_bytes"])
            if quota and line is None:
                found.append(f"{user}@{dom}: quota {quota} bytes but no {path}/maildirsize")
            elif line is not None and not quota:
                found.append(f"{user}@{dom}: {path}/maildirsize limits it but the database has no quota")
            elif line is not None and line.split(",")[0] != f"{quota}S":
                found.append(f"{user}@{dom}: maildirsize says {line!r}, the database {quota}S")
    for fmt, pairs in mailboxes.on_disk(cfg).items():
        for user, dom in sorted(pairs, key=lambda p: (p[1], p[0])):
            if (fmt, user, dom) not in known:
                path = mailboxes.mailbox_path(cfg, fmt, user, dom)
                found.append(f"{user}@{dom}: mailbox without a user ({path})")
    found += [f"{j}: crash journal without a mailbox (left when its mbox was removed by hand); safe to delete"
              for j in mailboxes.orphan_journals(cfg)]
    found += mailboxes.group_journal_problems(cfg)
    found += reserved_names(snap)
    found += dangling(snap)
    found += _maps(cfg, settings, snap)
    return found


def reserved_names(snap: Snapshot) -> list[str]:
    """Accounts stored before vmailctl refused names like `fred.lock` (another mailbox's
    dotlock) or `dovecot.index`: delivery to them defers; rename them."""
    from vdeliver.recipient import reserved

    found: list[str] = []
    for d in snap.domains:
        why = reserved(str(d["name"]))
        if why:
            found.append(f"domain {d['name']}: {why}; mail to it defers until it is renamed")
    addresses = [f"{m['username']}@{m['domain']}" for m in snap.mailboxes] + sorted(snap.aliases)
    for addr in addresses:
        local = addr.rpartition("@")[0]
        why = reserved(local)
        if why:
            found.append(f"{addr}: {why}; mail to it defers until it is renamed")
    return found


def dangling(snap: Snapshot) -> list[str]:
    """Aliases, forwards and catch-alls that point at an address of a hosted domain that does
    not exist: mail sent there bounces as unknown."""
    from vdeliver.accounts import names
    from vdeliver.accounts.routing import next_hops

    domains = {d["name"]: d for d in snap.domains}
    boxes = {(m["username"], m["domain"]) for m in snap.mailboxes}
    sources = [(a, t) for a, ts in snap.aliases.items() for t in ts]
    sources += [(a, t) for a, ts in snap.forwards.items() for t in ts]
    sources += [(f"@{d['name']}", d["catchall"]) for d in snap.domains if d["catchall"]]
    found = []
    for source, target in sources:
        addr = target
        for _ in range(len(domains) + 1):  # follow alias domains to the real one
            local, dom = names.split(addr)
            d = domains.get(dom)
            if d is None or not d["alias_of"]:
                break
            addr = f"{local}@{d['alias_of']}"
        local, dom = names.split(addr)
        local = local.split("+", 1)[0]
        d = domains.get(dom)
        if d is None or (local, dom) in boxes or f"{local}@{dom}" in snap.aliases or d["catchall"]:
            continue
        if not next_hops(snap, f"{local}@{dom}"):
            found.append(f"{source} -> {target}: no such address (mail to it is refused as unknown)")
    return found


def _maps(cfg: Config, settings: Settings, snap: Snapshot) -> list[str]:
    directory = settings.maps_directory
    if not os.path.isdir(directory):
        return [f"maps directory {directory} does not exist"]
    built = maps.built_serial(directory)
    if built is None:
        return [f"maps in {directory} were never built: run `vmailctl maps build`"]
    found: list[str] = []
    if built < snap.serial:
        found.append(f"maps are older than the database (built from change {built}, database at {snap.serial}): "
                     "run `vmailctl maps build`")
    try:
        texts = maps.render(snap, settings, cfg.host())
    except BadRow as exc:
        return [*found, str(exc)]
    makemap = settings.makemap if settings.makemap and os.access(settings.makemap, os.X_OK) else ""
    for name in maps.TEXT_MAPS:
        path = os.path.join(directory, name)
        current = maps._read(path)
        if current is None:
            found.append(f"{path} is missing")
            continue
        if built >= snap.serial and current != texts[name]:
            found.append(f"{path} differs from what the database gives (edited by hand?)")
        if makemap and name in maps.HASH_MAPS:
            db = path + ".db"
            if not os.path.exists(db):
                found.append(f"{db} is missing")
            elif os.path.getmtime(db) < os.path.getmtime(path):
                found.append(f"{db} is older than {name}")
    return found
