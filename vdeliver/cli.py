"""`vdeliver`: the command sendmail runs as its procmail mailer.  The only place that exits.

sendmail retries only on exit 75/74/71 and bounces everything else, so every path
out of here goes through errors.exit_code(): a usage error, a configuration fault
or a bug defers (75); only an unknown recipient, a loop or an over-size message
bounces.  argv is parsed by hand, procmail-style, because argparse exits 2 on its
own and costs more to import than a delivery takes.

Over 400 lines on purpose: the procmail-compatible argument parser, the help text and the
one place that turns a status into an exit code belong together; the rest of the core never
exits.
"""

import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py
import sys
import time

from vdeliver import __version__
from vdeliver.errors import EX_OK, EX_TEMPFAIL, DeliveryError, Status

TYPE_CHECKING = False  # typing costs an import on the hot path; mypy knows this name
if TYPE_CHECKING:
    from vdeliver.config import Config

HELP = """\
NAME
    vdeliver - local delivery agent for virtual mail domains on sendmail

SYNOPSIS
    vdeliver [-tYpo] [-f SENDER] [-c CONFIG] -a DOMAIN -a USER  < message
    vdeliver [-tYpo] [-f SENDER] [-c CONFIG] -d USER@DOMAIN    < message
    vdeliver [-c CONFIG] --dry-run -a DOMAIN -a USER
    vdeliver [-c CONFIG] --repair MBOX...
    vdeliver sieve-test [--json] [-f SENDER] [-r RECIPIENT] SCRIPT [MESSAGE]
    vdeliver --version | --help

DESCRIPTION
    Delivers one message from standard input into the mailbox of one virtual
    user: an mbox (default /var/spool/vbox/DOMAIN/USER) or a Maildir (default
    /home/vmail-users/DOMAIN/USER/Maildir), whichever exists, under the dotlock
    and fcntl locks that procmail, mutt, Dovecot and Postfix use.  The write is
    fsynced, and rolled back on any error: the mailbox is either unchanged or
    holds the whole message.

    sendmail runs it from the procmail mailer as `vdeliver -t -Y -a $h -a $u`.
    DOMAIN may be given as away.com, <away.com>, away.com.virtuser or
    away.com.virtuser.; USER as fred, fred@host, fred@away.com or
    <fred@away.com>.  user+detail delivers to user (or to its .detail Maildir
    folder with detail_folders = true).

OPTIONS
    -a ARG          first: the domain ($h); second: the user ($u)
    -d USER@DOMAIN  the recipient as one argument (with one -a, -a is the domain)
    -f SENDER       envelope sender; default: the leading "From " line
    -c CONFIG       configuration file (default $VDELIVER_CONFIG, then
                    /etc/vdeliver.toml; a missing default file means defaults)
    --dry-run       print the format and path of the mailbox and exit
    --repair MBOX...
                    take each mbox's locks and undo what an interrupted
                    delivery left (see CRASH SAFETY) and tidy temporary lock
                    files of dead processes; exit 0 when there was
                    nothing to do or it was repaired, 75 when one needs a look
                    (an unresolved journal, or one vdeliver did not write,
                    which is moved aside as .untrusted.lock, never acted upon)
    -t -Y -p -o     accepted for procmail compatibility; no effect
    --version       print the version
    --help          print this text

EXIT STATUS
    0   delivered
    67  unknown user or domain (bounce, 5.1.1)
    69  mail loop or message too big (bounce, 5.4.6 / 5.3.4)
    73  mailbox full, only with over_quota = "bounce" (5.2.2)
    75  anything else: locked mailbox, full disk, bad arguments, configuration
        or permission fault, internal error (sendmail keeps the message and
        tries again)

CRASH SAFETY
    Before appending to an mbox, vdeliver records in .MBOX.vdeliver-journal.lock
    beside it (a 4 KiB file made once and kept; Dovecot never lists *.lock as
    a folder) the original size, intended end and file identity, synced; after
    the append it marks the record idle.  A delivery killed in the middle
    leaves the record busy; the next delivery or --repair cuts the mbox back to
    its last complete message and logs what it cut.  Bytes another program
    wrote after the crash are never cut: then the journal is kept as
    .MBOX.vdeliver-journal.unresolved.lock and the log says why.  Files left in
    a Maildir's tmp/ are removed once older than maildir_tmp_max_age (36 hours).

FILES
    /etc/vdeliver.toml   configuration (TOML; see the README for every key)

LOGGING
    One line per delivery to syslog (facility mail), Postfix style:
    to=<fred@away.com>, sender=<a@b.org>, size=N, delay=S, dsn=2.0.0,
    status=sent (mbox /var/spool/vbox/away.com/fred)
"""


class UsageError(DeliveryError):
    def __init__(self, detail: str) -> None:
        super().__init__(Status("4.3.5", "usage error", detail))


class Args:
    __slots__ = ("a", "d", "sender", "config", "dry_run", "action", "paths")

    def __init__(self) -> None:
        self.a: list[str] = []
        self.d: str | None = None
        self.sender: str | None = None
        self.config: str | None = None
        self.dry_run = False
        self.action = "deliver"
        self.paths: list[str] = []


_NOOP_FLAGS = "tYpo"
_VALUE_FLAGS = "afdc"


def parse_args(argv: "list[str]") -> Args:
    """procmail-style options; raises UsageError (exit 75), never exits."""
    args = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name == "--help" and not eq:
                args.action = "help"
            elif name == "--version" and not eq:
                args.action = "version"
            elif name == "--dry-run" and not eq:
                args.dry_run = True
            elif name == "--repair" and not eq:
                args.action = "repair"
            elif name == "--config":
                if not eq:
                    if i >= len(argv):
                        raise UsageError("--config needs a file")
                    value = argv[i]
                    i += 1
                args.config = value
            else:
                raise UsageError(f"unknown option {arg[:40]!r}")
            continue
        if not arg.startswith("-"):
            args.paths.append(arg)
            continue
        if arg == "-":
            raise UsageError(f"unexpected argument {arg[:40]!r}")
        j = 1
        while j < len(arg):
            flag = arg[j]
            j += 1
            if flag in _NOOP_FLAGS:
                continue
            if flag not in _VALUE_FLAGS:
                raise UsageError(f"unknown option -{flag}")
            if j < len(arg):
                value = arg[j:]
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise UsageError(f"option -{flag} needs a value")
            if flag == "a":
                args.a.append(value)
            elif flag == "d":
                if args.d is not None:
                    raise UsageError("-d given twice")
                args.d = value
            elif flag == "f":
                args.sender = value
            else:
                args.config = value
            break
    if args.action == "repair":
        if not args.paths:
            raise UsageError("--repair needs at least one mbox path")
        return args
    if args.paths:
        raise UsageError(f"unexpected argument {args.paths[0][:40]!r}")
    if args.action != "deliver":
        return args
    if args.d is not None:
        if len(args.a) > 1:
            raise UsageError("-d takes at most one -a (the domain)")
    elif len(args.a) != 2:
        raise UsageError(f"need -a DOMAIN -a USER or -d USER@DOMAIN (got {len(args.a)} -a)")
    return args


def _drain(fd: int = 0) -> None:
    """Read what sendmail still wants to write, so it does not die on a closed pipe."""
    try:
        if os.isatty(fd):
            return
        while os.read(fd, 1 << 16):
            pass
    except OSError:
        pass


def run() -> None:
    """Console entry point: deliver, then leave without interpreter shutdown.

    Everything is written, fsynced and logged when main() returns; tearing the
    interpreter down costs 5-15 ms more, and a kill in that window would make
    sendmail deliver a completed message again.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _drop_root(cfg: "Config", doing: str) -> None:
    """As root, become the configured user; without one, refuse (a configuration fault)."""
    if os.geteuid() != 0:
        return
    user = getattr(cfg, "user", "")
    if not user:
        raise DeliveryError(
            Status("4.3.5", "configuration error", f"refusing to {doing} as root: set user in the configuration")
        )
    from vdeliver import privileges  # only as root: sendmail's U= normally starts us as the vmail user

    try:
        privileges.drop_privileges(privileges.RunUser(user, getattr(cfg, "group", "")))
    except privileges.DaemonError as exc:
        raise DeliveryError(Status("4.3.5", "configuration error", exc.strerror or str(exc))) from None


_STDIN_CLOSED = False


def _standard_streams() -> None:
    """Give closed descriptors 0, 1 and 2 /dev/null, before anything else opens a file.

    sendmail may run a mailer so.  Left closed, the next open (syslog's socket, a
    mailbox) would take the number: a drain of "stdin" would then read the syslog
    socket for ever, and a message line written to "stderr" would land in a mailbox.
    Python also leaves sys.stdin/stdout/stderr as None then."""
    global _STDIN_CLOSED
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if fd == 0:
                _STDIN_CLOSED = True
            try:
                got = os.open("/dev/null", os.O_RDWR)
            except OSError:
                return
            if got != fd:  # cannot happen while fd is the lowest free one; never keep a stray
                os.close(got)
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            try:
                # The new sys.stdin/stdout/stderr: it stays open, no context manager.
                stream = open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
                setattr(sys, name, stream)
            except OSError:
                pass


def main(argv: "list[str] | None" = None) -> int:
    started = time.time()
    from vdeliver.fileio import getenv

    phases = getenv("VDELIVER_PHASES") is not None
    if phases:  # the phase timer (docs/benchmarks.md)
        from vdeliver.log import start_phases

        start_phases()
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["sieve-test"]:  # a tool for people, not a delivery: its own exit codes
        from vdeliver.sieve.tool import main as sieve_test

        return sieve_test(args[1:])
    try:
        _standard_streams()
        code = _main(args, started)
        if phases:
            _phases_report()
        return code
    except KeyboardInterrupt:
        _say(Status("4.3.0", "interrupted"))
        return EX_TEMPFAIL
    except BaseException as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else EX_TEMPFAIL
            return code if code in (EX_OK, EX_TEMPFAIL) else EX_TEMPFAIL
        where = ""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            where = f" at {tb.tb_frame.f_code.co_filename.rpartition('/')[2]}:{tb.tb_lineno}"
        status = Status("4.3.0", "internal error", f"{type(exc).__name__}: {exc}{where}")
        _say(status)
        try:
            from vdeliver.log import Logger

            Logger().error(f"internal error: {status.detail}")
        except Exception:  # noqa: BLE001
            pass
        _drain()
        return EX_TEMPFAIL


def _phases_report() -> None:
    from vdeliver.log import phase, phases_line

    phase("log")
    try:
        sys.stderr.write(f"vdeliver: {phases_line()}\n")
    except Exception:  # noqa: BLE001 - a measurement never changes the outcome
        pass


def _say(status: Status) -> None:
    """The one line sendmail puts into the DSN: printable, never raises."""
    try:
        from vdeliver.log import escape

        sys.stderr.write(f"vdeliver: {escape(status.text())}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or broken stderr must not change the outcome
        pass


def _repair(args: Args) -> int:
    """`--repair MBOX...`: one line per mbox on stdout; 0 when all are in order."""
    from vdeliver import config as config_mod
    from vdeliver import recovery
    from vdeliver.log import Logger

    try:
        cfg = config_mod.load(args.config)
        _drop_root(cfg, "repair")
    except DeliveryError as exc:
        _say(exc.status)
        return EX_TEMPFAIL
    logger = Logger("vdeliver", cfg.syslog_facility, cfg.log)
    code = EX_OK
    for path in args.paths:
        try:
            outcome, text = recovery.repair(
                path, host=cfg.host(), lock_timeout=cfg.lock_timeout, stale_age=cfg.stale_lock_age, log=logger,
                group=config_mod.group_journal(cfg),
            )
        except DeliveryError as exc:
            outcome, text = "error", f"{path}: {exc.status.reason}: {exc.status.detail}"
        if outcome in ("error", recovery.UNRESOLVED_STATE, recovery.UNTRUSTED):  # a forged journal needs a look
            code = EX_TEMPFAIL
        sys.stdout.write(f"{outcome}: {text}\n")
    sys.stdout.flush()
    return code


def _main(argv: "list[str]", started: float) -> int:
    import _signal  # type: ignore[import-not-found]  # not `signal`: that one imports enum, which costs more than a delivery

    # A write past RLIMIT_FSIZE must fail with EFBIG (and be rolled back), not kill us.
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    from vdeliver import config as config_mod
    from vdeliver.log import Logger, delivery_line, phase

    try:
        args = parse_args(argv)
    except DeliveryError as exc:
        _say(exc.status)
        _drain()
        return exc.status.exit_code()
    if args.action == "help":
        sys.stdout.write(HELP)
        return EX_OK
    if args.action == "version":
        sys.stdout.write(f"vdeliver {__version__}\n")
        return EX_OK
    if args.action == "repair":
        return _repair(args)

    logger: Logger | None = None
    to = args.d or "@".join(args.a[::-1])
    sender = args.sender
    try:
        phase("imports")
        cfg = config_mod.load(args.config, cache=True)
        phase("config")
        logger = Logger("vdeliver", cfg.syslog_facility, cfg.log)
        _drop_root(cfg, "deliver")
        from vdeliver import recipient

        domain_arg = args.a[0] if args.a else None  # -d USER@DOMAIN alone: the domain is in USER
        user_arg = args.d if args.d is not None else args.a[1]
        rcpt = recipient.parse(
            domain_arg, user_arg, keep_case=cfg.keep_user_case, delimiter=cfg.recipient_delimiter
        )
        to = rcpt.address
        from vdeliver.deliver import deliver, resolve

        target = resolve(cfg, rcpt)
        phase("resolve")
        if args.dry_run:
            sys.stdout.write(f"{target.format} {target.path}{' (created on delivery)' if target.create else ''}\n")
            return EX_OK
        if _STDIN_CLOSED:
            raise DeliveryError(Status("4.3.0", "no message", "standard input is closed"))
        result = deliver(cfg, rcpt, 0, sender, target, logger)
        phase("store")
    except DeliveryError as exc:
        status = exc.status
        _say(status)
        try:
            if logger is None:
                logger = Logger()
            shown = None if sender is None else _sanitized(sender)
            logger.info(
                delivery_line(to, shown, 0, time.time() - started, status.dsn, status.word,
                              f"{status.reason}: {status.detail}" if status.detail else status.reason)
            )
        except Exception:  # noqa: BLE001 - the status decides the exit code, not the log
            pass
        if not args.dry_run:
            _drain()
        return status.exit_code()
    # The commit point: the message is durable.  Whatever fails from here on (the log, a
    # closed stderr, a signal), the answer is 0: a 75 would make sendmail store it again.
    try:
        for note in result.notes:
            logger.warning(f"to=<{to}>, broke stale lock {note}")
        where = result.where()
        logger.info(delivery_line(to, result.sender, result.size, time.time() - started, "2.0.0", "sent", where))
    except BaseException:  # noqa: BLE001
        pass
    return EX_OK


def _sanitized(sender: str) -> str:
    from vdeliver.message import sanitize_sender

    return sanitize_sender(sender)
