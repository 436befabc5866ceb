"""The account store: one behaviour over SQLite (stdlib) and PostgreSQL (psycopg 3).

`Store` holds every operation and its checks, written against a DB-API cursor
with `?` placeholders; the two engines (engines.py) only connect, translate
placeholders and classify their driver's errors.  It reads through snapshot.py
and checks routing with routing.py.  Kept as one class of ~450 lines on purpose:
every operation must run inside the same transaction and see the same checks.  Each vmailctl command runs in one
transaction (`with store.transaction():`): a refused or failed command leaves the
database exactly as it was.  Invariants that SQL cannot state portably (an alias
name must not shadow a mailbox, no alias or forward loops) are checked on the
whole data set inside the transaction, just before it commits.

Every change bumps `meta.serial` and `meta.changed_at`; `maps build` records the
serial it built from, which is how `check` sees maps older than the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from vdeliver.accounts import names, snapshot
from vdeliver.accounts.errors import (
    AccountsError,
    Conflict,
    InvalidName,
    NotFound,
    TemporaryError,
)
from vdeliver.accounts.routing import find_loop, strip_detail
from vdeliver.accounts.schema import CREATE_MIGRATIONS_TABLE, LATEST, MIGRATIONS
from vdeliver.accounts.settings import Settings
from vdeliver.accounts.snapshot import Snapshot

STATUSES = ("active", "disabled", "suspended")
FORMATS = ("maildir", "mbox")
MAX_QUOTA = (1 << 62)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Store:
    """The operations; subclasses provide the connection."""

    backend = ""
    write_begin = "BEGIN"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: Any = None
        self._depth = 0

    # -- engine hooks ----------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement

    def _classify(self, exc: BaseException) -> AccountsError | None:
        """Turn an engine error into ours (None: a bug, let it propagate)."""
        return None

    def _has_table(self, name: str) -> bool:
        raise NotImplementedError

    def _lock_for_migration(self) -> None:
        pass

    # -- connection and transactions ---------------------------------------------
    def open(self) -> Store:
        try:
            self.conn = self._connect()
            self.migrate()
        except AccountsError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            mapped = self._classify(exc)
            if mapped is None:
                raise
            raise mapped from None
        return self

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection must not mask the real error
                pass
            self.conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> Any:
        cur = self.conn.cursor()
        if params:
            cur.execute(self._sql(statement), params)
        else:
            cur.execute(statement)
        return cur

    def rows(self, statement: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self.execute(statement, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def one(self, statement: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        found = self.rows(statement, params)
        return found[0] if found else None

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[None]:
        """One transaction; nested uses join the outer one.  Engine errors become ours."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        try:
            self.execute(self.write_begin if write else "BEGIN")
        except Exception as exc:
            mapped = self._classify(exc)
            if mapped is None:
                raise
            raise mapped from None
        self._depth = 1
        try:
            yield
            if write:
                self._check_invariants()
            self.execute("COMMIT")
        except BaseException as exc:
            try:
                self.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the connection may be gone; the original error matters
                pass
            if isinstance(exc, Exception) and not isinstance(exc, AccountsError):
                mapped = self._classify(exc)
                if mapped is not None:
                    raise mapped from None
            raise
        finally:
            self._depth = 0

    # -- schema -----------------------------------------------------------------------
    def schema_version(self) -> int:
        if not self._has_table("schema_migrations"):
            return 0
        row = self.one("SELECT MAX(version) AS v FROM schema_migrations")
        return int(row["v"] or 0) if row else 0

    def migrate(self) -> list[int]:
        """Apply the missing migrations, each in its own transaction; returns their numbers."""
        applied: list[int] = []
        current = self.schema_version()
        if current > LATEST:
            raise TemporaryError(f"the database has schema version {current}, newer than this vmailctl ({LATEST})")
        if current == LATEST:
            return applied  # the common case: no write transaction at all
        for version, title, statements in MIGRATIONS:
            self.execute(self.write_begin)
            try:
                self._lock_for_migration()
                if not self._has_table("schema_migrations"):
                    self.execute(CREATE_MIGRATIONS_TABLE)
                row = self.one("SELECT version FROM schema_migrations WHERE version = ?", (version,))
                if row is None:
                    for statement in statements:
                        self.execute(statement)
                    self.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                        (version, title, now()),
                    )
                    applied.append(version)
                self.execute("COMMIT")
            except BaseException:
                try:
                    self.execute("ROLLBACK")
                except Exception:  # noqa: BLE001
                    pass
                raise
        return applied

    def _touch(self) -> None:
        self.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS VARCHAR(200)) WHERE key = 'serial'")
        self.execute("UPDATE meta SET value = ? WHERE key = 'changed_at'", (now(),))

    def meta(self) -> tuple[int, str]:
        values = {r["key"]: r["value"] for r in self.rows("SELECT key, value FROM meta")}
        return int(values.get("serial", "0")), values.get("changed_at", "")

    # -- domains ----------------------------------------------------------------------
    def domain(self, name: str) -> dict[str, Any]:
        row = self.one("SELECT name, alias_of, catchall, created_at FROM domains WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"domain {name} does not exist")
        return row

    def domain_add(self, name: str, alias_of: str | None = None) -> None:
        if self.one("SELECT name FROM domains WHERE name = ?", (name,)):
            raise Conflict(f"domain {name} already exists")
        if alias_of is not None:
            target = self.domain(alias_of)
            if target["alias_of"]:
                raise Conflict(f"{alias_of} is itself an alias of {target['alias_of']}: point {name} there")
            if alias_of == name:
                raise Conflict(f"domain {name} cannot be an alias of itself")
        self.execute("INSERT INTO domains (name, alias_of, created_at) VALUES (?, ?, ?)", (name, alias_of, now()))
        self._touch()

    def domain_remove(self, name: str, force: bool = False) -> list[dict[str, Any]]:
        """Remove a domain; with force also its mailboxes and aliases (mail stays on disk)."""
        self.domain(name)
        mailboxes = self.rows("SELECT username, domain, format FROM mailboxes WHERE domain = ?", (name,))
        n_alias = len(self.rows("SELECT DISTINCT username FROM aliases WHERE domain = ?", (name,)))
        dependants = [r["name"] for r in self.rows("SELECT name FROM domains WHERE alias_of = ?", (name,))]
        if dependants:
            raise Conflict(f"domain {name} has alias domains: {', '.join(sorted(dependants))}; remove them first")
        if (mailboxes or n_alias) and not force:
            raise Conflict(f"domain {name} still has {len(mailboxes)} mailbox(es) and {n_alias} alias(es); "
                           "remove them or use --force")
        self.execute("DELETE FROM forwards WHERE domain = ?", (name,))
        self.execute("DELETE FROM mailboxes WHERE domain = ?", (name,))
        self.execute("DELETE FROM aliases WHERE domain = ?", (name,))
        self.execute("DELETE FROM domains WHERE name = ?", (name,))
        self._touch()
        return mailboxes

    def domain_list(self) -> list[dict[str, Any]]:
        domains = self.rows("SELECT name, alias_of, catchall, created_at FROM domains ORDER BY name")
        counts = {r["domain"]: r["n"] for r in self.rows("SELECT domain, COUNT(*) AS n FROM mailboxes GROUP BY domain")}
        acounts = {r["domain"]: r["n"] for r in
                   self.rows("SELECT domain, COUNT(DISTINCT username) AS n FROM aliases GROUP BY domain")}
        for d in domains:
            d["mailboxes"] = int(counts.get(d["name"], 0))
            d["aliases"] = int(acounts.get(d["name"], 0))
        return domains

    def domain_show(self, name: str) -> dict[str, Any]:
        d = self.domain(name)
        d["mailboxes"] = [r["username"] for r in
                          self.rows("SELECT username FROM mailboxes WHERE domain = ? ORDER BY username", (name,))]
        found = self.rows("SELECT DISTINCT username FROM aliases WHERE domain = ?", (name,))
        d["aliases"] = sorted(r["username"] for r in found)
        d["alias_domains"] = [r["name"] for r in
                              self.rows("SELECT name FROM domains WHERE alias_of = ? ORDER BY name", (name,))]
        return d

    def catchall_set(self, name: str, target: str) -> None:
        d = self.domain(name)
        if d["alias_of"]:
            raise Conflict(f"{name} is an alias domain of {d['alias_of']}; set the catch-all there")
        self.execute("UPDATE domains SET catchall = ? WHERE name = ?", (self._target(target), name))
        self._touch()

    def catchall_clear(self, name: str) -> None:
        d = self.domain(name)
        if d["catchall"] is None:
            raise NotFound(f"domain {name} has no catch-all")
        self.execute("UPDATE domains SET catchall = NULL WHERE name = ?", (name,))
        self._touch()

    # -- mailboxes ---------------------------------------------------------------------
    _USER_COLS = "username, domain, password, format, quota_bytes, status, reason, keep_copy, created_at"

    def _real_domain(self, domain: str) -> None:
        d = self.domain(domain)
        if d["alias_of"]:
            raise Conflict(f"{domain} is an alias domain of {d['alias_of']}: add addresses there")

    def user(self, username: str, domain: str) -> dict[str, Any]:
        row = self.one(f"SELECT {self._USER_COLS} FROM mailboxes WHERE username = ? AND domain = ?", (username, domain))
        if row is None:
            raise NotFound(f"mailbox {username}@{domain} does not exist")
        row["forwards"] = self._targets("forwards", username, domain)
        return row

    def user_add(self, username: str, domain: str, password: str, fmt: str, quota: int = 0) -> None:
        if fmt not in FORMATS:
            raise InvalidName(f"mailbox format must be one of {', '.join(FORMATS)}")
        self._check_quota(quota)
        self._real_domain(domain)
        if self.one("SELECT username FROM mailboxes WHERE username = ? AND domain = ?", (username, domain)):
            raise Conflict(f"mailbox {username}@{domain} already exists")
        if self.one("SELECT username FROM aliases WHERE username = ? AND domain = ?", (username, domain)):
            raise Conflict(f"{username}@{domain} is an alias; remove the alias first")
        self.execute(
            "INSERT INTO mailboxes (username, domain, password, format, quota_bytes, status, reason, keep_copy,"
            " created_at) VALUES (?, ?, ?, ?, ?, 'active', '', 0, ?)",
            (username, domain, password, fmt, quota, now()),
        )
        self._touch()

    def user_remove(self, username: str, domain: str) -> dict[str, Any]:
        row = self.user(username, domain)
        self.execute("DELETE FROM forwards WHERE username = ? AND domain = ?", (username, domain))
        self.execute("DELETE FROM mailboxes WHERE username = ? AND domain = ?", (username, domain))
        self._touch()
        return row

    def user_list(self, domain: str | None = None) -> list[dict[str, Any]]:
        cols = "username, domain, format, quota_bytes, status, reason, keep_copy, created_at"
        if domain is not None:
            self.domain(domain)
            found = self.rows(f"SELECT {cols} FROM mailboxes WHERE domain = ? ORDER BY domain, username", (domain,))
        else:
            found = self.rows(f"SELECT {cols} FROM mailboxes ORDER BY domain, username")
        fwd = self._all_targets("forwards")
        for r in found:
            r["forwards"] = fwd.get(f"{r['username']}@{r['domain']}", [])
        return found

    def user_set_password(self, username: str, domain: str, password: str) -> None:
        self.user(username, domain)
        self.execute("UPDATE mailboxes SET password = ? WHERE username = ? AND domain = ?",
                     (password, username, domain))
        self._touch()

    def user_set_status(self, username: str, domain: str, status: str, reason: str = "") -> None:
        if status not in STATUSES:
            raise InvalidName(f"status must be one of {', '.join(STATUSES)}")
        if len(reason) > 500 or any(ch < " " for ch in reason):
            raise InvalidName("reason must be one line of at most 500 characters")
        self.user(username, domain)
        self.execute("UPDATE mailboxes SET status = ?, reason = ? WHERE username = ? AND domain = ?",
                     (status, reason, username, domain))
        self._touch()

    def user_set_quota(self, username: str, domain: str, quota: int) -> None:
        self._check_quota(quota)
        self.user(username, domain)
        self.execute("UPDATE mailboxes SET quota_bytes = ? WHERE username = ? AND domain = ?",
                     (quota, username, domain))
        self._touch()

    @staticmethod
    def _check_quota(quota: int) -> None:
        if quota < 0 or quota > MAX_QUOTA:
            raise InvalidName(f"quota must be between 0 and {MAX_QUOTA} bytes")

    # -- aliases and forwards ------------------------------------------------------------
    def _target(self, raw: str) -> str:
        """Validate a target; in a hosted domain it names a local address, so lower-case it."""
        t = names.target(raw)
        local, dom = names.split(t)
        if self.one("SELECT name FROM domains WHERE name = ?", (dom,)):
            base = local.lower().split("+", 1)[0]
            names.user(base)
            t = f"{local.lower()}@{dom}"
        return t

    def _targets(self, table: str, username: str, domain: str) -> list[str]:
        return [r["target"] for r in self.rows(
            f"SELECT target FROM {table} WHERE username = ? AND domain = ? ORDER BY target", (username, domain))]

    def _all_targets(self, table: str) -> dict[str, list[str]]:
        return snapshot.targets(self.rows, table)

    def alias_add(self, username: str, domain: str, targets: list[str]) -> None:
        self._real_domain(domain)
        if not targets:
            raise InvalidName("an alias needs at least one target")
        if self.one("SELECT username FROM mailboxes WHERE username = ? AND domain = ?", (username, domain)):
            raise Conflict(f"{username}@{domain} is a mailbox; use `forward set` to redirect its mail")
        existing = set(self._targets("aliases", username, domain))
        for raw in targets:
            t = self._target(raw)
            if t == f"{username}@{domain}":
                raise Conflict(f"alias {t} cannot point at itself")
            if t in existing:
                raise Conflict(f"alias {username}@{domain} already points at {t}")
            existing.add(t)
            self.execute("INSERT INTO aliases (username, domain, target) VALUES (?, ?, ?)", (username, domain, t))
        self._touch()

    def alias_remove(self, username: str, domain: str, targets: list[str] | None = None) -> None:
        self.domain(domain)
        existing = self._targets("aliases", username, domain)
        if not existing:
            raise NotFound(f"alias {username}@{domain} does not exist")
        if targets:
            for raw in targets:
                t = self._target(raw)
                if t not in existing:
                    raise NotFound(f"alias {username}@{domain} does not point at {t}")
                self.execute("DELETE FROM aliases WHERE username = ? AND domain = ? AND target = ?",
                             (username, domain, t))
        else:
            self.execute("DELETE FROM aliases WHERE username = ? AND domain = ?", (username, domain))
        self._touch()

    def alias_list(self, domain: str | None = None) -> list[dict[str, Any]]:
        if domain is not None:
            self.domain(domain)
        found: list[dict[str, Any]] = []
        for addr, targets in self._all_targets("aliases").items():
            user, dom = names.split(addr)
            if domain is None or dom == domain:
                found.append({"address": addr, "username": user, "domain": dom, "targets": targets})
        return found

    def forward_set(self, username: str, domain: str, targets: list[str], keep_copy: bool = False) -> None:
        self.user(username, domain)
        if not targets:
            raise InvalidName("a forward needs at least one target")
        clean: list[str] = []
        for raw in targets:
            t = self._target(raw)
            if strip_detail(t) == f"{username}@{domain}":
                raise Conflict(f"{username}@{domain} cannot forward to itself (use --keep-copy to keep a copy)")
            if t not in clean:
                clean.append(t)
        self.execute("DELETE FROM forwards WHERE username = ? AND domain = ?", (username, domain))
        for t in clean:
            self.execute("INSERT INTO forwards (username, domain, target) VALUES (?, ?, ?)", (username, domain, t))
        self.execute("UPDATE mailboxes SET keep_copy = ? WHERE username = ? AND domain = ?",
                     (1 if keep_copy else 0, username, domain))
        self._touch()

    def forward_clear(self, username: str, domain: str) -> None:
        row = self.user(username, domain)
        if not row["forwards"]:
            raise NotFound(f"mailbox {username}@{domain} has no forward")
        self.execute("DELETE FROM forwards WHERE username = ? AND domain = ?", (username, domain))
        self.execute("UPDATE mailboxes SET keep_copy = 0 WHERE username = ? AND domain = ?", (username, domain))
        self._touch()

    # -- whole data set ----------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.transaction(write=False):
            serial, changed = self.meta()
            return snapshot.whole(self.rows, serial, changed)

    def _check_invariants(self) -> None:
        loop = find_loop(snapshot.whole(self.rows))
        if loop:
            raise Conflict("mail loop: " + " -> ".join(loop))
