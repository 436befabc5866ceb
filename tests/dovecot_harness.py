"""A private Dovecot for the integration tests: its own base_dir, state, log and loopback port.

Nothing of the machine's Dovecot is used but the binaries and the `dovecot` /
`dovenull` users Debian's package created: the configuration is written under a
world-traversable temp dir (the mail processes run as vmail, the login processes
as dovenull), it includes the snippets `vdeliver.accounts.dovecot` generates (the
files `vmailctl dovecot-config` prints) filled in for the temp paths, and the
master runs in the foreground (`dovecot -F -c CONF`) in its own session, so
teardown can stop it and every child it started.

    with Dovecot(root, vmail, auth=passwd_file_auth(...)) as dc:
        imap = dc.login("fred@away.com", "secret")
        log = dc.log_text()   # inside: the temp dir is removed on exit
"""

from __future__ import annotations

import imaplib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TypedDict

from tests.helpers import Account, MailRoot, free_port, require, world_tmpdir
from vdeliver.config import Config


def vdeliver_config(root: MailRoot, **tables: dict[str, object]) -> Config:
    """The vdeliver Config object matching the MailRoot (what vmailctl would read)."""
    from vdeliver import config as config_mod

    cfg = config_mod.load(str(root.config))
    for name, table in tables.items():
        cfg.tables[name] = table
    return cfg


def passwd_file_auth(path: Path) -> str:
    """passdb + userdb from a Dovecot passwd-file (phase one: users made by hand)."""
    return (
        "passdb {\n"
        "  driver = passwd-file\n"
        f"  args = scheme=PLAIN username_format=%u {path}\n"
        "}\n"
        "userdb {\n"
        "  driver = passwd-file\n"
        f"  args = username_format=%u {path}\n"
        "}\n"
    )


class Dovecot:
    """One private Dovecot master and its children."""

    def __init__(self, root: MailRoot, vmail: Account, *, auth: str | None = None, cfg: Config | None = None,
                 extra: str = "", generated: Path | None = None) -> None:
        """auth: passdb/userdb text, or None for the generated SQL ones (the [accounts] database).
        generated: a directory `vmailctl dovecot-config --output` wrote; else the files are
        rendered here from cfg."""
        self.bin = require("dovecot")["dovecot"]
        self.root = root
        self.vmail = vmail
        self.base = world_tmpdir("vdeliver-dovecot-")
        self.conf = self.base / "dovecot.conf"
        self.log = self.base / "dovecot.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.auth = auth
        self.extra = extra
        self.cfg = cfg if cfg is not None else vdeliver_config(root)
        self.generated = generated

    # -- configuration ------------------------------------------------------------

    def write_config(self) -> None:
        from vdeliver.accounts import dovecot as dc

        # The generated files, as `vmailctl dovecot-config --output` writes them, with
        # config_dir pointing here so the auth snippet finds our dovecot-sql.conf.ext.
        confd = (self.generated or self.base) / "conf.d"
        if self.generated is None:
            tables = self.cfg.tables
            tables["dovecot"] = {**tables.get("dovecot", {}), "config_dir": str(self.base)}
            dc.write_files(str(self.base), dc.render_files(self.cfg))
        auth_file = confd / "auth-vdeliver-sql.conf.ext"
        if self.auth is not None:
            auth_file = self.base / "auth.conf.ext"
            auth_file.write_text(self.auth)
        self.conf.write_text(
            "# Private test instance (tests/dovecot_harness.py).\n"
            "protocols = imap\n"
            "listen = 127.0.0.1\n"
            f"base_dir = {self.base}/run\n"
            f"state_dir = {self.base}/state\n"
            f"log_path = {self.log}\n"
            "ssl = no\n"
            "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain login\n"
            "auth_failure_delay = 0\n"
            "auth_cache_size = 0\n"
            "# Failed logins are part of the tests: no delay, and no anvil penalty (which grows to 15 s).\n"
            "service anvil {\n"
            "  unix_listener anvil-auth-penalty {\n"
            "    mode = 0\n"
            "  }\n"
            "}\n"
            "login_greeting = vdeliver test Dovecot ready\n"
            "mail_fsync = always\n"
            "service imap-login {\n"
            "  inet_listener imap {\n"
            "    address = 127.0.0.1\n"
            f"    port = {self.port}\n"
            "  }\n"
            "  inet_listener imaps {\n"
            "    port = 0\n"
            "  }\n"
            "}\n"
            f"!include {confd}/90-vdeliver.conf\n"
            f"!include {auth_file}\n"
            f"{self.extra}"
        )
        # Readable by Dovecot's unprivileged processes; dovecot-sql.conf.ext stays 0600 (read as root).
        for path in (self.conf, auth_file, *confd.iterdir()):
            path.chmod(0o644)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> Dovecot:
        last = ""
        for _attempt in range(5):
            self.port = free_port()
            self.write_config()
            with open(self.base / "master.err", "wb") as err:  # the child keeps its own copy
                self.proc = subprocess.Popen(
                    [self.bin, "-F", "-c", str(self.conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,
                )
            if self._wait_ready(20.0):
                return self
            last = self.log_text()[-2000:] + (self.base / "master.err").read_text(errors="replace")[-2000:]
            self._kill()
            if "Address already in use" not in last:
                break
        raise RuntimeError(f"dovecot did not start:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(200).startswith(b"* OK"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._kill()

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the master stops its children on the way out
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in its session
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(5)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()  # read log_text() inside the with block

    # -- clients and evidence --------------------------------------------------------

    def connect(self) -> imaplib.IMAP4:
        return imaplib.IMAP4("127.0.0.1", self.port, timeout=30)

    def login(self, user: str, password: str) -> imaplib.IMAP4:
        imap = self.connect()
        imap.login(user, password)
        return imap

    def try_login(self, user: str, password: str) -> tuple[str, str]:
        """(status, text) of a LOGIN: ('OK', ...) or ('NO', '[AUTHENTICATIONFAILED] ...')."""
        imap = self.connect()
        try:
            typ, data = imap._simple_command("LOGIN", imap._quote(user), imap._quote(password))
            text = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
            return typ, text
        except imaplib.IMAP4.error as exc:
            return "NO", str(exc)
        finally:
            try:
                imap.logout()
            except (imaplib.IMAP4.error, OSError):
                pass

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)


# -- reading what Dovecot says ------------------------------------------------------


def bad_log_lines(log: str) -> list[str]:
    """Dovecot's complaints about a mailbox (corruption, lock trouble, crashes)."""
    return [
        line for line in log.splitlines()
        if re.search(r"(Error|Panic|Fatal|corrupt|Warning: .*(lock|mbox|sync|Maildir))", line, re.I)
    ]


class Fetched(TypedDict):
    """One message of fetch_all(): size is None when not fetched; body is what IMAP sent."""

    uid: int
    flags: set[str]
    size: int | None
    body: bytes


def fetch_all(imap: imaplib.IMAP4, items: str = "(UID FLAGS RFC822.SIZE BODY.PEEK[])") -> list[Fetched]:
    """UID FETCH 1:* (empty mailboxes too) parsed into dicts: uid, flags, size, body (bytes, as IMAP sent it)."""
    typ, data = imap.uid("FETCH", "1:*", items)
    assert typ == "OK", data
    out: list[Fetched] = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        head = item[0].decode()
        m_uid = re.search(r"UID (\d+)", head)
        assert m_uid, head  # a UID FETCH response always carries the UID (RFC 3501 6.4.8)
        m_flags = re.search(r"FLAGS \(([^)]*)\)", head)
        m_size = re.search(r"RFC822\.SIZE (\d+)", head)
        out.append({
            "uid": int(m_uid.group(1)),
            "flags": set(m_flags.group(1).split()) if m_flags else set(),
            "size": int(m_size.group(1)) if m_size else None,
            "body": item[1],
        })
    return out


def selected_count(data: list[bytes | None]) -> int:
    """The message count (EXISTS) of an IMAP SELECT's data."""
    assert data[0] is not None, data
    return int(data[0])


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def message_id(body: bytes) -> str:
    m = re.search(rb"^Message-ID: <([^>]*)>", body, re.M | re.I)
    assert m, body[:200]
    return m.group(1).decode()
