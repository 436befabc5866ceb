"""Dovecot's side of the paper's set-up, generated from vdeliver's own configuration.

`vmailctl dovecot-config` prints (or writes into a directory) the snippets Dovecot
needs to serve the mailboxes vdeliver fills, so that paths, the vmail user and the
database agree by construction instead of by copy-and-paste:

- `conf.d/90-vdeliver.conf`: mail_uid/gid, the default mail location (mbox
  INBOX at `mbox_path`, folders under the home; or Maildir), the mbox lock order
  vdeliver uses (dotlock, then fcntl: the same order on both sides, so the two
  can never each hold one lock and wait for the other), and the quota plugin;
- `auth-vdeliver-sql.conf.ext`: passdb and userdb from SQL;
- `dovecot-sql.conf.ext`: the driver, the connect string and the password, user
  and iterate queries written against vdeliver's schema (SQLite or PostgreSQL).

The user query computes each user's home and mail location from the stored
(normalised) domain and user names with the same templates vdeliver expands,
so `fred@away.com` reads exactly the mailbox vdeliver writes for `-a away.com -a
fred`.  Suspended users are refused at login with `nologin=Y` and a reason (IMAP
answers `NO [CONTACTADMIN] ...`) while their mail keeps arriving; disabled users
get no password row at all, like unknown users.

Only the standard library is used; vmailctl imports this module lazily.

Over 400 lines on purpose: most of it is the text of Dovecot's configuration files, kept
next to the settings that fill it in.
"""

from __future__ import annotations

import os

from vdeliver import fileio
from vdeliver.accounts.errors import ConfigurationError
from vdeliver.config import Config, ConfigError, home_template, read_table

DEFAULT_REASON = "Account suspended: please contact the postmaster"
QUOTA_ROOT = "User quota"

# [dovecot] keys: name -> (default, kind).  Validated here; config.py leaves the table to us.
KEYS: dict[str, tuple[object, str]] = {
    "home": ("", "template"),  # user's home; default: the Maildir template's parent
    "mbox_folders": ("mail", "str"),  # folders of mbox users, relative to the home
    "suspended_reason": (DEFAULT_REASON, "str"),
    "quota": (True, "bool"),  # Maildir++ quota (quota plugin, maildir backend)
    "config_dir": ("/etc/dovecot", "path"),  # where the generated files are meant to live
    "driver": ("", "str"),  # sqlite | pgsql; default: from [accounts]
    "connect": ("", "str"),  # Dovecot's connect string; default: from [accounts]
}



# -- settings -------------------------------------------------------------------


class Settings:
    """The values the generated files are made of, checked once."""

    def __init__(self, cfg: Config, lookup_uid: bool = True) -> None:
        self.lookup_uid = lookup_uid
        self.format: str = cfg.format
        path = cfg.path or "<defaults>"
        try:
            given = read_table(cfg, "dovecot", {key: "bool" if kind == "bool" else "str"
                                                for key, (_default, kind) in KEYS.items()})
        except ConfigError as exc:
            raise ConfigurationError(f"{exc.where}: {exc.message}") from None
        values: dict[str, object] = {key: given.get(key, default) for key, (default, _kind) in KEYS.items()}
        self.source = path
        from vdeliver.sieve.delivery import settings as sieve_settings

        try:
            self.sieve = sieve_settings(cfg)
        except ConfigError as exc:
            raise ConfigurationError(f"{exc.where}: {exc.message}") from None
        self.mbox_path: str = cfg.mbox_path
        self.maildir_path: str = cfg.maildir_path
        self.home: str = home_template(cfg)
        for name, template in (("home", self.home),):
            if not template.startswith("/") or "{user}" not in template:
                raise ConfigurationError(f"{path}: [dovecot] {name}: must be an absolute path containing {{user}}")
        folders = str(values["mbox_folders"]).strip("/")
        if not folders or ".." in folders.split("/") or "{" in folders or "%" in folders:
            raise ConfigurationError(f"{path}: [dovecot] mbox_folders: must be a plain relative directory")
        self.mbox_folders = folders
        reason = str(values["suspended_reason"])
        if not reason or any(ch < " " or ch == "\x7f" for ch in reason) or len(reason) > 200:
            raise ConfigurationError(f"{path}: [dovecot] suspended_reason: one line of text, at most 200 characters")
        self.reason = reason
        self.quota = bool(values["quota"])
        self.config_dir = str(values["config_dir"]).rstrip("/") or "/"
        if not self.config_dir.startswith("/") or "\n" in self.config_dir:
            raise ConfigurationError(f"{path}: [dovecot] config_dir: must be an absolute path")
        accounts = cfg.table("accounts")
        # The owner of the mailboxes: vmailctl's vmail_user, else the user vdeliver runs as.
        self.user = str(accounts.get("vmail_user", "") or cfg.user or "vmail")
        self.group = str(accounts.get("vmail_group", "") or cfg.group or "")
        self.driver, self.connect = _database(cfg, str(values["driver"]), str(values["connect"]), path)


def _database(cfg: Config, driver: str, connect: str, where: str) -> tuple[str, str]:
    """Dovecot's SQL driver and connect string, from [dovecot] or else from [accounts]."""
    accounts = cfg.table("accounts")
    # Dovecot only reads: the read-only role's dsn when there is one (`vmailctl db grant-readonly`).
    readonly = str(accounts.get("readonly_dsn", "") or "")
    url = readonly or str(accounts.get("dsn", "") or "")
    secret = str(accounts.get("readonly_password_file" if readonly else "password_file", "") or "")
    if not driver:
        driver = "pgsql" if url else "sqlite"
    if driver not in ("sqlite", "pgsql"):
        raise ConfigurationError(f"{where}: [dovecot] driver: must be sqlite or pgsql (got {driver!r})")
    if not connect and driver == "pgsql" and url:
        connect = _pg_connect(url)
        if secret:
            from vdeliver.accounts.settings import read_secret

            try:
                password = read_secret(secret)
            except Exception as exc:  # noqa: BLE001 - its ConfigurationError says which file and why
                raise ConfigurationError(f"{where}: [accounts] password file: {exc}") from None
            escaped = password.replace("\\", "\\\\").replace("'", "\\'")
            connect += f" password='{escaped}'"  # the generated file is 0600 (SECRET_FILES)
    if not connect and driver == "sqlite":
        connect = str(accounts.get("database", "") or "/var/lib/vdeliver/accounts.sqlite")
    if not connect:
        raise ConfigurationError(f"{where}: [dovecot] connect: needed with driver = {driver}")
    if "\n" in connect:
        raise ConfigurationError(f"{where}: [dovecot] connect: must be one line")
    return driver, connect


def _pg_connect(conninfo: str) -> str:
    """libpq's key=value form, which is what Dovecot's pgsql driver passes on; URLs are converted."""
    if "://" not in conninfo:
        return conninfo
    from urllib.parse import parse_qsl, unquote, urlsplit

    parts = urlsplit(conninfo)
    words: list[str] = []
    if parts.hostname:
        words.append(f"host={parts.hostname}")
    if parts.port:
        words.append(f"port={parts.port}")
    if parts.path.strip("/"):
        words.append(f"dbname={unquote(parts.path.strip('/'))}")
    if parts.username:
        words.append(f"user={unquote(parts.username)}")
    if parts.password:
        words.append(f"password={unquote(parts.password)}")
    for key, value in parse_qsl(parts.query):
        words.append(f"{key}={value}")
    return " ".join(words)


# -- path templates -------------------------------------------------------------


def dovecot_template(template: str) -> str:
    """vdeliver's {domain}/{user} template in Dovecot's %-variables (%d, %n)."""
    return template.replace("%", "%%").replace("{domain}", "%d").replace("{user}", "%n")


def sql_template(template: str, domain: str, user: str) -> str:
    """The template as an SQL expression concatenating literals and the two name columns."""
    out: list[str] = []
    rest = template
    while rest:
        i_d, i_u = rest.find("{domain}"), rest.find("{user}")
        hits = [(i, col, n) for i, col, n in ((i_d, domain, 8), (i_u, user, 6)) if i >= 0]
        if not hits:
            out.append(_sql_literal(rest))
            break
        i, col, n = min(hits)
        if i:
            out.append(_sql_literal(rest[:i]))
        out.append(col)
        rest = rest[i + n :]
    return " || ".join(out) if out else "''"


def _sql_literal(text: str) -> str:
    # Dovecot expands %-variables in the query before the database sees it.
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


# -- the files ------------------------------------------------------------------


def mail_conf(s: Settings) -> str:
    home = dovecot_template(s.home)
    if s.format == "maildir":
        location = f"mail_location = maildir:{dovecot_template(s.maildir_path)}"
    else:
        # mbox INBOX where vdeliver appends; folders under the home.
        location = f"mail_location = mbox:~/{s.mbox_folders}:INBOX={dovecot_template(s.mbox_path)}"
    uid_line = f"# first_valid_uid = <uid of {s.user}>   (needed when that is below 500)\n"
    if s.lookup_uid:
        import pwd

        try:
            uid = pwd.getpwnam(s.user).pw_uid
            # Dovecot refuses mail uids below first_valid_uid (500); vmail is often a system user.
            uid_line = f"first_valid_uid = {uid}\n" if uid < 500 else ""
        except KeyError:
            pass
    group = s.group or s.user
    quota = ""
    if s.quota:
        quota = (
            "\n# Maildir++ quota: the same maildirsize file vdeliver reads and appends to.\n"
            "# The user query switches it on per Maildir user (quota + quota_rule);\n"
            "# mbox users have no quota root.\n"
            "mail_plugins = $mail_plugins quota\n"
            "protocol imap {\n"
            "  mail_plugins = $mail_plugins imap_quota\n"
            "}\n"
        )
    return (
        f"# Generated by `vmailctl dovecot-config` from {s.source}.\n"
        "# Mailboxes written by vdeliver; Dovecot reads them as the same vmail user.\n"
        f"mail_uid = {s.user}\n"
        f"mail_gid = {group}\n"
        f"{uid_line}"
        "\n"
        "# For users whose userdb gives no mail location (the SQL userdb gives each user\n"
        f"# the location of its own format): vdeliver's default format, {s.format}.\n"
        f"mail_home = {home}\n"
        f"{location}\n"
        "\n"
        "# vdeliver takes the dotlock first, then an fcntl lock on the whole file.  Dovecot\n"
        "# takes its write locks in the order listed: the same order means a writer never\n"
        "# holds one lock while waiting for the other's (Debian's default is fcntl dotlock).\n"
        "mbox_write_locks = dotlock fcntl\n"
        "mbox_read_locks = fcntl\n"
        "# Write flag changes into the mbox at once.  With lazy writes (Dovecot's default)\n"
        "# a flag stored just as vdeliver appended was now and then lost in our load test\n"
        "# (a deleted message came back); written at once, none was.\n"
        "mbox_lazy_writes = no\n"
        f"{quota}"
    )


PIGEONHOLE_LACKS = frozenset({"ereject", "fcc"})


def sieve_conf(s: Settings) -> str:
    """Pigeonhole's settings, so that managesieved and webmail keep scripts where vdeliver runs
    them and can only save what vdeliver implements (docs/sieve.md)."""
    from vdeliver.sieve.validator import EXTENSIONS

    # All of them, the two default comparators too: with the list set, Pigeonhole knows only
    # what it names (a script requiring "comparator-i;octet" would be refused otherwise).
    # ereject (RFC 5429) is vdeliver's only: Debian's Pigeonhole (0.5.19) does not know it and
    # would warn at every start; managesieved refuses a script that requires it.
    extensions = " ".join(sorted(EXTENSIONS - PIGEONHOLE_LACKS))
    sv = s.sieve
    scripts = ""
    for key, paths in (("sieve_before", sv.before), ("sieve_after", sv.after)):
        for i, path in enumerate(paths):
            scripts += f"  {key}{i + 1 if i else ''} = {path}\n"
    if sv.global_dir:
        scripts += f"  sieve_global = {sv.global_dir}\n"
    if scripts:
        scripts = ("  # The global scripts of [sieve] before / after, and where include :global looks:\n"
                   "  # Pigeonhole runs them in the same order with the same rule (docs/sieve.md).\n" + scripts)
    boxes = "".join(f'  mailbox "{folder}" {{\n    special_use = {flag}\n  }}\n'
                    for flag, folder in sorted(sv.special_use.items(), key=lambda kv: kv[1]))
    special = ("# The folders fileinto :specialuse and specialuse_exists find by their flag ([sieve]\n"
               "# special_use; by default the same as Debian's conf.d/15-mailboxes.conf).\n"
               "namespace inbox {\n  inbox = yes\n"  # Debian's 10-mail.conf says so too: the same namespace
               f"{boxes}}}\n") if boxes else ""
    return (
        f"# Generated by `vmailctl dovecot-config` from {s.source}.\n"
        "# Sieve scripts (Pigeonhole: dovecot-sieve, dovecot-managesieved): where ManageSieve\n"
        "# keeps a user's scripts is where vdeliver runs them ([sieve] enabled = true).\n"
        "plugin {\n"
        "  sieve = file:~/sieve;active=~/.dovecot.sieve\n"
        "  # Exactly the extensions vdeliver implements: a script that uses anything else is\n"
        "  # refused when it is saved, never at delivery.\n"
        f"  sieve_extensions = {extensions}\n"
        "  # vdeliver's limits ([sieve]): a script over them is refused when it is saved.\n"
        f"  sieve_max_script_size = {sv.max_script_size}\n"
        f"  sieve_max_actions = {sv.max_actions}\n"
        f"  sieve_max_redirects = {sv.max_redirects}\n"
        f"{scripts}"
        "}\n"
        f"{special}"
    )


def auth_conf(s: Settings) -> str:
    args = f"{s.config_dir}/dovecot-sql.conf.ext"
    return (
        f"# Generated by `vmailctl dovecot-config` from {s.source}.\n"
        "# Users from vdeliver's accounts database.  In conf.d/10-auth.conf replace\n"
        "# `!include auth-system.conf.ext` with `!include auth-vdeliver-sql.conf.ext`.\n"
        "passdb {\n"
        "  driver = sql\n"
        f"  args = {args}\n"
        "}\n"
        "userdb {\n"
        "  driver = sql\n"
        f"  args = {args}\n"
        "}\n"
    )


def _lookup(alias: str = "m") -> str:
    """FROM/WHERE shared by the password and user queries.

    The login domain may be an alias domain (domains.alias_of): the row found is the
    mailbox in the real domain, and the password query returns that name as `user`,
    so the rest of the session (userdb, paths, logs) uses the canonical address.
    Disabled mailboxes and empty passwords never match: to Dovecot they do not exist.
    """
    return (
        f"FROM domains d JOIN mailboxes {alias} ON {alias}.domain = COALESCE(d.alias_of, d.name) "
        f"WHERE d.name = '%d' AND {alias}.username = '%n' AND {alias}.status <> 'disabled'"
    )


def sql_conf(s: Settings, driver: str | None = None, connect: str | None = None) -> str:
    driver = driver or s.driver
    connect = connect or s.connect
    home = sql_template(s.home, "m.domain", "m.username")
    maildir = sql_template(s.maildir_path, "m.domain", "m.username")
    inbox = sql_template(s.mbox_path, "m.domain", "m.username")
    folders = _sql_literal("/" + s.mbox_folders + ":INBOX=")
    reason = _sql_literal(s.reason)
    uid = _sql_literal(s.user)
    gid = _sql_literal(s.group or s.user)
    quota = ""
    if s.quota:
        quota = (
            ", \\\n"
            f"  CASE WHEN m.format = 'maildir' AND m.quota_bytes > 0 THEN {_sql_literal('maildir:' + QUOTA_ROOT)} END"
            " AS quota, \\\n"
            "  CASE WHEN m.format = 'maildir' AND m.quota_bytes > 0 THEN '*:bytes=' || m.quota_bytes END AS quota_rule"
        )
    return (
        f"# Generated by `vmailctl dovecot-config` from {s.source}.\n"
        f"# Dovecot reads vdeliver's accounts database ({'SQLite' if driver == 'sqlite' else 'PostgreSQL'}).\n"
        "# %n and %d are the user and domain of the (lower-cased) login name; Dovecot\n"
        "# escapes them for SQL.  NULL columns are ignored by Dovecot.\n"
        f"driver = {driver}\n"
        f"connect = {connect}\n"
        "default_pass_scheme = ARGON2ID\n"
        "\n"
        "# Suspended users: the password is checked, then the login is refused with the\n"
        "# stored reason (IMAP: NO [...] reason); their mail keeps arriving meanwhile.\n"
        "password_query = SELECT m.username || '@' || m.domain AS user, m.password AS password, \\\n"
        "  CASE WHEN m.status = 'suspended' THEN 'Y' END AS nologin, \\\n"
        f"  CASE WHEN m.status = 'suspended' THEN COALESCE(NULLIF(m.reason, ''), {reason}) END AS reason \\\n"
        f"  {_lookup()} AND m.password <> ''\n"
        "\n"
        "# Home and mail location from the same templates vdeliver expands; mbox users get\n"
        "# their INBOX in the spool and folders under the home, Maildir users their Maildir.\n"
        f"user_query = SELECT {home} AS home, \\\n"
        f"  CASE WHEN m.format = 'maildir' THEN 'maildir:' || {maildir} \\\n"
        f"  ELSE 'mbox:' || {home} || {folders} || {inbox} END AS mail, \\\n"
        f"  {uid} AS uid, {gid} AS gid{quota} \\\n"
        f"  {_lookup()}\n"
        "\n"
        "iterate_query = SELECT m.username || '@' || m.domain AS user FROM mailboxes m WHERE m.status <> 'disabled'\n"
    )


def render_files(cfg: Config, driver: str | None = None, connect: str | None = None,
                 lookup_uid: bool = True) -> dict[str, str]:
    """Every generated file, by its name relative to Dovecot's configuration directory."""
    s = Settings(cfg, lookup_uid)
    return {
        "conf.d/90-vdeliver.conf": mail_conf(s),
        "conf.d/90-vdeliver-sieve.conf": sieve_conf(s),
        "conf.d/auth-vdeliver-sql.conf.ext": auth_conf(s),
        "dovecot-sql.conf.ext": sql_conf(s, driver, connect),
    }


# -- vmailctl dovecot-config ------------------------------------------------------------

SECRET_FILES = ("dovecot-sql.conf.ext",)  # may hold a database password: 0600


def add_arguments(parser: object) -> None:
    """Options of `vmailctl dovecot-config` (an argparse parser)."""
    add = parser.add_argument  # type: ignore[attr-defined]
    add("--output", "-o", metavar="DIR", help="write the files into DIR (e.g. /etc/dovecot) instead of printing them")
    add("--file", metavar="NAME", help="print only this file (e.g. dovecot-sql.conf.ext)")
    add("--driver", choices=("sqlite", "pgsql"), help="SQL driver (default: from [accounts])")
    add("--connect", metavar="STRING", help="Dovecot's connect string (default: from [accounts])")


def parse_args(argv: list[str]) -> object:
    """vmailctl passes the words after `dovecot-config`; a bad one is a clear error (exit 1)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vmailctl dovecot-config", exit_on_error=False,
        description="Print (or write with --output) the Dovecot configuration for this vdeliver set-up.",
    )
    add_arguments(parser)
    return parse_words(parser, argv, "dovecot-config")


def parse_words(parser: object, argv: list[str], command: str) -> object:
    """A generator command's words, parsed; a bad one is a ConfigurationError (exit 1)."""
    import argparse

    try:
        args, rest = parser.parse_known_args(argv)  # type: ignore[attr-defined]
    except argparse.ArgumentError as exc:
        raise ConfigurationError(f"{command}: {exc}") from None
    if rest:
        raise ConfigurationError(f"{command}: unexpected argument {rest[0]!r}")
    return args


def render(cfg: Config, args: object = None) -> str | int:
    """What `vmailctl dovecot-config [ARGS]` prints: every file with a header line, one
    file (--file), or with --output DIR the list of files written.  args: the words after
    `dovecot-config`, or an argparse namespace.  Raises DovecotConfigError."""
    if args is None or isinstance(args, list | tuple):
        try:
            args = parse_args(list(args or []))
        except SystemExit as exc:  # --help: argparse printed it
            return int(exc.code or 0) if isinstance(exc.code, int) else 0
    files = render_files(cfg, getattr(args, "driver", None), getattr(args, "connect", None))
    return deliver_files(files, getattr(args, "file", None), getattr(args, "output", None))


def deliver_files(files: dict[str, str], only: str | None, output: str | None) -> str:
    """What a generator command prints (dovecot-config, webmail-config): every file with a
    header line, one file (--file NAME), or with --output DIR the list of files written."""
    if only:
        if only not in files:
            raise ConfigurationError(f"--file: no generated file {only!r} (one of {', '.join(files)})")
        files = {only: files[only]}
    if output:
        written = write_files(output, files)
        if not written:
            return f"{output}: up to date\n"
        return "".join(f"wrote {os.path.join(output, name)}\n" for name in written)
    if only:
        return files[only]
    return "\n".join(f"# ==> {name} <==\n{text}" for name, text in files.items())


def write_files(directory: str, files: dict[str, str]) -> list[str]:
    """Write each file atomically (temporary file, fsync, rename), only when it changed."""
    written: list[str] = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        data = text.encode()
        try:
            with open(path, "rb") as f:
                if f.read() == data:
                    continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigurationError(f"{path}: {exc.strerror}") from None
        mode = 0o600 if os.path.basename(name) in SECRET_FILES else 0o644
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fileio.replace(path, data, mode)
        except OSError as exc:
            raise ConfigurationError(f"{path}: {exc.strerror}") from None
        written.append(name)
    return written


def example_files() -> dict[str, str]:
    """The files shipped in examples/dovecot/: the defaults, machine-independent."""
    from vdeliver.config import DEFAULT_PATH, Config

    mbox = Config(DEFAULT_PATH)
    maildir = Config(DEFAULT_PATH)
    maildir.format = "maildir"
    pg = Config(DEFAULT_PATH, {"accounts": {"dsn": "host=/var/run/postgresql dbname=vmail user=vmailctl",
                                            "readonly_dsn": "host=/var/run/postgresql dbname=vmail user=dovecot"}})
    files = render_files(mbox, lookup_uid=False)
    files["conf.d/90-vdeliver.conf.maildir"] = render_files(maildir, lookup_uid=False)["conf.d/90-vdeliver.conf"]
    files["dovecot-sql.conf.ext.pgsql"] = render_files(pg, lookup_uid=False)["dovecot-sql.conf.ext"]
    return files


if __name__ == "__main__":  # regenerate examples/dovecot: python -m vdeliver.accounts.dovecot examples/dovecot
    import sys

    for written_name in write_files(sys.argv[1], example_files()):
        print(f"wrote {written_name}")
