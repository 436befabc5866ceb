"""The two engines of the account store: SQLite (stdlib, the embedded default) and
PostgreSQL (psycopg 3, for real and multi-hub sites).

Each only connects, translates placeholders and sorts its driver's errors into the
accounts errors (a lock or an unreachable server is temporary, exit 75; a constraint is a
conflict, exit 1); every operation is the shared `Store`'s.
"""

from __future__ import annotations

import os
from typing import Any

from vdeliver.accounts.errors import AccountsError, ConfigurationError, Conflict, TemporaryError
from vdeliver.accounts.settings import Settings
from vdeliver.accounts.store import Store


class SQLiteStore(Store):
    backend = "sqlite"
    write_begin = "BEGIN IMMEDIATE"  # take the write lock now, so a busy database fails before any change

    def _connect(self) -> Any:
        import sqlite3

        path = self.settings.database
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            raise ConfigurationError(f"[accounts] database: directory {parent} does not exist")
        old = os.umask(0o077)  # the database holds password hashes
        try:
            conn = sqlite3.connect(path, timeout=self.settings.busy_timeout, isolation_level=None)
        finally:
            os.umask(old)
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _has_table(self, name: str) -> bool:
        return self.one("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None

    def _classify(self, exc: BaseException) -> AccountsError | None:
        import sqlite3

        if isinstance(exc, sqlite3.IntegrityError):
            return Conflict(f"refused by the database: {exc}")
        if isinstance(exc, sqlite3.OperationalError):
            text = str(exc)
            if "locked" in text or "busy" in text:
                return TemporaryError(f"database {self.settings.database} is locked: try again later")
            return TemporaryError(f"database {self.settings.database}: {text}")
        if isinstance(exc, sqlite3.DatabaseError):
            return TemporaryError(f"database {self.settings.database}: {exc}")
        return None


class PostgresStore(Store):
    backend = "postgresql"

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise TemporaryError("PostgreSQL needs psycopg 3: pip install 'vdeliver[postgres]'") from None
        dsn, extra = self.settings.connect_args()
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=self.settings.connect_timeout, **extra)
        timeout = max(1, self.settings.busy_timeout) * 1000
        conn.execute(f"SET lock_timeout = {int(timeout)}")
        conn.execute("SET client_min_messages = warning")
        return conn

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def _has_table(self, name: str) -> bool:
        row = self.one("SELECT to_regclass(?) IS NOT NULL AS present", (name,))
        return bool(row and row["present"])

    def _lock_for_migration(self) -> None:
        # Two first runs at once must not both create the tables.
        self.execute("SELECT pg_advisory_xact_lock(7305164)")

    def _classify(self, exc: BaseException) -> AccountsError | None:
        import psycopg

        if isinstance(exc, psycopg.errors.IntegrityError):
            return Conflict(f"refused by the database: {str(exc).splitlines()[0]}")
        if isinstance(exc, psycopg.errors.LockNotAvailable):
            return TemporaryError("database is locked: try again later")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return TemporaryError(f"database unreachable: {first}")
        return None


def open_store(settings: Settings) -> Store:
    store: Store = PostgresStore(settings) if settings.dsn else SQLiteStore(settings)
    return store.open()
