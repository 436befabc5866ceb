"""Messages per second through vdeliver-lmtpd (and, beside it, Dovecot's LMTP server).

    python -m benchmarks.lmtp_bench [--messages N] [--clients 1,8] [--formats mbox,maildir]
                                    [--servers vdeliver,dovecot] [--size BYTES] [--sieve]

Each run builds a private mail tree under /tmp, starts the server privately (as root it
serves as the vmail user, as in production), and drives it with `clients` concurrent
stdlib smtplib.LMTP connections over the unix socket; client i delivers its share of the
messages to its own mailbox u<i>@bench.example (different mailboxes, as for different
recipients).  Every message is fsynced by the server (vdeliver: the file, and new/ for
Maildir; Dovecot: mail_fsync = optimized, its default).  Afterwards every mailbox is
counted, so a server cannot win by skipping work.

For the benchmark harness (benchmarks/run.py, issue 9): `run(messages, clients, fmt)`
returns a dict with msgs_per_s, seconds, ms_per_msg, delivered, errors, server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAIN = "bench.example"
SENDER = "bench-sender@example.org"


def message(size: int, n: int) -> bytes:
    head = (f"From: Bench <{SENDER}>\r\nTo: someone@{DOMAIN}\r\nSubject: lmtp bench {n}\r\n"
            f"Message-ID: <{n}.{time.time():.6f}@bench>\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def _vmail() -> tuple[str, int, int] | None:
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam("vmail")
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/nonexistent", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", "vmail"], check=True)
        pw = pwd.getpwnam("vmail")
    return pw.pw_name, pw.pw_uid, pw.pw_gid


class Tree:
    """A private mail tree: vbox/<domain>/u<i> (mbox) and home/<domain>/u<i>/Maildir; with
    `sieve`, each user's home holds the 30-rule script of sieve_bench as the active script."""

    def __init__(self, fmt: str, users: int, sieve: bool = False, parent: str = "/tmp") -> None:
        self.base = tempfile.mkdtemp(prefix="lmtp-bench-", dir=parent)
        os.chmod(self.base, 0o755)
        self.fmt = fmt
        self.sieve = sieve
        self.owner = _vmail()
        self.vbox = os.path.join(self.base, "vbox")
        self.home = os.path.join(self.base, "home")
        self.run = os.path.join(self.base, "run")
        for d in (self.vbox, self.home, self.run, os.path.join(self.base, "spool"),
                  os.path.join(self.vbox, DOMAIN), os.path.join(self.home, DOMAIN)):
            os.makedirs(d, exist_ok=True)
            self.own(d)
        for i in range(users):
            if fmt == "mbox":
                path = os.path.join(self.vbox, DOMAIN, f"u{i}")
                open(path, "wb").close()
                os.chmod(path, 0o600)
                self.own(path)
            else:
                md = os.path.join(self.home, DOMAIN, f"u{i}", "Maildir")
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(os.path.join(md, sub), 0o700, exist_ok=True)
                for d in (os.path.dirname(md), md, *(os.path.join(md, s) for s in ("tmp", "new", "cur"))):
                    self.own(d)
            if sieve:
                self._script(os.path.join(self.home, DOMAIN, f"u{i}"))

    def _script(self, home: str) -> None:
        from benchmarks.sieve_bench import FOLDERS, rules

        os.makedirs(os.path.join(home, "sieve"), 0o700, exist_ok=True)
        with open(os.path.join(home, "sieve", "rules.sieve"), "wb") as f:
            f.write(rules())
        os.symlink("sieve/rules.sieve", os.path.join(home, ".dovecot.sieve"))
        for folder in FOLDERS:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(home, "Maildir", f".{folder}", sub), 0o700, exist_ok=True)
        if self.owner is not None:
            for dirpath, dirnames, filenames in os.walk(home):
                for name in [*dirnames, *filenames]:
                    os.lchown(os.path.join(dirpath, name), self.owner[1], self.owner[2])
            os.lchown(os.path.join(home, ".dovecot.sieve"), self.owner[1], self.owner[2])

    def own(self, path: str) -> None:
        if self.owner is not None:
            os.chown(path, self.owner[1], self.owner[2])

    def count(self, i: int) -> int:
        if self.fmt == "mbox":
            with open(os.path.join(self.vbox, DOMAIN, f"u{i}"), "rb") as f:
                data = f.read()
            return data.count(b"\nFrom ") + data.startswith(b"From ")
        return len(os.listdir(os.path.join(self.home, DOMAIN, f"u{i}", "Maildir", "new")))

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


class Server:
    """A private server process (own session) with its unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], socket_path: str) -> None:
        self.proc = proc
        self.socket = socket_path

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(self.socket)
                    if s.recv(200).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("server did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def start_vdeliver(tree: Tree, clients: int) -> Server:
    sock = os.path.join(tree.run, "lmtp.sock")
    conf = os.path.join(tree.base, "vdeliver.toml")
    with open(conf, "w") as f:
        f.write(f'format = "{tree.fmt}"\nmbox_path = "{tree.vbox}/{{domain}}/{{user}}"\n'
                f'maildir_path = "{tree.home}/{{domain}}/{{user}}/Maildir"\n'
                f'spool_dir = "{tree.base}/spool"\nlog = "none"\n'
                + getattr(tree, "settings", "")  # more top-level keys (lmtp_grid: delivered_to = false)
                + (f'user = "{tree.owner[0]}"\n' if tree.owner else "")
                + f'\n[lmtp]\nsocket = "{sock}"\nmax_connections = {max(20, clients + 2)}\n'
                + getattr(tree, "lmtp_settings", "")  # more [lmtp] keys (lmtp_grid: processes)
                + ("\n[sieve]\nenabled = true\n" if tree.sieve else ""))
    os.chmod(conf, 0o644)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C", "PYTHONPATH": ROOT}
    proc = subprocess.Popen(["/usr/bin/python3", "-m", "vdeliver.lmtp.daemon", "-c", conf],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd="/", env=env, start_new_session=True)
    server = Server(proc, sock)
    server.wait_ready()
    return server


DOVECOT_CONF = """\
base_dir = {base}/dovecot
state_dir = {base}/dovecot/state
instance_name = vdeliver-lmtp-bench
protocols = lmtp
ssl = no
log_path = {base}/dovecot.log
mail_location = {location}
first_valid_uid = 0
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}/%d/%n
}}
passdb {{
  driver = static
  args = nopassword=y
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


def start_dovecot(tree: Tree) -> Server:
    dovecot = shutil.which("dovecot", path="/usr/sbin:/usr/bin:/sbin")
    if dovecot is None or not os.path.exists("/usr/lib/dovecot/lmtp") or tree.owner is None:
        raise RuntimeError("dovecot-lmtpd needs dovecot, /usr/lib/dovecot/lmtp and root")
    for d in ("dovecot", "dovecot-home", "dovecot-mail"):
        os.makedirs(os.path.join(tree.base, d), exist_ok=True)
    tree.own(os.path.join(tree.base, "dovecot-home"))
    tree.own(os.path.join(tree.base, "dovecot-mail"))
    if tree.fmt == "mbox":
        location = f"mbox:{tree.base}/dovecot-mail/%d/%n:INBOX={tree.vbox}/%d/%n"
    else:
        location = f"maildir:{tree.home}/%d/%n/Maildir"
    conf = os.path.join(tree.base, "dovecot.conf")
    with open(conf, "w") as f:
        home = tree.home if tree.sieve else f"{tree.base}/dovecot-home"  # with sieve: the users' own homes
        f.write(DOVECOT_CONF.format(base=tree.base, location=location, uid=tree.owner[1], gid=tree.owner[2],
                                    home=home))
        if tree.sieve:
            f.write("protocol lmtp {\n  mail_plugins = $mail_plugins sieve\n}\n"
                    "plugin {\n  sieve = file:~/sieve;active=~/.dovecot.sieve\n}\n")
    proc = subprocess.Popen([dovecot, "-F", "-c", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    server = Server(proc, os.path.join(tree.base, "dovecot", "lmtp"))
    server.wait_ready()
    return server


def _client(sock: str, user: int, count: int, size: int, errors: list[str]) -> None:
    try:
        with smtplib.LMTP(sock, timeout=120) as c:
            c.ehlo("bench.client")
            for n in range(count):
                refused = c.sendmail(SENDER, [f"u{user}@{DOMAIN}"], message(size, n))
                if refused:
                    errors.append(str(refused))
    except (smtplib.SMTPException, OSError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def run(messages: int, clients: int, fmt: str, server: str = "vdeliver", size: int = 3800,
        sieve: bool = False) -> dict[str, object]:
    """Deliver `messages` messages with `clients` concurrent LMTP connections; the rates.
    `sieve`: every user has the 30-rule script (Maildir only)."""
    if fmt not in ("mbox", "maildir") or (sieve and fmt != "maildir"):
        raise ValueError(f"fmt must be mbox or maildir (maildir with sieve), not {fmt!r}")
    tree = Tree(fmt, clients, sieve)
    srv = start_vdeliver(tree, clients) if server == "vdeliver" else start_dovecot(tree)
    try:
        share = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
        errors: list[str] = []
        # One warm-up message per client (connection set-up, first imports), not timed.
        warm = [threading.Thread(target=_client, args=(srv.socket, i, 1, size, errors)) for i in range(clients)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        threads = [threading.Thread(target=_client, args=(srv.socket, i, share[i], size, errors))
                   for i in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        delivered = sum(tree.count(i) for i in range(clients)) - clients
    finally:
        srv.stop()
        tree.remove()
    return {
        "server": server,
        "format": fmt,
        "clients": clients,
        "messages": messages,
        "size": size,
        "delivered": delivered,
        "errors": errors[:5],
        "seconds": round(seconds, 4),
        "msgs_per_s": round(delivered / seconds, 1) if seconds else 0.0,
        "ms_per_msg": round(1000 * seconds / delivered, 3) if delivered else None,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--formats", default="mbox,maildir")
    ap.add_argument("--servers", default="vdeliver,dovecot")
    ap.add_argument("--size", type=int, default=3800)
    ap.add_argument("--sieve", action="store_true", help="each user has sieve_bench's 30-rule script (Maildir)")
    args = ap.parse_args(argv)
    print(f"{'server':10} {'format':8} {'clients':>7} {'msgs':>6} {'msg/s':>8} {'ms/msg':>8}  errors")
    for srv in args.servers.split(","):
        for fmt in args.formats.split(","):
            for clients in (int(c) for c in args.clients.split(",")):
                try:
                    r = run(args.messages, clients, fmt, srv, args.size, args.sieve)
                except RuntimeError as exc:
                    print(f"{srv:10} {fmt:8} {clients:>7}  skipped: {exc}")
                    continue
                print(f"{srv:10} {fmt:8} {clients:>7} {r['delivered']:>6} {r['msgs_per_s']:>8} "
                      f"{r['ms_per_msg']:>8}  {len(r['errors'])}")  # type: ignore[arg-type]
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
