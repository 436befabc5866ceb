"""The commands of vmailctl, one function per noun, each given the parsed arguments.

vmailctl.py owns the parser, the exit codes and the front doors (`serve`); this module
does the work, in one database transaction per command, through the store.  Output is
a table or key/value lines for people and `--json` for scripts.

Over 400 lines on purpose: one short function per vmailctl noun, side by side, so that every
command's transaction and output can be compared at a glance.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any

from vdeliver.accounts.errors import (
    EXIT_ERROR,
    EXIT_OK,
    AccountsError,
    Conflict,
    InvalidName,
    TemporaryError,
    UsageError,
)


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
            from vdeliver.accounts.engines import open_store

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

    if ctx.args.verb == "purge-tracking":
        return _purge_tracking(ctx)

    roles = ctx.args.roles
    for role in roles:
        if not role or len(role) > 63 or not (role[0].isascii() and (role[0].isalpha() or role[0] == "_")) \
                or not all(c.isascii() and (c.isalnum() or c == "_") for c in role) or role != role.lower():
            raise UsageError(f"invalid role name {role[:80]!r} (lower-case letters, digits and _)")
    grants = schema.tracking_grants if ctx.args.verb == "grant-tracking" else schema.readonly_grants
    statements = [st for role in roles for st in grants(role)]
    if ctx.args.sql:
        print(";\n".join(statements) + ";")
        return EXIT_OK
    if ctx.settings.backend != "postgresql":
        raise UsageError(f"db {ctx.args.verb} needs PostgreSQL ([accounts] dsn); SQLite has no roles: "
                         "give the readers' group (or, for tracking, the vmail user) the file instead")
    store = ctx.store
    with store.transaction():
        for st in statements:
            store.execute(st)
    what = "read and write access to the tracking table" if ctx.args.verb == "grant-tracking" else \
        "read-only access to the accounts tables"
    print(f"granted {what}: {', '.join(roles)}")
    return EXIT_OK


def _purge_tracking(ctx: Context) -> int:
    from vdeliver.config import ConfigError
    from vdeliver.tracking import Tracker, TrackingError

    try:
        tracker = Tracker.from_config(ctx.cfg)
        removed = tracker.purge()
        tracker.close()
    except ConfigError as exc:
        raise UsageError(f"{exc.where}: {exc.message}") from None
    except TrackingError as exc:
        raise TemporaryError(f"tracking store: {exc}") from None
    if ctx.args.json:
        print(json.dumps({"removed": removed}))
    else:
        print(f"removed {removed} expired tracking rows")
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
        lines = [(f"{'would import' if d['dry_run'] else 'imported'}: {len(d['domains'])} domain(s), "
                 f"{len(d['mailboxes'])} mailbox(es), {d['aliases']} alias(es), {d['forwards']} forward(s), "
                 f"{d['disabled']} disabled")]
        lines += [f"not mapped: {u}" for u in d["unmapped"]]
        return "\n".join(lines)

    _emit(a, rep, text_out)
    return EXIT_OK


class _DryRun(Exception):
    """Raised inside the transaction to roll a --dry-run back."""


def cmd_dovecot(ctx: Context) -> int:
    import importlib

    name, what = ("webmail", "webmail") if ctx.args.noun == "webmail-config" else ("dovecot", "Dovecot")
    try:
        mod = importlib.import_module(f"vdeliver.accounts.{name}")
    except ModuleNotFoundError as exc:
        if not exc.name or f"vdeliver.accounts.{name}".startswith(exc.name):
            raise AccountsError(f"the {what} configuration generator is not installed "
                                f"(vdeliver.accounts.{name} is missing)") from None
        raise
    result = mod.render(ctx.cfg, list(ctx.args.args))
    if isinstance(result, str):
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
        return EXIT_OK
    return int(result or 0)


def cmd_sieve(ctx: Context) -> int:
    from vdeliver.accounts import mailboxes, sievescripts
    from vdeliver.unixd import as_user

    a = ctx.args
    user, dom = _addr(a.address)
    with ctx.store.transaction(write=False):
        fmt = str(ctx.store.user(user, dom)["format"])  # the mailbox must exist
    lay = sievescripts.layout(ctx.cfg, user, dom)
    who = mailboxes.owner(ctx.settings)
    text = b""
    if a.verb == "put":
        if a.file:
            with open(a.file, "rb") as f:
                text = f.read((1 << 20) + 1)
        else:
            stdin = getattr(sys.stdin, "buffer", None)
            text = stdin.read((1 << 20) + 1) if stdin is not None else sys.stdin.read().encode()
    # With vmail's ids, not root's: vmail owns the home and everything below it.
    with as_user(who.uid, who.gid):
        if a.verb == "list":
            rows = [{"name": n, "active": act} for n, act in sievescripts.scripts(lay)]
            _emit(a, rows, lambda r: "\n".join(f"{x['name']}{'  (active)' if x['active'] else ''}" for x in r))
        elif a.verb == "get":
            data = sievescripts.read(lay, a.name)
            stdout = getattr(sys.stdout, "buffer", None)
            if stdout is not None:
                sys.stdout.flush()
                stdout.write(data)
            else:
                sys.stdout.write(data.decode("utf-8", "replace"))
        elif a.verb == "put":
            for line, message in sievescripts.put(lay, a.name, text, fmt):
                sys.stderr.write(f"vmailctl: warning: line {line}: {message}\n")
            print(f"stored {a.name} for {user}@{dom}")
        elif a.verb == "activate":
            sievescripts.activate(lay, a.name)
            print(f"{a.name} is now active for {user}@{dom}")
        elif a.verb == "deactivate":
            print("deactivated" if sievescripts.deactivate(lay) else "no script was active")
        elif a.verb == "delete":
            sievescripts.delete(lay, a.name)
            print(f"deleted {a.name}")
        else:  # check
            errors = sievescripts.check(lay, a.name, fmt)
            _emit(a, {"ok": not errors, "errors": [{"line": n, "message": m} for n, m in errors]},
                  lambda d: "\n".join(f"line {e['line']}: {e['message']}" for e in d["errors"]) or "ok")
            return EXIT_ERROR if errors else EXIT_OK
    return EXIT_OK


def cmd_from_procmailrc(args: argparse.Namespace) -> int:
    """`vmailctl sieve from-procmailrc FILE`: the Sieve on stdout, what was left out on stderr."""
    from vdeliver.accounts import procmailrc
    from vdeliver.accounts.errors import EXIT_USAGE

    try:
        result = procmailrc.convert_file(args.file, home=args.home)
    except procmailrc.ProcmailrcError as exc:
        sys.stderr.write(f"vmailctl: error: {exc}\n")
        return EXIT_USAGE
    if args.json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(result.script)
        sys.stdout.flush()
        for s in result.skipped:
            where = f"{s.file}: " if s.file else f"{args.file}: "
            sys.stderr.write(f"vmailctl: {where}line {s.line}: not converted: {s.reason}\n")
    return EXIT_ERROR if result.skipped else EXIT_OK


def cmd_doctor(ctx: Context) -> int:
    from vdeliver.accounts import doctor

    report = doctor.run(ctx.cfg, ctx.settings, ctx.args.cf, ctx.args.dovecot_dir)
    _emit(ctx.args, {"ok": not report.problems, "problems": report.problems, "checked": report.checked},
          lambda _d: doctor.text(report))
    return EXIT_ERROR if report.problems else EXIT_OK


COMMANDS: dict[str, Callable[[Context], int]] = {
    "domain": cmd_domain, "user": cmd_user, "alias": cmd_alias, "forward": cmd_forward,
    "catchall": cmd_catchall, "maps": cmd_maps, "check": cmd_check, "import": cmd_import,
    "dovecot-config": cmd_dovecot, "webmail-config": cmd_dovecot, "db": cmd_db, "doctor": cmd_doctor,
    "sieve": cmd_sieve,
}
