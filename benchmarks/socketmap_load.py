"""vdeliver-socketmapd against a bare netstring echo server, same client, same socket, one run.

    python -m benchmarks.socketmap_load [--quick] [--rounds 5] [--slice 1.0] [--out DIR]
    python -m benchmarks.socketmap_load --cells cached,pg,growth     (any subset)

A private PostgreSQL cluster (tests/pg.py: unix socket, fsync off) holds the accounts;
the real server runs as a subprocess over it, as in production (as vmail when run as
root).  The peer is a bare netstring echo server in Python on the same kind of socket
(unix): it reads a request and writes it back, nothing else - the most this protocol
costs in this runtime.  Two echo servers are measured, an asyncio Protocol and a
blocking thread per connection, and the faster one in each cell is the peer.

The client is the same for every target: blocking sockets, strict one request at a
time per connection, as sendmail asks (no pipelining); a single connection is a plain
send/recv loop, 16 connections are spread over client processes that each drive
theirs with epoll.  Targets take turns slice by slice, the order rotating every round,
so a busy second on a shared machine falls on all of them alike.

Cells:
  cached   keys answered from the server's memory: 1 and 16 connections
           (goals: >= 0.7x echo; p50 <= 50 us on one connection; 16 >= 2x one)
  pg       every lookup a database read (ttl = 0), keys cycling over 20,000 accounts
           and aliases: 16 connections (goal >= 5000/s)
  growth   one connection, uncached, tables of 100 to 1,000,000 accounts and as many
           aliases (bulk-loaded with COPY), one database and one server per size, all
           measured in the same interleaved rounds: p50/p99 against table size, the
           100-row size is the peer; EXPLAIN of the lookup's query at the largest size.
           A PNG curve (matplotlib, imported here only) beside the Markdown.

Writes DIR/socketmap.md and DIR/socketmap-growth.png (default benchmarks/results/;
--quick writes to a temporary directory unless --out is given).  No figure is asserted
anywhere: tests/test_benchmarks.py runs --quick to check the harness.
"""

from __future__ import annotations

import argparse
import array
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DOMAINS = 100
PG_KEYS = 20_000

# -- the peer: bare netstring echo servers ---------------------------------------------------


def _echo_asyncio(sock: socket.socket) -> None:
    import asyncio

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            # The netstring split is written out in both echo servers on purpose: they are the
            # peers that set the limit, and a shared helper's call would slow them (flattering us).
            buf = self.buf + data if self.buf else data
            out = []
            while True:
                colon = buf.find(b":")
                if colon < 0:
                    break
                end = colon + 1 + int(buf[:colon])
                if len(buf) <= end:
                    break
                out.append(buf[: end + 1])
                buf = buf[end + 1 :]
            self.buf = buf
            if out:
                self.transport.write(b"".join(out))  # type: ignore[attr-defined]

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_unix_server(Echo, sock=sock)
        await server.serve_forever()

    asyncio.run(serve())


def _echo_threads(sock: socket.socket) -> None:
    import threading

    def serve(conn: socket.socket) -> None:
        recv, send = conn.recv, conn.sendall
        buf = b""
        while True:
            data = recv(65536)
            if not data:
                break
            buf += data
            out = []
            while True:
                colon = buf.find(b":")
                if colon < 0:
                    break
                end = colon + 1 + int(buf[:colon])
                if len(buf) <= end:
                    break
                out.append(buf[: end + 1])
                buf = buf[end + 1 :]
            if out:
                send(b"".join(out))
        conn.close()

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def echo_main(path: str, kind: str, procs: int) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(256)
    for _ in range(procs - 1):  # workers sharing one listening socket, as a pre-forked server would
        if os.fork() == 0:
            break
    (_echo_asyncio if kind == "asyncio" else _echo_threads)(sock)
    return 0


# -- the client ------------------------------------------------------------------------------


def _reply_end(data: bytes) -> int:
    colon = data.find(b":")
    if colon <= 0:
        raise ConnectionError(f"not a netstring reply: {data[:40]!r}")
    return colon + 2 + int(data[:colon])


def _one_connection(sock: socket.socket, reqs: list[bytes], end_ns: int, lat: array.array[int],
                    status: bytes) -> int:
    send, recv, now = sock.send, sock.recv, time.perf_counter_ns
    n, i, bad = len(reqs), 0, 0
    while True:
        t0 = now()
        if t0 >= end_ns:
            return bad
        send(reqs[i % n])
        data = recv(65536)
        need = _reply_end(data)
        while len(data) < need:
            more = recv(65536)
            if not more:
                raise ConnectionError("server closed the connection")
            data += more
        lat.append(now() - t0)
        if status and data[data.find(b":") + 1 :][: len(status)] != status:
            bad += 1
        i += 1


def _many_connections(socks: list[socket.socket], reqs: list[bytes], end_ns: int, lat: array.array[int],
                      status: bytes, offset: int) -> int:
    now = time.perf_counter_ns
    ep = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    started: dict[int, int] = {}
    partial: dict[int, bytes] = {}
    n, i, bad = len(reqs), offset, 0
    for fd, s in by_fd.items():
        ep.register(fd, select.EPOLLIN)
        started[fd] = now()
        s.send(reqs[i % n])
        i += 7
    live = len(by_fd)
    give_up = end_ns + 10_000_000_000
    while live:
        events = ep.poll(1.0)
        if not events and now() > give_up:
            raise TimeoutError("server stopped answering")
        for fd, _ in events:
            s = by_fd[fd]
            data = partial.pop(fd, b"") + s.recv(65536)
            if not data or len(data) < _reply_end(data):
                if not data:
                    raise ConnectionError("server closed the connection")
                partial[fd] = data
                continue
            t = now()
            lat.append(t - started[fd])
            if status and data[data.find(b":") + 1 :][: len(status)] != status:
                bad += 1
            if t >= end_ns:
                ep.unregister(fd)
                live -= 1
                continue
            started[fd] = t
            s.send(reqs[i % n])
            i += 7
    ep.close()
    return bad


def drive(path: str, conns: int, procs: int, reqs: list[bytes], seconds: float,
          status: bytes, cpu: int | None = None) -> tuple[int, list[int], int]:
    """`conns` connections to `path` for `seconds`, in `procs` client processes; returns
    (completed lookups, latencies in ns, replies with the wrong status)."""
    procs = max(1, min(procs, conns))
    start_ns = time.perf_counter_ns() + int(0.05e9) + conns * 200_000
    end_ns = start_ns + int(seconds * 1e9)
    children = []
    for k in range(procs):
        mine = conns // procs + (1 if k < conns % procs else 0)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the client process: connect first, start together, report through the pipe
            os.close(r)
            code = 0
            try:
                if cpu is not None:
                    os.sched_setaffinity(0, {cpu})
                socks = []
                for _ in range(mine):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(path)
                    socks.append(s)
                lat: array.array[int] = array.array("q")
                delay = (start_ns - time.perf_counter_ns()) / 1e9
                if delay > 0:
                    time.sleep(delay)
                if mine == 1:
                    bad = _one_connection(socks[0], reqs, end_ns, lat, status)
                else:
                    bad = _many_connections(socks, reqs, end_ns, lat, status, k * 7919)
                result: object = (lat.tobytes(), bad)
            except Exception as exc:  # noqa: BLE001 - reported by the parent
                result, code = f"{type(exc).__name__}: {exc}", 1
            with os.fdopen(w, "wb") as f:
                pickle.dump(result, f)
            os._exit(code)
        os.close(w)
        children.append((pid, r))
    latencies: list[int] = []
    bad_total = 0
    errors = []
    for pid, r in children:
        with os.fdopen(r, "rb") as f:
            try:
                result = pickle.load(f)
            except EOFError:
                result = "client process died"
        os.waitpid(pid, 0)
        if isinstance(result, str):
            errors.append(result)
            continue
        raw, bad = result  # type: ignore[misc]
        lat = array.array("q")
        lat.frombytes(raw)  # type: ignore[has-type]
        latencies.extend(lat)
        bad_total += bad
    if errors:
        raise RuntimeError(f"client failed against {path}: {errors[0]}")
    return len(latencies), latencies, bad_total


# -- the targets -----------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, path: str, argv: list[str], status: bytes, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.name, self.path, self.argv, self.status, self.env, self.log = name, path, argv, status, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.argv, cwd=str(ROOT), start_new_session=True, env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text(errors="replace")[-2000:] if self.log else ""
                raise RuntimeError(f"{self.name} did not start: {log}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True, timeout=5)
            return [int(x) for x in out.stdout.split()] or [self.proc.pid]
        except (OSError, subprocess.SubprocessError):
            return [self.proc.pid]

    def pin(self, cpus: set[int]) -> None:
        """Every thread of every process of the target onto `cpus`."""
        for pid in self.pids():
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, cpus)
                except OSError:
                    pass

    def cpu_seconds(self) -> float:
        """User+system time of the target's processes and threads so far (from /proc)."""
        if self.proc is None:
            return 0.0
        total = 0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                pass
        return total / tick


def echo_targets(base: Path, procs: int) -> list[Target]:
    out = []
    for kind in ("asyncio", "threads"):
        path = str(base / f"echo-{kind}.sock")
        argv = [sys.executable, "-m", "benchmarks.socketmap_load", "--echo", path, "--echo-kind", kind,
                "--echo-procs", str(procs)]
        many = f", {procs} processes" if procs > 1 else ""
        out.append(Target(f"echo ({kind}{many})", path, argv, b""))
    return out


def pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] / 1000.0  # us


class Measured:
    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.seconds = 0.0
        self.lat: list[int] = []
        self.bad = 0
        self.cpu = 0.0
        self.where = ""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def interleave(targets: list[Target], conns: int, procs: int, reqs_for: Callable[[Target], list[bytes]],
               rounds: int, slice_s: float, say: Callable[[str], None],
               placement: tuple[int, int] | None = None) -> list[Measured]:
    """Every target, `rounds` times for `slice_s` seconds each, the order rotating.  placement:
    (client CPU, server CPU) for the slice, else wherever the scheduler puts them."""
    results = {t.name: Measured(t.name) for t in targets}
    every = set(range(os.cpu_count() or 1))
    for r in range(rounds):
        order = targets[r % len(targets):] + targets[: r % len(targets)]
        for t in order:
            if placement is not None:
                t.pin({placement[1]})
            cpu0 = t.cpu_seconds()
            n, lat, bad = drive(t.path, conns, procs, reqs_for(t), slice_s, t.status,
                                placement[0] if placement else None)
            if placement is not None:
                t.pin(every)
            m = results[t.name]
            m.cpu += t.cpu_seconds() - cpu0
            m.count += n
            m.seconds += slice_s
            m.lat.extend(lat)
            m.bad += bad
    where = {None: "", (0, 0): " (same core)", (0, 1): " (2 cores)"}.get(placement, f" {placement}")
    for m in results.values():
        m.where = where
        say(f"  {conns:>2} conn{where:<12} {m.name:<44} {m.rate:>9.0f}/s  p50 {pct(m.lat, 0.5):7.1f} us  "
            f"p99 {pct(m.lat, 0.99):7.1f} us  server CPU {m.cpu / max(m.count, 1) * 1e6:6.1f} us/lookup"
            + (f"  WRONG REPLIES {m.bad}" if m.bad else ""))
    return list(results.values())


# -- the database ----------------------------------------------------------------------------


def _rows(kind: str, start: int, stop: int) -> bytes:
    """COPY text for accounts u<i> (mailboxes) or aliases a<i> -> u<i>, spread over DOMAINS domains."""
    created = "2026-12-05T00:00:00Z"
    if kind == "mailboxes":
        lines = [f"u{i}\td{i % DOMAINS}.example\tmbox\t{created}" for i in range(start, stop)]
    else:
        lines = [f"a{i}\td{i % DOMAINS}.example\tu{i}@d{i % DOMAINS}.example" for i in range(start, stop)]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def grow(conninfo: str, start: int, stop: int) -> None:
    """Accounts and aliases start..stop-1, bulk-loaded with COPY, then ANALYZE."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        with conn.transaction():
            cur = conn.cursor()
            with cur.copy("COPY mailboxes (username, domain, format, created_at) FROM STDIN") as cp:
                cp.write(_rows("mailboxes", start, stop))
            with cur.copy("COPY aliases (username, domain, target) FROM STDIN") as cp:
                cp.write(_rows("aliases", start, stop))
        conn.execute("ANALYZE mailboxes")
        conn.execute("ANALYZE aliases")
        conn.execute("ANALYZE domains")


def explain(conninfo: str, key: str) -> list[str]:
    """EXPLAIN ANALYZE of the queries one lookup of `key` runs, as the server runs them."""
    import psycopg

    from vdeliver.socketmap import lookup

    if hasattr(lookup, "explainable"):
        sqls = lookup.explainable(key)
    else:  # the queries of accounts.snapshot.slice()
        local, _, domain = key.partition("@")
        sqls = [("SELECT * FROM domains WHERE name = %s", (domain,)),
                ("SELECT * FROM mailboxes WHERE domain = %s AND username = %s", (domain, local)),
                ("SELECT * FROM aliases WHERE domain = %s AND username = %s", (domain, local))]
    out = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # The server runs a prepared statement: after five executions PostgreSQL may switch to
        # a generic plan (parameters unknown at planning), so show that one.
        conn.execute("SET plan_cache_mode = force_generic_plan")
        cur = psycopg.ClientCursor(conn)
        for n, (sql, params) in enumerate(sqls):
            parts = sql.split("%s")
            numbered = "".join(f"{part}${i + 1}" for i, part in enumerate(parts[:-1])) + parts[-1]
            cur.execute(f"PREPARE explained{n} AS {numbered}")
            holes = ", ".join(["%s"] * len(params))
            rows = cur.execute(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) EXECUTE explained{n}({holes})",
                               params).fetchall()
            out += [r[0] for r in rows]
    return out


def setup_database(base: Path) -> tuple[Any, str]:
    """A private cluster and its database `bench`; returns (cluster, conninfo)."""
    from tests.pg import Cluster

    cluster = Cluster("smbench")
    with open(cluster.data / "postgresql.conf", "a") as conf:
        # Room for every growth size in memory: flat must not mean "flat on disk reads".
        conf.write("shared_buffers = 512MB\nmax_connections = 100\n")
    cluster.start()
    return cluster, new_database(cluster, base, "bench")


def new_database(cluster: Any, base: Path, name: str) -> str:
    """A database with the accounts schema and DOMAINS domains; returns its conninfo."""
    from vdeliver.accounts.engines import open_store
    from vdeliver.accounts.settings import load as load_accounts
    from vdeliver.config import load as load_config

    cluster.psql(f'CREATE DATABASE "{name}"')
    conninfo = str(cluster.conninfo(name))
    config = write_config(base, f"cfg-{name}", conninfo, ttl=0)
    with open_store(load_accounts(load_config(str(config)))) as store, store.transaction():
        for d in range(DOMAINS):
            store.domain_add(f"d{d}.example")
    return conninfo


def write_config(base: Path, name: str, conninfo: str, *, ttl: int, workers: int = 8) -> Path:
    config = base / f"{name}.toml"
    (base / "maps").mkdir(exist_ok=True)
    config.write_text(
        f'log = "none"\n[accounts]\ndsn = "{conninfo}"\n[maps]\ndirectory = "{base}/maps"\n'
        f'[socketmap]\nsocket_in = "{base}/{name}.sock"\nsocket_out = ""\nttl = {ttl}\nnegative_ttl = {ttl}\n'
        f"cache_size = 1000000\nmax_connections = 2000\npoll_interval = 0\nworkers = {workers}\n"
        + ('user = "vmail"\n' if os.geteuid() == 0 else "")
    )
    os.chmod(config, 0o644)
    return config


SERVER_PYTHON = sys.executable


def server_target(base: Path, name: str, label: str, conninfo: str, ttl: int, workers: int = 8) -> Target:
    config = write_config(base, name, conninfo, ttl=ttl, workers=workers)
    argv = [SERVER_PYTHON, "-m", "vdeliver.socketmap.daemon", "-c", str(config), "--log", "stderr"]
    return Target(label, str(base / f"{name}.sock"), argv, b"OK", log=base / f"{name}.log")


def requests(keys: list[str]) -> list[bytes]:
    from vdeliver.socketmap import protocol as p

    return [p.encode_request("virtuser", k) for k in keys]


def key(i: int, alias: bool = False) -> str:
    return f"{'a' if alias else 'u'}{i}@d{i % DOMAINS}.example"


# -- the run ---------------------------------------------------------------------------------


def _const(reqs: list[bytes]) -> Callable[[Target], list[bytes]]:
    return lambda t: reqs


def _prefixed(say: Callable[[str], None], prefix: str) -> Callable[[str], None]:
    return lambda text: say(prefix + text)


def best_echo(ms: list[Measured]) -> Measured:
    return max((m for m in ms if m.name.startswith("echo")), key=lambda m: m.rate)


def row(m: Measured, peer: Measured | None, conns: int, note: str = "") -> str:
    ratio = f"{m.rate / peer.rate:.2f}x" if peer is not None and peer.rate else "-"
    cpu = f"{m.cpu / m.count * 1e6:.1f}" if m.count and m.cpu else "-"
    return (f"| {conns} | {m.name} | {m.count} | {m.rate:.0f} | {ratio} | {pct(m.lat, 0.5):.1f} | "
            f"{pct(m.lat, 0.99):.1f} | {cpu} | {note} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.socketmap_load", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, not the figures")
    ap.add_argument("--rounds", type=int, default=0, help="interleaved rounds per cell (default 5; quick 1)")
    ap.add_argument("--slice", type=float, default=0.0, help="seconds per target per round (default 1; quick 0.1)")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes for 16 connections (default 2)")
    ap.add_argument("--cells", default="cached,pg,growth")
    ap.add_argument("--server-python", default=sys.executable,
                    help="interpreter for vdeliver-socketmapd (default this one; production: /usr/bin/python3)")
    ap.add_argument("--workers", type=int, default=8, help="[socketmap] workers of the uncached server (default 8)")
    ap.add_argument("--max-size", type=int, default=0, help="largest growth size (default 1000000; quick 1000)")
    ap.add_argument("--out", help="results directory (default benchmarks/results; quick: a temporary one)")
    ap.add_argument("--echo", help=argparse.SUPPRESS)
    ap.add_argument("--echo-kind", default="asyncio", help=argparse.SUPPRESS)
    ap.add_argument("--echo-procs", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.echo:
        return echo_main(args.echo, args.echo_kind, args.echo_procs)
    global SERVER_PYTHON
    SERVER_PYTHON = args.server_python
    rounds = args.rounds or (1 if args.quick else 5)
    slice_s = args.slice or (0.1 if args.quick else 1.0)
    max_size = args.max_size or (1000 if args.quick else 1_000_000)
    cells = set(args.cells.split(","))
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="smbench-out-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, flush=True)

    from tests.helpers import world_tmpdir

    base = world_tmpdir("vdeliver-smbench-")
    started = time.monotonic()
    cluster = None
    targets: list[Target] = []
    lines: list[str] = []
    goals: list[str] = []
    growth: list[tuple[int, Measured]] = []
    plan: list[str] = []
    try:
        cluster, conninfo = setup_database(base)
        say(f"loading {PG_KEYS} accounts and aliases")
        grow(conninfo, 0, PG_KEYS)
        procs = args.client_procs
        table = [("| connections | target | lookups | lookups/s | x echo | p50 us | p99 us | server CPU us/lookup "
                  "| note |"), "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        if "cached" in cells:
            say("cached lookups (50 keys, warmed), 1 and 16 connections")
            server = server_target(base, "cached", "vdeliver-socketmapd (cached)", conninfo, 3600)
            echos = echo_targets(base, 1)
            group = [server, *echos]
            for t in group:
                t.start()
                targets.append(t)
            hot = requests([key(i) for i in range(50)])
            drive(server.path, 1, 1, hot, 0.2, b"OK")  # warm the cache
            many = interleave(group, 16, procs, lambda t: hot, rounds, slice_s, say)
            e16, s16 = best_echo(many), many[0]
            ones: list[str] = []
            for placement, what in (((0, 0), "client and server on one core"),
                                    ((0, 1), "client and server on two cores"), (None, "unpinned")):
                if placement is not None and (os.cpu_count() or 1) < 2 and placement[1] == 1:
                    continue
                one = interleave(group, 1, 1, lambda t: hot, rounds, slice_s, say, placement)
                e1, s1 = best_echo(one), one[0]
                table += [row(m, e1, 1, what) for m in one]
                ones.append(f"{s16.rate / s1.rate:.2f}x ({what})")
                goals.append(f"- cached, 1 connection, {what}: {s1.rate:.0f}/s, {s1.rate / e1.rate:.2f}x the faster "
                             f"echo server ({e1.name}) (goal >= 0.7x); p50 {pct(s1.lat, 0.5):.1f} us against the "
                             f"echo's {pct(e1.lat, 0.5):.1f} us (goal <= 50 us).")
            table += [row(m, e16, 16, f"{procs} client processes, unpinned") for m in many]
            goals.append(f"- cached, 16 connections: {s16.rate:.0f}/s, {s16.rate / e16.rate:.2f}x the faster echo "
                         f"server ({e16.name}) (goal >= 0.7x); against the one-connection rate: {', '.join(ones)} "
                         "(goal >= 2x on 2 cores).")
            for t in group:
                t.stop()
        if "pg" in cells:
            say(f"uncached lookups (ttl 0, {PG_KEYS} accounts and aliases), 16 connections")
            server = server_target(base, "uncached", "vdeliver-socketmapd (uncached, PostgreSQL)", conninfo, 0,
                                   workers=args.workers)
            echos = echo_targets(base, 1)
            group = [server, *echos]
            for t in group:
                t.start()
                targets.append(t)
            keys = requests([key(i, alias=bool(i % 2)) for i in range(PG_KEYS)])
            drive(server.path, 1, 1, keys, 0.2, b"OK")  # connections made, statements prepared
            many = interleave(group, 16, procs, lambda t: keys, rounds, slice_s, say)
            one = interleave(group[:1], 1, 1, lambda t: keys, rounds, slice_s, say)
            e16 = best_echo(many)
            table.append(row(one[0], None, 1, "every lookup a database read"))
            table.append(row(many[0], e16, 16, f"every lookup a database read; {procs} client processes"))
            goals.append(f"- uncached (PostgreSQL), 16 connections: {many[0].rate:.0f} lookups/s "
                         f"({many[0].rate / 5000:.2f}x the goal of 5000/s; {many[0].rate / e16.rate:.2f}x echo); "
                         f"one connection: {one[0].rate:.0f}/s, p50 {pct(one[0].lat, 0.5):.0f} us.")
            for t in group:
                t.stop()
        if "growth" in cells:
            say("growth: one connection, uncached, one database per table size, all measured in the same rounds")
            sizes = []
            size = 100
            while size <= max_size:
                sizes.append(size)
                size *= 10
            servers, keys_of = [], {}
            for size in sizes:
                t0 = time.monotonic()
                db = new_database(cluster, base, f"g{size}")
                grow(db, 0, size)
                say(f"  {size:>8}: loaded with COPY in {time.monotonic() - t0:.1f}s")
                t = server_target(base, f"g{size}", f"{size:,} accounts", db, 0, workers=2)
                t.start()
                targets.append(t)
                servers.append(t)
                # Keys spread over the whole table, accounts and aliases alike.
                step = max(1, size // 2000)
                keys_of[t.name] = requests([key(i, alias=bool((i // step) % 2)) for i in range(0, size, step)])
                drive(t.path, 1, 1, keys_of[t.name], 0.2, b"OK")  # connected, statement prepared
                if size == sizes[-1]:
                    plan = explain(db, key(size - 1))
            measured = interleave(servers, 1, 1, lambda t: keys_of[t.name], rounds, slice_s, say)
            growth = list(zip(sizes, measured, strict=True))
            base_m = growth[0][1]
            big_size, big = growth[-1]
            goals.append(f"- growth, 100 -> {big_size:,} accounts and aliases: p50 {pct(base_m.lat, 0.5):.0f} -> "
                         f"{pct(big.lat, 0.5):.0f} us ({pct(big.lat, 0.5) / pct(base_m.lat, 0.5):.2f}x), p99 "
                         f"{pct(base_m.lat, 0.99):.0f} -> {pct(big.lat, 0.99):.0f} us "
                         f"({pct(big.lat, 0.99) / pct(base_m.lat, 0.99):.2f}x) (goal: flat).")
            for t in servers:
                t.stop()
        lines += table
    finally:
        for t in targets:
            t.stop()
        if cluster is not None:
            cluster.destroy()
        if os.environ.get("SMBENCH_KEEP"):
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    from benchmarks import report

    wall = time.monotonic() - started
    md = [
        ("# vdeliver-socketmapd against a bare echo server"
         + (" (--quick smoke run: tiny counts, not a measurement)" if args.quick else "")),
        "",
        (f"- Date: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; wall time {wall:.0f} s; command "
         f"`python -m benchmarks.socketmap_load{' --quick' if args.quick else ''}`; {rounds} interleaved rounds "
         f"of {slice_s:g} s per target and cell."),
        f"- Machine: {report.machine()}; shared with other jobs, so read the ratios.",
        ("- Client: blocking unix sockets, strict one request at a time per connection (as sendmail); "
         f"16 connections in {args.client_procs} client processes (epoll). Echo: a bare netstring echo server "
         "in Python (asyncio Protocol, and a thread per connection); the faster one is the peer (`x echo`)."),
        (f"- Database: a private PostgreSQL 15 cluster on a unix socket (fsync off); {PG_KEYS} accounts and as "
         f"many aliases over {DOMAINS} domains for the cached and uncached cells. Server CPU: user+system time "
         "of the target's processes over the slice, per lookup."),
        "",
        "## Goals",
        "",
        *goals,
        "",
        "## Cells",
        "",
        *lines,
    ]
    if growth:
        md += ["", "## Growth: one connection, uncached, against table size", "",
               "| accounts (and as many aliases) | lookups/s | p50 us | p99 us | p50 x 100-row size |",
               "|---:|---:|---:|---:|---:|"]
        b50 = pct(growth[0][1].lat, 0.5)
        for size, m in growth:
            md.append(f"| {size:,} | {m.rate:.0f} | {pct(m.lat, 0.5):.0f} | {pct(m.lat, 0.99):.0f} | "
                      f"{pct(m.lat, 0.5) / b50:.2f}x |")
        png = out / "socketmap-growth.png"
        why = plot_growth(png, growth)
        md += ["", f"![socketmap latency against table size]({png.name})" if not why else f"({why})"]
        if plan:
            md += ["", (f"Query plan of one lookup at {growth[-1][0]:,} rows (`EXPLAIN ANALYZE` of the prepared "
                        "statement, generic plan, as the server runs it):"), "", "```",
                   *plan, "```"]
    (out / "socketmap.md").write_text("\n".join(md) + "\n")
    say(f"results: {out / 'socketmap.md'} ({wall:.0f}s)")
    bad = sum(m.bad for _, m in growth)
    return 1 if bad else 0


def plot_growth(path: Path, growth: list[tuple[int, Measured]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    sizes = [s for s, _ in growth]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sizes, [pct(m.lat, 0.5) for _, m in growth], "o-", label="p50")
    ax.plot(sizes, [pct(m.lat, 0.99) for _, m in growth], "s--", label="p99")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("accounts in PostgreSQL (and as many aliases)")
    ax.set_ylabel("socketmap lookup latency, us (uncached)")
    ax.set_title("vdeliver-socketmapd: one connection, every lookup a database read")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
