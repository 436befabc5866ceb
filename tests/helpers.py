"""Shared test helpers: real peers, the vmail user, a vdeliver that vmail can run.

Peers: `require("sendmail")` skips a test whose peer program is missing, or fails
it when VDELIVER_REQUIRE_PEERS=1 (as in CI).

The interpreter running pytest may live under root's home, which other users
cannot enter.  Tests that run vdeliver as the unprivileged vmail user use
`install_vdeliver()`: a copy of the package in a world-readable directory and a
launcher `bin/vdeliver` whose shebang is Debian's /usr/bin/python3 (the same form
as production: `python3 -I` and only the standard library on the delivery path).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vdeliver"
REQUIRE_PEERS = os.environ.get("VDELIVER_REQUIRE_PEERS") == "1"
IS_ROOT = os.geteuid() == 0
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# sbin directories are not always on a non-root PATH; peers live there.
_SEARCH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/lib/postgresql/15/bin", "/usr/lib/dovecot"]
)


class RunAs(TypedDict, total=False):
    """The subprocess.run()/Popen() keywords that start a child as another user."""

    user: int
    group: int
    extra_groups: list[int]


def run_as(uid: int, gid: int) -> RunAs:
    """Keywords that run a child as uid:gid with no supplementary groups."""
    return {"user": uid, "group": gid, "extra_groups": []}


def which(program: str) -> str | None:
    return shutil.which(program, path=_SEARCH)


def require(*programs: str) -> dict[str, str]:
    """Paths of the named peer programs; skip (or fail under CI) when one is missing."""
    found: dict[str, str] = {}
    for program in programs:
        path = which(program)
        if path is None:
            message = f"peer program {program!r} is not installed"
            if REQUIRE_PEERS:
                pytest.fail(message + " (VDELIVER_REQUIRE_PEERS=1)", pytrace=False)
            pytest.skip(message)
        found[program] = path
    return found


def require_root(why: str) -> None:
    if not IS_ROOT:
        if REQUIRE_PEERS:
            pytest.fail(f"needs root: {why}", pytrace=False)
        pytest.skip(f"needs root: {why}")


def world_tmpdir(prefix: str = "vdeliver-test-") -> Path:
    """A temporary directory every user can enter (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class Account:
    name: str
    uid: int
    gid: int


def ensure_vmail() -> Account:
    """The unprivileged vmail user (created when running as root), else ourselves."""
    if IS_ROOT:
        try:
            pw = pwd.getpwnam("vmail")
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--user-group", "--home-dir", "/nonexistent", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", "vmail"],
                check=True,
            )
            pw = pwd.getpwnam("vmail")
        return Account("vmail", pw.pw_uid, pw.pw_gid)
    pw = pwd.getpwuid(os.geteuid())
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid)


_INSTALLED: Path | None = None


def install_vdeliver() -> Path:
    """Copy the package where vmail can read it; return the directory (bin/, lib/)."""
    global _INSTALLED
    if _INSTALLED is not None and (_INSTALLED / "bin" / "vdeliver").exists():
        return _INSTALLED
    base = world_tmpdir("vdeliver-install-")
    lib = base / "lib"
    shutil.copytree(PACKAGE, lib / "vdeliver", ignore=shutil.ignore_patterns("__pycache__"))
    # What a real install has beside it in site-packages (the launcher puts that first on sys.path).
    import idna

    shutil.copytree(Path(idna.__file__).parent, lib / "idna", ignore=shutil.ignore_patterns("__pycache__"))
    bindir = base / "bin"
    bindir.mkdir()
    # The servers keep site-packages (the socketmap server may need psycopg).
    # vdeliver: the launcher exactly as `python -m vdeliver.launcher` writes it in production.
    from vdeliver import launcher as production_launcher

    production_launcher.write(str(bindir / "vdeliver"), python=SYSTEM_PYTHON, libdir=str(lib))
    for name, module, func, call, flags in (
        ("vdeliver-lmtpd", "vdeliver.lmtp.daemon", "main", "raise SystemExit(main())", "-I"),
        ("vdeliver-socketmapd", "vdeliver.socketmap.daemon", "main", "raise SystemExit(main())", "-I"),
    ):
        launcher = bindir / name
        launcher.write_text(
            f"#!{SYSTEM_PYTHON} {flags}\n"
            "import sys\n"
            f"sys.path.insert(0, {str(lib)!r})\n"
            f"from {module} import {func}\n"
            f"{call}\n"
        )
        launcher.chmod(0o755)
    # Compile with the interpreter that will run it: vmail cannot write __pycache__ here.
    subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", str(lib)], check=True, capture_output=True)
    for path in [base, lib, *lib.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for launcher in bindir.iterdir():
        launcher.chmod(0o755)
    _INSTALLED = base
    return base


def free_port() -> int:
    """An unused loopback TCP port (a daemon may still lose it: wait for its greeting)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_lines(values: dict[str, object]) -> list[str]:
    """`key = value` lines for a flat TOML table (strings, whole numbers, booleans)."""
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return lines


def mbox_messages(path: Path) -> list[bytes]:
    """The messages of an mbox as Python's reader sees them (From_ line excluded)."""
    import mailbox

    mb = mailbox.mbox(str(path), create=False)
    try:
        return [mb.get_bytes(k) for k in mb.keys()]
    finally:
        mb.close()


@dataclass
class MailRoot:
    """A private mail tree: vbox/ for mboxes, home/ for Maildirs, a config file."""

    base: Path
    owner: Account
    config: Path = field(init=False)
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = self.base / "vdeliver.toml"
        (self.base / "vbox").mkdir(exist_ok=True)
        (self.base / "home").mkdir(exist_ok=True)
        (self.base / "spool").mkdir(exist_ok=True)
        for d in ("vbox", "home", "spool"):
            os.chown(self.base / d, self.owner.uid, self.owner.gid)
        self.write_config()

    @property
    def vbox(self) -> Path:
        return self.base / "vbox"

    @property
    def home(self) -> Path:
        return self.base / "home"

    def write_config(self, **extra: object) -> Path:
        self.extra.update(extra)
        values: dict[str, object] = {
            "mbox_path": f"{self.vbox}/{{domain}}/{{user}}",
            "maildir_path": f"{self.home}/{{domain}}/{{user}}/Maildir",
            "spool_dir": str(self.base / "spool"),
            "log": "stderr",
            "lock_timeout": 10,
        }
        if IS_ROOT:
            values["user"] = self.owner.name
        values.update(self.extra)
        self.config.write_text("\n".join(toml_lines(values)) + "\n")
        self.config.chmod(0o644)
        return self.config

    def _own(self, path: Path) -> None:
        os.chown(path, self.owner.uid, self.owner.gid)

    def add_domain(self, domain: str) -> None:
        for top in (self.vbox, self.home):
            d = top / domain
            d.mkdir(exist_ok=True, mode=0o700)
            self._own(d)

    def add_mbox(self, domain: str, user: str, content: bytes = b"") -> Path:
        self.add_domain(domain)
        path = self.vbox / domain / user
        path.write_bytes(content)
        path.chmod(0o600)
        self._own(path)
        return path

    def add_maildir(self, domain: str, user: str) -> Path:
        self.add_domain(domain)
        userdir = self.home / domain / user
        userdir.mkdir(exist_ok=True, mode=0o700)
        self._own(userdir)
        md = userdir / "Maildir"
        md.mkdir(exist_ok=True, mode=0o700)
        self._own(md)
        for sub in ("tmp", "new", "cur"):
            (md / sub).mkdir(exist_ok=True, mode=0o700)
            self._own(md / sub)
        return md


def run_vdeliver(
    args: list[str],
    message: bytes = b"",
    *,
    config: Path | None = None,
    as_user: Account | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the installed vdeliver like sendmail does (as vmail when we are root)."""
    launcher = install_vdeliver() / "bin" / "vdeliver"
    argv = [str(launcher)]
    if config is not None:
        argv += ["-c", str(config)]
    argv += args
    kwargs: RunAs = {}
    if as_user is not None and IS_ROOT and as_user.uid != 0:
        kwargs = run_as(as_user.uid, as_user.gid)
    return subprocess.run(
        argv,
        input=message,
        capture_output=True,
        timeout=timeout,
        env=env if env is not None else {"PATH": "/usr/bin:/bin", "LANG": "C"},
        cwd="/",
        **kwargs,
    )


class DevLog:
    """Receive what programs send to /dev/log, when the machine has no syslog daemon there
    (the tests bind it themselves; with a daemon, `lines()` is empty and only the program's
    side - that logging through syslog(3) works - is tested)."""

    def __init__(self) -> None:
        import socket

        self.sock: socket.socket | None = None
        if os.path.exists("/dev/log"):
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind("/dev/log")
            os.chmod("/dev/log", 0o666)
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        self.sock = sock

    def lines(self, wait_for: str = "", timeout: float = 10) -> list[str]:
        """Every datagram so far (as text, bytes >= 0x80 kept as \\x escapes); with wait_for,
        wait up to timeout for a line that contains it."""
        import select

        found: list[str] = []
        if self.sock is None:
            return found
        deadline = time.monotonic() + timeout
        while True:
            done = not wait_for or any(wait_for in line for line in found)
            ready = select.select([self.sock], [], [], 0 if done else max(0.0, deadline - time.monotonic()))
            if ready[0]:
                found.append(self.sock.recv(65536).decode("ascii", "backslashreplace"))
                continue
            if not wait_for or any(wait_for in line for line in found) or time.monotonic() >= deadline:
                return found

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            try:
                os.unlink("/dev/log")
            except OSError:
                pass
