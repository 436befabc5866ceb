"""`vmailctl import`: move a site running the paper's set-up onto the accounts database.

Sources:
- the paper's users table (`username`, `password`, `userpart`, `domain`, and optionally
  `forward`, `alias_for`), read from a CSV file with a header line, a SQLite file or a
  PostgreSQL connection string;
- its hand-written `virtusertable` and `access` (access.in) files.

Everything is imported in the caller's one transaction; what cannot be mapped is
reported line by line, never guessed.  Password hashes keep their Dovecot scheme:
`{SCHEME}...` as it is, crypt(3) strings (`$1$`, `$5$`, `$6$`, `$2b$`) with their
scheme prefix added; plain text is hashed only when asked (--plain-passwords).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from typing import Any

from vdeliver.accounts import names, passwords
from vdeliver.accounts.errors import AccountsError, NotFound
from vdeliver.accounts.settings import Settings
from vdeliver.accounts.store import Store

_CRYPT = (("$1$", "MD5-CRYPT"), ("$5$", "SHA256-CRYPT"), ("$6$", "SHA512-CRYPT"),
          ("$2a$", "BLF-CRYPT"), ("$2b$", "BLF-CRYPT"), ("$2y$", "BLF-CRYPT"))
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


@dataclass
class Report:
    domains: list[str] = field(default_factory=list)
    mailboxes: list[tuple[str, str, str]] = field(default_factory=list)  # (user, domain, format)
    aliases: int = 0
    forwards: int = 0
    disabled: int = 0
    unmapped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"domains": self.domains, "mailboxes": [f"{u}@{d}" for u, d, _ in self.mailboxes],
                "aliases": self.aliases, "forwards": self.forwards, "disabled": self.disabled,
                "unmapped": self.unmapped}


class Importer:
    def __init__(self, store: Store, settings: Settings, fmt: str, plain_passwords: bool = False) -> None:
        self.store = store
        self.settings = settings
        self.fmt = fmt
        self.plain = plain_passwords
        self.report = Report()

    def _ensure_domain(self, dom: str) -> None:
        try:
            self.store.domain(dom)
        except NotFound:
            self.store.domain_add(dom)
            self.report.domains.append(dom)

    def _has_mailbox(self, user: str, dom: str) -> bool:
        try:
            self.store.user(user, dom)
            return True
        except NotFound:
            return False

    def _password(self, where: str, raw: str) -> str:
        raw = (raw or "").strip()
        if not raw:
            return ""
        if raw.startswith("{"):
            return passwords.check_imported(raw)
        for prefix, scheme in _CRYPT:
            if raw.startswith(prefix):
                return passwords.check_imported("{" + scheme + "}" + raw)
        if self.plain:
            return passwords.hash_password(raw, self.settings)
        self.report.unmapped.append(f"{where}: password kept out (not a known hash; "
                                    "--plain-passwords hashes plain text): the user cannot log in until `user passwd`")
        return ""

    # -- the paper's users table ---------------------------------------------------------------
    def users(self, rows: list[dict[str, Any]]) -> None:
        for n, row in enumerate(rows, 1):
            where = f"row {n}"
            row = {str(k).strip().lower(): ("" if v is None else str(v)) for k, v in row.items()}
            try:
                self._user_row(where, row)
            except AccountsError as exc:
                self.report.unmapped.append(f"{where}: {exc}")

    def _user_row(self, where: str, row: dict[str, str]) -> None:
        userpart, dom = row.get("userpart", "").strip(), row.get("domain", "").strip()
        username = row.get("username", "").strip()
        if (not userpart or not dom) and "@" in username:
            userpart, _, dom = username.rpartition("@")
        if not userpart or not dom:
            raise AccountsError(f"needs userpart and domain (or username user@domain), got {username!r}")
        user, dom = names.user(userpart), names.domain(dom)
        alias_for = row.get("alias_for", "").strip()
        forward = row.get("forward", "").strip()
        self._ensure_domain(dom)
        if alias_for:
            self.store.alias_add(user, dom, [t.strip() for t in alias_for.split(",") if t.strip()])
            self.report.aliases += 1
            return
        self.store.user_add(user, dom, self._password(f"{where} ({user}@{dom})", row.get("password", "")), self.fmt)
        self.report.mailboxes.append((user, dom, self.fmt))
        if forward:
            self.store.forward_set(user, dom, [t.strip() for t in forward.split(",") if t.strip()])
            self.report.forwards += 1

    @staticmethod
    def read_csv(path: str) -> list[dict[str, Any]]:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    @staticmethod
    def read_table(kind: str, source: str, table: str) -> list[dict[str, Any]]:
        if not _IDENT.match(table):
            raise AccountsError(f"invalid table name {table!r}")
        if kind == "sqlite":
            import sqlite3

            conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
            try:
                cur = conn.execute(f"SELECT * FROM {table}")
                cols = [d[0] for d in cur.description]
                return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
            except sqlite3.Error as exc:
                raise AccountsError(f"cannot read {table} from {source}: {exc}") from None
            finally:
                conn.close()
        import psycopg

        try:
            with psycopg.connect(source, connect_timeout=10) as pconn:
                pcur = pconn.execute(f"SELECT * FROM {table}")
                pcols = [d[0] for d in pcur.description or []]
                return [dict(zip(pcols, r, strict=True)) for r in pcur.fetchall()]
        except psycopg.Error as exc:
            raise AccountsError(f"cannot read {table}: {str(exc).strip().splitlines()[0]}") from None

    # -- hand-written sendmail files ---------------------------------------------------------------
    @staticmethod
    def _lines(text: str) -> list[tuple[int, str, str]]:
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = s.split(None, 1)
            out.append((n, parts[0], parts[1].strip() if len(parts) > 1 else ""))
        return out

    def virtusertable(self, text: str) -> None:
        entries = self._lines(text)
        # Mailboxes first, so aliases and forwards can refer to them in any order.
        entries.sort(key=lambda e: (0 if e[2].lower().endswith(".virtuser.") or e[2].lower().endswith(".virtuser")
                                    else 1 if not e[1].startswith("@") else 2))
        for n, key, value in entries:
            try:
                self._virtuser(key, value)
            except AccountsError as exc:
                self.report.unmapped.append(f"line {n}: {key} {value}: {exc}")

    def _virtuser(self, key: str, value: str) -> None:
        if not value:
            raise AccountsError("no value")
        low = value.lower()
        if key.startswith("@"):
            dom = names.domain(key[1:])
            if low.startswith("error:"):
                self._ensure_domain(dom)  # the generated maps add the same rejection
                return
            if value.startswith("%1@"):
                target = names.domain(value[3:])
                self._ensure_domain(target)
                self.store.domain_add(dom, alias_of=target)
                self.report.domains.append(dom)
                return
            if "%" in value:
                raise AccountsError("catch-all with %-substitution other than %1@domain")
            self._ensure_domain(dom)
            self.store.catchall_set(dom, _unvirtuser(value))
            return
        user, dom = names.address(key)
        if low.startswith("error:"):
            raise AccountsError("a per-address error entry (disable the mailbox instead, or import access)")
        if "@" not in value:
            raise AccountsError("a local alias name; recreate it with `alias add` or `forward set`")
        if "%" in value:
            raise AccountsError("%-substitution in a user entry")
        self._ensure_domain(dom)
        if low.endswith((".virtuser.", ".virtuser")):
            tuser, tdom = names.address(value.rstrip(".")[: -len(".virtuser")])
            if (tuser, tdom) == (user, dom):
                if not self._has_mailbox(user, dom):
                    self.store.user_add(user, dom, "", self.fmt)
                    self.report.mailboxes.append((user, dom, self.fmt))
                return
            value = f"{tuser}@{tdom}"
        target = _unvirtuser(value)
        if self._has_mailbox(user, dom):
            self.store.forward_set(user, dom, [target])
            self.report.forwards += 1
        else:
            self.store.alias_add(user, dom, [target])
            self.report.aliases += 1

    def access(self, text: str) -> None:
        for n, key, value in self._lines(text):
            try:
                self._access(key, value)
            except AccountsError as exc:
                self.report.unmapped.append(f"line {n}: {key} {value}: {exc}")

    def _access(self, key: str, value: str) -> None:
        tag, sep, rest = key.partition(":")
        if sep and "@" not in tag:
            if tag.lower() != "to":
                raise AccountsError(f"{tag}: entries are site policy, not accounts; keep them by hand")
            key = rest
        verdict = value.split()[0].upper() if value else ""
        if "@" not in key:
            if verdict in ("RELAY", "OK"):
                self._ensure_domain(names.domain(key))
                return
            raise AccountsError("a domain entry other than RELAY")
        user, dom = names.address(key)
        refused = verdict in ("REJECT", "DISCARD") or verdict.startswith("ERROR:") or verdict[:3].isdigit()
        if not refused:
            raise AccountsError("an address entry other than a refusal")
        if not self._has_mailbox(user, dom):
            raise AccountsError("refuses an address that is not a mailbox")
        reason = value if not verdict.startswith("ERROR:") else value.split(":", 3)[-1]
        self.store.user_set_status(user, dom, "disabled", reason.strip()[:500])
        self.report.disabled += 1


def _unvirtuser(value: str) -> str:
    low = value.lower()
    for suffix in (".virtuser.", ".virtuser"):
        if low.endswith(suffix):
            return value[: -len(suffix)]
    return value
