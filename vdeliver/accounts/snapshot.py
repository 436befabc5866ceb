"""The one read path of the accounts database: rows into a `Snapshot`.

Everything built from the database reads it through here: `vmailctl maps build` and
`check` (the whole data set, `whole()`), the socketmap server (the rows one key can
depend on, `slice()`), and the store's own invariant check before a commit.  `q` is a
query function `q(sql, params) -> list of dict rows` with `?` placeholders, so the same
code serves SQLite and PostgreSQL, a store's transaction and a reader's connection.
Password hashes are never part of a snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Query = Callable[[str, tuple[Any, ...]], list[dict[str, Any]]]

DOMAIN_COLS = "name, alias_of, catchall, created_at"
MAILBOX_COLS = "username, domain, format, quota_bytes, status, reason, keep_copy, created_at"


@dataclass
class Snapshot:
    """Everything the maps and `check` need, read in one transaction."""

    serial: int
    changed_at: str
    domains: list[dict[str, Any]]
    mailboxes: list[dict[str, Any]]
    aliases: dict[str, list[str]] = field(default_factory=dict)   # address -> targets
    forwards: dict[str, list[str]] = field(default_factory=dict)  # address -> targets

    def hosted(self) -> set[str]:
        return {d["name"] for d in self.domains}


def whole(q: Query, serial: int = 0, changed_at: str = "") -> Snapshot:
    """Every domain, mailbox, alias and forward, in a stable order."""
    snap = Snapshot(serial=serial, changed_at=changed_at,
                    domains=q(f"SELECT {DOMAIN_COLS} FROM domains ORDER BY name", ()),
                    mailboxes=q(f"SELECT {MAILBOX_COLS} FROM mailboxes ORDER BY domain, username", ()))
    snap.aliases, snap.forwards = targets(q, "aliases"), targets(q, "forwards")
    return snap


# The rows a map line for `local@domain` can depend on, in ONE statement (one round trip, one
# snapshot, no transaction around it): the domain row and the row of the domain it is an alias
# of; the mailbox, aliases and forwards of `local` in the real domain (the alias's target).
# Every column is text so the branches line up in both engines; _slice_rows() types them back.
# Each branch is a primary-key lookup: (name), (username, domain[, target]).
_REAL = "(SELECT coalesce(alias_of, name) FROM domains WHERE name = ?)"
SLICE_SQL = (
    f"SELECT 0 AS k, name AS c1, alias_of AS c2, catchall AS c3, created_at AS c4, NULL AS c5, NULL AS c6,"
    f" NULL AS c7, NULL AS c8 FROM domains"
    f" WHERE name = ? OR name = (SELECT alias_of FROM domains WHERE name = ?)"
    f" UNION ALL SELECT 1, username, domain, format, CAST(quota_bytes AS TEXT), status, reason,"
    f" CAST(keep_copy AS TEXT), created_at FROM mailboxes WHERE username = ? AND domain = {_REAL}"
    f" UNION ALL SELECT 2, username, domain, target, NULL, NULL, NULL, NULL, NULL FROM aliases"
    f" WHERE username = ? AND domain = {_REAL}"
    f" UNION ALL SELECT 3, username, domain, target, NULL, NULL, NULL, NULL, NULL FROM forwards"
    f" WHERE username = ? AND domain = {_REAL}"
)


def slice_params(domain: str, local: str) -> tuple[str, ...]:
    return (domain, domain, local, domain, local, domain, local, domain)


def slice(q: Query, domain: str, local: str) -> Snapshot:  # shadows the builtin: the word for it
    """The rows a map line for `local@domain` can depend on: its domain (and the domain an
    alias domain points to), and only the mailbox, aliases and forwards of its local part -
    every line of a domain depends on its own user's rows and the domain row only."""
    if not domain:
        return empty()
    return slice_rows([tuple(r.values()) for r in q(SLICE_SQL, slice_params(domain, local))], domain)


def slice_rows(rows: list[tuple[Any, ...]], domain: str) -> Snapshot:
    """A Snapshot from the rows of SLICE_SQL (as tuples, in column order)."""
    domains: list[dict[str, Any]] = []
    snap = Snapshot(serial=0, changed_at="", domains=domains, mailboxes=[])
    aliases: list[tuple[str, str]] = []
    forwards: list[tuple[str, str]] = []
    for kind, a, b, c, d, e, f, g, h in rows:
        if kind == 0:
            row = {"name": a, "alias_of": b, "catchall": c, "created_at": d}
            if a == domain:
                domains.insert(0, row)  # the asked domain first, as it was read before its target
            else:
                domains.append(row)
        elif kind == 1:
            snap.mailboxes.append({"username": a, "domain": b, "format": c, "quota_bytes": int(d), "status": e,
                                   "reason": f, "keep_copy": int(g), "created_at": h})
        else:
            (aliases if kind == 2 else forwards).append((f"{a}@{b}", c))
    for pairs, out in ((aliases, snap.aliases), (forwards, snap.forwards)):
        for address, target in sorted(pairs):
            out.setdefault(address, []).append(target)
    return snap


def targets(q: Query, table: str, domain: str = "", local: str = "") -> dict[str, list[str]]:
    """address -> targets of the aliases or forwards table (of one address when given)."""
    assert table in ("aliases", "forwards")
    sql = f"SELECT username, domain, target FROM {table}"
    params: tuple[str, ...] = ()
    if domain:
        sql, params = sql + " WHERE domain = ? AND username = ?", (domain, local)
    out: dict[str, list[str]] = {}
    for r in q(sql + " ORDER BY domain, username, target", params):
        out.setdefault(f"{r['username']}@{r['domain']}", []).append(r["target"])
    return out


def empty() -> Snapshot:
    return Snapshot(serial=0, changed_at="", domains=[], mailboxes=[])
