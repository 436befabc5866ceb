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


def slice(q: Query, domain: str, local: str) -> Snapshot:  # shadows the builtin: the word for it
    """The rows a map line for `local@domain` can depend on: its domain (and the domain an
    alias domain points to), and only the mailbox, aliases and forwards of its local part -
    every line of a domain depends on its own user's rows and the domain row only."""
    domains = q(f"SELECT {DOMAIN_COLS} FROM domains WHERE name = ?", (domain,)) if domain else []
    if domains and domains[0]["alias_of"]:
        domains += q(f"SELECT {DOMAIN_COLS} FROM domains WHERE name = ?", (domains[0]["alias_of"],))
    snap = Snapshot(serial=0, changed_at="", domains=domains, mailboxes=[])
    for d in domains:
        if d["alias_of"] or not local:
            continue  # `@d`, `To:d`: the domain row decides
        snap.mailboxes += q(f"SELECT {MAILBOX_COLS} FROM mailboxes WHERE domain = ? AND username = ?",
                            (d["name"], local))
        snap.aliases.update(targets(q, "aliases", d["name"], local))
        snap.forwards.update(targets(q, "forwards", d["name"], local))
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
