"""ManageSieve (RFC 5804) spoken raw to the webmail's Dovecot managesieved, then vdeliver runs what it
saved (tests/webmail_harness.py, no browser).  Once with a Maildir user, once with an mbox user:

1. a script with a UTF-8 name, its lines ending in CRLF and bare LF as Roundcube writes them, filing
   "rechnung" mail into a UTF-8 folder named with the format's hierarchy separator, is saved and made
   active: managesieved links <home>/.dovecot.sieve to sieve/<name>.sieve, which holds the bytes sent;
2. a matching message delivered by the CLI and one by LMTP land in that folder (read over IMAP under
   its modified UTF-7 name); a message that does not match stays in the INBOX;
3. a script requiring an extension vdeliver does not implement (vnd.dovecot.pipe, fcc) is refused
   with NO, and the active script stays as it was;
4. a script managesieved accepts but that fails at delivery (fileinto a missing folder without
   :create) keeps the message in the INBOX, and vdeliver says why in <home>/.dovecot.sieve.log.
"""

from __future__ import annotations

import base64
import imaplib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dovecot_harness import bad_log_lines
from tests.helpers import Account
from tests.webmail_harness import WebmailSite
from vdeliver.sieve.delivery import _mutf7 as mutf7

pytestmark = [pytest.mark.peers, pytest.mark.webmail, pytest.mark.slow]

USERS = {"maildir": ("fred@home.com", "fred pass"), "mbox": ("wilma@home.com", "wilma pass")}
SEPARATOR = {"maildir": ".", "mbox": "/"}  # Dovecot's hierarchy separator of each format
NAME = "Regeln für Büro"
TIMEOUT = 30.0

Token = str | bytes  # an atom or a parenthesized response code (str), a quoted string or literal (bytes)


class Reply:
    """One ManageSieve response: the data lines before it, then OK / NO / BYE, a code, a text."""

    def __init__(self, status: str, code: str, text: str, lines: list[list[Token]]) -> None:
        self.status = status
        self.code = code
        self.text = text
        self.lines = lines

    def __repr__(self) -> str:
        return f"Reply({self.status} {self.code} {self.text!r}, {self.lines!r})"


class ManageSieve:
    """A small ManageSieve client: every socket operation has a deadline."""

    def __init__(self, port: int, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        try:
            self.greeting = self.response()
            assert self.greeting.status == "OK", self.greeting
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    # -- reading ------------------------------------------------------------------------

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"managesieved closed the connection (after {self.buf[-200:]!r})")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def _tokens(self) -> list[Token]:
        """One logical line: atoms, quoted strings, literals (read in full), response codes."""
        tokens: list[Token] = []
        line = self._line()
        i = 0
        while i < len(line):
            c = line[i:i + 1]
            if c == b" ":
                i += 1
            elif c == b'"':
                out = bytearray()
                i += 1
                while line[i:i + 1] != b'"':
                    if i >= len(line):
                        raise AssertionError(f"unterminated string in {line!r}")
                    if line[i:i + 1] == b"\\":
                        i += 1
                    out += line[i:i + 1]
                    i += 1
                tokens.append(bytes(out))
                i += 1
            elif c == b"{" and line.endswith(b"}"):
                tokens.append(self._exact(int(line[i + 1:-1].rstrip(b"+"))))
                line, i = self._line(), 0  # the line goes on after the literal
            elif c == b"(":
                depth, j, quoted = 0, i, False
                while j < len(line):
                    ch = line[j:j + 1]
                    if ch == b'"' and line[j - 1:j] != b"\\":
                        quoted = not quoted
                    elif not quoted and ch == b"(":
                        depth += 1
                    elif not quoted and ch == b")":
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                tokens.append(line[i:j + 1].decode("utf-8", "replace"))
                i = j + 1
            else:
                j = line.find(b" ", i)
                j = len(line) if j < 0 else j
                tokens.append(line[i:j].decode("utf-8", "replace"))
                i = j
        return tokens

    def response(self) -> Reply:
        lines: list[list[Token]] = []
        while True:
            tokens = self._tokens()
            head = tokens[0] if tokens else ""
            if isinstance(head, str) and head.upper() in ("OK", "NO", "BYE"):
                rest = tokens[1:]
                code = ""
                if rest and isinstance(rest[0], str) and rest[0].startswith("("):
                    code, rest = rest[0], rest[1:]
                text = " ".join(t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in rest)
                return Reply(head.upper(), code, text, lines)
            lines.append(tokens)

    # -- writing ------------------------------------------------------------------------

    @staticmethod
    def string(value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else value
        if len(data) < 1024 and not any(c in data for c in (b"\r", b"\n", b'"', b"\\", b"\0")):
            return b'"' + data + b'"'
        return b"{%d+}\r\n" % len(data) + data

    def command(self, name: str, *args: str | bytes) -> Reply:
        self.sock.sendall(b" ".join([name.encode(), *(self.string(a) for a in args)]) + b"\r\n")
        return self.response()

    def authenticate(self, user: str, password: str) -> Reply:
        plain = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        return self.command("AUTHENTICATE", "PLAIN", plain)

    def putscript(self, name: str, script: bytes) -> Reply:
        # The script always as a non-synchronizing literal, whatever its size (RFC 5804 2.6).
        head = b"PUTSCRIPT " + self.string(name) + b" {%d+}\r\n" % len(script)
        self.sock.sendall(head + script + b"\r\n")
        return self.response()

    def setactive(self, name: str) -> Reply:
        return self.command("SETACTIVE", name)

    def listscripts(self) -> dict[str, bool]:
        """{name: active}"""
        reply = self.command("LISTSCRIPTS")
        assert reply.status == "OK", reply
        out: dict[str, bool] = {}
        for tokens in reply.lines:
            name = tokens[0]
            assert isinstance(name, bytes), tokens
            out[name.decode("utf-8")] = any(isinstance(t, str) and t.upper() == "ACTIVE" for t in tokens[1:])
        return out

    def logout(self) -> Reply:
        try:
            return self.command("LOGOUT")
        finally:
            self.close()


# -- the site ---------------------------------------------------------------------------------------


@pytest.fixture(params=["maildir", "mbox"])
def hub(request: pytest.FixtureRequest, vmail: Account, tmp_path: Path) -> Iterator[tuple[WebmailSite, str]]:
    fmt = str(request.param)
    site = WebmailSite(vmail, tmp_path / "shots" / fmt)
    try:
        site.start()
        site.add_user(*USERS[fmt], fmt)
        site.serve()
        yield site, fmt
    finally:
        log = site.close()
    assert not bad_log_lines(log), log


def connect(site: WebmailSite, address: str, password: str) -> ManageSieve:
    ms = ManageSieve(int(site.tables["webmail"]["managesieve_port"]))  # type: ignore[call-overload]
    try:
        caps = {str(t[0], "ascii").upper() for t in ms.greeting.lines if t and isinstance(t[0], bytes)}
        assert {"IMPLEMENTATION", "SASL", "SIEVE"} <= caps, ms.greeting
        reply = ms.authenticate(address, password)
        assert reply.status == "OK", reply
    except BaseException:
        ms.close()
        raise
    return ms


def subjects(site: WebmailSite, address: str, password: str, folder: str) -> list[str]:
    """The subjects in `folder` (a UTF-8 name), read over IMAP under its modified UTF-7 name."""
    assert site.dovecot is not None
    imap = site.dovecot.login(address, password)
    try:
        typ, count = imap.select('"' + mutf7(folder) + '"', readonly=True)
        assert typ == "OK", (folder, count, imap.list())
        if count[0] == b"0":
            return []
        typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK", data
        heads = [item[1] for item in data if isinstance(item, tuple)]
        return sorted(bytes(h).decode().split(":", 1)[1].strip() for h in heads)
    finally:
        try:
            imap.logout()
        except (imaplib.IMAP4.error, OSError):
            pass


def message(to: str, subject: str, mid: str) -> bytes:
    return (f"From: Alice <alice@example.org>\nTo: {to}\nSubject: {subject}\n"
            f"Message-ID: <{mid}@example.org>\n\nHello.\n").encode()


def filing_script(folder: str) -> bytes:
    """As Roundcube's managesieve plugin writes a rule, CRLF and bare LF line endings mixed."""
    return ('require ["fileinto","mailbox"];\r\n'
            "# rule:[Rechnungen]\n"
            'if header :contains "subject" "rechnung"\r\n'
            "{\n"
            f'\tfileinto :create "{folder}";\r\n'
            "\tstop;\n"
            "}\r\n").encode()


# -- the scenario -----------------------------------------------------------------------------------


def test_scripts_saved_over_managesieve_run_at_delivery(hub: tuple[WebmailSite, str]) -> None:
    site, fmt = hub
    address, password = USERS[fmt]
    user, domain = address.split("@")
    home = site.root.home / domain / user
    link = home / ".dovecot.sieve"
    folder = f"Büro{SEPARATOR[fmt]}Rechnungen"

    # 1. A UTF-8 name, mixed line endings, a UTF-8 folder: saved and made active.
    script = filing_script(folder)
    ms = connect(site, address, password)
    try:
        reply = ms.putscript(NAME, script)
        assert reply.status == "OK", reply
        reply = ms.setactive(NAME)
        assert reply.status == "OK", reply
        assert ms.listscripts() == {NAME: True}
    finally:
        ms.logout()
    assert link.is_symlink(), sorted(os.listdir(home))
    assert os.readlink(link) == f"sieve/{NAME}.sieve"
    assert (home / "sieve" / f"{NAME}.sieve").read_bytes() == script
    assert link.read_bytes() == script

    # 2. The CLI and LMTP both file by it; what does not match stays in the INBOX.
    site.deliver_cli(address, message(address, "Ihre Rechnung 17", "r17"), "alice@example.org")
    site.deliver_lmtp(address, message(address, "RECHNUNG 18", "r18"), "bob@example.org")
    site.deliver_lmtp(address, message(address, "Mittagessen?", "m1"), "alice@example.org")
    lmtp_log = site.lmtpd.log()[-2000:] if site.lmtpd else ""
    assert subjects(site, address, password, folder) == ["Ihre Rechnung 17", "RECHNUNG 18"], lmtp_log
    assert subjects(site, address, password, "INBOX") == ["Mittagessen?"], lmtp_log
    assert not (home / ".dovecot.sieve.log").exists(), (home / ".dovecot.sieve.log").read_text()

    # 3. An extension vdeliver does not implement: refused when saved; the active script unchanged.
    ms = connect(site, address, password)
    try:
        sieve = next(t[1] for t in ms.greeting.lines if t[:1] == [b"SIEVE"])
        assert isinstance(sieve, bytes) and not {b"fcc", b"vnd.dovecot.pipe"} & set(sieve.split()), sieve
        refused = {
            ("Pipe", "vnd.dovecot.pipe"): b'require "vnd.dovecot.pipe";\r\npipe "archive";\r\n',
            (NAME, "fcc"): b'require "fcc";\r\nkeep;\r\n',  # over the active script itself
        }
        for (name, extension), text in refused.items():
            reply = ms.putscript(name, text)
            assert reply.status == "NO" and f"unknown Sieve capability `{extension}'" in reply.text, (name, reply)
        assert ms.listscripts() == {NAME: True}
    finally:
        ms.logout()
    assert os.readlink(link) == f"sieve/{NAME}.sieve"
    assert link.read_bytes() == script
    assert not (home / "sieve" / "Pipe.sieve").exists(), sorted(os.listdir(home / "sieve"))

    # 4. Accepted when saved, fails at delivery: the message is kept, the user is told why.
    broken = b'require "fileinto";\r\nfileinto "Missing";\r\n'
    ms = connect(site, address, password)
    try:
        reply = ms.putscript("Kaputt", broken)
        assert reply.status == "OK", reply
        reply = ms.setactive("Kaputt")
        assert reply.status == "OK", reply
        assert ms.listscripts() == {NAME: False, "Kaputt": True}
    finally:
        ms.logout()
    assert os.readlink(link) == "sieve/Kaputt.sieve"
    site.deliver_cli(address, message(address, "Rechnung 19", "r19"), "alice@example.org")
    site.deliver_lmtp(address, message(address, "Rechnung 20", "r20"), "bob@example.org")
    assert subjects(site, address, password, "INBOX") == ["Mittagessen?", "Rechnung 19", "Rechnung 20"]
    assert subjects(site, address, password, folder) == ["Ihre Rechnung 17", "RECHNUNG 18"]
    log = home / ".dovecot.sieve.log"
    assert log.exists(), sorted(os.listdir(home))
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and all("fileinto 'Missing': no such mailbox; kept in the INBOX" in line
                                   for line in lines), lines
