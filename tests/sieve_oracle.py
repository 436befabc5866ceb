"""Pigeonhole's `sieve-test` (Debian's dovecot-sieve) as the oracle for vdeliver's Sieve.

    oracle = Pigeonhole.start()            # skips (or fails under CI) without sieve-test
    result = oracle.run(script_bytes)      # compile and run against a small message
    result.ok, result.errors               # [(line, message), ...] when it refused the script

sieve-test refuses to run as root (Dovecot's first_valid_uid), so as root it runs as the
vmail user, with a private configuration in a directory every user can enter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import IS_ROOT, RunAs, ensure_vmail, require, run_as, world_tmpdir

MESSAGE = b"From: alice@example.org\r\nTo: fred@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
_ERROR = re.compile(r"^[^:]*: line (\d+): error: (.*)$")


@dataclass
class Result:
    ok: bool
    errors: list[tuple[int, str]] = field(default_factory=list)
    output: str = ""


class Pigeonhole:
    def __init__(self, program: str, base: Path, run_kw: RunAs) -> None:
        self.program = program
        self.base = base
        self.run_kw = run_kw
        self.count = 0

    @classmethod
    def start(cls) -> Pigeonhole:
        program = require("sieve-test")["sieve-test"]
        base = world_tmpdir("vdeliver-sieve-oracle-")
        run_kw: RunAs = {}
        user = f"{os.getuid()}"
        if IS_ROOT:
            vmail = ensure_vmail()
            run_kw = run_as(vmail.uid, vmail.gid)
            user = vmail.name
        (base / "run").mkdir()
        (base / "Maildir").mkdir()
        (base / "dovecot.conf").write_text(
            f"mail_uid = {user}\nmail_gid = {user}\nfirst_valid_uid = 1\nbase_dir = {base}/run\n"
            f"log_path = /dev/stderr\nmail_location = maildir:{base}/Maildir\n"
        )
        (base / "message.eml").write_bytes(MESSAGE)
        if IS_ROOT:
            for path in (base, base / "run", base / "Maildir"):
                os.chown(path, run_kw["user"], run_kw["group"])
        return cls(program, base, run_kw)

    def run(self, script: bytes) -> Result:
        self.count += 1
        path = self.base / f"s{self.count}.sieve"
        path.write_bytes(script)
        path.chmod(0o644)
        done = subprocess.run([self.program, "-c", str(self.base / "dovecot.conf"), str(path),
                               str(self.base / "message.eml")],
                              capture_output=True, timeout=60, **self.run_kw)
        out = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
        errors = [(int(m.group(1)), m.group(2)) for m in map(_ERROR.match, out.splitlines()) if m]
        return Result(done.returncode == 0, errors, out)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
