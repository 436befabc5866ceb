"""mbox crash journal, before and after the persistent journal: syncs and time per message, one run.

`python -m benchmarks.journal_bench [--quick] [--before REV] [--out DIR]`

"Before" is vdeliver at REV (default: the last commit with a journal file made, synced with its
directory and removed by every delivery), exported with `git archive`; "after" is this tree;
"off" is this tree with `mbox_journal = false` (the floor: the mbox's own fsync).  Each variant
runs in its own interpreter (same Python, same disk, same 4 KB message) and calls
`vdeliver.mbox.deliver()` directly: the difference is the journal, not the process start.

- syncs per message: `strace -f -c` of a worker that delivers N messages into an mbox that
  already had one (its journal exists), fsync/fdatasync/sync_file_range calls divided by N;
  and of one first delivery into a new mbox.
- time per message: the variants interleaved round by round (so the load of the shared machine
  falls on all alike), the median of each; ratios against "before" and "off".
- the common case of recovery (no interrupted delivery): the time of the journal hook's
  recover() alone, median of many calls (before: one failed lstat; after: open, fstat, pread).

Run it under the machine-wide lock: `flock /var/tmp/vdeliver-bench.lock python -m ...`.
Writes benchmarks/results/journal.md (with --quick: a temporary directory, unless --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BEFORE = "ece065b"  # main before the persistent journal (3 syncs a message)
SYNCS = ("fsync", "fdatasync", "sync_file_range", "msync", "syncfs", "sync")

# Runs in a fresh interpreter with PYTHONPATH at one variant's copy of the package.
WORKER = r"""
import json, os, sys, time
from vdeliver import mbox
from vdeliver.message import Prepared, Spool
from vdeliver.recovery import MboxJournal

mode, path, n, size, spool_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
record = b"From bench@example.org  Sat Dec  5 18:00:00 2026\nSubject: journal bench\n\n"
record += (b"x" * 71 + b"\n") * max(1, (size - len(record)) // 72) + b"\n"

def message():
    spool = Spool(1 << 20, spool_dir)
    spool.write(record)
    return Prepared(spool, "bench@example.org", len(record), record.count(b"\n"), len(record), False)

def once():
    m = message()
    try:
        mbox.deliver(path, m, host="bench", create=True, journal=MboxJournal(record=(mode != "off")))
    finally:
        m.close()

if sys.argv[6] == "recover":
    once()
    fd = os.open(path, os.O_RDWR)
    st = os.fstat(fd)
    times = []
    for _ in range(n):
        j = MboxJournal(record=(mode != "off"))
        t0 = time.perf_counter()
        j.recover(fd, path, st)
        getattr(j, "close", lambda: None)()
        times.append(time.perf_counter() - t0)
    os.close(fd)
else:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def export_before(rev: str, into: str) -> str | None:
    """The package at rev, or why not."""
    try:
        data = subprocess.run(["git", "-C", ROOT, "archive", rev, "vdeliver"], capture_output=True, check=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot export {rev}: {exc}"
    os.makedirs(into, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", into], input=data, check=True, timeout=60)
    return None


def worker(pkg: str, mode: str, mbox: str, n: int, kind: str, spool: str, strace: str | None = None) -> list[float]:
    argv = [sys.executable, "-c", WORKER, mode, mbox, str(n), "4096", spool, kind]
    if strace:
        argv = ["strace", "-f", "-qq", "-c", "-o", strace, "-e", "trace=" + ",".join(SYNCS), *argv]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pkg, "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C"}
    # cwd: `python -c` puts it first on sys.path, before PYTHONPATH
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600, env=env, cwd=pkg).stdout
    return [float(x) for x in json.loads(out.strip().splitlines()[-1])]


def count_syncs(summary: str) -> dict[str, int]:
    """strace -c's table: `% time seconds usecs/call calls errors syscall`."""
    counts: dict[str, int] = {}
    with open(summary) as f:
        for line in f:
            cols = line.split()
            if cols and cols[-1] in SYNCS and len(cols) >= 5:
                counts[cols[-1]] = int(cols[3])
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.journal_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: checks the harness, not the figures")
    p.add_argument("--before", default=BEFORE, help=f"the revision to compare with (default {BEFORE})")
    p.add_argument("--out", help=f"results directory (default: {RESULTS}; with --quick a temporary one)")
    args = p.parse_args(argv)
    rounds, per_round, traced, recovers = (1, 3, 3, 50) if args.quick else (20, 50, 20, 3000)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="vdeliver-journal-bench-", dir="/var/tmp")
    out = args.out or (os.path.join(work, "results") if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    lines: list[str] = []
    try:
        pkgs = {"after": os.path.join(work, "after"), "before": os.path.join(work, "before")}
        shutil.copytree(os.path.join(ROOT, "vdeliver"), os.path.join(pkgs["after"], "vdeliver"))
        why = export_before(args.before, pkgs["before"])
        variants = [("before", "on"), ("after", "on"), ("after", "off")] if why is None else [("after", "on"),
                                                                                              ("after", "off")]
        names = {("before", "on"): f"before ({args.before})", ("after", "on"): "after", ("after", "off"): "off"}
        spool = os.path.join(work, "spool")
        os.makedirs(spool)
        has_strace = shutil.which("strace") is not None

        # Syncs per message.
        syncs: dict[str, str] = {}
        for pkg, mode in variants:
            name = names[(pkg, mode)]
            if not has_strace:
                syncs[name] = "strace is not installed"
                continue
            box = os.path.join(work, f"syncs-{pkg}-{mode}")
            worker(pkgs[pkg], mode, box, 1, "deliver", spool)  # the mbox and its journal exist
            log = os.path.join(work, f"strace-{pkg}-{mode}")
            worker(pkgs[pkg], mode, box, traced, "deliver", spool, strace=log)
            counts = count_syncs(log)
            per = sum(counts.values()) / traced
            first = os.path.join(work, f"strace-first-{pkg}-{mode}")
            worker(pkgs[pkg], mode, box + "-new", 1, "deliver", spool, strace=first)
            syncs[name] = (f"{per:g} a message ({', '.join(f'{v / traced:g} {k}' for k, v in sorted(counts.items()))});"
                           f" first delivery into a new mbox: {sum(count_syncs(first).values())}")

        # Time per message, interleaved.
        times: dict[str, list[float]] = {names[v]: [] for v in variants}
        boxes = {v: os.path.join(work, f"time-{v[0]}-{v[1]}") for v in variants}
        for v in variants:
            worker(pkgs[v[0]], v[1], boxes[v], 1, "deliver", spool)
        for _ in range(rounds):
            for v in variants:
                times[names[v]] += worker(pkgs[v[0]], v[1], boxes[v], per_round, "deliver", spool)
        med = {k: statistics.median(t) * 1000 for k, t in times.items()}

        # The common case of recovery, alone.
        rec: dict[str, float] = {}
        for v in variants:
            box = os.path.join(work, f"recover-{v[0]}-{v[1]}")
            rec[names[v]] = statistics.median(worker(pkgs[v[0]], v[1], box, recovers, "recover", spool)) * 1e6
    finally:
        shutil.rmtree(os.path.join(work, "spool"), ignore_errors=True)

    when = datetime.datetime.now(datetime.UTC)
    wall = time.monotonic() - started
    with open("/proc/loadavg") as f:
        load = float(f.read().split()[0])
    lines += [
        "# mbox crash journal: before and after the persistent journal"
        + (" (--quick: not a measurement)" if args.quick else ""),
        "",
        (f"- Date: {when:%Y-%m-%d %H:%M} UTC; wall time {wall:.0f} s; load average at the end {load:.1f};"
        f" command `python -m benchmarks.journal_bench{' --quick' if args.quick else ''}`."),
        f"- Machine: {os.cpu_count()} cores, ext4 on {os.path.realpath('/var/tmp')}, Python {sys.version.split()[0]}.",
        ("- In-process deliveries (`vdeliver.mbox.deliver()`), 4 KB message, each variant in its own interpreter;"
        f" {rounds} rounds of {per_round} messages per variant, interleaved."),
    ]
    if why:
        lines.append(f"- No 'before' variant: {why}.")
    lines += ["", ("| variant | syncs (strace -c) | median ms a message | ratio to before | ratio to off |"
              " recover(), common case (us) |"), "|---|---|---|---|---|---|"]
    base = med.get(names[("before", "on")])
    off = med[names[("after", "off")]]
    for v in variants:
        n = names[v]
        ratio = f"{med[n] / base:.2f}" if base else "-"
        lines.append(f"| {n} | {syncs.get(n, '-')} | {med[n]:.3f} | {ratio} | {med[n] / off:.2f} | {rec[n]:.1f} |")
    lines.append("")
    text = "\n".join(lines)
    path = os.path.join(out, "journal.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"results: {path}")
    for name in os.listdir(work):  # keep only a --quick run's results, when they went there
        if os.path.join(work, name) != out:
            shutil.rmtree(os.path.join(work, name), ignore_errors=True) if os.path.isdir(
                os.path.join(work, name)) else os.unlink(os.path.join(work, name))
    if out != os.path.join(work, "results"):
        os.rmdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
