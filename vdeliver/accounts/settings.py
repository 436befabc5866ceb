"""The [accounts] and [maps] tables of the vdeliver configuration, validated.

    [accounts]
    database = "/var/lib/vdeliver/accounts.sqlite"   # SQLite (the default store), or:
    # dsn = "postgresql://vmailctl@db1,db2/vmail"     # PostgreSQL via psycopg 3 (libpq conninfo)
    # password_file = "/etc/vdeliver/db-password"     # the dsn's password, kept out of this file
    # readonly_dsn = "host=/run/postgresql dbname=vmail user=vdeliver_ro"   # for the readers:
    #                                 # the socketmap server and Dovecot (`vmailctl db grant-readonly`)
    # readonly_password_file = ""
    vmail_user = "vmail"            # owner of the mailboxes vmailctl creates
    vmail_group = "vmail"
    password_scheme = "ARGON2ID"    # or "BLF-CRYPT"
    argon2_time_cost = 3            # argon2-cffi defaults; lower only for tests
    argon2_memory_cost = 65536      # KiB
    argon2_parallelism = 4
    bcrypt_rounds = 12
    busy_timeout = 5                # seconds to wait for a locked SQLite database
    connect_timeout = 5             # seconds to reach PostgreSQL
    default_quota = 0               # bytes, 0 = none (Maildir++ maildirsize)

    [maps]
    directory = "/etc/mail"           # where examples/sendmail_*.mc read them
    makemap = "/usr/sbin/makemap"   # "" = write the text maps only
    reject_unknown = true           # refuse unknown users of hosted domains at RCPT time
    local_host_names = ""           # class w of the outgoing sendmail; "" = this host's name + localhost
    relay_clients = "127.0.0.1 localhost"   # Connect:X RELAY lines in access.in and access_out

Every error names the file, line and key (Config.where).

Secrets: a password may sit in the dsn, but then the configuration file must not be
readable by everyone (`install -m 0640 -o root -g vmail`); `load()` notes a readable
file holding a password in `Settings.warnings`, which every command prints (or logs)
at start.  Better, `password_file` holds it apart (one line, mode 0600 or 0640).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from vdeliver.accounts.errors import ConfigurationError
from vdeliver.config import Config, ConfigError, pg_liveness, read_table

SCHEMES = ("ARGON2ID", "BLF-CRYPT")


@dataclass
class Settings:
    database: str = "/var/lib/vdeliver/accounts.sqlite"
    dsn: str = ""
    vmail_user: str = "vmail"
    vmail_group: str = "vmail"
    password_scheme: str = "ARGON2ID"
    argon2_time_cost: int = 3
    argon2_memory_cost: int = 65536
    argon2_parallelism: int = 4
    bcrypt_rounds: int = 12
    busy_timeout: int = 5
    connect_timeout: int = 5
    default_quota: int = 0
    # [maps]: the key's name there in the field's metadata
    maps_directory: str = field(default="/etc/mail", metadata={"maps": "directory"})
    makemap: str = field(default="/usr/sbin/makemap", metadata={"maps": "makemap"})
    reject_unknown: bool = field(default=True, metadata={"maps": "reject_unknown"})
    local_host_names: str = field(default="", metadata={"maps": "local_host_names"})
    relay_clients: str = field(default="127.0.0.1 localhost", metadata={"maps": "relay_clients"})
    password_file: str = ""
    readonly_dsn: str = ""
    readonly_password_file: str = ""
    warnings: list[str] = field(default_factory=list, init=False)  # found by load(), for the log

    @property
    def backend(self) -> str:
        return "postgresql" if self.dsn else "sqlite"

    def connect_args(self, readonly: bool = False) -> tuple[str, dict[str, Any]]:
        """(conninfo, extra psycopg.connect keywords) for vmailctl, or for a reader.

        A reader (socketmap server) uses readonly_dsn when one is set; the password comes
        from the matching password file when one is set."""
        if readonly and self.readonly_dsn:
            dsn, secret = self.readonly_dsn, self.readonly_password_file
        else:
            dsn, secret = self.dsn, self.password_file
        extra: dict[str, Any] = {"password": read_secret(secret)} if secret else {}
        # A server that vanishes from the network (a failed primary's host) must not hold a
        # query for the kernel's TCP timeout (minutes): libpq's keepalives and TCP user timeout,
        # unless the connection string sets its own.  Unix-socket connections ignore them.
        extra.update(pg_liveness(dsn))
        return dsn, extra


# The keys of [accounts] and [maps] and their kinds for config.read_table(): the fields above,
# so that a key is declared once, with its type and default.
_ACCOUNTS = {f.name: str(f.type) for f in fields(Settings) if f.init and "maps" not in f.metadata}
_MAPS = {f.metadata["maps"]: str(f.type) for f in fields(Settings) if "maps" in f.metadata}
_MAPS_ATTR = {f.metadata["maps"]: f.name for f in fields(Settings) if "maps" in f.metadata}


def load(cfg: Config) -> Settings:
    s = Settings()
    try:
        accounts = read_table(cfg, "accounts", _ACCOUNTS)
        maps = read_table(cfg, "maps", _MAPS)
    except ConfigError as exc:
        raise ConfigurationError(f"{exc.where}: {exc.message}") from None
    for key, value in accounts.items():
        setattr(s, key, value)
    for key, value in maps.items():
        setattr(s, _MAPS_ATTR[key], value)
    explicit = set(accounts)
    if "database" in explicit and "dsn" in explicit and s.dsn:
        raise ConfigurationError(f"{cfg.where('accounts', 'dsn')}: give either database or dsn, not both")
    if not s.dsn and not os.path.isabs(s.database):
        raise ConfigurationError(f"{cfg.where('accounts', 'database')}: must be an absolute path")
    if s.password_scheme.upper() not in SCHEMES:
        raise ConfigurationError(
            f"{cfg.where('accounts', 'password_scheme')}: must be one of {', '.join(SCHEMES)}"
            f" (got {s.password_scheme!r})"
        )
    s.password_scheme = s.password_scheme.upper()
    for key, low in (("argon2_time_cost", 1), ("argon2_memory_cost", 8), ("argon2_parallelism", 1),
                     ("bcrypt_rounds", 4), ("busy_timeout", 0), ("connect_timeout", 1)):
        if getattr(s, key) < low:
            raise ConfigurationError(f"{cfg.where('accounts', key)}: must be at least {low}")
    if s.argon2_memory_cost < 8 * s.argon2_parallelism:
        where = cfg.where("accounts", "argon2_memory_cost")
        raise ConfigurationError(f"{where}: must be at least 8 x argon2_parallelism")
    if s.bcrypt_rounds > 31:
        raise ConfigurationError(f"{cfg.where('accounts', 'bcrypt_rounds')}: must be at most 31")
    for key in ("password_file", "readonly_password_file"):
        path = getattr(s, key)
        if path:
            if not os.path.isabs(path):
                raise ConfigurationError(f"{cfg.where('accounts', key)}: must be an absolute path")
            try:
                read_secret(path)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{cfg.where('accounts', key)}: {exc}") from None
            if _others_can_read(path):
                s.warnings.append(_readable_warning(path, "the database password"))
    if s.readonly_dsn and not s.dsn:
        raise ConfigurationError(f"{cfg.where('accounts', 'readonly_dsn')}: needs dsn (PostgreSQL) as well")
    if cfg.path and (_has_password(s.dsn) or _has_password(s.readonly_dsn)) and _others_can_read(cfg.path):
        s.warnings.append(_readable_warning(cfg.path, "a database password (in dsn)"))
    if not os.path.isabs(s.maps_directory):
        raise ConfigurationError(f"{cfg.where('maps', 'directory')}: must be an absolute path")
    if s.makemap and not os.path.isabs(s.makemap):
        raise ConfigurationError(f"{cfg.where('maps', 'makemap')}: must be an absolute path or empty")
    for key in ("local_host_names", "relay_clients"):
        for word in getattr(s, key).split():
            if not all(c.isalnum() or c in ".-:[]_" for c in word):
                raise ConfigurationError(f"{cfg.where('maps', key)}: invalid host name {word!r}")
    return s


def read_secret(path: str) -> str:
    """The first line of a password file; refuses anything but a regular file."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigurationError(f"cannot read password file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigurationError(f"password file {path} is not a regular file")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace").split("\n", 1)[0].rstrip("\r")
    if not text:
        raise ConfigurationError(f"password file {path} is empty")
    return text


def _others_can_read(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


def _readable_warning(path: str, what: str) -> str:
    return (f"warning: {path} holds {what} and every user can read it: "
            f"chown root:vmail {path} && chmod 0640 {path}")


def _has_password(dsn: str) -> bool:
    """Does a libpq conninfo (key=value words or a URL) carry a password?"""
    if not dsn:
        return False
    if dsn.startswith(("postgresql://", "postgres://")):
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(dsn)
        return bool(parts.password) or "password" in parse_qs(parts.query)
    return any(word.strip().startswith("password") and "=" in word
               for word in dsn.replace(" =", "=").split())
