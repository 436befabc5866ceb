"""Group commit in vdeliver-lmtpd (issue 21): syncs per mbox message and msgs/s, on against off, one run.

    python -m benchmarks.group_bench [--quick] [--messages N] [--reps R] [--clients C] [--out FILE]

Two vdeliver-lmtpd servers of this tree, each on its own private mail tree (ext4, beside each
other), started alike but for `[lmtp] group_commit` (true: busy records in slots of the group
journal, one fdatasync for the records of concurrent deliveries; false: each delivery's own
per-mbox journal record and its fdatasync).  C clients (8) send 4 KB messages over persistent
LMTP connections, client i into its own mbox u<i> (8 clients into 8 mboxes).

- syncs per message: each server is started once under `strace -f -c` (fsync, fdatasync),
  sent N messages, and stopped; its sync calls over N.
- msgs/s: the two servers (not traced) take turns batch by batch, R repetitions, the order
  alternating, so a slow stretch of the shared machine falls on both; median of each, and the
  ratio on/off.  Every mbox is counted afterwards (every message there once).

Run it under the machine-wide lock: `flock /var/tmp/vdeliver-bench.lock python -m benchmarks.group_bench`.
Writes benchmarks/results/group-commit.md (--quick: tiny counts into a temporary file; a smoke
test of the harness run by tests/test_benchmarks.py, no figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import lmtp_bench

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "group-commit.md")
SYNCS = ("fsync", "fdatasync")


def _start(tree: lmtp_bench.Tree, clients: int, on: bool, strace_out: str = "") -> lmtp_bench.Server:
    tree.lmtp_settings = f"group_commit = {'true' if on else 'false'}\n"  # type: ignore[attr-defined]
    if not strace_out:
        return lmtp_bench.start_vdeliver(tree, clients)
    real = subprocess.Popen

    def traced(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = real(  # type: ignore[call-overload]
            ["strace", "-f", "-c", "-o", strace_out, "-e", "trace=" + ",".join(SYNCS), *argv], **kw)
        return proc

    subprocess.Popen = traced  # type: ignore[assignment, misc]
    try:
        return lmtp_bench.start_vdeliver(tree, clients)
    finally:
        subprocess.Popen = real  # type: ignore[misc]


def _stop_traced(server: lmtp_bench.Server) -> None:
    """SIGTERM to the server under strace (not strace), which then writes its summary and exits."""
    try:
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        kids = []
    for pid in kids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.stop()


def _syncs(path: str) -> int:
    total = 0
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in SYNCS:
                total += int(parts[3])
    return total


def _batch(server: lmtp_bench.Server, clients: int, per_client: int, size: int, errors: list[str]) -> float:
    threads = [threading.Thread(target=lmtp_bench._client, args=(server.socket, i, per_client, size, errors))
               for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return clients * per_client / (time.perf_counter() - started)


def syncs_per_message(on: bool, clients: int, messages: int, size: int) -> tuple[float, list[str]]:
    """Syncs per message of a server that already delivered into its mboxes (journals made)."""
    tree = lmtp_bench.Tree("mbox", clients)
    out = os.path.join(tree.base, "strace.txt")
    errors: list[str] = []
    server = _start(tree, clients, on)
    try:
        _batch(server, clients, 1, size, errors)  # warm-up, not traced: the journals are made
        server.stop()
        server = _start(tree, clients, on, out)
        per = max(1, messages // clients)
        _batch(server, clients, per, size, errors)
        _stop_traced(server)
        return _syncs(out) / (per * clients), errors
    finally:
        server.stop()
        tree.remove()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=400, help="messages a batch (and in the traced run)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.reps = 16, 1
    out = args.out or (os.path.join(tempfile.mkdtemp(prefix="group-bench-"), "group-commit.md") if args.quick
                       else RESULTS)
    if os.geteuid() != 0 or shutil.which("strace") is None:
        print("group_bench: needs root (the server serves as vmail) and strace", file=sys.stderr)
        return 1
    errors: list[str] = []
    syncs = {}
    for on in (True, False):
        syncs[on], errs = syncs_per_message(on, args.clients, args.messages, args.size)
        errors += errs
    trees = {on: lmtp_bench.Tree("mbox", args.clients) for on in (True, False)}
    servers = {on: _start(trees[on], args.clients, on) for on in (True, False)}
    rates: dict[bool, list[float]] = {True: [], False: []}
    per = max(1, args.messages // args.clients)
    try:
        for on in (True, False):
            _batch(servers[on], args.clients, 1, args.size, errors)  # warm-up
        for rep in range(args.reps):
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                rates[on].append(_batch(servers[on], args.clients, per, args.size, errors))
        counts = {on: sum(trees[on].count(i) for i in range(args.clients)) for on in (True, False)}
    finally:
        for server in servers.values():
            server.stop()
        for tree in trees.values():
            tree.remove()
    want = args.clients * (1 + per * args.reps)
    med = {on: statistics.median(rates[on]) for on in (True, False)}
    load = os.getloadavg()[0]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Group commit in vdeliver-lmtpd: on against off",
        "",
        (f"`python -m benchmarks.group_bench{' --quick' if args.quick else ''}`, {when}, load {load:.1f},"
         f" {os.cpu_count()} CPUs, ext4. {args.clients} clients into {args.clients} mboxes, {args.size} B messages,"
         f" {per * args.clients} messages a batch, {args.reps} batches each, interleaved."),
        "",
        "| group_commit | syncs / message (strace -f -c) | msgs/s (median) | ratio |",
        "|---|---|---|---|",
        f"| true | {syncs[True]:.2f} | {med[True]:.0f} | {med[True] / med[False]:.2f}x |",
        f"| false | {syncs[False]:.2f} | {med[False]:.0f} | 1.00x |",
        "",
        f"Delivered: {counts[True]} and {counts[False]} of {want} each; errors: {len(errors)}"
        + (f" ({errors[:3]})" if errors else "") + ".",
    ]
    if args.quick:
        lines.insert(1, "\n(--quick smoke run: tiny counts, not a measurement)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not errors and counts[True] == want and counts[False] == want else 1


if __name__ == "__main__":
    raise SystemExit(main())
