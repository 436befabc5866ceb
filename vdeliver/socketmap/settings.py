"""The [socketmap] table of the vdeliver configuration, validated (vdeliver-socketmapd).

Every error names the file, line and key (`/etc/vdeliver.toml:12: [socketmap] ttl: must be
a whole number`).  Its own module so that the lookup code and the server both read it
without importing each other.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields

from vdeliver.config import Config, ConfigError, read_table
from vdeliver.socketmap import protocol as p

FLAVOURS = ("in", "out")


@dataclass
class Settings:
    socket_in: str = "/run/vdeliver/socketmap-in.sock"
    socket_out: str = "/run/vdeliver/socketmap-out.sock"
    socket_mode: str = "0660"
    tcp: str = ""
    tcp_access: str = "in"
    ttl: int = 60
    negative_ttl: int = 30
    stale_max_age: int = 86400
    db_timeout: float = 3.0
    client_timeout: float = 10.0
    idle_timeout: int = 0
    poll_interval: float = 2.0
    workers: int = 8
    max_connections: int = 1000
    max_key: int = p.MAX_KEY
    cache_size: int = 100_000
    aliases_names: str = "Alias1"
    user: str = ""  # "" = the top-level `user`
    group: str = ""
    allow_root: bool = False
    metrics: str = ""  # "/path" or "127.0.0.1:PORT": Prometheus text on /metrics (vdeliver.metrics)
    # derived from the keys above by load_settings(), not keys themselves
    mode: int = field(default=0o660, init=False)
    tcp_host: str = field(default="", init=False)
    tcp_port: int = field(default=0, init=False)
    listeners: list[Listener] = field(default_factory=list, init=False)
    metrics_endpoint: tuple[str, int] | str | None = field(default=None, init=False)


@dataclass
class Listener:
    kind: str  # "unix" or "tcp"
    address: str  # path, or host
    port: int
    access: str  # flavour of map `access` here

    def describe(self) -> str:
        return self.address if self.kind == "unix" else f"{self.address}:{self.port}"


# The keys of [socketmap] and their kinds for config.read_table(): the fields above, so that
# a key is declared once, with its type and default.
_KEYS = {f.name: str(f.type) for f in fields(Settings) if f.init}


def load_settings(cfg: Config) -> Settings:
    """Validate the [socketmap] table; every error names file, line and key."""
    s = Settings()
    for key, value in read_table(cfg, "socketmap", _KEYS).items():
        setattr(s, key, value)

    def w(key: str) -> str:
        return cfg.where("socketmap", key)

    for key in ("socket_in", "socket_out"):
        path = getattr(s, key)
        if path and not path.startswith("/"):
            raise ConfigError(w(key), "must be an absolute path (or empty to disable)")
        if len(path.encode()) > 100:
            raise ConfigError(w(key), "unix socket path too long (over 100 bytes)")
    if s.socket_in and s.socket_in == s.socket_out:
        raise ConfigError(w("socket_out"), "must differ from socket_in")
    try:
        s.mode = int(s.socket_mode, 8)
    except ValueError:
        raise ConfigError(w("socket_mode"), f"must be an octal mode like \"0660\" (got {s.socket_mode!r})") from None
    if s.mode & ~0o777:
        raise ConfigError(w("socket_mode"), "must be a permission mode (at most 0777)")
    if s.tcp_access not in FLAVOURS:
        raise ConfigError(w("tcp_access"), f"must be one of {', '.join(FLAVOURS)} (got {s.tcp_access!r})")
    if s.tcp:
        host, colon, port = s.tcp.rpartition(":")
        host = host.strip("[]")
        try:
            s.tcp_port = int(port)
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ConfigError(w("tcp"), f"must be \"127.0.0.1:PORT\" (got {s.tcp!r})") from None
        if not colon or not 0 < s.tcp_port < 65536:
            raise ConfigError(w("tcp"), f"must be \"127.0.0.1:PORT\" (got {s.tcp!r})")
        if not loopback:
            raise ConfigError(w("tcp"), "must be a loopback address: socket maps have no authentication")
        s.tcp_host = host
    for key, low in (("workers", 1), ("max_connections", 1), ("max_key", 16), ("cache_size", 1)):
        if getattr(s, key) < low:
            raise ConfigError(w(key), f"must be at least {low}")
    if s.db_timeout <= 0 or s.client_timeout <= 0:
        raise ConfigError(w("db_timeout" if s.db_timeout <= 0 else "client_timeout"), "must be more than 0")
    if s.metrics:
        from vdeliver.metrics import parse_endpoint

        try:
            s.metrics_endpoint = parse_endpoint(s.metrics)
        except ValueError as exc:
            raise ConfigError(w("metrics"), str(exc)) from None
    if s.socket_in:
        s.listeners.append(Listener("unix", s.socket_in, 0, "in"))
    if s.socket_out:
        s.listeners.append(Listener("unix", s.socket_out, 0, "out"))
    if s.tcp:
        s.listeners.append(Listener("tcp", s.tcp_host, s.tcp_port, s.tcp_access))
    if not s.listeners:
        raise ConfigError(w("socket_in"), "no listener: set socket_in, socket_out or tcp")
    if not s.user:
        s.user, s.group = cfg.user, s.group or cfg.group
    if os.geteuid() == 0 and not s.user and not s.allow_root:
        raise ConfigError(w("user"), "refusing to serve as root: set [socketmap] user (or user), "
                          "or allow_root = true")
    return s
