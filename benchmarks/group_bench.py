"""Group commit in vdeliver-lmtpd (issue 21): syncs per mbox message and msgs/s, on against off, one run.

    python -m benchmarks.group_bench [--quick] [--messages N] [--reps R] [--clients C] [--flush-ms MS]
                                     [--out FILE]

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

Both on this machine's disk (a flush about 0.1 ms: group commit has nothing to share) and, unless
--flush-ms 0, on a disk whose cache flush takes --flush-ms (4 ms: a SATA disk, an SSD without
power-loss protection), built for the run by benchmarks/slowdisk.py (ext4 on a RAM disk behind
nbdkit; root, nbdkit, nbdkit-plugin-python, libnbd-bin, fuse3).

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
from collections.abc import Callable

from benchmarks import lmtp_bench
from benchmarks.slowdisk import SlowDisk, missing, sync_ms

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


def syncs_per_message(on: bool, clients: int, messages: int, size: int, parent: str) -> tuple[float, list[str]]:
    """Syncs per message of a server that already delivered into its mboxes (journals made)."""
    tree = lmtp_bench.Tree("mbox", clients, parent=parent)
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


class Compared:
    """One disk's comparison: syncs a message and msgs/s, group commit on and off."""

    def __init__(self, disk: str) -> None:
        self.disk = disk
        self.syncs: dict[bool, float] = {}
        self.rates: dict[bool, list[float]] = {True: [], False: []}
        self.counts: dict[bool, int] = {}
        self.errors: list[str] = []
        self.want = 0
        self.flushes: dict[bool, float] = {}  # device cache flushes a message, where the disk counts them

    def median(self, on: bool) -> float:
        return statistics.median(self.rates[on])

    def rows(self) -> list[str]:
        on, off = self.median(True), self.median(False)
        if self.flushes:
            head = [("| group_commit | syncs / message (strace -f -c) | device flushes / message | msgs/s (median)"
                     " | ratio |"), "|---|---|---|---|---|"]
            cells = {k: f" {self.flushes[k]:.2f} |" for k in (True, False)}
        else:
            head = ["| group_commit | syncs / message (strace -f -c) | msgs/s (median) | ratio |", "|---|---|---|---|"]
            cells = {True: "", False: ""}
        return [*head,
                f"| true | {self.syncs[True]:.2f} |{cells[True]} {on:.0f} | {on / off:.2f}x |",
                f"| false | {self.syncs[False]:.2f} |{cells[False]} {off:.0f} | 1.00x |",
                "",
                f"Delivered: {self.counts[True]} and {self.counts[False]} of {self.want} each; errors: "
                f"{len(self.errors)}" + (f" ({self.errors[:3]})" if self.errors else "") + "."]

    @property
    def ok(self) -> bool:
        return not self.errors and self.counts[True] == self.want and self.counts[False] == self.want


def compare(disk: str, parent: str, args: argparse.Namespace, flushes: Callable[[], int] | None = None) -> Compared:
    got = Compared(disk)
    for on in (True, False):
        got.syncs[on], errs = syncs_per_message(on, args.clients, args.messages, args.size, parent)
        got.errors += errs
    trees = {on: lmtp_bench.Tree("mbox", args.clients, parent=parent) for on in (True, False)}
    servers = {on: _start(trees[on], args.clients, on) for on in (True, False)}
    per = max(1, args.messages // args.clients)
    try:
        for on in (True, False):
            _batch(servers[on], args.clients, 1, args.size, got.errors)  # warm-up
        flushed = {True: 0, False: 0}
        for rep in range(args.reps):
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                before = flushes() if flushes else 0
                got.rates[on].append(_batch(servers[on], args.clients, per, args.size, got.errors))
                flushed[on] += (flushes() - before) if flushes else 0
        if flushes:  # the batches take turns, so each one's flushes are its own
            got.flushes = {on: flushed[on] / (per * args.clients * args.reps) for on in (True, False)}
        got.counts = {on: sum(trees[on].count(i) for i in range(args.clients)) for on in (True, False)}
    finally:
        for server in servers.values():
            server.stop()
        for tree in trees.values():
            tree.remove()
    got.want = args.clients * (1 + per * args.reps)
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--messages", type=int, default=400, help="messages a batch (and in the traced run)")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--flush-ms", type=float, default=4.0,
                    help="the slow-flush disk's flush time (benchmarks/slowdisk.py); 0: the machine's disk only")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.quick:
        args.messages, args.reps = 16, 1
    out = args.out or (os.path.join(tempfile.mkdtemp(prefix="group-bench-"), "group-commit.md") if args.quick
                       else RESULTS)
    if os.geteuid() != 0 or shutil.which("strace") is None:
        print("group_bench: needs root (the server serves as vmail) and strace", file=sys.stderr)
        return 1
    per = max(1, args.messages // args.clients)
    load = os.getloadavg()[0]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Group commit in vdeliver-lmtpd: on against off",
        "",
        (f"`python -m benchmarks.group_bench{' --quick' if args.quick else ''}`, {when}, load {load:.1f},"
         f" {os.cpu_count()} CPUs. {args.clients} clients into {args.clients} mboxes, {args.size} B messages,"
         f" {per * args.clients} messages a batch, {args.reps} batches each, interleaved."),
        "",
    ]
    results = [compare("this machine's disk", "/tmp", args)]
    here = sync_ms("/tmp")
    lines += [f"## This machine's disk (ext4 under /tmp; one fdatasync of a rewritten block: {here:.2f} ms)",
              "", *results[0].rows(), ""]
    slow_failed = ""
    if args.flush_ms > 0:
        why = missing()
        if why:
            slow_failed = f"slow-flush disk skipped: {why}"
            lines += [f"## A disk whose cache flush takes {args.flush_ms:g} ms", "", slow_failed, ""]
        else:
            with SlowDisk(args.flush_ms) as disk:
                sync = disk.sync_ms()
                results.append(compare(f"a disk flushing in {args.flush_ms:g} ms", disk.path, args, disk.flushes))
            lines += [(f"## A disk whose cache flush takes {args.flush_ms:g} ms (benchmarks/slowdisk.py: ext4 on "
                       f"a RAM disk behind nbdkit; one fdatasync of a rewritten block: {sync:.2f} ms)"),
                      "", *results[-1].rows(), ""]
    if args.quick:
        lines.insert(1, "\n(--quick smoke run: tiny counts, not a measurement)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    if slow_failed and os.environ.get("VDELIVER_REQUIRE_PEERS") == "1":
        return 1
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
