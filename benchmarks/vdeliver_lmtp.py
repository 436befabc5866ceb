"""The vdeliver LMTP server as an agent of this harness, started by benchmarks/lmtp_bench.py.

lmtp_bench.start_vdeliver(tree, clients) starts vdeliver-lmtpd privately for a mail tree (as
root it serves as vmail).  Here it is handed this harness's own tree, so the server delivers
into the same kind of mailboxes as every other agent, is driven by the same LMTP client as
Dovecot's server, and its mail goes through the same integrity check.  When lmtp_bench.py (or
that function) is missing, the agent is skipped with a note.
"""

from __future__ import annotations

import os
import pwd

from benchmarks.agents import Context, ResidentAgent, proc_usage, session_pids


class _Tree:
    """The attributes lmtp_bench.start_vdeliver() reads from its Tree, pointing into our layout."""

    def __init__(self, ctx: Context, fmt: str, key: str = "vdeliver-lmtp", settings: str = "",
                 lmtp_settings: str = "") -> None:
        self.fmt = fmt
        self.lmtp_settings = lmtp_settings  # more [lmtp] lines
        self.sieve = False  # start_vdeliver() enables [sieve] when the tree has scripts
        self.settings = settings  # more top-level configuration lines
        self.base = ctx.path(f"{key}-{fmt}")
        self.vbox = ctx.layout.vbox
        self.home = ctx.layout.home
        self.run = os.path.join(self.base, "run")
        self.owner: tuple[str, int, int] | None = None
        if ctx.creds is not None:
            self.owner = (pwd.getpwuid(ctx.creds[0]).pw_name, ctx.creds[0], ctx.creds[1])
        for d in (self.base, self.run, os.path.join(self.base, "spool")):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
            ctx.own(d)


class VdeliverLmtp(ResidentAgent):
    key = "vdeliver-lmtp"
    label = "vdeliver LMTP (resident)"
    fsync = "as the vdeliver command line"
    connections = 16  # concurrent clients the server must admit (the grid sets more)
    settings = ""  # more top-level configuration lines (a variant sets its own key and label too)
    lmtp_settings = ""  # more [lmtp] lines

    def missing(self) -> str | None:
        try:
            from benchmarks import lmtp_bench
        except ImportError:
            return "benchmarks/lmtp_bench.py (the vdeliver LMTP server's benchmark hook) is not there"
        if not hasattr(lmtp_bench, "start_vdeliver"):
            return "benchmarks/lmtp_bench.py has no start_vdeliver(tree, clients)"
        if not os.path.exists("/usr/bin/python3"):
            return "/usr/bin/python3 not installed"
        return None

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.servers: dict[str, object] = {}

    def start(self, fmt: str) -> None:
        if fmt in self.servers:
            return
        from benchmarks import lmtp_bench

        tree = _Tree(self.ctx, fmt, self.key, self.settings, self.lmtp_settings)
        self.servers[fmt] = lmtp_bench.start_vdeliver(tree, self.connections)  # type: ignore[arg-type]

    def socket_path(self, fmt: str) -> str:
        return str(self.servers[fmt].socket)  # type: ignore[attr-defined]

    def usage(self, fmt: str) -> tuple[float, int] | None:
        server = self.servers.get(fmt)
        if server is None:
            return None
        return proc_usage(session_pids(server.proc.pid))  # type: ignore[attr-defined]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()  # type: ignore[attr-defined]
        self.servers.clear()
