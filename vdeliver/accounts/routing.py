"""Where mail for a hosted address goes next, and the loops vmailctl must refuse.

The routing graph is the one sendmail's virtusertable draws: an alias domain points to
its domain, a forward or an alias to its targets, a catch-all to its target, and a
mailbox ends the walk.  Pure functions of a Snapshot: the store checks every change with
find_loop() before it commits, and `vmailctl check` reports targets that go nowhere.
"""

from __future__ import annotations

from vdeliver.accounts import names
from vdeliver.accounts.snapshot import Snapshot


def strip_detail(addr: str) -> str:
    local, dom = names.split(addr)
    return f"{local.split('+', 1)[0]}@{dom}"


def next_hops(snap: Snapshot, addr: str) -> list[str]:
    """Where mail for a hosted address goes next, as sendmail's virtusertable would send it."""
    domains = {d["name"]: d for d in snap.domains}
    addr = strip_detail(addr)
    local, dom = names.split(addr)
    d = domains.get(dom)
    if d is None:
        return []  # off-site: leaves this host
    if d["alias_of"]:
        return [f"{local}@{d['alias_of']}"]
    if addr in snap.forwards:
        return list(snap.forwards[addr])  # keep_copy adds a terminal local delivery
    if any(m["username"] == local and m["domain"] == dom for m in snap.mailboxes):
        return []
    if addr in snap.aliases:
        return list(snap.aliases[addr])
    if d["catchall"]:
        return [d["catchall"]]
    return []


def find_loop(snap: Snapshot) -> list[str]:
    """A cycle of addresses through aliases, forwards, catch-alls and alias domains, or []."""
    sources = list(snap.aliases) + list(snap.forwards)
    sources += [f"{d['name']}-catchall@{d['name']}" for d in snap.domains if d["catchall"]]
    sources += [d["catchall"] for d in snap.domains if d["catchall"]]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(addr: str, path: list[str]) -> list[str]:
        key = strip_detail(addr)
        if state.get(key) == 2:
            return []
        if state.get(key) == 1:
            return [*path[path.index(key):], key]
        state[key] = 1
        path.append(key)
        for nxt in next_hops(snap, key):
            found = visit(nxt, path)
            if found:
                return found
        path.pop()
        state[key] = 2
        return []

    for src in sources:
        found = visit(src, [])
        if found:
            return found
    return []
