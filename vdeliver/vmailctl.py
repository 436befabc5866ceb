"""vmailctl: manage domains, mailboxes, aliases and forwards, and build the sendmail maps.

One tool over one database replaces the paper's five hand-edited files and its
`makemap` runs.  Each command is one database transaction: a refused or failed
command leaves the database as it was.  vmailctl is not on the delivery path, so it
may use argparse; but argparse's own exit is intercepted so that every failure
prints one clear line and exits with a documented code.

Also the front door of the resident servers (`vmailctl serve lmtp|socketmap ...`)
and of the Dovecot configuration generator (`vmailctl dovecot-config ...`), each
imported only when asked for.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from vdeliver.accounts.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    AccountsError,
    Conflict,
    InvalidName,
)

EXIT_SOFTWARE = 70

EXIT_CODES = """exit codes:
  0   success (check: no mismatch found)
  1   refused: invalid name, not found, duplicate, loop, bad configuration,
      or (check) mismatches found
  2   usage error (unknown command or option, missing argument)
  70  internal error (a bug: please report it)
  75  temporary failure: the database is locked or unreachable, a map
      build is already running; try again later

configuration: -c FILE, else $VDELIVER_CONFIG, else /etc/vdeliver.toml
([accounts] and [maps] tables; see docs/accounts.md)."""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns every exit code."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def _size(text: str) -> int:
    """`0`, `1048576`, `500K`, `100M`, `2G` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    mult = 1
    if t and t[-1] in units:
        mult, t = units[t[-1]], t[:-1]
    if not t.isdigit():
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (bytes, or a number with K, M, G or T)")
    return int(t) * mult


def build_parser() -> _Parser:
    p = _Parser(
        prog="vmailctl",
        description="Manage the vdeliver accounts database and the sendmail maps built from it.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", metavar="FILE", help="vdeliver configuration file")
    top = p.add_subparsers(dest="noun", metavar="COMMAND", parser_class=_Parser)
    top.required = True

    def sub(parent: Any, name: str, help_text: str) -> _Parser:
        sp: _Parser = parent.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        return sp

    def verbs(name: str, help_text: str) -> Any:
        sp = sub(top, name, help_text)
        v = sp.add_subparsers(dest="verb", metavar="ACTION", parser_class=_Parser)
        v.required = True
        return v

    def js(sp: _Parser) -> None:
        sp.add_argument("--json", action="store_true", help="print JSON")

    d = verbs("domain", "hosted domains")
    sp = sub(d, "add", "add a hosted domain")
    sp.add_argument("domain")
    sp.add_argument("--alias-of", metavar="DOMAIN", help="make it an alias domain: user@it goes to user@DOMAIN")
    sp = sub(d, "remove", "remove a domain")
    sp.add_argument("domain")
    sp.add_argument("--force", action="store_true", help="also remove its mailboxes and aliases (mail stays on disk)")
    js(sub(d, "list", "list domains"))
    sp = sub(d, "show", "show one domain")
    sp.add_argument("domain")
    js(sp)

    u = verbs("user", "mailboxes")
    sp = sub(u, "add", "add a mailbox and create it on disk")
    sp.add_argument("address")
    sp.add_argument("--format", choices=("maildir", "mbox"), help="mailbox format (default: the config's format)")
    sp.add_argument("--quota", type=_size, help="quota in bytes (K, M, G suffixes); Maildir++ for Maildir users")
    _password_options(sp, allow_none=True)
    sp.add_argument("--no-mailbox", action="store_true", help="do not create the mailbox on disk")
    sp = sub(u, "remove", "remove a mailbox (its mail stays on disk unless --remove-mail)")
    sp.add_argument("address")
    sp.add_argument("--remove-mail", action="store_true",
                    help="move the mail aside to .removed-USER-TIME in its domain directory")
    sp.add_argument("--unlink", action="store_true", help="with --remove-mail: delete the mail instead")
    sp = sub(u, "list", "list mailboxes")
    sp.add_argument("domain", nargs="?")
    js(sp)
    sp = sub(u, "show", "show one mailbox")
    sp.add_argument("address")
    js(sp)
    sp = sub(u, "passwd", "set a mailbox's password")
    sp.add_argument("address")
    _password_options(sp, allow_none=False)
    for verb, text in (("disable", "refuse mail for the mailbox (at RCPT time) and its logins"),
                       ("suspend", "keep mail arriving but refuse reading it (Dovecot shows the reason)")):
        sp = sub(u, verb, text)
        sp.add_argument("address")
        sp.add_argument("--reason", default="", help="one line shown to the user or sender")
    for verb, text in (("enable", "undo disable"), ("unsuspend", "undo suspend")):
        sp = sub(u, verb, text)
        sp.add_argument("address")
    sp = sub(u, "quota", "set a mailbox's quota (0 = none)")
    sp.add_argument("address")
    sp.add_argument("size", type=_size)

    a = verbs("alias", "addresses that deliver to other addresses")
    sp = sub(a, "add", "add an alias (or more targets to one)")
    sp.add_argument("address")
    sp.add_argument("targets", nargs="+", metavar="TARGET")
    sp = sub(a, "remove", "remove an alias, or some of its targets")
    sp.add_argument("address")
    sp.add_argument("targets", nargs="*", metavar="TARGET")
    sp = sub(a, "list", "list aliases")
    sp.add_argument("domain", nargs="?")
    js(sp)

    f = verbs("forward", "forward a mailbox's mail")
    sp = sub(f, "set", "forward a mailbox to one or more addresses (replaces any forward)")
    sp.add_argument("address")
    sp.add_argument("targets", nargs="+", metavar="TARGET")
    sp.add_argument("--keep-copy", action="store_true", help="also deliver into the mailbox")
    sp = sub(f, "clear", "stop forwarding")
    sp.add_argument("address")

    c = verbs("catchall", "what a domain does with unknown addresses")
    sp = sub(c, "set", "send unknown addresses of DOMAIN to TARGET")
    sp.add_argument("domain")
    sp.add_argument("target")
    sp = sub(c, "clear", "refuse unknown addresses of DOMAIN again")
    sp.add_argument("domain")

    m = verbs("maps", "sendmail maps")
    sp = sub(m, "build", "write the maps that changed and compile them with makemap")
    sp.add_argument("--reload", action="store_true",
                    help="SIGHUP the outgoing sendmail when a map it reads only at start-up changed")
    js(sp)

    js(sub(top, "check", "compare database, maps and mailboxes on disk; exit 1 on any mismatch"))

    db = verbs("db", "the accounts database itself")
    sp = sub(db, "grant-readonly", "let PostgreSQL ROLE (created if missing) read the accounts tables and "
             "nothing else: for Dovecot and the socketmap server ([accounts] readonly_dsn)")
    sp.add_argument("roles", nargs="+", metavar="ROLE")
    sp.add_argument("--sql", action="store_true", help="print the SQL instead of running it")

    sp = sub(top, "doctor", "check the installation as sendmail, vdeliver and Dovecot see it; exit 1 on problems")
    sp.add_argument("--cf", action="append", metavar="FILE", help="a sendmail .cf (default: /etc/mail/sendmail_out.cf"
                    " and sendmail_in.cf)")
    sp.add_argument("--dovecot-dir", default="/etc/dovecot", metavar="DIR", help="Dovecot's configuration directory")
    js(sp)

    i = verbs("import", "import a site running the paper's set-up")
    sp = sub(i, "users", "the paper's users table (username, password, userpart, domain, forward, alias_for)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", metavar="FILE", help="a CSV file with a header line")
    src.add_argument("--sqlite", metavar="FILE", help="a SQLite database")
    src.add_argument("--dsn", metavar="CONNINFO", help="a PostgreSQL connection string")
    sp.add_argument("--table", default="users", help="table name for --sqlite/--dsn (default users)")
    sp.add_argument("--plain-passwords", action="store_true", help="hash passwords that are plain text")
    for kind in ("virtusertable", "access"):
        sp = sub(i, kind, f"a hand-written {kind} file")
        sp.add_argument("file")
    for sp in i.choices.values():
        sp.add_argument("--format", choices=("maildir", "mbox"), help="format of imported mailboxes")
        sp.add_argument("--no-mailbox", action="store_true", help="do not create missing mailboxes on disk")
        sp.add_argument("--dry-run", action="store_true", help="report only; change nothing")
        js(sp)

    sp = sub(top, "serve", "run a resident server: serve lmtp|socketmap [ARGS...]")
    sp.add_argument("server", choices=("lmtp", "socketmap"))
    sp.add_argument("args", nargs=argparse.REMAINDER)
    # Its options (--output DIR, --file NAME, ...) belong to vdeliver.accounts.dovecot, imported only
    # when the command runs: main() hands it every word after `dovecot-config` untouched.
    sub(top, "dovecot-config", "print (or write with --output DIR) the Dovecot configuration for this set-up; "
        "`vmailctl dovecot-config --help` lists its options")
    return p


def _password_options(sp: _Parser, allow_none: bool) -> None:
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    if allow_none:
        g.add_argument("--no-password", action="store_true", help="no password: no login until `user passwd`")
    sp.add_argument("--scheme", choices=("ARGON2ID", "BLF-CRYPT"), help="password scheme (default from config)")


# -- helpers -------------------------------------------------------------------------------------


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        data = sys.stdin.read(4096)
        if data.endswith("\n"):
            data = data[:-1]
        if data.endswith("\r"):
            data = data[:-1]
        if "\n" in data:
            raise InvalidName("--password-stdin: expected one line")
        return data
    if not sys.stdin.isatty():
        raise InvalidName("no terminal to ask for the password: use --password-stdin")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Retype new password: ") != first:
        raise InvalidName("the passwords do not match")
    return first


def _emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        out = text(data)
        if out:
            print(out)


def _cell(value: Any) -> str:
    """One table cell: lists as `a, b`, nothing as `-`."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return ""
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _kv(d: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if isinstance(v, list):
            return ", ".join(map(str, v)) or "-"
        return "-" if v is None or v == "" else str(v)

    return "\n".join(f"{k}: {show(v)}" for k, v in d.items())


def _public_user(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k != "password"}
    out["keep_copy"] = bool(out.get("keep_copy"))
    if "password" in row:
        from vdeliver.accounts.passwords import scheme_of

        out["password_scheme"] = scheme_of(row["password"]) or None
    return out


# -- commands --------------------------------------------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        from vdeliver import config as vconfig
        from vdeliver.accounts import settings as vsettings

        self.args = args
        try:
            self.cfg = vconfig.load(args.config)
        except vconfig.ConfigError as exc:
            raise AccountsError(f"{exc.where}: {exc.message}") from None
        self.settings = vsettings.load(self.cfg)
        for warning in self.settings.warnings:
            sys.stderr.write(f"vmailctl: {warning}\n")
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from vdeliver.accounts.store import open_store

            self._store = open_store(self.settings)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _addr(text: str) -> tuple[str, str]:
    from vdeliver.accounts import names

    return names.address(text)


def _dom(text: str) -> str:
    from vdeliver.accounts import names

    return names.domain(text)


def cmd_domain(ctx: Context) -> int:
    a, s = ctx.args, ctx.store
    if a.verb == "list":
        with s.transaction(write=False):
            rows = s.domain_list()
        _emit(a, rows, lambda r: _table(r, ["name", "alias_of", "catchall", "mailboxes", "aliases"]))
        return EXIT_OK
    name = _dom(a.domain)
    if a.verb == "show":
        with s.transaction(write=False):
            _emit(a, s.domain_show(name), _kv)
        return EXIT_OK
    if a.verb == "add":
        with s.transaction():
            s.domain_add(name, _dom(a.alias_of) if a.alias_of else None)
        print(f"added domain {name}" + (f" (alias of {_dom(a.alias_of)})" if a.alias_of else ""))
        return EXIT_OK
    with s.transaction():
        removed = s.domain_remove(name, force=a.force)
    extra = f" and {len(removed)} mailbox(es); their mail is still on disk" if removed else ""
    print(f"removed domain {name}{extra}")
    return EXIT_OK


def cmd_user(ctx: Context) -> int:
    from vdeliver.accounts import mailboxes, passwords

    a, s, cfg, st = ctx.args, ctx.store, ctx.cfg, ctx.settings
    if a.verb == "list":
        dom = _dom(a.domain) if a.domain else None
        with s.transaction(write=False):
            rows = [_public_user(r) for r in s.user_list(dom)]
        _emit(a, rows, lambda r: _table(r, ["username", "domain", "format", "status", "quota_bytes", "forwards",
                                            "keep_copy"]))
        return EXIT_OK
    user, dom = _addr(a.address)
    addr = f"{user}@{dom}"
    if a.verb == "show":
        with s.transaction(write=False):
            row = _public_user(s.user(user, dom))
        row["path"] = mailboxes.mailbox_path(cfg, row["format"], user, dom)
        _emit(a, row, _kv)
        return EXIT_OK
    if a.verb == "add":
        fmt = a.format or cfg.format
        quota = st.default_quota if a.quota is None else a.quota
        secret = "" if a.no_password else passwords.hash_password(_read_password(a), st, a.scheme)
        with s.transaction():
            s.user_add(user, dom, secret, fmt, quota)
            path = None if a.no_mailbox else mailboxes.create(cfg, st, fmt, user, dom, quota)
        print(f"added mailbox {addr} ({fmt}{', ' + path if path else ''})")
        return EXIT_OK
    if a.verb == "remove":
        if a.unlink and not a.remove_mail:
            raise UsageError("vmailctl user remove: --unlink needs --remove-mail")
        with s.transaction():
            row = s.user_remove(user, dom)
            moved = mailboxes.move_aside(cfg, row["format"], user, dom, unlink=a.unlink) if a.remove_mail else None
        note = ""
        if a.remove_mail:
            note = ("; mail deleted" if moved == "" else f"; mail moved to {moved}" if moved
                    else "; it had no mail on disk")
        else:
            note = f"; its mail is still at {mailboxes.mailbox_path(cfg, row['format'], user, dom)}"
        print(f"removed mailbox {addr}{note}")
        return EXIT_OK
    if a.verb == "passwd":
        secret = passwords.hash_password(_read_password(a), st, a.scheme)
        with s.transaction():
            s.user_set_password(user, dom, secret)
        print(f"password of {addr} changed")
        return EXIT_OK
    if a.verb in ("disable", "enable", "suspend", "unsuspend"):
        want = {"disable": "disabled", "suspend": "suspended", "enable": "active", "unsuspend": "active"}[a.verb]
        undoes = {"enable": "disabled", "unsuspend": "suspended"}.get(a.verb)
        with s.transaction():
            row = s.user(user, dom)
            if undoes and row["status"] != undoes:
                raise Conflict(f"mailbox {addr} is {row['status']}, not {undoes}")
            if not undoes and row["status"] == want:
                raise Conflict(f"mailbox {addr} is already {want}")
            s.user_set_status(user, dom, want, getattr(a, "reason", "") or "")
        print(f"mailbox {addr} is now {want}")
        return EXIT_OK
    if a.verb == "quota":
        with s.transaction():
            row = s.user(user, dom)
            s.user_set_quota(user, dom, a.size)
            written = mailboxes.set_quota(cfg, st, row["format"], user, dom, a.size)
        extra = f" ({written})" if written else (" (recorded; mbox quotas are not enforced)" if row["format"] == "mbox"
                                                 else "")
        print(f"quota of {addr} set to {a.size} bytes{extra}" if a.size else f"quota of {addr} removed")
        return EXIT_OK
    raise UsageError(f"vmailctl user: unknown action {a.verb}")


def cmd_alias(ctx: Context) -> int:
    a, s = ctx.args, ctx.store
    if a.verb == "list":
        dom = _dom(a.domain) if a.domain else None
        with s.transaction(write=False):
            rows = s.alias_list(dom)
        _emit(a, rows, lambda r: "\n".join(f"{x['address']}: {', '.join(x['targets'])}" for x in r))
        return EXIT_OK
    user, dom = _addr(a.address)
    with s.transaction():
        if a.verb == "add":
            new = f"{user}@{dom}" not in {x["address"] for x in s.alias_list(dom)}
            s.alias_add(user, dom, a.targets)
        else:
            new = False
            s.alias_remove(user, dom, a.targets or None)
    done = "added" if new else "updated" if a.verb == "add" or a.targets else "removed"
    print(f"alias {user}@{dom} {done}")
    return EXIT_OK


def cmd_forward(ctx: Context) -> int:
    a, s = ctx.args, ctx.store
    user, dom = _addr(a.address)
    with s.transaction():
        if a.verb == "set":
            s.forward_set(user, dom, a.targets, keep_copy=a.keep_copy)
        else:
            s.forward_clear(user, dom)
    print(f"forward of {user}@{dom} {'set' if a.verb == 'set' else 'cleared'}")
    return EXIT_OK


def cmd_catchall(ctx: Context) -> int:
    a, s = ctx.args, ctx.store
    dom = _dom(a.domain)
    with s.transaction():
        if a.verb == "set":
            s.catchall_set(dom, a.target)
        else:
            s.catchall_clear(dom)
    print(f"catch-all of {dom} {'set' if a.verb == 'set' else 'cleared'}")
    return EXIT_OK


def cmd_maps(ctx: Context) -> int:
    from vdeliver.accounts import maps

    result = maps.build_from(ctx.store, ctx.settings, ctx.cfg.host())
    restart = maps.needs_restart(result.written)
    reloaded = maps.reload_sendmail() if restart and ctx.args.reload else None
    data = {"directory": result.directory, "serial": result.serial, "written": result.written,
            "compiled": result.compiled, "unchanged": result.unchanged, "restart_needed": restart,
            "reloaded_pid": reloaded}

    def text(d: dict[str, Any]) -> str:
        if not d["written"] and not d["compiled"]:
            return f"maps in {d['directory']} are up to date"
        line = (f"maps in {d['directory']}: wrote {', '.join(d['written']) or 'nothing'}; "
                f"compiled {', '.join(d['compiled']) or 'nothing'}")
        if d["reloaded_pid"]:
            return line + f"\nsent SIGHUP to the outgoing sendmail (pid {d['reloaded_pid']})"
        if d["restart_needed"]:
            return line + (f"\n{', '.join(d['restart_needed'])} changed; sendmail reads these only at start-up:"
                           f" restart the outgoing sendmail (kill -HUP $(head -1 {maps.OUT_PID_FILE}),"
                           " or vmailctl maps build --reload)")
        return line

    _emit(ctx.args, data, text)
    return EXIT_OK


def cmd_check(ctx: Context) -> int:
    from vdeliver.accounts import check

    found = check.problems(ctx.cfg, ctx.settings, ctx.store.snapshot())
    _emit(ctx.args, {"ok": not found, "problems": found}, lambda d: "\n".join(d["problems"]) or "no mismatch found")
    return EXIT_ERROR if found else EXIT_OK


def cmd_db(ctx: Context) -> int:
    from vdeliver.accounts import schema

    roles = ctx.args.roles
    for role in roles:
        if not role or len(role) > 63 or not (role[0].isascii() and (role[0].isalpha() or role[0] == "_")) \
                or not all(c.isascii() and (c.isalnum() or c == "_") for c in role) or role != role.lower():
            raise UsageError(f"invalid role name {role[:80]!r} (lower-case letters, digits and _)")
    statements = [st for role in roles for st in schema.readonly_grants(role)]
    if ctx.args.sql:
        print(";\n".join(statements) + ";")
        return EXIT_OK
    if ctx.settings.backend != "postgresql":
        raise UsageError("db grant-readonly needs PostgreSQL ([accounts] dsn); SQLite has no roles: "
                         "make the database file readable by the readers' group instead")
    store = ctx.store
    with store.transaction():
        for st in statements:
            store.execute(st)
    print(f"granted read-only access to the accounts tables: {', '.join(roles)}")
    return EXIT_OK


def cmd_import(ctx: Context) -> int:
    from vdeliver.accounts import mailboxes
    from vdeliver.accounts.importer import Importer

    a, s, cfg = ctx.args, ctx.store, ctx.cfg
    imp = Importer(s, ctx.settings, a.format or cfg.format, getattr(a, "plain_passwords", False))
    if a.verb == "users":
        if a.csv:
            rows = Importer.read_csv(a.csv)
        elif a.sqlite:
            rows = Importer.read_table("sqlite", a.sqlite, a.table)
        else:
            rows = Importer.read_table("postgresql", a.dsn, a.table)
    else:
        try:
            with open(a.file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise AccountsError(f"cannot read {a.file}: {exc.strerror}") from None
    try:
        with s.transaction():
            if a.verb == "users":
                imp.users(rows)
            elif a.verb == "virtusertable":
                imp.virtusertable(text)
            else:
                imp.access(text)
            if not a.no_mailbox and not a.dry_run:
                for user, dom, fmt in imp.report.mailboxes:
                    mailboxes.create(cfg, ctx.settings, fmt, user, dom)
            if a.dry_run:
                raise _DryRun()
    except _DryRun:
        pass
    rep = imp.report.as_dict()
    rep["dry_run"] = a.dry_run

    def text_out(d: dict[str, Any]) -> str:
        lines = [f"{'would import' if d['dry_run'] else 'imported'}: {len(d['domains'])} domain(s), "
                 f"{len(d['mailboxes'])} mailbox(es), {d['aliases']} alias(es), {d['forwards']} forward(s), "
                 f"{d['disabled']} disabled"]
        lines += [f"not mapped: {u}" for u in d["unmapped"]]
        return "\n".join(lines)

    _emit(a, rep, text_out)
    return EXIT_OK


class _DryRun(Exception):
    """Raised inside the transaction to roll a --dry-run back."""


def cmd_serve(argv: list[str], config: str | None) -> int:
    import importlib

    server, rest = argv[0], argv[1:]
    module = {"lmtp": "vdeliver.lmtp.daemon", "socketmap": "vdeliver.socketmap.daemon"}.get(server)
    if module is None:
        raise UsageError(f"vmailctl serve: unknown server {server!r} (choose lmtp or socketmap)")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not exc.name or module.startswith(exc.name):
            raise AccountsError(f"the {server} server is not installed ({module} is missing)") from None
        raise
    if config and "-c" not in rest and "--config" not in rest:
        rest = ["-c", config, *rest]
    return int(mod.main(rest) or 0)


def cmd_dovecot(ctx: Context) -> int:
    import importlib

    try:
        mod = importlib.import_module("vdeliver.accounts.dovecot")
    except ModuleNotFoundError as exc:
        if not exc.name or "vdeliver.accounts.dovecot".startswith(exc.name):
            raise AccountsError("the Dovecot configuration generator is not installed "
                                "(vdeliver.accounts.dovecot is missing)") from None
        raise
    result = mod.render(ctx.cfg, list(ctx.args.args))
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
        return EXIT_OK
    return int(result or 0)


def cmd_doctor(ctx: Context) -> int:
    from vdeliver import doctor

    report = doctor.run(ctx.cfg, ctx.settings, ctx.args.cf, ctx.args.dovecot_dir)
    _emit(ctx.args, {"ok": not report.problems, "problems": report.problems, "checked": report.checked},
          lambda _d: doctor.text(report))
    return EXIT_ERROR if report.problems else EXIT_OK


COMMANDS: dict[str, Callable[[Context], int]] = {
    "domain": cmd_domain, "user": cmd_user, "alias": cmd_alias, "forward": cmd_forward,
    "catchall": cmd_catchall, "maps": cmd_maps, "check": cmd_check, "import": cmd_import,
    "dovecot-config": cmd_dovecot, "db": cmd_db, "doctor": cmd_doctor,
}


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"vmailctl: {message}\n")
    return code


def _passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `[-c FILE] dovecot-config WORDS...` so that WORDS reach the command untouched."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-c", "--config"):
            i += 2
        elif word.startswith("--config=") or (word.startswith("-c") and len(word) > 2):
            i += 1
        else:
            break
    if i < len(argv) and argv[i] == "dovecot-config":
        return argv[: i + 1], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx: Context | None = None
    try:
        head, rest = _passthrough(argv)
        try:
            args = build_parser().parse_args(head)
        except SystemExit as exc:  # --help / --version: argparse printed it
            return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_OK
        if args.noun == "dovecot-config":
            args.args = rest
        if args.noun == "serve":
            return cmd_serve([args.server, *args.args], args.config)
        ctx = Context(args)
        return COMMANDS[args.noun](ctx)
    except UsageError as exc:
        return _fail(f"usage error: {exc}\n(try `vmailctl --help`)", EXIT_USAGE)
    except AccountsError as exc:
        return _fail(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_TEMPFAIL)
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - one clear line, never a traceback for the operator
        if os.environ.get("VMAILCTL_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_SOFTWARE)
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    raise SystemExit(main())
