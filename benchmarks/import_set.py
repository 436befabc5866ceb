"""The modules one delivery imports beyond the interpreter's own start-up, as sendmail runs it.

    python -m benchmarks.import_set [--json] [SOURCE_DIR]

Runs Debian's /usr/bin/python3 with `-IS` (what the launcher runs, vdeliver/launcher.py)
for one mbox and one Maildir delivery into a temporary tree, and prints, per format, the
modules present after the delivery that a bare `python3 -IS -c pass` does not have.  Interpreter
start-up and imports are most of a per-message run's cost, so this list is kept in
docs/architecture.md and must not grow without a reason.  SOURCE_DIR (default: this
checkout) is the directory holding the `vdeliver` package, so two versions can be compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
MESSAGE = b"From: alice@example.org\nTo: fred@away.com\nSubject: import set\n\nhello\n"

_CHILD = r"""
import sys
base = set(sys.modules)
sys.path.insert(0, sys.argv[1])
sys.argv = ["vdeliver", "-c", sys.argv[2], "-f", "alice@example.org", "-a", "away.com", "-a", "fred"]
from vdeliver.cli import main
code = main(sys.argv[1:])
sys.stdout.write(" ".join(sorted(set(sys.modules) - base)) + "\n")
sys.exit(code)
"""


def measure(source: str, fmt: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "vdeliver.toml"
        user = ""
        if os.geteuid() == 0:  # vdeliver refuses to deliver as root: as the vmail user, like sendmail's U=
            import pwd

            pw = pwd.getpwnam("vmail")
            user = 'user = "vmail"\n'
            root.chmod(0o755)
        config.write_text(
            f'format = "{fmt}"\ncreate_mailbox = true\nlog = "none"\n{user}'
            f'mbox_path = "{root}/vbox/{{domain}}/{{user}}"\n'
            f'maildir_path = "{root}/home/{{domain}}/{{user}}/Maildir"\n'
            f'spool_dir = "/tmp"\n'
        )
        (root / "vbox" / "away.com").mkdir(parents=True)
        (root / "home" / "away.com").mkdir(parents=True)
        if user:
            for path in (root / "vbox", root / "vbox" / "away.com", root / "home", root / "home" / "away.com"):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        done = subprocess.run([PYTHON, "-IS", "-c", _CHILD, source, str(config)], input=MESSAGE,
                              capture_output=True, timeout=60)
        if done.returncode != 0:
            raise SystemExit(f"delivery failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
        return done.stdout.decode().split()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    args = [a for a in args if a != "--json"]
    source = os.path.abspath(args[0] if args else str(Path(__file__).resolve().parent.parent))
    result = {fmt: measure(source, fmt) for fmt in ("mbox", "maildir")}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for fmt, modules in result.items():
            stdlib = [m for m in modules if not m.startswith("vdeliver")]
            ours = [m for m in modules if m.startswith("vdeliver")]
            print(f"{fmt}: {len(modules)} modules")
            print(f"  vdeliver: {' '.join(ours)}")
            print(f"  stdlib:   {' '.join(stdlib)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
