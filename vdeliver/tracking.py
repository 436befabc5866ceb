"""What delivery remembers between messages, for every hub at once: Sieve's `duplicate`
(RFC 7352), delivery deduplication (`dedup_seconds`), and (issue 18) vacation responses.

One table, `tracking (kind, mailbox, key, expires)`, in SQLite (the embedded default: a file
the delivering user can write, `[tracking] database`) or PostgreSQL (`[tracking] dsn`: the
accounts database, where migration 3 created the table, so that every hub sees the same
rows).  The one write is an atomic insert-if-absent-or-expired:

    INSERT ... ON CONFLICT (kind, mailbox, key) DO UPDATE SET expires = ...
    WHERE tracking.expires <= now

which touches a row only when it was absent or expired: of two hubs delivering the same
message to the same mailbox at the same moment, exactly one sees its row written (the
rowcount), so exactly one acts.  `claim(..., refresh=True)` also moves an unexpired row's
expiry forward (RFC 7352's `:last`).

Nothing here may stop a delivery: every database error becomes TrackingError, and the
caller decides (a duplicate test is then false, a deduplication lets the message through,
and the log says why).  Every wait has a deadline (SQLite's busy timeout, PostgreSQL's
connect and statement timeouts).
"""

import os
import time

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from typing import Any

    from vdeliver.config import Config

KEYS = {"database": "str", "dsn": "str", "timeout": "float"}
DEFAULT_DATABASE = "/var/lib/vdeliver/tracking.sqlite"
TABLE = """CREATE TABLE IF NOT EXISTS tracking (
    kind VARCHAR(16) NOT NULL,
    mailbox VARCHAR(320) NOT NULL,
    key VARCHAR(1000) NOT NULL,
    expires BIGINT NOT NULL,
    PRIMARY KEY (kind, mailbox, key)
)"""
MAX_KEY = 1000


def _key(text: str) -> str:
    """A key either engine stores: no NUL (PostgreSQL's text has none), valid UTF-8 (a
    header's bad bytes come as surrogates), and at most MAX_KEY characters (a longer one
    keeps its start and a digest of the whole)."""
    clean = text.replace("\x00", "\x1f").encode("utf-8", "replace").decode("utf-8")
    if len(clean) > MAX_KEY:
        import hashlib

        clean = clean[:MAX_KEY - 65] + "#" + hashlib.sha256(clean.encode("utf-8")).hexdigest()
    return clean


class TrackingError(Exception):
    """The tracking store cannot answer now (missing, locked past its deadline, down)."""


class Tracker:
    def __init__(self, database: str = DEFAULT_DATABASE, dsn: str = "", timeout: float = 5.0) -> None:
        self.database = database
        self.dsn = dsn
        self.timeout = timeout
        self._conn: Any = None

    @classmethod
    def from_config(cls, cfg: "Config") -> "Tracker":
        from vdeliver.config import ConfigError, read_table

        values = read_table(cfg, "tracking", KEYS)
        tracker = cls(str(values.get("database", DEFAULT_DATABASE)), str(values.get("dsn", "")),
                      float(values.get("timeout", 5.0)))  # type: ignore[arg-type]
        if not tracker.dsn and not tracker.database.startswith("/"):
            raise ConfigError(cfg.where("tracking", "database"), "must be an absolute path")
        if tracker.timeout <= 0:
            raise ConfigError(cfg.where("tracking", "timeout"), "must be more than 0 seconds")
        return tracker

    # -- the connection --------------------------------------------------------------------

    def _connect(self) -> "Any":
        if self._conn is not None:
            return self._conn
        try:
            if self.dsn:
                try:
                    import psycopg
                except ImportError:
                    raise TrackingError("PostgreSQL needs psycopg 3: pip install 'vdeliver[postgres]'") from None
                from psycopg.conninfo import conninfo_to_dict

                ms = int(self.timeout * 1000)
                given = str(conninfo_to_dict(self.dsn).get("options") or "")  # kept (a search_path, say)
                from vdeliver.config import pg_liveness

                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)),
                                             options=f"{given} -c statement_timeout={ms} -c lock_timeout={ms}".strip(),
                                             **pg_liveness(self.dsn))
            else:
                import sqlite3

                # Made 0600 if it is new (SQLite gives its journal the same mode); never a link.
                os.close(os.open(self.database, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
                self._conn = sqlite3.connect(self.database, timeout=self.timeout, isolation_level=None)
                self._conn.execute(TABLE)
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001 - sqlite3's or psycopg's: all mean "not now"
            self._conn = None
            raise TrackingError(f"{self._where()}: {exc}") from None
        return self._conn

    def _execute(self, sql: str, args: tuple[object, ...]) -> int:
        conn = self._connect()
        if self.dsn:
            sql = sql.replace("?", "%s")
        try:
            cur = conn.execute(sql, args)
            return int(cur.rowcount)
        except Exception as exc:  # noqa: BLE001 - the driver's errors: the store cannot answer now
            self.close()
            raise TrackingError(f"{self._where()}: {exc}") from None

    def _where(self) -> str:
        return "PostgreSQL" if self.dsn else self.database

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    # -- the operations ----------------------------------------------------------------------

    def claim(self, kind: str, mailbox: str, key: str, seconds: float, refresh: bool = False,
              now: float | None = None) -> bool:
        """Record (kind, mailbox, key) for `seconds`; True when this call wrote it (it was
        absent or expired), False when it was there already.  With `refresh`, a row that is
        there has its expiry moved to now + seconds too (and False is still returned)."""
        now = time.time() if now is None else now
        expires = int(now + seconds)
        key = _key(key)
        written = self._execute(
            "INSERT INTO tracking (kind, mailbox, key, expires) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (kind, mailbox, key) DO UPDATE SET expires = excluded.expires "
            "WHERE tracking.expires <= ?", (kind, _key(mailbox.lower()), key, expires, int(now)))
        if written:
            return True
        if refresh:
            self._execute("UPDATE tracking SET expires = ? WHERE kind = ? AND mailbox = ? AND key = ?",
                          (expires, kind, _key(mailbox.lower()), key))
        return False

    def release(self, kind: str, mailbox: str, key: str) -> None:
        """Forget a claim whose action did not happen (a delivery that failed after it)."""
        self._execute("DELETE FROM tracking WHERE kind = ? AND mailbox = ? AND key = ?",
                      (kind, _key(mailbox.lower()), _key(key)))

    def seen(self, kind: str, mailbox: str, key: str, now: float | None = None) -> bool:
        """Whether an unexpired row is there (nothing is written)."""
        now = time.time() if now is None else now
        conn = self._connect()
        sql = "SELECT 1 FROM tracking WHERE kind = ? AND mailbox = ? AND key = ? AND expires > ?"
        if self.dsn:
            sql = sql.replace("?", "%s")
        try:
            return conn.execute(sql, (kind, _key(mailbox.lower()), _key(key), int(now))).fetchone() is not None
        except Exception as exc:  # noqa: BLE001
            self.close()
            raise TrackingError(f"{self._where()}: {exc}") from None

    def purge(self, now: float | None = None) -> int:
        """Remove the expired rows (vmailctl's housekeeping); how many went."""
        now = time.time() if now is None else now
        return self._execute("DELETE FROM tracking WHERE expires <= ?", (int(now),))
