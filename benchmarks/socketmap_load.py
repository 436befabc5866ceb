"""Load test of vdeliver-socketmapd on loopback: requests/s and latency percentiles.

    .venv/bin/python benchmarks/socketmap_load.py [--requests 4000] [--seconds 8] [--out FILE]

Starts the real server (a subprocess) on a unix socket over a private SQLite
accounts database of 2,000 mailboxes, then for 1, 16 and 128 concurrent
connections measures
  cached    keys answered from the server's memory (warmed first), and
  uncached  a key never asked before on every request (each one a database read),
each bounded by a request count and a time limit.  The client runs in this
process (asyncio), on the same machine: the numbers are a floor, not a ceiling.
Writes a Markdown table (default benchmarks/results/socketmap.md).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vdeliver.socketmap import protocol as p  # noqa: E402

USERS = 2000


def make_database(base: Path) -> Path:
    from vdeliver.accounts.engines import open_store
    from vdeliver.accounts.settings import load as load_accounts
    from vdeliver.config import load as load_config

    config = base / "vdeliver.toml"
    (base / "maps").mkdir()
    config.write_text(
        f'log = "none"\n[accounts]\ndatabase = "{base}/accounts.sqlite"\n[maps]\ndirectory = "{base}/maps"\n'
        f'[socketmap]\nsocket_in = "{base}/in.sock"\nsocket_out = ""\nttl = 3600\nnegative_ttl = 3600\n'
        "cache_size = 1000000\nmax_connections = 2000\n"
        # The server refuses to serve as root: as vmail, as in production (the SQLite database
        # is opened before root is given up, so it may stay root's).
        + ('user = "vmail"\n' if os.geteuid() == 0 else "")
    )
    with open_store(load_accounts(load_config(str(config)))) as store, store.transaction():
        store.domain_add("bench.example")
        for i in range(USERS):
            store.user_add(f"u{i}", "bench.example", "{PLAIN}x", "mbox")
    return config


async def one_connection(sock: str, keys: itertools.count[int], stop_at: float, budget: list[int],
                         latencies: list[float], prefix: str, cached: bool) -> None:
    reader, writer = await asyncio.open_unix_connection(sock)
    rr = p.ReplyReader()
    try:
        while budget[0] > 0 and time.perf_counter() < stop_at:
            budget[0] -= 1
            n = next(keys)
            key = f"u{n % 50}@bench.example" if cached else f"{prefix}{n}@bench.example"
            t0 = time.perf_counter()
            writer.write(p.encode_request("virtuser", key))
            while (reply := rr.next_reply()) is p.NEED_DATA:
                rr.receive_data(await reader.read(65536))
            latencies.append(time.perf_counter() - t0)
            assert isinstance(reply, p.Reply) and reply.status in ("OK", "NOTFOUND"), reply
    finally:
        writer.close()


async def scenario(sock: str, conns: int, cached: bool, requests: int, seconds: float, prefix: str) -> dict[str, float]:
    latencies: list[float] = []
    budget = [requests]
    keys = itertools.count()
    t0 = time.perf_counter()
    await asyncio.gather(*(one_connection(sock, keys, t0 + seconds, budget, latencies, prefix, cached)
                           for _ in range(conns)))
    elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=1000)
    return {"n": len(latencies), "rps": len(latencies) / elapsed, "p50": q[499] * 1e3, "p90": q[899] * 1e3,
            "p99": q[989] * 1e3, "max": max(latencies) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000, help="per scenario (default 4000)")
    ap.add_argument("--seconds", type=float, default=8, help="time limit per scenario (default 8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "socketmap.md"))
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vdeliver-smbench-"))
    proc = None
    try:
        config = make_database(base)
        sock = str(base / "in.sock")
        proc = subprocess.Popen([sys.executable, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--log", "none"],
                                cwd=str(ROOT), start_new_session=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("server did not start")
            time.sleep(0.05)
        # Warm the cached keys.
        asyncio.run(scenario(sock, 1, True, 50, 10, ""))
        rows = []
        for cached in (True, False):
            for conns in (1, 16, 128):
                r = asyncio.run(scenario(sock, conns, cached, args.requests, args.seconds, f"c{conns}-"))
                rows.append((conns, "cached" if cached else "uncached", r))
                print(f"{conns:>4} conns {'cached' if cached else 'uncached':>8}: {r['n']:>6} req "
                      f"{r['rps']:>8.0f}/s  p50 {r['p50']:.2f} ms  p90 {r['p90']:.2f}  p99 {r['p99']:.2f}  "
                      f"max {r['max']:.2f}", flush=True)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)
    lines = [
        "# vdeliver-socketmapd load test",
        "",
        (f"`benchmarks/socketmap_load.py --requests {args.requests} --seconds {args.seconds}` on "
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
        f"Python {platform.python_version()}; SQLite accounts database of {USERS} mailboxes; unix socket; "
        "client (asyncio) and server on the same machine. `cached`: keys answered from memory; "
        "`uncached`: a new key on every request (one database read each)."),
        "",
        "| connections | keys | requests | requests/s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for conns, kind, r in rows:
        lines.append(f"| {conns} | {kind} | {r['n']} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p90']:.2f} | "
                     f"{r['p99']:.2f} | {r['max']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
