"""`vmailctl doctor`: check an installation the way sendmail, vdeliver and Dovecot will see it.

Each check reads what the running programs read (the compiled .cf, the map files' owners and
modes, vdeliver's configuration, Dovecot's files) and reports every problem with its fix, the
things a first set-up got wrong by hand (issue 15):

- the vdeliver mailer line sendmail runs (P=, U=, F=, A= of `Mprocmail`): sendmail execs P=
  with argv[0] exactly as A= writes it and an EMPTY environment, so the mailer is started
  that way, as the U= user, and must print its version;
- the map, class and alias files the .cf names, judged as sendmail judges them when it runs
  as root: owned by root or TrustedUser (else readable by all), not group- or world-writable,
  in directories that are not group- or world-writable either; an alias file needs its .db;
- the mailbox base directories and the accounts database directory, owned by the vmail user;
- the LMTP mailer's socket and the [lmtp] user the server needs when started as root;
- Dovecot's files equal to what `vmailctl dovecot-config` generates.

Nothing is changed.  Exit 0 when every check passed, 1 with the list of problems.
Not on the delivery path: it may import what it likes.

Over 400 lines on purpose: one check per thing an administrator gets wrong on the first day,
each short and independent; splitting them would scatter one checklist.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CF = ("/etc/mail/sendmail_out.cf", "/etc/mail/sendmail_in.cf")
DEFAULT_DOVECOT = "/etc/dovecot"
VERSION_TIMEOUT = 20  # seconds for the mailer to print its version
# Map classes whose last argument is a file sendmail opens (hash and btree add .db).
FILE_MAPS = {"hash": ".db", "btree": ".db", "dbm": ".pag", "text": "", "cdb": ".cdb"}


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)

    def ok(self, what: str) -> None:
        self.checked.append(what)

    def bad(self, what: str, problem: str, fix: str) -> None:
        self.problems.append({"check": what, "problem": problem, "fix": fix})


@dataclass
class Cf:
    path: str
    options: dict[str, str] = field(default_factory=dict)
    mailers: dict[str, dict[str, str]] = field(default_factory=dict)
    maps: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (name, class, args)
    classes: list[tuple[str, str]] = field(default_factory=list)  # (class, file spec)


def parse_cf(path: str) -> Cf:
    """The parts of a compiled sendmail.cf the checks need."""
    with open(path, encoding="latin-1") as f:
        raw = f.read().split("\n")
    lines: list[str] = []
    for line in raw:  # sendmail joins a line starting with white space to the one before
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    cf = Cf(path)
    for line in lines:
        if line.startswith("O ") and "=" in line:
            key, _, value = line[2:].partition("=")
            cf.options[key.strip()] = value.strip()
        elif line.startswith("M") and "," in line:
            name, _, rest = line[1:].partition(",")
            fields = re.split(r",\s*(?=[A-Z]=)", rest.strip())
            cf.mailers[name] = {k: v.strip() for k, _, v in (x.partition("=") for x in fields) if v}
        elif line.startswith("K") and " " in line:
            name, mclass, *args = line[1:].split()
            cf.maps.append((name, mclass, args))
        elif line.startswith("F") and len(line) > 1:
            if line[1] == "{":
                name, _, spec = line[2:].partition("}")
            else:
                name, spec = line[1], line[2:]
            cf.classes.append((name, spec.strip()))
    return cf


# -- sendmail's file safety -------------------------------------------------------------------


def _uid(name: str) -> int | None:
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name.split(":")[0]).pw_uid
    except KeyError:
        return None


def unsafe_reason(path: str, trusted: int | None) -> str | None:
    """Why sendmail (running as root) would refuse to read `path`, or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_uid not in (0, trusted) and not st.st_mode & stat.S_IROTH:
        owner = _name(st.st_uid)
        return (f"is owned by {owner} (mode {stat.S_IMODE(st.st_mode):04o}), neither root nor TrustedUser"
                f" ({_name(trusted) if trusted is not None else 'not set'})")
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        dst = os.stat(directory)
        if dst.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"lies in {directory}, which is group- or world-writable (mode {stat.S_IMODE(dst.st_mode):04o})"
        if directory == "/":
            return None
        directory = os.path.dirname(directory)


def _name(uid: int | None) -> str:
    if uid is None:
        return "nobody"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _map_fix(path: str, trusted: int | None) -> str:
    if trusted is None:
        return (f"add define(`confTRUSTED_USER', `smmta')dnl after OSTYPE in the .mc and recompile it"
                f" (Debian's makemap makes {path} smmta's), or chown root {path}")
    return f"chown {_name(trusted)} {path}; chmod 0640 {path}; chmod go-w {os.path.dirname(path)}"


def check_files(cf: Cf, report: Report) -> None:
    trusted = _uid(cf.options.get("TrustedUser", ""))
    for name, mclass, args in cf.maps:
        if mclass == "socket":
            _check_socket(f"{cf.path}: map {name}", args[-1] if args else "", report)
            continue
        if mclass not in FILE_MAPS or not args or not args[-1].startswith("/"):
            continue
        optional = "-o" in args
        path = args[-1] + FILE_MAPS[mclass]
        what = f"{cf.path}: map {name} ({path})"
        reason = unsafe_reason(path, trusted)
        if reason == "does not exist" and optional:
            report.ok(what + " optional, absent")
        elif reason:
            fix = (f"build it: makemap {mclass} {args[-1]} < {args[-1]} (or vmailctl maps build)"
                   if reason == "does not exist" else _map_fix(path, trusted))
            report.bad(what, f"{path} {reason}: sendmail ignores the map as unsafe", fix)
        else:
            report.ok(what)
    for name, spec in cf.classes:
        if "@" in spec:  # a class from a map (socket): checked with its map
            continue
        words = spec.split()
        optional = bool(words) and words[0] == "-o"
        path = words[1] if optional and len(words) > 1 else (words[0] if words else "")
        if not path.startswith("/"):
            continue
        what = f"{cf.path}: class {name} ({path})"
        reason = unsafe_reason(path, trusted)
        if reason == "does not exist" and optional:
            report.ok(what + " optional, absent")
        elif reason == "does not exist":
            report.bad(what, f"{path} does not exist: sendmail refuses to start",
                       f"create it (vmailctl maps build writes {os.path.basename(path)})")
        elif reason:
            report.bad(what, f"{path} {reason}: sendmail ignores it as unsafe", _map_fix(path, trusted))
        else:
            report.ok(what)
    for spec in filter(None, cf.options.get("AliasFile", "").split(",")):
        spec = spec.strip()
        if spec.startswith("socket:"):
            _check_socket(f"{cf.path}: alias map", spec.split()[-1], report)
            continue
        path = spec.split(":", 1)[1] if ":" in spec.split("/", 1)[0] else spec
        what = f"{cf.path}: alias file {path}"
        if not os.path.exists(path):
            built = "vmailctl maps build" if path.endswith("vdeliver-aliases") else f"touch {path}"
            report.bad(what, f"{path} does not exist: sendmail -bi fails and aliases are not read",
                       f"{built}, then sendmail -C {cf.path} -bi")
            continue
        reason = unsafe_reason(path + ".db", trusted)
        if reason == "does not exist":
            report.bad(what, f"{path}.db does not exist", f"sendmail -C {cf.path} -bi")
        elif reason:
            report.bad(what, f"{path}.db {reason}: sendmail ignores it as unsafe", _map_fix(path + ".db", trusted))
        else:
            report.ok(what)


def _check_socket(what: str, spec: str, report: Report, server: str = "socketmap") -> None:
    if not spec.startswith("unix:"):
        return
    path = spec[5:]
    try:
        is_sock = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_sock = False
    if is_sock:
        report.ok(f"{what} ({path})")
    else:
        consequence = "sendmail defers every delivery" if server == "lmtp" else "sendmail defers every lookup"
        report.bad(f"{what} ({path})", f"no socket at {path}: {consequence}",
                   f"start vdeliver-{server}d before sendmail (docs/{server}.md)")


# -- the mailer line --------------------------------------------------------------------------


def check_mailer(cf: Cf, report: Report) -> str | None:
    """Check the vdeliver mailer; return the user it runs as (U=), if any."""
    m = cf.mailers.get("procmail")
    if m is None or "vdeliver" not in m.get("A", "") + m.get("P", ""):
        return None
    what = f"{cf.path}: mailer procmail"
    prog, args = m.get("P", ""), m.get("A", "").split()
    user = m.get("U", "")
    flags = m.get("F", "")
    if "m" in flags:
        report.bad(what, f"flag m in F={flags}: one run would get recipients of several domains",
                   "remove m from PROCMAIL_MAILER_FLAGS (use `l0`)")
    if not args or "/" not in prog:
        report.bad(what, f"P={prog} A={' '.join(args)} is not a program path", "see docs/sendmail.md")
        return user
    if os.path.basename(prog).startswith("python") and not args[0].startswith("/"):
        report.bad(what, f"argv[0] is {args[0]!r}: sendmail passes it as written with an empty environment,"
                   " so the venv's python cannot find its venv and every message bounces",
                   "use the launcher: python -m vdeliver.launcher /usr/local/libexec/vdeliver, and"
                   " PROCMAIL_MAILER_PATH `/usr/local/libexec/vdeliver, U=vmail:vmail',"
                   " PROCMAIL_MAILER_ARGS `vdeliver -t -Y -a $h -a $u'")
        return user
    cut = next((i for i, a in enumerate(args) if a in ("-t", "-Y", "-a", "-d", "-c") or "$" in a), len(args))
    argv = [*args[:cut], "--version"]
    problem = run_as(prog, argv, user)
    if problem:
        report.bad(what, f"{prog} run as sendmail runs it ({' '.join(argv)}, user {user or 'root'},"
                   f" empty environment): {problem}",
                   f"rewrite the launcher: /opt/vdeliver/bin/python -m vdeliver.launcher {prog}"
                   if "libexec" in prog or not os.path.basename(prog).startswith("python")
                   else "reinstall the venv with /usr/bin/python3 -m venv and pip install")
    else:
        report.ok(f"{what}: {prog} starts vdeliver as {user or 'root'} with an empty environment")
    return user


def run_as(prog: str, argv: list[str], user: str) -> str | None:
    """Run prog as sendmail would (argv as given, empty environment, as `user`); None if fine."""
    if not os.path.exists(prog):
        return f"{prog} does not exist (sendmail bounces every message)"
    if not os.access(prog, os.X_OK):
        return f"{prog} is not executable"
    ids: dict[str, Any] = {}
    if user and os.geteuid() == 0:
        name, _, group = user.partition(":")
        try:
            pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        except KeyError:
            return f"no such user {name!r} (U= in the mailer line)"
        ids = {"user": pw.pw_uid, "group": group or pw.pw_gid, "extra_groups": []}
    try:
        r = subprocess.run(argv, executable=prog, env={}, cwd="/", stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=VERSION_TIMEOUT, **ids)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run: {exc}"
    if r.returncode != 0:
        err = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
        return f"exit {r.returncode}: {err[-1] if err else 'no output'}"
    return None


# -- vdeliver's side --------------------------------------------------------------------------


def _base(template: str) -> str:
    return os.path.dirname(template.split("{", 1)[0].rstrip("/") + "/") if "{" in template else template


def check_dirs(cfg: Any, settings: Any, owner: str, report: Report) -> None:
    user = (owner or cfg.user or settings.vmail_user).split(":")[0]
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        report.bad("vmail user", f"no user {user!r}",
                   f"useradd --system --user-group --home-dir /nonexistent --shell /usr/sbin/nologin {user}")
        return
    bases = [_base(cfg.mbox_path), _base(cfg.maildir_path)]
    for base in dict.fromkeys(bases):
        try:
            st = os.stat(base)
        except FileNotFoundError:
            if base == _base(cfg.mbox_path if cfg.format == "mbox" else cfg.maildir_path):
                report.bad(f"mailbox directory {base}", f"{base} does not exist",
                           f"install -d -o {user} -g {user} -m 0700 {base}")
            continue
        if st.st_uid != uid:
            report.bad(f"mailbox directory {base}", f"{base} is owned by {_name(st.st_uid)}, not {user}",
                       f"chown {user}:{user} {base}")
        else:
            report.ok(f"mailbox directory {base}")
    if not settings.dsn:
        directory = os.path.dirname(settings.database)
        if os.path.isdir(directory):
            report.ok(f"accounts database directory {directory}")
        else:
            report.bad("accounts database", f"{directory} does not exist (vmailctl cannot create its database)",
                       f"install -d -m 0700 {directory}")


def check_lmtp(cf: Cf, cfg: Any, report: Report) -> None:
    m = cf.mailers.get("vdlmtp") or next((v for v in cf.mailers.values() if "z" in v.get("F", "")
                                          and v.get("A", "").startswith("FILE ")), None)
    if m is None:
        return
    sock = m["A"].split()[-1]
    table = cfg.table("lmtp")
    if not (table.get("user") or cfg.user):
        report.bad(f"{cfg.path or 'configuration'}: [lmtp] user",
                   "not set: vdeliver-lmtpd started as root refuses to deliver",
                   f"add [lmtp] user = \"vmail\" to {cfg.path or '/etc/vdeliver.toml'}")
    else:
        report.ok("[lmtp] user")
    if table.get("socket", "/run/vdeliver/lmtp.sock") != sock:
        report.bad(f"{cf.path}: LMTP socket", f"the mailer connects to {sock}, [lmtp] socket is "
                   f"{table.get('socket', '/run/vdeliver/lmtp.sock')}", "make them the same path")
    _check_socket(f"{cf.path}: LMTP server", "unix:" + sock, report, server="lmtp")


def check_dovecot(cfg: Any, directory: str, report: Report) -> None:
    if not os.path.isdir(directory):
        return
    from vdeliver.accounts import dovecot

    try:
        files = dovecot.render_files(cfg)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the other checks still count
        report.bad("Dovecot", f"cannot generate its configuration: {exc}", "fix the [accounts]/[dovecot] settings")
        return
    if not os.path.exists(os.path.join(directory, "conf.d", "90-vdeliver.conf")):
        # Not set up yet (sendmail first, Dovecot later): a note, not a problem.
        report.ok(f"Dovecot in {directory}: not configured for vdeliver yet (vmailctl dovecot-config -o {directory})")
        return
    for name, text in files.items():
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                same = f.read() == text
        except FileNotFoundError:
            report.bad(f"Dovecot {path}", f"{path} does not exist", f"vmailctl dovecot-config -o {directory}")
            continue
        if same:
            report.ok(f"Dovecot {path}")
        else:
            report.bad(f"Dovecot {path}", f"{path} differs from what vmailctl generates for this configuration",
                       f"vmailctl dovecot-config -o {directory}")


# -- the command ------------------------------------------------------------------------------


def run(cfg: Any, settings: Any, cf_paths: list[str] | None = None, dovecot_dir: str = DEFAULT_DOVECOT) -> Report:
    report = Report()
    explicit = bool(cf_paths)
    owner = ""
    for path in cf_paths or list(DEFAULT_CF):
        try:
            cf = parse_cf(path)
        except FileNotFoundError:
            if explicit or path == DEFAULT_CF[0]:
                report.bad(path, f"{path} does not exist", "compile it: m4 sendmail_out.mc > sendmail_out.cf"
                           " (docs/sendmail.md, step 3)")
            continue
        except OSError as exc:
            report.bad(path, f"cannot read {path}: {exc.strerror}", f"check {path}")
            continue
        owner = check_mailer(cf, report) or owner
        check_files(cf, report)
        check_lmtp(cf, cfg, report)
    check_dirs(cfg, settings, owner, report)
    check_dovecot(cfg, dovecot_dir, report)
    return report


def text(report: Report) -> str:
    lines = [f"problem: {p['problem']}\n    fix: {p['fix']}" for p in report.problems]
    if report.problems:
        lines.append(f"{len(report.problems)} problem(s), {len(report.checked)} check(s) passed")
    else:
        lines.append(f"ok: {len(report.checked)} check(s) passed")
    return "\n".join(lines)
