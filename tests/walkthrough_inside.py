"""The inside half of tests/test_docs_walkthrough.py: run by /usr/bin/python3 in fresh namespaces.

Standard library only (no pytest here).  Reads the job (the blocks to run, the clone's files,
the wheelhouse) as JSON on stdin, mounts the private world, runs each block with `/bin/sh -e`,
then sends mail over SMTP and reads everything back over IMAP; prints the log and, on its
last line, a JSON result.  Every daemon the blocks start dies with the pid namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

OVERLAID = ("etc", "opt", "usr/local", "var", "home", "root")
SCRATCH = "/mnt"  # a tmpfs inside the namespace


def _sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True, **kw)  # type: ignore[call-overload,no-any-return]


def _isolate(job: dict[str, object]) -> str:
    """Mount the private world; return the clone's copy."""
    _sh(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", SCRATCH])
    # Copy the clone first: it may live below /tmp or /run (CI's clone may), which the
    # tmpfs mounts below hide.
    clone = f"{SCRATCH}/vdeliver"
    root = str(job["root"])
    for rel in job["files"]:  # type: ignore[attr-defined]
        dest = os.path.join(clone, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(root, rel), dest)
    for d in OVERLAID:
        upper, work = f"{SCRATCH}/upper/{d}", f"{SCRATCH}/work/{d}"
        os.makedirs(upper)
        os.makedirs(work)
        _sh(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir=/{d},upperdir={upper},workdir={work}", f"/{d}"])
    _sh(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"])
    _sh(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp"])
    _sh(["ip", "link", "set", "lo", "up"])
    _start_dns()
    return clone


def _start_dns() -> None:
    """A loopback DNS server answering NXDOMAIN to everything, in place of the Internet's DNS
    (the namespace has no network): the docs' domains do not exist, and sendmail learns so at
    once instead of deferring every message for a name server that cannot be reached."""
    import socket
    import threading

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))

    def serve() -> None:
        while True:
            query, peer = sock.recvfrom(4096)
            if len(query) < 12:
                continue
            # Same id, QR=1, opcode and RD copied, RA=1, RCODE=3 (NXDOMAIN); the question echoed.
            flags = bytes([0x80 | (query[2] & 0x79), 0x80 | 3])
            sock.sendto(query[:2] + flags + query[4:6] + b"\0\0\0\0\0\0" + query[12:], peer)

    threading.Thread(target=serve, daemon=True).start()
    Path("/etc/resolv.conf").unlink(missing_ok=True)
    Path("/etc/resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:2 attempts:1\n")


def _check_packages(line: str) -> str:
    missing = []
    for pkg in (word for word in line.split()[2:] if not word.startswith("-")):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, timeout=30)
        if r.stdout.strip() != "install ok installed":
            missing.append(pkg)
    if missing:
        raise RuntimeError(f"packages the docs install are not installed: {' '.join(missing)}")
    return ""


def _run_block(block: dict[str, object], clone: str, env: dict[str, str], log: list[str]) -> None:
    text = str(block["text"]).replace("\\\n", " ")  # a command continued with backslash-newline is one line
    lines = []
    for line in text.split("\n"):
        if line.startswith("apt-get install "):
            _check_packages(line.split("#")[0])
            log.append(f"checked (not run): {line}")
        else:
            lines.append(line)
    log.append(f"== {block['file']}:{block['line']} ({block['id']})")
    # Output to a file, not a pipe: a daemon the block starts may keep the pipe open for good.
    with open(f"{SCRATCH}/block.out", "w+") as out:
        r = subprocess.run(["/bin/sh", "-e", "-x", "-c", "\n".join(lines)], cwd=clone, env=env, stdout=out,
                           stderr=subprocess.STDOUT, timeout=150, stdin=subprocess.DEVNULL)
        out.seek(0)
        log.append(out.read())
    if r.returncode != 0:
        raise RuntimeError(f"{block['file']}:{block['line']} ({block['id']}) exited {r.returncode}")


def _imap_read(user: str, password: str) -> bytes:
    import imaplib

    with imaplib.IMAP4("127.0.0.1", 143, timeout=30) as imap:
        imap.login(user, password)
        imap.select("INBOX")
        _typ, data = imap.search(None, "ALL")
        out = b""
        for num in data[0].split():
            _typ, msg = imap.fetch(num, "(BODY.PEEK[])")
            out += b"".join(part[1] for part in msg if isinstance(part, tuple))
        return out


def _after(env: dict[str, str], log: list[str]) -> dict[str, object]:
    import smtplib

    result: dict[str, object] = {}
    result["mbox_fred_away"] = b"hello fred" in Path("/var/spool/vbox/away.com/fred").read_bytes()
    with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
        smtp.sendmail("postmaster@mail.example.net", ["fred@home.com", "info@away.com"],
                      b"Subject: over SMTP\r\n\r\nhello over smtp\r\n")
    fred_home = Path("/home/vmail-users/home.com/fred/Maildir/new")
    wilma = Path("/var/spool/vbox/home.com/wilma")
    _run_queue_until(env, log, lambda: any(fred_home.iterdir()) and b"hello over smtp" in wilma.read_bytes())
    result["imap_fred_away"] = b"hello fred" in _imap_read("fred@away.com", "fred-secret")
    result["imap_fred_home"] = b"hello over smtp" in _imap_read("fred@home.com", "fred-secret")
    result["imap_wilma_home"] = b"hello over smtp" in _imap_read("wilma@home.com", "wilma-secret")
    # The last block switched the outgoing sendmail to LMTP (docs/lmtp.md): one more message.
    result["lmtp_used"] = "vdlmtp" in Path("/etc/mail/sendmail_out.cf").read_text()
    result["out_alive_after_hup"] = _outgoing_alive()
    with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
        smtp.sendmail("postmaster@mail.example.net", ["fred@away.com"], b"Subject: lmtp\r\n\r\nhello over lmtp\r\n")
    _run_queue_until(env, log, lambda: b"hello over lmtp" in Path("/var/spool/vbox/away.com/fred").read_bytes())
    result["imap_fred_away_lmtp"] = b"hello over lmtp" in _imap_read("fred@away.com", "fred-secret")
    return result


def _after_socketmap(env: dict[str, str], log: list[str]) -> dict[str, object]:
    """After docs/socketmap.md's switch: a user added with vmailctl and no `maps build` gets mail."""
    import smtplib

    result: dict[str, object] = {}
    result["socketmap_used"] = "socketmap-out.sock" in Path("/etc/mail/sendmail_out.cf").read_text()
    subprocess.run(["vmailctl", "user", "add", "--password-stdin", "barney@home.com"], input="barney-secret\n",
                   env=env, check=True, capture_output=True, text=True, timeout=60)
    _outgoing_alive()
    with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
        smtp.sendmail("postmaster@mail.example.net", ["barney@home.com"], b"Subject: sm\r\n\r\nhello socketmap\r\n")
    barney = Path("/var/spool/vbox/home.com/barney")
    _run_queue_until(env, log, lambda: b"hello socketmap" in barney.read_bytes())
    result["imap_barney_socketmap"] = b"hello socketmap" in _imap_read("barney@home.com", "barney-secret")
    return result


def _managesieve(user: str, password: str, name: str, script: bytes) -> bool:
    """PUTSCRIPT and SETACTIVE over ManageSieve (RFC 5804) on the documented loopback port."""
    import base64
    import socket

    with socket.create_connection(("127.0.0.1", 4190), timeout=30) as s:
        f = s.makefile("rwb")

        def answer() -> bytes:
            while True:
                line = f.readline()
                if not line or line.startswith((b"OK", b"NO", b"BYE")):
                    return line

        answer()
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        ok = True
        for command in (f'AUTHENTICATE "PLAIN" "{token}"\r\n'.encode(),
                        f'PUTSCRIPT "{name}" {{{len(script)}+}}\r\n'.encode() + script + b"\r\n",
                        f'SETACTIVE "{name}"\r\n'.encode()):
            f.write(command)
            f.flush()
            ok = ok and answer().startswith(b"OK")
        f.write(b"LOGOUT\r\n")
        f.flush()
        return ok


def _roundcube_login(user: str, password: str, log: list[str]) -> bool:
    """Debian's Roundcube as configured by docs/webmail.md, on PHP's built-in server (the walk-
    through has no web server): the login form, then the mailbox page."""
    import http.cookiejar
    import re
    import time
    import urllib.parse
    import urllib.request

    server = subprocess.Popen(["php", "-S", "127.0.0.1:8080", "-t", "/var/lib/roundcube/public_html"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/var/lib/roundcube")
    try:
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        page = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "rcmloginuser" not in page:
            try:
                page = opener.open("http://127.0.0.1:8080/", timeout=30).read().decode()
            except OSError:
                time.sleep(0.2)
        token = re.search(r'name="_token" value="([^"]+)"', page)
        if token is None:
            log.append(f"roundcube: no login form:\n{page[-2000:]}")
            return False
        form = urllib.parse.urlencode({"_token": token.group(1), "_task": "login", "_action": "login",
                                       "_timezone": "UTC", "_url": "", "_user": user, "_pass": password}).encode()
        reply = opener.open("http://127.0.0.1:8080/?_task=login", data=form, timeout=60)
        page = reply.read().decode()
        ok = "_task=mail" in reply.geturl() and "rcmloginuser" not in page
        if not ok:
            log.append(f"roundcube: login refused ({reply.geturl()}):\n{page[-2000:]}")
        return ok
    finally:
        server.terminate()
        server.wait(10)


def _after_webmail(env: dict[str, str], log: list[str]) -> dict[str, object]:
    """After docs/webmail.md: fred@home.com saves a filter over ManageSieve, as Roundcube would,
    and the next message is filed by it; Roundcube logs fred in."""
    import smtplib
    import time

    result: dict[str, object] = {}
    script = (b'require ["fileinto", "mailbox"];\r\nif header :contains "subject" "webmail" {\n'
              b'  fileinto :create "Webmail";\r\n}\n')  # CRLF and LF mixed, as Roundcube writes
    deadline = time.monotonic() + 15  # `doveadm reload` brings the listener up
    while not result.get("managesieve_saved") and time.monotonic() < deadline:
        try:
            result["managesieve_saved"] = _managesieve("fred@home.com", "fred-secret", "roundcube", script)
        except OSError:
            time.sleep(0.3)
    with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
        smtp.sendmail("postmaster@mail.example.net", ["fred@home.com"],
                      b"Subject: from webmail\r\n\r\nhello filter\r\n")
    folder = Path("/home/vmail-users/home.com/fred/Maildir/.Webmail/new")
    _run_queue_until(env, log, lambda: folder.is_dir() and any(folder.iterdir()))
    import imaplib

    with imaplib.IMAP4("127.0.0.1", 143, timeout=30) as imap:
        imap.login("fred@home.com", "fred-secret")
        typ, data = imap.select("Webmail", readonly=True)
        result["imap_fred_home_filed"] = typ == "OK" and data[0] == b"1"
    result["roundcube_login"] = _roundcube_login("fred@home.com", "fred-secret", log)
    return result


def _run_queue_until(env: dict[str, str], log: list[str], arrived: "object", seconds: float = 60) -> None:
    """Run the outgoing queue (as the admin would, `sendmail -qf`) until arrived() says the
    message is there, for at most `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = subprocess.run(["/usr/sbin/sendmail", "-C", "/etc/mail/sendmail_out.cf", "-qf"], env=env,
                           capture_output=True, text=True, timeout=60)
        log.append(r.stdout + r.stderr)
        if arrived():  # type: ignore[operator]
            return
        time.sleep(1)


def _after_by_hand(env: dict[str, str], log: list[str]) -> dict[str, object]:
    """The example maps: fred@away.com got the first message (an mbox); one over SMTP to
    fred@home.com (the Maildir made by hand)."""
    import smtplib

    result: dict[str, object] = {}
    result["mbox_fred_away"] = b"hello fred" in Path("/var/spool/vbox/away.com/fred").read_bytes()
    with smtplib.SMTP("127.0.0.1", 25, timeout=30) as smtp:
        smtp.sendmail("postmaster@mail.example.net", ["fred@home.com"], b"Subject: hand\r\n\r\nhello by hand\r\n")
    new = Path("/home/vmail-users/home.com/fred/Maildir/new")
    _run_queue_until(env, log, lambda: any(b"hello by hand" in f.read_bytes() for f in new.iterdir()))
    result["maildir_fred_home"] = any(b"hello by hand" in f.read_bytes() for f in new.iterdir())
    return result


def _outgoing_alive() -> bool:
    """On SIGHUP the outgoing sendmail restarts itself (by its full path); is one running again?"""
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            pid = Path("/run/sendmail/mta/sendmail_out.pid").read_text().split()[0]
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                return True
        except (OSError, IndexError):
            pass
        time.sleep(0.5)
    return False


def _inside() -> int:
    job = json.loads(sys.stdin.read())
    full_log = open(job["log"], "w")  # noqa: SIM115 - opened before the mounts hide its directory
    log: list[str] = []
    result: dict[str, object] = {"error": None}
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "LANG": "C.UTF-8", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": job["wheels"], "PIP_CONFIG_FILE": "/dev/null",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        clone = _isolate(job)
        plan = job["plan"]
        if job["mode"] == "by-hand":
            for block in plan:
                _run_block(block, clone, env, log)
            result.update(_after_by_hand(env, log))
        else:
            ids = [str(block["id"]) for block in plan]
            switch, webmail = ids.index("socketmap-switch"), ids.index("webmail-packages")
            for block in plan[:switch]:
                _run_block(block, clone, env, log)
            result.update(_after(env, log))
            _run_block(plan[switch], clone, env, log)  # docs/socketmap.md's switch
            result.update(_after_socketmap(env, log))
            for block in plan[webmail:]:  # docs/webmail.md
                _run_block(block, clone, env, log)
            result.update(_after_webmail(env, log))
    except Exception as exc:  # noqa: BLE001 - reported to the test with the log
        result["error"] = f"{type(exc).__name__}: {exc}"
    if result["error"] or not all(v for k, v in result.items() if k != "error"):
        for cmd in (["/usr/sbin/sendmail", "-C", "/etc/mail/sendmail_out.cf", "-bp"],
                    ["/usr/sbin/sendmail", "-bp", "-Ac"],
                    ["ls", "-lR", "/var/spool/vbox", "/home/vmail-users"], ["ps", "axf"]):
            try:  # diagnostics only: they must never hide the error they are there to explain
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                log.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
            except (OSError, subprocess.SubprocessError) as exc:
                log.append(f"$ {' '.join(cmd)}\n({exc})")
    full_log.write("\n".join(log))
    full_log.close()
    print("\n".join(log)[-20000:])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_inside())
