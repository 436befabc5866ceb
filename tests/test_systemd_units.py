"""Running the servers under systemd: the shipped units (examples/systemd/) pass `systemd-analyze
verify`, and both servers speak the notify protocol their `Type=notify` relies on (READY=1 once
they listen and dropped root, RELOADING=1 and READY=1 around a SIGHUP, STOPPING=1 on SIGTERM),
told over a real $NOTIFY_SOCKET.  Without one they run the same."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT, ROOT, MailRoot, install_vdeliver, require, world_tmpdir
from tests.socketmap_harness import populate, running_server, write_config
from tests.test_lmtp_server import Lmtpd
from vdeliver import unixd

UNITS = sorted((ROOT / "examples" / "systemd").glob("*.service"))


def test_the_units_are_the_two_servers() -> None:
    assert [u.name for u in UNITS] == ["vdeliver-lmtpd.service", "vdeliver-socketmapd.service"]
    for unit in UNITS:
        text = unit.read_text()
        for line in ("Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "RuntimeDirectory=vdeliver",
                     "ExecReload=/bin/kill -HUP $MAINPID", "KillSignal=SIGTERM"):
            assert f"\n{line}\n" in text, (unit.name, line)
        assert f"ExecStart=/opt/vdeliver/bin/{unit.stem} -c /etc/vdeliver.toml\n" in text
    lmtp = (ROOT / "examples" / "systemd" / "vdeliver-lmtpd.service").read_text()
    assert "ReadWritePaths=/var/spool/vbox /home/vmail-users /var/lib/vdeliver" in lmtp  # where delivery writes


@pytest.mark.peers
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    analyze = require("systemd-analyze")["systemd-analyze"]
    # verify checks that ExecStart exists: point it at the installed server, as /opt/vdeliver would be.
    installed = install_vdeliver() / "bin" / unit.stem
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(f"/opt/vdeliver/bin/{unit.stem}", str(installed)))
    r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if unit.name in line]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr


class Manager:
    """The service manager's end of $NOTIFY_SOCKET: a datagram socket the servers (as vmail) may write."""

    def __init__(self) -> None:
        self.dir = world_tmpdir("vdeliver-notify-")
        self.path = self.dir / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        os.chmod(self.path, 0o777)
        self.sock.settimeout(20)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    yield m
    m.close()


def test_notify_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert unixd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert unixd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert unixd.notify("READY=1") is False  # never raises


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"vdeliver-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert unixd.notify("STATUS=hello") is True
        assert sock.recv(100) == b"STATUS=hello"


def test_lmtpd_tells_the_manager(mailroot: MailRoot, manager: Manager) -> None:
    if not IS_ROOT:
        pytest.skip("the server tests start vdeliver-lmtpd as root serving as vmail")
    server = Lmtpd(mailroot)
    server.env = {"NOTIFY_SOCKET": str(manager.path)}
    server.start()
    try:
        ready = manager.next()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(server.proc.pid if server.proc else 0)
        assert "listening on" in ready["STATUS"]
        assert server.socket.exists()
        server.signal(signal.SIGHUP)
        assert manager.next() == {"RELOADING": "1"}
        assert manager.next() == {"READY": "1"}
        server.signal(signal.SIGTERM)
        assert manager.next() == {"STOPPING": "1"}
        assert server.wait() == 0
    finally:
        server.stop()


def test_socketmapd_tells_the_manager(tmp_path: Path, manager: Manager, monkeypatch: pytest.MonkeyPatch) -> None:
    base = world_tmpdir("vdeliver-smd-")
    try:
        config = write_config(base, f'database = "{base}/accounts.sqlite"')
        populate(config)
        monkeypatch.setenv("NOTIFY_SOCKET", str(manager.path))
        with running_server(config) as proc:
            ready = manager.next()
            assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
            os.kill(proc.pid, signal.SIGHUP)
            assert manager.next() == {"RELOADING": "1"}
            assert manager.next() == {"READY": "1"}
            os.kill(proc.pid, signal.SIGTERM)
            assert manager.next() == {"STOPPING": "1"}
            assert proc.wait(20) == 0
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
