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
import os
import sys
from typing import Any, NoReturn

from vdeliver.accounts import commands
from vdeliver.accounts.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    AccountsError,
    UsageError,
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


FROM_PROCMAILRC = """Convert the recipes of a procmailrc (FILE) into one Sieve script, printed on standard output.
Needs no database and no configuration; nothing is stored (`vmailctl sieve put` stores the result).

Converted: recipes `:0` with their flags (H, B, D, c as :copy, A, a, E; the lock `:` is
vdeliver's own business), header and body conditions in procmail's regular expressions
(`^TO_`, `^TO`, `^FROM_DAEMON`, `^FROM_MAILER` expanded as procmailrc(5) defines them), `!`,
`< N` and `> N`, `$` conditions over constant variables, `VAR ?? regex`, `\\/` into $MATCH;
folders (mbox file, Maildir `dir/`, MH `dir/.`, Maildir++ `.Name/`) named relative to MAILDIR,
/dev/null, `! address` forwards, nesting blocks, constant assignments, INCLUDERC and SWITCHRC.
Each delivering recipe ends with `stop`, as procmail stops after it, unless it has the c flag.

Not converted, each listed with its line and the reason: pipes to programs, filters (f, w),
scoring conditions (w^x), program conditions (`? cmd`), backquote assignments and what uses
them, patterns that do not name a header field (`^Field:`) or span header lines, h or b
alone on a delivery, e, c on a nesting block.  These are left out of the script; the list is
printed as comments at its top and on standard error.  docs/sieve.md ("Moving from
procmail") says which patterns convert exactly.

--json prints {"script": ..., "skipped": [{"line", "reason", "text"}], "converted": N,
"notes": [...]}; notes are the settings ignored on purpose (LOGFILE, VERBOSE, ...)."""

FROM_PROCMAILRC_EXIT = """exit codes:
  0   every recipe converted
  1   some recipes or lines were not converted (the script is still printed)
  2   usage error, or FILE cannot be read"""


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

    def sub(parent: Any, name: str, help_text: str, *positionals: str, json: bool = False) -> _Parser:
        """A subcommand with its positional arguments, written `name`, `name?`, `name+=METAVAR`
        or `name*=METAVAR`, and --json when scripts read its output."""
        sp: _Parser = parent.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES,
                                        formatter_class=argparse.RawDescriptionHelpFormatter)
        for spec in positionals:
            spec, _, metavar = spec.partition("=")
            nargs = spec[-1] if spec[-1] in "?+*" else None
            sp.add_argument(spec.rstrip("?+*"), nargs=nargs, metavar=metavar or None)
        if json:
            js(sp)
        return sp

    def verbs(name: str, help_text: str) -> Any:
        sp = sub(top, name, help_text)
        v = sp.add_subparsers(dest="verb", metavar="ACTION", parser_class=_Parser)
        v.required = True
        return v

    def js(sp: _Parser) -> None:
        sp.add_argument("--json", action="store_true", help="print JSON")

    d = verbs("domain", "hosted domains")
    sp = sub(d, "add", "add a hosted domain", "domain")
    sp.add_argument("--alias-of", metavar="DOMAIN", help="make it an alias domain: user@it goes to user@DOMAIN")
    sp = sub(d, "remove", "remove a domain", "domain")
    sp.add_argument("--force", action="store_true", help="also remove its mailboxes and aliases (mail stays on disk)")
    sub(d, "list", "list domains", json=True)
    sub(d, "show", "show one domain", "domain", json=True)

    u = verbs("user", "mailboxes")
    sp = sub(u, "add", "add a mailbox and create it on disk", "address")
    sp.add_argument("--format", choices=("maildir", "mbox"), help="mailbox format (default: the config's format)")
    sp.add_argument("--quota", type=_size, help="quota in bytes (K, M, G suffixes); Maildir++ for Maildir users")
    _password_options(sp, allow_none=True)
    sp.add_argument("--no-mailbox", action="store_true", help="do not create the mailbox on disk")
    sp = sub(u, "remove", "remove a mailbox (its mail stays on disk unless --remove-mail)", "address")
    sp.add_argument("--remove-mail", action="store_true",
                    help="move the mail aside to .removed-USER-TIME in its domain directory")
    sp.add_argument("--unlink", action="store_true", help="with --remove-mail: delete the mail instead")
    sub(u, "list", "list mailboxes", "domain?", json=True)
    sub(u, "show", "show one mailbox", "address", json=True)
    _password_options(sub(u, "passwd", "set a mailbox's password", "address"), allow_none=False)
    for verb, text in (("disable", "refuse mail for the mailbox (at RCPT time) and its logins"),
                       ("suspend", "keep mail arriving but refuse reading it (Dovecot shows the reason)")):
        sp = sub(u, verb, text, "address")
        sp.add_argument("--reason", default="", help="one line shown to the user or sender")
    for verb, text in (("enable", "undo disable"), ("unsuspend", "undo suspend")):
        sub(u, verb, text, "address")
    sp = sub(u, "quota", "set a mailbox's quota (0 = none)", "address")
    sp.add_argument("size", type=_size)

    a = verbs("alias", "addresses that deliver to other addresses")
    sub(a, "add", "add an alias (or more targets to one)", "address", "targets+=TARGET")
    sub(a, "remove", "remove an alias, or some of its targets", "address", "targets*=TARGET")
    sub(a, "list", "list aliases", "domain?", json=True)

    f = verbs("forward", "forward a mailbox's mail")
    sp = sub(f, "set", "forward a mailbox to one or more addresses (replaces any forward)", "address",
             "targets+=TARGET")
    sp.add_argument("--keep-copy", action="store_true", help="also deliver into the mailbox")
    sub(f, "clear", "stop forwarding", "address")

    c = verbs("catchall", "what a domain does with unknown addresses")
    sub(c, "set", "send unknown addresses of DOMAIN to TARGET", "domain", "target")
    sub(c, "clear", "refuse unknown addresses of DOMAIN again", "domain")

    m = verbs("maps", "sendmail maps")
    sp = sub(m, "build", "write the maps that changed and compile them with makemap", json=True)
    sp.add_argument("--reload", action="store_true",
                    help="SIGHUP the outgoing sendmail when a map it reads only at start-up changed")

    sub(top, "check", "compare database, maps and mailboxes on disk; exit 1 on any mismatch", json=True)

    sv = verbs("sieve", "a mailbox's Sieve scripts, where ManageSieve keeps them (<home>/sieve, .dovecot.sieve)")
    sub(sv, "list", "list the scripts; the active one is marked", "address", json=True)
    sub(sv, "get", "print a script", "address", "name")
    sub(sv, "put", "store a script (from FILE or standard input); refused unless it compiles", "address", "name",
        "file?")
    sub(sv, "activate", "make a script the active one", "address", "name")
    sub(sv, "deactivate", "leave the mailbox without an active script", "address")
    sub(sv, "delete", "delete a script (not the active one)", "address", "name")
    sub(sv, "check", "compile a script (default: the active one) and report every error with its line, and "
        "every folder it names that the mailbox's format cannot hold", "address", "name?", json=True)
    sp = sub(sv, "from-procmailrc", "convert a procmailrc into one Sieve script; list what cannot be converted",
             "file", json=True)
    sp.description = FROM_PROCMAILRC
    sp.epilog = FROM_PROCMAILRC_EXIT
    sp.add_argument("--home", metavar="DIR", help="$HOME as the rcfile sees it (default: the directory of FILE); "
                    "folders are named relative to MAILDIR, by default $HOME")

    db = verbs("db", "the accounts database itself")
    sp = sub(db, "grant-readonly", "let PostgreSQL ROLE (created if missing) read the accounts tables and "
             "nothing else: for Dovecot and the socketmap server ([accounts] readonly_dsn)", "roles+=ROLE")
    sp.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    sp = sub(db, "grant-tracking", "let PostgreSQL ROLE (created if missing) read and write the tracking table "
             "and nothing else: for deliveries ([tracking] dsn)", "roles+=ROLE")
    sp.add_argument("--sql", action="store_true", help="print the SQL instead of running it")
    sub(db, "purge-tracking", "remove the expired rows of the tracking store ([tracking]: Sieve duplicate, "
        "dedup_seconds, vacation replies); run it daily from cron", json=True)

    sp = sub(top, "doctor", "check the installation as sendmail, vdeliver and Dovecot see it; exit 1 on problems",
             json=True)
    sp.add_argument("--cf", action="append", metavar="FILE", help="a sendmail .cf (default: /etc/mail/sendmail_out.cf"
                    " and sendmail_in.cf)")
    sp.add_argument("--dovecot-dir", default="/etc/dovecot", metavar="DIR", help="Dovecot's configuration directory")

    i = verbs("import", "import a site running the paper's set-up")
    sp = sub(i, "users", "the paper's users table (username, password, userpart, domain, forward, alias_for)")
    src = sp.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", metavar="FILE", help="a CSV file with a header line")
    src.add_argument("--sqlite", metavar="FILE", help="a SQLite database")
    src.add_argument("--dsn", metavar="CONNINFO", help="a PostgreSQL connection string")
    sp.add_argument("--table", default="users", help="table name for --sqlite/--dsn (default users)")
    sp.add_argument("--plain-passwords", action="store_true", help="hash passwords that are plain text")
    for kind in ("virtusertable", "access"):
        sub(i, kind, f"a hand-written {kind} file", "file")
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
    sub(top, "webmail-config", "print (or write with --output DIR) Dovecot's ManageSieve service and Roundcube's "
        "configuration for webmail on these accounts; `vmailctl webmail-config --help` lists its options")
    return p


def _password_options(sp: _Parser, allow_none: bool) -> None:
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    if allow_none:
        g.add_argument("--no-password", action="store_true", help="no password: no login until `user passwd`")
    sp.add_argument("--scheme", choices=("ARGON2ID", "BLF-CRYPT"), help="password scheme (default from config)")


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


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"vmailctl: {message}\n")
    return code


def _passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `[-c FILE] dovecot-config|webmail-config WORDS...` so that WORDS reach the command untouched."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in ("-c", "--config"):
            i += 2
        elif word.startswith("--config=") or (word.startswith("-c") and len(word) > 2):
            i += 1
        else:
            break
    if i < len(argv) and argv[i] in ("dovecot-config", "webmail-config"):
        return argv[: i + 1], argv[i + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx: commands.Context | None = None
    try:
        head, rest = _passthrough(argv)
        try:
            args = build_parser().parse_args(head)
        except SystemExit as exc:  # --help / --version: argparse printed it
            return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_OK
        if args.noun in ("dovecot-config", "webmail-config"):
            args.args = rest
        if args.noun == "serve":
            return cmd_serve([args.server, *args.args], args.config)
        if args.noun == "sieve" and args.verb == "from-procmailrc":
            return commands.cmd_from_procmailrc(args)  # no configuration, no database
        ctx = commands.Context(args)
        return commands.COMMANDS[args.noun](ctx)
    except UsageError as exc:
        return _fail(f"usage error: {exc}\n(try `vmailctl --help`)", EXIT_USAGE)
    except AccountsError as exc:
        return _fail(f"error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_TEMPFAIL)
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as exc:  # one clear line, never a traceback for the operator
        if os.environ.get("VMAILCTL_DEBUG"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_SOFTWARE)
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    raise SystemExit(main())
