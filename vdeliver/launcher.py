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

Both paths in it are absolute and it reads no environment: sendmail runs a mailer with an
empty environment and argv[0] as written in the mailer line, which is why the plain
`python -m vdeliver` line with argv[0] `python` cannot find its venv.  The one failure
that happens before vdeliver's own error handling runs, the import itself (a venv removed,
a half-finished upgrade), exits 75 so that sendmail keeps the mail instead of bouncing it
with "unknown mailer error 1".

Run it again after upgrading the interpreter or moving the installation
(`vmailctl doctor` checks that the launcher still starts).
"""

from __future__ import annotations

import os
import sys

TEMPLATE = """#!{python} -IS
# vdeliver launcher, written by `python -m vdeliver.launcher`; see vdeliver/launcher.py.
import sys
sys.path.insert(0, {libdir!r})
try:
    from vdeliver.cli import run
except BaseException as exc:  # anything before vdeliver runs must defer (75), never bounce
    sys.stderr.write("vdeliver: 4.3.0 cannot load vdeliver from " + {libdir!r} + ": " + repr(exc) + "\\n")
    import os
    os._exit(75)
run()
"""


def render(python: str | None = None, libdir: str | None = None) -> str:
    base = python or os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    here = libdir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return TEMPLATE.format(python=base, libdir=here)


def write(path: str, python: str | None = None, libdir: str | None = None) -> None:
    """Write the launcher atomically, mode 0755."""
    text = render(python, libdir)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o755)
    os.rename(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: python -m vdeliver.launcher PATH\n"
                         "  writes an executable that starts vdeliver as fast as this machine can\n")
        return 2
    parent = os.path.dirname(os.path.abspath(args[0]))
    if not os.path.isdir(parent):
        sys.stderr.write(f"vdeliver.launcher: directory {parent} does not exist"
                         f" (create it first: mkdir -p {parent})\n")
        return 1
    try:
        write(args[0])
    except OSError as exc:
        sys.stderr.write(f"vdeliver.launcher: {args[0]}: {exc.strerror}\n")
        return 1
    sys.stdout.write(f"wrote {args[0]}: {render().splitlines()[0]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
