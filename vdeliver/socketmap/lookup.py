"""The socket map answers, from the accounts database: the same as the generated files.

One source of truth: an answer is never computed here.  For a key, this module
reads the rows the key is about - its domain (and, for an alias domain, the domain
it points to) and the mailbox, aliases and forwards of its local part - into an
accounts `Snapshot`, has `vdeliver.accounts.maps.render` write the map texts for
that slice exactly as `vmailctl maps build` would, and reads the key's line back.
Every line depends only on its domain's row and its own user's rows, so the slice
gives the same line as the whole database does, in time independent of the size
of the domain; tests/test_socketmap_lookup.py checks every key of a populated
database against the files makemap compiled.

Socket map name -> generated file:

    virtuser         virtusertable      (sendmail's name: FEATURE(virtusertable) declares Kvirtuser)
    virtuserdomains  virtuserdomains    (value: the domain itself)
    access_in        access.in          (the incoming sendmail's `access`, see server.py)
    access_out       access_out         (the outgoing sendmail's `access`)
    aliases          vdeliver-aliases   (the generated multi-target aliases; whole-database read)
    VirtHost         virtuserdomains    (any key: every hosted domain, space-separated - what
                                         `F{VirtHost}domains@socket:...` loads into the class
                                         when sendmail starts; whole-database read)
    R                relay-domains      (the same words, for the incoming sendmail's class R:
                                         `RELAY_DOMAIN_FILE(`domains@socket:...')` asks map `R`)

With [sieve] srs_domain (vdeliver.srs), VirtHost and R also hold the SRS domain, and its
addresses are answered from the secret, not the database: virtuser gives a valid SRS0
address's original sender; access_in lets it in and refuses at RCPT a forged or stale one
and every other address there (unless the SRS domain is also hosted).

Database access: SQLite opened read-only, or PostgreSQL through psycopg 3 with the
[accounts] dsn (libpq multi-host strings fail over: `host=db1,db2 target_session_attrs=any`).
One connection per worker thread.  A broken connection is retried once on a fresh one
(which is how a multi-host dsn moves to the next host); after a failed connect,
lookups fail fast (TEMP, or a stale cached answer) until the background probe
(`serial()`, polled by the server) connects again.

One file of about 500 lines on purpose: the two engines (SQLite, PostgreSQL), their
connections and retry, and the one-statement slice are one job, reading the rows a key
depends on; split, the retry rules would be spread over modules that must agree.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from vdeliver.config import Config

MAPS = {
    "virtuser": "virtusertable",
    "virtuserdomains": "virtuserdomains",
    "access_in": "access.in",
    "access_out": "access_out",
    "aliases": "aliases",
    "VirtHost": "virtuserdomains",
    "R": "relay-domains",
}


# The incoming access map's answer for an SRS address at the SRS domain that is not valid.
SRS_INVALID = "ERROR:5.1.1:550 Invalid or expired SRS address"


class BackendConfigError(Exception):
    """The [accounts] table cannot be used; the message names the key."""


class DatabaseDown(Exception):
    """No connection now; the background probe is retrying."""


def parse_map(name: str, text: str) -> dict[str, str]:
    """A generated map text as makemap reads it: first word -> rest of the line."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if name.endswith("aliases"):
            key, _, value = line.partition(":")
        elif name == "virtuserdomains":
            key, value = line, line
        else:
            parts = line.split(None, 1)
            key, value = parts[0], parts[1] if len(parts) > 1 else ""
        # makemap folds keys to lower case and keeps the first of duplicates
        entries.setdefault(key.strip().lower(), value.strip())
    return entries


def _file_name(map_name: str) -> str:
    if map_name == "aliases":  # the accounts package names its generated aliases file
        from vdeliver.accounts import maps

        return str(getattr(maps, "ALIASES", "aliases"))
    return MAPS[map_name]


def key_parts(map_name: str, key: str) -> tuple[str, str]:
    """(domain, local part) a key is about: `To:fred@away.com` -> (away.com, fred),
    `@away.com` -> (away.com, ""), `To:away.com` -> (away.com, "")."""
    if map_name.startswith("access"):
        tag, colon, rest = key.partition(":")
        key = rest if colon and tag.isalpha() else key
    local, _, domain = key.rpartition("@")
    return domain.rstrip(".").lower(), local.lower()


class Backend:
    """Map lookups over the accounts database (thread-safe: one connection per thread)."""

    maps = frozenset(MAPS) | {"quota"}

    def __init__(self, settings: Any, hostname: str, *, statement_timeout: float = 3.0,
                 retry_interval: float = 1.0) -> None:
        self.settings = settings
        self.hostname = hostname
        self.statement_timeout = statement_timeout
        self.retry_interval = retry_interval
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_reason = ""
        self.kind = "postgresql" if settings.dsn else "sqlite"
        self._shared: Any = None  # SQLite: one connection opened before root is given up
        self._shared_lock = threading.Lock()
        self.srs: tuple[str, bytes] | None = None  # ([sieve] srs_domain, its secret): bounces to SRS0
        # The `quota` map: where Maildirs are ([maildir_path]), the detail delimiter, over_quota.
        self.quota_config: Any = None

    def prepare(self) -> None:
        """Called as root, before the server drops privileges: open the SQLite database now,
        so that it may stay 0600 root (it holds password hashes) and still be read after the
        server has become its run user.  One connection, used under a lock (lookups are
        short).  PostgreSQL connects later, as the run user (a read-only role)."""
        if self.kind == "sqlite" and self._shared is None:
            self._shared = self._connect()

    # -- connections -----------------------------------------------------------------
    def _connect(self) -> Any:
        if self.kind == "sqlite":
            import sqlite3
            from urllib.parse import quote

            lite = sqlite3.connect(f"file:{quote(self.settings.database)}?mode=ro", uri=True,
                                   timeout=self.statement_timeout, isolation_level=None, check_same_thread=False)
            lite.execute("PRAGMA query_only = ON")
            return lite
        import psycopg

        dsn, extra = self.settings.connect_args(readonly=True)  # readonly_dsn when set: GRANT SELECT only
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=self.settings.connect_timeout, **extra)
        conn.execute(f"SET statement_timeout = {max(1, int(self.statement_timeout * 1000))}")
        return conn

    def _conn(self, probe: bool = False) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = self._open(probe)
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _open(self, probe: bool = False) -> Any:
        """A new connection, or DatabaseDown while a failed connect is recent (unless probing)."""
        if not probe and time.monotonic() < self._down_until:
            raise DatabaseDown(f"{self._down_reason} (reconnecting in the background)")
        try:
            conn = self._connect()
        except Exception as exc:
            self._down_until = time.monotonic() + self.retry_interval
            self._down_reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise
        self._down_until = 0.0
        return conn

    def open_link(self) -> Any:
        """A PostgreSQL connection for the answer loop to drive itself (pglink.Link): the slice
        statement prepared, then libpq in non-blocking mode.  Blocks: runs in a lookup thread."""
        from psycopg import pq

        from vdeliver.accounts import snapshot

        conn = self._open()
        try:
            res = conn.pgconn.prepare(SLICE_STATEMENT, _numbered(snapshot.SLICE_SQL).encode())
            if res.status != pq.ExecStatus.COMMAND_OK:
                raise OSError(f"cannot prepare the lookup statement: {res.get_error_message()}")
            conn.pgconn.nonblocking = 1
        except BaseException:
            conn.close()
            raise
        return conn

    def slice_plan(self, map_name: str, key: str) -> tuple[str, str, str] | None:
        """(domain, local part, generated file) when the answer to `key` is exactly one slice
        statement (what lookup() would run, and all it would run), else None."""
        if self.kind != "postgresql" or map_name not in MAPS or map_name in ("VirtHost", "R", "aliases"):
            return None
        if map_name.startswith("access") and key.partition(":")[0].lower() != "to":
            return None
        if self.srs is not None and self.srs[0] in key.lower():
            return None  # the SRS domain's addresses are answered from the secret (lookup._srs)
        domain, local = key_parts(map_name, key)
        return (domain, local, MAPS[map_name]) if domain else None

    def slice_answer(self, map_name: str, key: str, domain: str, file_name: str, rows: list[tuple[Any, ...]]) -> \
            str | None:
        """The key's line in the generated file, from the rows of its slice statement."""
        from vdeliver.accounts import snapshot

        return parse_map(file_name, self._render(snapshot.slice_rows(rows, domain), file_name)).get(key.lower())

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is already broken
                pass

    def close(self) -> None:
        if self._shared is not None:
            shared, self._shared = self._shared, None
            try:
                shared.close()
            except Exception:  # noqa: BLE001
                pass
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _run(self, work: Any, probe: bool = False) -> Any:
        """work(query) in one read-only transaction; one retry on a fresh connection."""
        if self._shared is not None:
            with self._shared_lock:
                result = self._transaction(self._shared, work)
            self._local.asked = True
            return result
        for attempt in (1, 2):
            conn = self._conn(probe)
            try:
                result = self._transaction(conn, work)
                self._local.asked = True
                return result
            except DatabaseDown:
                raise
            except Exception:
                self._drop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _transaction(self, conn: Any, work: Any) -> Any:
        if self.kind == "sqlite":
            def query(sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
                cur = conn.execute(sql, params)
                cols = [d[0] for d in cur.description]
                return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

            conn.execute("BEGIN")
            try:
                return work(query)
            finally:
                conn.execute("COMMIT")

        def pgquery(sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
            cur = conn.execute(sql.replace("?", "%s"), params)
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return work(pgquery)

    # -- answers -------------------------------------------------------------------------
    def serial(self) -> int:
        """The database's change counter (bumped by every vmailctl change); also the reconnect probe."""
        rows = self._run(lambda q: q("SELECT value FROM meta WHERE key = 'serial'"), probe=True)
        return int(rows[0]["value"]) if rows else 0

    def check(self) -> None:
        self.serial()

    def lookup_asked(self, map_name: str, key: str) -> tuple[str | None, bool]:
        """lookup(), and whether the database answered it (False: answered from the
        configuration alone, e.g. a `Connect:` access key); read in the same thread."""
        self._local.asked = False
        value = self.lookup(map_name, key)
        return value, bool(self._local.asked)

    def lookup(self, map_name: str, key: str) -> str | None:
        if self.srs is not None:
            answer = self._srs(map_name, key)
            if answer is not None:
                return answer
        return self._lookup(map_name, key)

    def _lookup(self, map_name: str, key: str) -> str | None:
        """The answer of the generated map files (no SRS)."""
        if map_name == "quota":
            return self._quota(key)
        file_name = _file_name(map_name)
        if map_name in ("VirtHost", "R"):
            # A class read once when sendmail starts: {VirtHost} (outgoing) routes through the
            # virtusertable; R (incoming) is the relay decision, which sendmail takes from the
            # domain alone (an access `To:user@domain RELAY` only exempts it from a refusal).
            text = self._render(self._run(self._whole), file_name)
            words = list(parse_map(file_name, text))
            if self.srs is not None and self.srs[0] not in words:
                # Its bounces go through the virtusertable ({VirtHost}), and the incoming sendmail
                # must relay for it (R): without it every bounce was "550 Relaying denied".
                words.append(self.srs[0])
            return " ".join(words) if words else None
        if map_name == "aliases":
            from vdeliver.accounts.maps import alias_name

            # Every generated alias is named alias_name(address); sendmail also asks for
            # `owner-x`, `root`... which can never be there: no whole-database read for them.
            if not key.lower().startswith(alias_name("").rsplit("-", 1)[0] + "-"):
                return None
            snap = self._run(self._whole)
        elif map_name.startswith("access") and key.partition(":")[0].lower() != "to":
            # Only `To:` lines come from the database; `Connect:` lines come from the
            # configuration, and `From:`, `Spam:`, ... are never in the generated map.  Answer
            # them without a query, so a database outage does not turn every sender check into
            # TEMP (cached NOTFOUNDs are never served stale: cache.py).
            from vdeliver.accounts import snapshot

            snap = snapshot.empty()
        else:
            domain, local = key_parts(map_name, key)
            if domain:  # the same as the answer loop's own statements give (slice_plan)
                from vdeliver.accounts import snapshot

                return self.slice_answer(map_name, key, domain, file_name,
                                         self._run_one(snapshot.SLICE_SQL, snapshot.slice_params(domain, local)))
            snap = self._slice(domain, local)
        return parse_map(file_name, self._render(snap, file_name)).get(key.lower())

    def _quota(self, key: str) -> str | None:
        """Map `quota` (as Cyrus's smmapd): `user@domain` -> "452 4.2.2 mailbox full" (or "552
        5.2.2 ..." with over_quota = "bounce") when that mailbox is a Maildir whose Maildir++
        quota is reached on this hub; None (NOTFOUND: no objection) otherwise, for aliases,
        mbox users, unknown or disabled addresses and a quota that cannot be read alike."""
        cfg = self.quota_config
        local, _, domain = key.strip().strip("<>").rpartition("@")
        if cfg is None or not local or not domain:
            return None
        from vdeliver.deliver import expand
        from vdeliver.recipient import Recipient

        if cfg.recipient_delimiter and cfg.recipient_delimiter in local:
            local = local.split(cfg.recipient_delimiter, 1)[0]
        domain, local = domain.lower().rstrip("."), local.lower()
        snap = self._slice(domain, local)
        box = next((m for m in snap.mailboxes if m["status"] != "disabled"), None)
        if box is None or box["format"] != "maildir":
            return None
        from vdeliver import maildir

        path = expand(cfg.maildir_path, Recipient(str(box["domain"]), str(box["username"])))
        if maildir.quota_reached(path) is None:
            return None
        return "552 5.2.2 mailbox full" if cfg.over_quota == "bounce" else "452 4.2.2 mailbox full"

    def _srs(self, map_name: str, key: str) -> str | None:
        """A bounce to one of our SRS0 addresses (vdeliver.srs): the virtuser map sends it on to
        the original sender, the incoming access map lets it in.  The SRS domain is in class R
        (the incoming sendmail relays for it), so the incoming access map refuses at RCPT what
        would otherwise be accepted and bounced later (backscatter): an SRS0 address whose hash
        is wrong (forged) or whose day is stale, an SRS1 address (vdeliver makes none), and,
        unless the SRS domain is also hosted, every other address there."""
        from vdeliver import srs

        assert self.srs is not None
        domain, secret = self.srs
        if map_name == "virtuser":
            return srs.reverse(key, domain, secret)
        if map_name == "virtuserdomains":
            return domain if key.lower() == domain else None
        if map_name == "access_in" and key[:3].lower() == "to:":
            address = key[3:]
            local, at, where = address.rpartition("@")
            if (where if at else address).rstrip(".").lower() != domain:
                return None
            if srs.reverse(address, domain, secret):
                return "RELAY"
            if at and local[:5].upper() in ("SRS0=", "SRS1="):
                return SRS_INVALID
            if not at:  # `To:srs-domain`: what the hosted domain says, else nobody is there
                from vdeliver.accounts.maps import ACCESS_UNKNOWN

                return self._lookup(map_name, key) or ACCESS_UNKNOWN
            return None  # another user: `To:srs-domain` decides, as for a hosted domain
        if map_name == "access_out" and key[:3].lower() == "to:":
            return "RELAY" if srs.reverse(key[3:], domain, secret) else None
        return None

    def _render(self, snap: Any, file_name: str) -> str:
        from vdeliver.accounts.maps import render

        return render(snap, self.settings, self.hostname)[file_name]

    def _slice(self, domain: str, local: str) -> Any:
        """The rows `local@domain` depends on: one statement, one round trip (snapshot.SLICE_SQL)."""
        from vdeliver.accounts import snapshot

        if not domain:
            return snapshot.empty()
        return snapshot.slice_rows(self._run_one(snapshot.SLICE_SQL, snapshot.slice_params(domain, local)), domain)

    def _run_one(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """One statement and its rows, without a transaction around it (a statement reads one
        snapshot by itself): one round trip.  PostgreSQL runs it as a server-side prepared
        statement (parsed and planned once per connection).  One retry on a fresh connection."""
        if self._shared is not None:
            with self._shared_lock:
                rows = list(self._shared.execute(sql, params).fetchall())
            self._local.asked = True  # the database answered (lookup_asked)
            return rows
        for attempt in (1, 2):
            conn = self._conn()
            try:
                if self.kind == "sqlite":
                    rows = list(conn.execute(sql, params).fetchall())
                else:
                    rows = list(conn.execute(_pg(sql), params, prepare=True).fetchall())
                self._local.asked = True
                return rows
            except DatabaseDown:
                raise
            except Exception:
                self._drop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _whole(self, q: Any) -> Any:
        from vdeliver.accounts import snapshot

        return snapshot.whole(q)


_PG_SQL: dict[str, str] = {}
SLICE_STATEMENT = b"vdeliver_slice"  # its name on the answer loop's own connections


def _numbered(sql: str) -> str:
    """`?` placeholders as libpq's `$1`, `$2`, ... (the statement has no `?` in literals)."""
    parts = sql.split("?")
    return "".join(f"{part}${i + 1}" for i, part in enumerate(parts[:-1])) + parts[-1]


def _pg(sql: str) -> str:
    """`?` placeholders as psycopg's `%s`, converted once per statement text."""
    out = _PG_SQL.get(sql)
    if out is None:
        out = _PG_SQL[sql] = sql.replace("?", "%s")
    return out


def explainable(key: str, map_name: str = "virtuser") -> list[tuple[str, tuple[Any, ...]]]:
    """The statements (PostgreSQL form) and parameters a lookup of `key` runs: for EXPLAIN."""
    from vdeliver.accounts import snapshot

    domain, local = key_parts(map_name, key)
    return [(_pg(snapshot.SLICE_SQL), snapshot.slice_params(domain, local))]


def open_backend(cfg: Config, log: Any = None, statement_timeout: float | None = None) -> Backend:
    """The backend for the [accounts] table of a configuration."""
    try:
        from vdeliver.accounts import settings as accounts_settings
    except ImportError as exc:  # pragma: no cover - a broken install
        raise BackendConfigError(f"accounts package unavailable: {exc}") from None
    try:
        settings = accounts_settings.load(cfg)
    except Exception as exc:  # noqa: BLE001 - its ConfigurationError names file, line and key
        raise BackendConfigError(str(exc)) from None
    if statement_timeout is None:
        from vdeliver.socketmap.settings import load_settings

        statement_timeout = load_settings(cfg).db_timeout
    if settings.dsn:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise BackendConfigError("[accounts] dsn needs psycopg 3: pip install 'vdeliver[postgres]'") from None
    backend = Backend(settings, cfg.host(), statement_timeout=statement_timeout)
    backend.quota_config = cfg
    sieve = cfg.table("sieve")
    if sieve.get("srs_domain") and sieve.get("srs_secret_file"):
        from vdeliver import srs

        try:  # read as root, before the server gives it up: the secret may be root's
            backend.srs = (str(sieve["srs_domain"]).lower(), srs.read_secret(str(sieve["srs_secret_file"])))
        except srs.SrsError as exc:
            raise BackendConfigError(f"[sieve] srs_secret_file: {exc}") from None
    return backend
