"""Issue 14 on the resident servers: files made as root, slow and greedy clients, shutdown,
and answers after the commit point.  Real processes, started as root, serving as vmail."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, DevLog, MailRoot, mbox_messages, require_root
from tests.test_lmtp_server import Lmtpd, raw_until_data, transaction

pytestmark = pytest.mark.peers


def _victim(mailroot: MailRoot) -> Path:
    """A root-owned file outside the run directory that vmail would love root to overwrite."""
    safe = mailroot.base / "rootonly"
    safe.mkdir(mode=0o700, exist_ok=True)
    victim = safe / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o600)
    return victim


def _unchanged(victim: Path) -> None:
    st = victim.stat()
    assert victim.read_bytes() == b"precious\n" and (st.st_uid, st.st_mode & 0o777) == (0, 0o600)


def test_pid_file_symlink_planted_by_vmail_is_never_followed(mailroot: MailRoot) -> None:
    require_root("the server starts as root")
    victim = _victim(mailroot)
    server = Lmtpd(mailroot)
    server.pid_file.symlink_to(victim)
    os.lchown(server.pid_file, mailroot.owner.uid, mailroot.owner.gid)
    # The old code wrote `<pid_file>.<pid>` and chowned it, following links: plant one for
    # every pid the server may get.
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    for pid in range(last + 1, last + 400):
        tmp = Path(f"{server.pid_file}.{pid}")
        tmp.symlink_to(victim)
        os.lchown(tmp, mailroot.owner.uid, mailroot.owner.gid)
    try:
        server.start()
        assert not server.pid_file.is_symlink()
        assert server.pid_file.read_text().strip() == str(server.proc.pid)  # type: ignore[union-attr]
        _unchanged(victim)
    finally:
        server.stop()
    _unchanged(victim)


def test_pid_file_below_a_symlinked_directory_is_refused(mailroot: MailRoot) -> None:
    require_root("the server starts as root")
    victim = _victim(mailroot)
    server = Lmtpd(mailroot)
    link = server.rundir / "sub"
    link.symlink_to(victim.parent)
    os.lchown(link, mailroot.owner.uid, mailroot.owner.gid)
    server.pid_file = link / "lmtpd.pid"
    server.settings["pid_file"] = str(server.pid_file)
    from tests.test_lmtp_server import write_config

    write_config(mailroot, **server.settings)
    try:
        with pytest.raises(RuntimeError, match=r"exited 71.*symbolic link owned by uid"):
            server.start()
    finally:
        server.stop()  # only if it started after all
    assert os.listdir(victim.parent) == ["victim"]
    _unchanged(victim)


@pytest.mark.parametrize("planted", ["file", "foreign-socket", "symlink"])
def test_socket_path_taken_by_something_else_is_refused(mailroot: MailRoot, planted: str) -> None:
    require_root("the server starts as root")
    victim = _victim(mailroot)
    server = Lmtpd(mailroot)
    if planted == "file":
        server.socket.write_text("x")
    elif planted == "symlink":
        server.socket.symlink_to(victim)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(server.socket))
        s.close()
        os.chown(server.socket, 65534, 65534)  # nobody's, not ours
    try:
        with pytest.raises(RuntimeError, match="exited 71"):
            server.start()
    finally:
        server.stop()
    assert os.path.lexists(server.socket)
    _unchanged(victim)


def test_run_directory_writable_by_others_is_refused(mailroot: MailRoot) -> None:
    require_root("the server starts as root")
    server = Lmtpd(mailroot)
    server.rundir.chmod(0o777)
    try:
        with pytest.raises(RuntimeError, match=r"exited 71.*may be changed by others"):
            server.start()
    finally:
        server.stop()


def _socketmap_config(base: Path, extra: str) -> Path:
    from tests.socketmap_harness import populate, write_config

    config = write_config(base, f'database = "{base}/accounts.sqlite"', extra)
    populate(config)
    return config


def test_socketmap_serves_as_its_user_and_refuses_root(mailroot: MailRoot) -> None:
    require_root("the server starts as root")
    from tests.socketmap_harness import Client, running_server

    base = mailroot.base
    config = _socketmap_config(base, "")
    (base / "accounts.sqlite").chmod(0o600)  # stays root's: opened before root is given up
    with running_server(config) as proc:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(mailroot.owner.uid)] * 4, uids
        c = Client(str(base / "in.sock"))
        assert c.ask("virtuser", "fred@away.com").status == "OK"
        c.close()
    text = config.read_text().replace('user = "vmail"\n', "")
    config.write_text(text)
    out = subprocess.run([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--check"],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=60)
    assert out.returncode == 78 and "refusing to serve as root" in out.stderr, out


def test_slow_client_cannot_hold_a_slot(mailroot: MailRoot) -> None:
    """One byte a second is never silence: the command time limit closes it with 421."""
    mailroot.add_mbox("away.com", "fred")
    server = Lmtpd(mailroot, command_time_limit=2, timeout=60).start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(server.socket))
            assert s.recv(100).startswith(b"220")
            started = time.monotonic()
            got = b""
            for ch in b"LHLO " + b"x" * 100:
                try:
                    s.sendall(bytes([ch]))
                except OSError:
                    break
                s.settimeout(0.3)
                try:
                    data = s.recv(200)
                except TimeoutError:
                    continue
                got += data
                if not data or b"421" in got:
                    break
            assert b"421 4.4.2 command not complete after 2s" in got
            assert time.monotonic() - started < 20
        with server.client() as c:  # the server goes on
            assert transaction(c, "s@example.org", ["fred@away.com"])["fred@away.com"][0] == 250
    finally:
        server.stop()


def test_one_peer_cannot_take_every_slot(mailroot: MailRoot) -> None:
    from tests.helpers import free_port

    port = free_port()
    server = Lmtpd(mailroot, tcp=f"127.0.0.1:{port}", max_connections_per_peer=2).start()
    held = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert s.recv(100).startswith(b"220")
            held.append(s)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(200).startswith(b"421 4.4.2 too many connections from you")
        extra.close()
        with server.client() as c:  # root on the unix socket (sendmail) is not capped
            c.noop()
    finally:
        for s in held:
            s.close()
        server.stop()
    assert "max_connections_per_peer=2 reached" in server.log()


def test_shutdown_ends_within_its_grace_time(mailroot: MailRoot) -> None:
    """A delivery waiting on a mailbox lock (held here for longer than the grace) does not
    keep a SIGTERM'ed server alive: it is abandoned unanswered, and the mailbox is untouched."""
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(lock_timeout=120)
    server = Lmtpd(mailroot, shutdown_grace=2)
    from tests.test_lmtp_server import write_config

    mailroot.extra["lock_timeout"] = 120
    write_config(mailroot, **server.settings)
    server.start()
    fd = os.open(box, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    try:
        s, _got = raw_until_data(server, b"LHLO c\r\nMAIL FROM:<s@x.org>\r\nRCPT TO:<fred@away.com>\r\nDATA\r\n")
        s.sendall(b"Subject: stuck\r\n\r\nbody\r\n.\r\n")
        time.sleep(1)  # the delivery is now waiting for the lock
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        assert time.monotonic() - started < 2 + 10
        assert code == 0
        s.close()
    finally:
        os.close(fd)
        server.stop()
    assert box.read_bytes() == b""
    assert "shutdown_grace (2s) over: abandoning 1 connection" in server.log()


def test_lmtp_8bit_sender_gets_250_once(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    devlog = DevLog()
    try:
        mailroot.extra["log"] = "syslog"
        server = Lmtpd(mailroot).start()
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(server.socket))
                s.sendall(b"LHLO c\r\nMAIL FROM:<j\xe9r\xf4me@exa\xffmple.org>\r\nRCPT TO:<fred@away.com>\r\nDATA\r\n"
                          b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
                got = b""
                while b"221" not in got:
                    data = s.recv(4096)
                    if not data:
                        break
                    got += data
        finally:
            server.stop()
        assert b"250 2.1.0" in got and got.count(b"250 2.0.0") >= 1, got
        assert b"\r\n4" not in got and b"\r\n5" not in got
        msgs = mbox_messages(box)
        assert len(msgs) == 1 and b"Return-Path: <j\xe9r\xf4me@exa\xffmple.org>" in box.read_bytes()
        for line in devlog.lines(wait_for="to=<fred@away.com>"):
            assert line.isascii() and line.isprintable(), line
    finally:
        devlog.close()
