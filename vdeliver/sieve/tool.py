"""`vdeliver sieve-test`: compile a script and run it against a message, delivering nothing.

    vdeliver sieve-test [--json] [-f SENDER] [-r RECIPIENT] [-a ORIGINAL_RECIPIENT]
                        [-m DEFAULT_MAILBOX] [--trace] [--personal-dir DIR] [--global-dir DIR]
                        [--config FILE] SCRIPT [MESSAGE]

Like Pigeonhole's sieve-test: the message comes from MESSAGE or standard input; nothing is
stored or sent.  Text output for people; `--json` prints one object for scripts and
webmail (status, errors with their lines, the actions in execution order, the implicit
keep, and "header", the new header, only when editheader changed it).  `--config FILE`
takes the [sieve] settings of that configuration (the limits, and where spamtest and
virustest read the scanners' verdicts), as delivery would; without it, the defaults.
Exit 0 when the script compiled and ran, 1 when it did not, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from vdeliver.sieve.errors import SieveError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"vdeliver sieve-test: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _parser() -> _Parser:
    p = _Parser(prog="vdeliver sieve-test", description=__doc__.split("\n\n")[2] if __doc__ else None,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("-f", dest="sender", default="", metavar="SENDER", help="envelope sender (default: <>)")
    p.add_argument("-r", dest="recipient", default="", metavar="RECIPIENT", help="envelope recipient")
    p.add_argument("-a", dest="original", default="", metavar="ORIGINAL_RECIPIENT", help="original recipient")
    p.add_argument("-m", dest="mailbox", default="INBOX", metavar="DEFAULT_MAILBOX",
                   help="where keep and the implicit keep store (default INBOX)")
    p.add_argument("--trace", action="store_true", help="show each test with its result and each command, by line")
    p.add_argument("--personal-dir", metavar="DIR",
                   help="where include finds personal scripts, DIR/NAME.sieve (default: the script's directory)")
    p.add_argument("--global-dir", metavar="DIR", help="where include :global finds scripts (default: none)")
    p.add_argument("--config", metavar="FILE", help="read the [sieve] settings of this configuration file")
    p.add_argument("script", metavar="SCRIPT")
    p.add_argument("message", nargs="?", metavar="MESSAGE", help="the message (default: standard input)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from vdeliver.sieve import interpreter
    from vdeliver.sieve.validator import compile_script

    run_opts: dict[str, object] = {}
    if args.config:
        from vdeliver.config import load
        from vdeliver.errors import DeliveryError
        from vdeliver.sieve.delivery import settings

        try:
            opts = settings(load(args.config))
        except DeliveryError as exc:
            sys.stderr.write(f"vdeliver sieve-test: {exc}\n")
            return EXIT_USAGE
        run_opts = {"max_actions": opts.max_actions, "max_redirects": opts.max_redirects, "spam": opts.spam,
                    "max_cpu_time": opts.max_cpu_time}
        if args.global_dir is None and opts.global_dir:
            args.global_dir = opts.global_dir
    try:
        with open(args.script, "rb") as f:
            source = f.read()
        if args.message:
            with open(args.message, "rb") as f:
                data = f.read()
        else:
            data = sys.stdin.buffer.read()
    except OSError as exc:
        sys.stderr.write(f"vdeliver sieve-test: {exc.filename}: {exc.strerror}\n")
        return EXIT_USAGE
    status, errors = "ok", []
    result = interpreter.Result()
    import os

    def resolve(location: str, name: str) -> bytes | None:
        folder = (args.personal_dir or os.path.dirname(os.path.abspath(args.script))) if location == "personal" \
            else args.global_dir
        try:
            with open(os.path.join(folder, name + ".sieve"), "rb") as f:
                return f.read()
        except (OSError, TypeError):
            return None

    try:
        compiled = compile_script(source, resolve=resolve)
    except SieveError as exc:
        status, errors = "compile-error", exc.errors
    else:
        try:
            envelope = interpreter.Envelope(args.sender, args.recipient, args.original)
            trace = None
            if args.trace:
                def trace(line: int, text: str) -> None:
                    (sys.stderr if args.json else sys.stdout).write(f"trace: line {line}: {text}\n")
            result = interpreter.run(compiled, interpreter.Message.from_bytes(data), envelope, trace=trace,
                                     **run_opts)  # type: ignore[arg-type]
        except SieveError as exc:
            status, errors = "runtime-error", exc.errors
            result = interpreter.Result()
    if args.json:
        out = {"status": status, "errors": [{"line": e.line, "message": e.message} for e in errors],
               "actions": [a.to_json() for a in result.actions], "implicit_keep": result.implicit_keep}
        if result.header is not None:  # editheader changed the header: the new one, LF line ends
            out["header"] = result.header.decode("utf-8", "replace")
        sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    else:
        for e in errors:
            sys.stdout.write(f"{args.script}: line {e.line}: error: {e.message}\n")
        if status == "ok":
            sys.stdout.write(_text(result, args.mailbox))
    return EXIT_OK if status == "ok" else EXIT_FAILED


def _text(result: object, mailbox: str) -> str:
    from vdeliver.sieve.interpreter import Result

    assert isinstance(result, Result)
    lines = ["Performed actions:"]
    for a in result.actions:
        if a.type == "keep":
            lines.append(f" * store message in folder: {mailbox}")
        elif a.type == "fileinto":
            lines.append(f" * store message in folder: {a.mailbox}" + ("  (copy)" if a.copy else ""))
        elif a.type == "redirect":
            lines.append(f" * redirect message to: <{a.address}>" + ("  (copy)" if a.copy else ""))
        elif a.type == "notify" and a.vacation is not None:
            from vdeliver.sieve import notify

            uri = notify.parse(a.address)
            lines.append(f" * send notification with method '{notify.scheme(a.address)}:':")
            lines.append(f"    => importance   : {a.vacation.seconds}")
            if uri.subject:
                lines.append(f"    => subject      : {uri.subject}")
            lines.append("    => recipients   :")
            lines += [f"       + To: {to}" for to in uri.to] or ["       NONE, action has no effect"]
        elif a.type == "vacation" and a.vacation is not None:
            v = a.vacation
            lines.append(" * send vacation message:")
            lines.append(f"    => seconds : {v.seconds}")
            if v.subject:
                lines.append(f"    => subject : {v.subject}")
            if v.from_:
                lines.append(f"    => from    : {v.from_}")
            lines.append(f"    => handle  : {v.handle}")
            lines += ["", "START MESSAGE", a.reason.replace("\r\n", "\n").rstrip("\n"), "END MESSAGE", ""]
        elif a.type in ("reject", "ereject"):
            reason = a.reason.replace("\r", "").replace("\n", "??")  # one line, as Pigeonhole shows it
            lines.append(f" * {'e' if a.type == 'ereject' else ''}reject message with reason: {reason}")
        else:
            lines.append(f" * {a.type}")
    if not result.actions:
        lines.append("  (none)")
    lines.append("Implicit keep:")
    lines.append(f" * store message in folder: {mailbox}" if result.implicit_keep else "  (none)")
    return "\n".join(lines) + "\n"
