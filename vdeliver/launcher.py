"""Write the fastest way to start vdeliver: a launcher script for sendmail's mailer line.

    /opt/vdeliver/bin/python -m vdeliver.launcher /usr/local/libexec/vdeliver

writes an executable that runs the base interpreter with `-IS` (isolated, no site) and puts this
installation's package directory first on sys.path.  Why: a venv's python runs
every `.pth` file of its site-packages at start-up (setuptools' hook, editable
installs), which here doubles the interpreter's start-up (38 ms against 19 ms, see
docs/benchmarks.md), and pip's console-script wrapper imports `re` on top.  The
delivery path needs nothing but the standard library and this package, so the
launcher skips `site` altogether.  The mailer line then becomes

    define(`PROCMAIL_MAILER_PATH', `/usr/local/libexec/vdeliver, U=vmail:vmail')dnl
    define(`PROCMAIL_MAILER_ARGS', `vdeliver -t -Y -a $h -a $u')dnl

It is a /bin/sh script that checks its interpreter is still there, then execs it with
`-IS -c`.  Both paths in it are absolute and it reads no environment: sendmail runs a mailer with an
empty environment and argv[0] as written in the mailer line, which is why the plain
`python -m vdeliver` line with argv[0] `python` cannot find its venv.  The one failure
that can happen before vdeliver's own error handling runs, a missing interpreter (a Python
upgrade) or a failed import (a venv removed, a half-finished upgrade), exits 75 so that
sendmail keeps the mail instead of bouncing it.

Run it again after upgrading the interpreter or moving the installation
(`vmailctl doctor` checks that the launcher still starts).

`python -m vdeliver.launcher --direct PATH` writes a `#!/usr/bin/python3.11 -IS` script instead,
without the shell: 1 ms less per message (about 0.13x of the interpreter's own start-up, issue
21; `benchmarks/cli_bench.py` measures both).  Then a missing interpreter is an execve()
failure inside sendmail, which defers the message (EX_OSERR, 71) only for a mailer with the
`l` (local) flag: the examples' `PROCMAIL_MAILER_FLAGS` is `l0`, and
tests/test_sendmail_e2e.py checks that a real sendmail keeps the message queued then.  With
sendmail's default procmail flags (`SPhnu9`, no `l`) it would bounce: keep the shell launcher.
"""

from __future__ import annotations

import os
import sys

# A /bin/sh script, not a `#!python` one: if the interpreter it names is gone (a Python
# upgrade removed /usr/bin/python3.11), execve() of a `#!` script fails with ENOENT inside
# sendmail, which then bounces every message; here the shell notices and defers (75).  The
# shell costs about half a millisecond per message.
TEMPLATE = """#!/bin/sh
# vdeliver launcher, written by `python -m vdeliver.launcher`; see vdeliver/launcher.py.
# sendmail bounces on every exit code but 75, 74 and 71: whatever fails here defers.
PY={python}
if [ ! -x "$PY" ]; then
    echo "vdeliver: 4.3.0 interpreter $PY is missing: run python -m vdeliver.launcher again" >&2
    exit 75
fi
exec "$PY" -IS -c '
import sys
sys.path.insert(0, {libdir})
try:
    from vdeliver.cli import run
except BaseException as exc:
    sys.stderr.write("vdeliver: 4.3.0 cannot load vdeliver from %s: %r\\n" % (sys.path[0], exc))
    raise SystemExit(75)
run()
' "$@"
exit 75
"""


# The same program as a `#!` script (see --direct above).  -IS rides on the #! line as one
# argument, which Python reads as -I -S.
TEMPLATE_DIRECT = """#!{python} -IS
# vdeliver launcher (--direct), written by `python -m vdeliver.launcher --direct`; see vdeliver/launcher.py.
# sendmail bounces on every exit code but 75, 74 and 71: a failed import defers (75), a missing
# interpreter is EX_OSERR (71) for a mailer with the l flag.
import sys
sys.path.insert(0, {libdir})
try:
    from vdeliver.cli import run
except BaseException as exc:
    sys.stderr.write("vdeliver: 4.3.0 cannot load vdeliver from %s: %r\\n" % (sys.path[0], exc))
    raise SystemExit(75)
run()
"""


def _sh_word(text: str) -> str:
    """One shell word, single-quoted."""
    return "'" + text.replace("'", "'\\''") + "'"


def render(python: str | None = None, libdir: str | None = None, direct: bool = False) -> str:
    base = python or os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    here = libdir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if any(ch in path for path in (here, base) for ch in "'\"\\\n"):
        raise ValueError("the interpreter and library paths may not contain quotes, backslashes or newlines")
    if direct:
        if any(ch in base for ch in " \t") or len(base) > 200:
            raise ValueError("a #! line takes an interpreter path without blanks, under 200 characters")
        return TEMPLATE_DIRECT.format(python=base, libdir=repr(here).replace("'", '"'))
    # libdir goes inside the single-quoted Python program: a Python string literal without quotes.
    return TEMPLATE.format(python=_sh_word(base), libdir=repr(here).replace("'", '"'))


def write(path: str, python: str | None = None, libdir: str | None = None, direct: bool = False) -> None:
    """Write the launcher atomically, mode 0755."""
    from vdeliver import fileio

    fileio.replace(path, render(python, libdir, direct).encode(), 0o755)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    direct = args[:1] == ["--direct"]
    if direct:
        args = args[1:]
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: python -m vdeliver.launcher [--direct] PATH\n"
                         "  writes an executable that starts vdeliver as fast as this machine can\n"
                         "  --direct: a #! script without /bin/sh (1 ms less; needs the l mailer flag)\n")
        return 2
    parent = os.path.dirname(os.path.abspath(args[0]))
    if not os.path.isdir(parent):
        sys.stderr.write(f"vdeliver.launcher: directory {parent} does not exist"
                         f" (create it first: mkdir -p {parent})\n")
        return 1
    try:
        write(args[0], direct=direct)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        sys.stderr.write(f"vdeliver.launcher: {args[0]}: {why}\n")
        return 1
    python = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    sys.stdout.write(f"wrote {args[0]}: runs {python} -IS{' directly (#!)' if direct else ''}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
