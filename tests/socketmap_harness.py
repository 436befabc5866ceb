"""Shared pieces of the socketmap tests (no tests here): a populated accounts
database, a configuration file, the real server as a subprocess, a client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import ROOT
from vdeliver.accounts.engines import open_store
from vdeliver.accounts.settings import load as load_accounts_settings
from vdeliver.config import load as load_config
from vdeliver.socketmap import protocol as p


def write_config(base: Path, accounts: str, socketmap: str = "", maps_dir: Path | None = None) -> Path:
    """A vdeliver.toml with [accounts], [maps] and [socketmap] for a test."""
    if os.geteuid() == 0:
        from tests.helpers import ensure_vmail

        ensure_vmail()  # the server serves as vmail (it refuses root)
    maps_dir = maps_dir or base / "maps"
    maps_dir.mkdir(exist_ok=True)
    path = base / "vdeliver.toml"
    path.write_text(
        "log = \"stderr\"\n"
        f"[accounts]\n{accounts}\nargon2_time_cost = 1\nargon2_memory_cost = 64\nargon2_parallelism = 1\n"
        f"[maps]\ndirectory = \"{maps_dir}\"\nmakemap = \"/usr/sbin/makemap\"\n"
        f"[socketmap]\nsocket_in = \"{base}/in.sock\"\nsocket_out = \"{base}/out.sock\"\n"
        + ("user = \"vmail\"\n" if os.geteuid() == 0 and "user =" not in socketmap else "") + f"{socketmap}\n"
    )
    os.chmod(path, 0o644)
    return path


def populate(config: Path) -> None:
    """Every kind of account the maps know, in two domains, an alias domain and a catch-all domain."""
    cfg = load_config(str(config))
    with open_store(load_accounts_settings(cfg)) as store, store.transaction():
        store.domain_add("away.com")
        store.domain_add("home.com")
        store.domain_add("alias.org", alias_of="away.com")
        store.domain_add("empty.net")
        for user in ("fred", "dino", "sleepy", "multi", "keeper", "single"):
            store.user_add(user, "away.com", "{PLAIN}x", "mbox")
        store.user_add("fred", "home.com", "{PLAIN}x", "maildir")
        store.user_add("wilma", "home.com", "{PLAIN}x", "maildir")
        store.user_set_status("dino", "away.com", "disabled", "left")
        store.user_set_status("sleepy", "away.com", "suspended", "unpaid")
        store.forward_set("single", "away.com", ["single@elsewhere.example"])
        store.forward_set("multi", "away.com", ["a@elsewhere.example", "b@elsewhere.example"])
        store.forward_set("keeper", "away.com", ["k@elsewhere.example"], keep_copy=True)
        store.alias_add("info", "away.com", ["fred@away.com"])
        store.alias_add("sales", "away.com", ["orders@partner.example"])
        store.alias_add("team", "away.com", ["fred@away.com", "fred@home.com"])
        store.catchall_set("home.com", "wilma@home.com")


def generated_maps(config: Path) -> dict[str, str]:
    """The texts `vmailctl maps build` writes, for this database."""
    from vdeliver.accounts.maps import render

    cfg = load_config(str(config))
    settings = load_accounts_settings(cfg)
    with open_store(settings) as store:
        snap = store.snapshot()
    return render(snap, settings, cfg.host())


class Client:
    """A socket map client that speaks the protocol module's wire format."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 10) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(address)
        self.reader = p.ReplyReader()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> p.Reply | p.ProtocolError | object:
        while True:
            reply = self.reader.next_reply()
            if reply is not p.NEED_DATA:
                return reply
            data = self.sock.recv(65536)
            self.reader.receive_data(data)

    def ask(self, map_name: str, key: str) -> p.Reply:
        self.send_raw(p.encode_request(map_name, key))
        reply = self.read_reply()
        assert isinstance(reply, p.Reply), reply
        return reply

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@contextmanager
def running_server(config: Path, *extra: str, python: str | None = None,
                   open_files: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """The real daemon (`python -m vdeliver.socketmap.daemon -c config`), stopped with SIGTERM;
    open_files sets its RLIMIT_NOFILE."""
    text = config.read_text()
    sockets = [line.split('"')[1] for line in text.splitlines() if line.startswith(("socket_in", "socket_out"))]
    log = open(config.parent / "socketmapd.log", "ab")  # noqa: SIM115 - the daemon's output; closed below
    proc = subprocess.Popen(
        [python or sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--log", "stderr", *extra],
        cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=None if open_files is None else (lambda: _limit_files(open_files)),
    )
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(s) for s in sockets):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"socketmapd did not start: {(config.parent / 'socketmapd.log').read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def _limit_files(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def server_log(config: Path) -> str:
    return (config.parent / "socketmapd.log").read_text(errors="replace")
