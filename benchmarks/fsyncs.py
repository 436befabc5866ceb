"""Count what each agent really syncs for one delivery, with strace, beside what it claims.

A benchmark where one agent fsyncs once and another four times compares durability, not
speed; so each agent delivers one 4 KB message per format under `strace -f` (resident servers:
strace attached to the server's processes) after a warm-up delivery, and the fsync, fdatasync,
sync_file_range and msync calls are counted.  Skipped with a note when strace is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable

from benchmarks.agents import Agent, Context, session_pids
from benchmarks.workloads import Box, Message

SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "msync", "syncfs", "sync")


def _count(path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                for name in SYNC_CALLS:
                    # "1234 fsync(3) = 0" or "[pid 1234] fsync(3 <unfinished ...>"
                    if f" {name}(" in line or line.startswith(f"{name}("):
                        if "resumed>" not in line:
                            counts[name] = counts.get(name, 0) + 1
                        break
    except OSError:
        pass
    return counts


def _server_pids(agent: Agent, fmt: str) -> list[int]:
    proc = getattr(agent, "procs", {}).get(fmt) if hasattr(agent, "procs") else None
    if proc is None and hasattr(agent, "servers"):
        server = agent.servers.get(fmt)
        proc = getattr(server, "proc", None)
    return session_pids(proc.pid) if proc is not None else []


def audit(ctx: Context, agents: list[Agent], say) -> dict[tuple[str, str], str]:  # type: ignore[no-untyped-def]
    """(agent key, format) -> e.g. "3 fsync" (calls in one delivery), or why it was not counted."""
    strace = shutil.which("strace")
    out: dict[tuple[str, str], str] = {}
    if strace is None:
        say("strace is not installed: sync calls not counted")
        return out
    for agent in agents:
        if agent.kind not in ("process", "resident") or agent.only_basic:
            continue
        for fmt in agent.formats:
            try:
                agent.start(fmt)
                box = ctx.layout.box(fmt, "fsync-audit.test", agent.key)
                state = agent.open_writer(fmt)
                try:
                    warm = agent.deliver(state, box, Message(f"{agent.key}.audit.warm", 4096))
                    if not warm.ok:
                        raise RuntimeError(warm.error)
                    log = ctx.path("logs", f"strace-{agent.key}-{fmt}")
                    if agent.kind == "process":
                        real_argv = agent.argv

                        def traced(b: Box, _real: Callable[[Box], list[str]] = real_argv, _log: str = log) -> list[str]:
                            return [strace, "-f", "-qq", "-o", _log, "-e", "trace=" + ",".join(SYNC_CALLS), *_real(b)]

                        agent.argv = traced  # type: ignore[assignment]  # per instance; the del below undoes it
                        try:
                            sample = agent.deliver(state, box, Message(f"{agent.key}.audit", 4096))
                        finally:
                            del agent.argv  # back to the class's method
                    else:
                        pids = _server_pids(agent, fmt)
                        tracer = subprocess.Popen(
                            [strace, "-f", "-qq", "-o", log, "-e", "trace=" + ",".join(SYNC_CALLS),
                             *[a for pid in pids for a in ("-p", str(pid))]],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(0.5)  # let strace attach
                        sample = agent.deliver(state, box, Message(f"{agent.key}.audit", 4096))
                        time.sleep(0.3)
                        tracer.send_signal(signal.SIGINT)
                        tracer.wait(10)
                    if not sample.ok:
                        raise RuntimeError(sample.error)
                    counts = _count(log)
                    out[(agent.key, fmt)] = ", ".join(f"{n} {name}" for name, n in counts.items()) or "none"
                finally:
                    agent.close_writer(state)
                    ctx.layout.remove_domain("fsync-audit.test")
            except Exception as exc:  # noqa: BLE001 - an audit failure is a note, not a crash
                out[(agent.key, fmt)] = f"not counted ({type(exc).__name__}: {exc})"[:120]
            say(f"    fsyncs {agent.key} {fmt}: {out[(agent.key, fmt)]}")
    if os.path.exists(ctx.path("dovecot-mail", "fsync-audit.test")):
        shutil.rmtree(ctx.path("dovecot-mail", "fsync-audit.test"), ignore_errors=True)
    return out
