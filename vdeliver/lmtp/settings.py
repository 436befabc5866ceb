"""The [lmtp] table of the configuration, validated: what `vdeliver-lmtpd` serves and how.

Every key has a default and a kind; a wrong value is a ConfigError naming the file, line
and key.  A default of None takes the top-level key of the same name (user, group,
max_message_size), so one configuration serves the command line and the server.
"""

from __future__ import annotations

from vdeliver.config import Config, ConfigError, read_table

# [lmtp] key -> (default, kind).  A default of None means "take the top-level key".
LMTP_KEYS: dict[str, tuple[object, str]] = {
    "socket": ("/run/vdeliver/lmtp.sock", "path"),
    "socket_mode": ("0660", "mode"),
    "socket_owner": ("", "owner"),
    "tcp": ("", "address"),
    "max_connections": (20, "count"),
    "max_recipients": (1000, "count"),
    "max_message_size": (None, "size"),
    "delivery_threads": (8, "count"),
    "processes": (1, "count"),
    "pid_file": ("", "path?"),
    "user": (None, "str"),
    "group": (None, "str"),
    "timeout": (300, "count"),
    "data_timeout": (600, "count"),
    "command_time_limit": (300, "count"),
    "transaction_time_limit": (3600, "count"),
    "max_connections_per_peer": (10, "count"),
    "shutdown_grace": (60, "count"),
    "metrics": ("", "metrics"),
    "rcpt_check_quota": (True, "bool"),
    "group_commit": (False, "bool"),
    "group_journal": ("", "path?"),
    "recovery_time_limit": (30, "count"),
}


class Settings:
    """The validated [lmtp] table."""

    socket: str
    socket_mode: int
    socket_owner: str
    tcp: tuple[str, int] | None
    max_connections: int
    max_recipients: int
    max_message_size: int
    delivery_threads: int
    processes: int  # processes accepting on the socket (each with its own max_connections)
    pid_file: str
    user: str
    group: str
    timeout: int
    data_timeout: int
    command_time_limit: int
    transaction_time_limit: int
    max_connections_per_peer: int
    shutdown_grace: int
    metrics: tuple[str, int] | str | None  # where /metrics is served (vdeliver.metrics), or None
    rcpt_check_quota: bool  # refuse a full Maildir at RCPT (452 4.2.2 / 552 5.2.2)
    group_commit: bool  # concurrent mbox appends share the group journal's syncs (vdeliver/groupjournal.py)
    group_journal: str  # where; "" = beside the mbox domains (config.group_journal())
    recovery_time_limit: int  # seconds start-up spends recovering the group journal before listening

    def restart_keys(self) -> tuple[object, ...]:
        return (self.socket, self.socket_mode, self.socket_owner, self.tcp, self.user, self.group, self.pid_file,
                self.max_connections, self.delivery_threads, self.metrics, self.processes, self.group_commit,
                self.group_journal)


def settings(cfg: Config) -> Settings:
    """Validate [lmtp]; a ConfigError names the file, line and key at fault."""
    given = read_table(cfg, "lmtp", {key: "int" if kind in ("count", "size") else "bool" if kind == "bool" else "str"
                                     for key, (_default, kind) in LMTP_KEYS.items()})
    s = Settings()
    for key, (default, kind) in LMTP_KEYS.items():
        where = cfg.where("lmtp", key)
        value = given.get(key, default)
        if value is None:
            value = getattr(cfg, key)  # the top-level key of the same name
        if kind == "count" and value < 1:  # type: ignore[operator]
            raise ConfigError(where, "must be at least 1")
        if kind == "path" and not str(value).startswith("/"):
            raise ConfigError(where, "must be an absolute path")
        if kind == "path?" and value and not str(value).startswith("/"):
            raise ConfigError(where, "must be an absolute path or empty")
        if kind == "mode":
            text = str(value)
            if not text or len(text) > 4 or any(ch not in "01234567" for ch in text):
                raise ConfigError(where, f"must be an octal mode like \"0660\" (got {text!r})")
            value = int(text, 8)
        elif kind == "address":
            value = _tcp_address(str(value), where)
        elif kind == "metrics":
            from vdeliver.metrics import parse_endpoint

            try:
                value = parse_endpoint(str(value))
            except ValueError as exc:
                raise ConfigError(where, str(exc)) from None
        elif kind == "owner" and value and (str(value).count(":") > 1 or str(value).startswith(":")):
            raise ConfigError(where, "must be USER or USER:GROUP")
        setattr(s, key, value)
    if len(s.socket.encode()) > 107:
        raise ConfigError(cfg.where("lmtp", "socket"), "path too long for a unix socket (107 bytes)")
    return s


def _tcp_address(value: str, where: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(where, f"must be HOST:PORT (got {value!r})")
    import ipaddress

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(where, f"host must be a loopback IP address (got {host!r})") from None
    if not ip.is_loopback:
        # LMTP has no authentication: anyone who can connect can deliver.
        raise ConfigError(where, f"only loopback addresses are allowed (got {host})")
    return host, int(port)



def load(config: str | None) -> tuple[Config, Settings]:
    """The configuration file (-c, $VDELIVER_CONFIG or /etc/vdeliver.toml) and its [lmtp]."""
    from vdeliver import config as config_mod

    cfg = config_mod.load(config)
    return cfg, settings(cfg)
