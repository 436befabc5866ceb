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
from collections.abc import Callable
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

    def stores(self) -> list[str]:
        """The folders sieve-test stored into, explicit actions first, then the implicit keep.
        In a sequence (`-s`), a keep of a script that is not the last only means "go on": only
        the last script's keep (explicit or implicit) stores into the INBOX."""
        sections = self.output.split("## Executing script:")
        folders: list[str] = []
        for number, section in enumerate(sections):
            last = number == len(sections) - 1
            for line in section.splitlines():
                if line.startswith(" * store message in folder: "):
                    folders.append(line.split(": ", 1)[1])
                elif line.rstrip() == " * keep" and last:
                    folders.append("INBOX")
        return list(dict.fromkeys(folders))

    def store_flags(self) -> dict[str, list[str]]:
        """Folder -> the IMAP flags sieve-test stored it with (lower case, sorted)."""
        flags: dict[str, list[str]] = {}
        folder = ""
        for line in self.output.splitlines():
            if line.startswith(" * store message in folder: "):
                folder = line.split(": ", 1)[1]
                flags.setdefault(folder, [])
            elif line.strip().startswith("+ add IMAP flags: ") and folder:
                flags[folder] = sorted(f.lower() for f in line.split(": ", 1)[1].split())
            elif line.startswith(" * "):
                folder = ""
        return flags

    def redirects(self) -> list[str]:
        return [line.split(": ", 1)[1].strip("<>") for line in self.output.splitlines()
                if line.startswith(" * redirect message to: ")]

    @property
    def implicit_keep(self) -> bool:
        tail = self.output.split("Implicit keep:", 1)[-1]
        return " * store message in folder: " in tail

    @property
    def discarded(self) -> bool:
        return " * discard" in self.output.splitlines()


class Pigeonhole:
    def __init__(self, program: str, base: Path, run_kw: RunAs) -> None:
        self.program = program
        self.base = base
        self.run_kw = run_kw
        self.count = 0

    @classmethod
    def start(cls, extra_config: str = "") -> Pigeonhole:
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
            f"log_path = /dev/stderr\nmail_location = maildir:{base}/Maildir\n{extra_config}"
        )
        (base / "message.eml").write_bytes(MESSAGE)
        if IS_ROOT:
            for path in (base, base / "run", base / "Maildir"):
                os.chown(path, run_kw["user"], run_kw["group"])
        return cls(program, base, run_kw)

    def run(self, script: bytes, message: bytes | None = None, sender: str = "", recipient: str = "",
            before: list[bytes] | None = None) -> Result:
        """Compile and run `script` against `message` (a small default one) with that envelope;
        `before`: scripts run first, in a sequence (sieve-test -s, as sieve_before runs them)."""
        self.count += 1
        extra: list[str] = []
        for i, text in enumerate(before or []):
            first = self.base / f"s{self.count}-before{i}.sieve"
            first.write_bytes(text)
            first.chmod(0o644)
            extra += ["-s", str(first)]
        path = self.base / f"s{self.count}.sieve"
        path.write_bytes(script)
        path.chmod(0o644)
        mail = self.base / "message.eml"
        if message is not None:
            mail = self.base / f"m{self.count}.eml"
            mail.write_bytes(message)
            mail.chmod(0o644)
        envelope = (["-f", sender] if sender else []) + (["-r", recipient] if recipient else [])
        done = subprocess.run([self.program, "-c", str(self.base / "dovecot.conf"), *envelope, *extra, str(path),
                               str(mail)],
                              capture_output=True, timeout=60, **self.run_kw)
        out = done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")
        errors = [(int(m.group(1)), m.group(2)) for m in map(_ERROR.match, out.splitlines()) if m]
        return Result(done.returncode == 0, errors, out)

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def assert_same_verdict(oracle: Pigeonhole, script: bytes, ours: Callable[[bytes], object],
                        refusal: type[Exception]) -> None:
    """Both accept `script`, or both refuse it with an error on the same line."""
    theirs = oracle.run(script)
    try:
        ours(script)
    except refusal as exc:
        assert not theirs.ok, f"Pigeonhole accepts what we refuse ({exc}):\n{theirs.output}"
        line = getattr(exc, "line", None)
        assert line in [n for n, _ in theirs.errors], (exc, theirs.errors)
    else:
        assert theirs.ok, f"Pigeonhole refuses what we accept:\n{theirs.output}"
