"""Large messages through LMTP (issue 21): a 10 MB message, vdeliver-lmtpd against Dovecot LMTP
and the fsync floor.

    python -m benchmarks.lmtp_large [--quick] [--messages N] [--formats mbox,maildir] [--out FILE]

One client, one mailbox per server and format, `messages` messages of 10 MB each (15; --quick
3 of 1 MB).  Both servers run at once (started once per format, as in the grid) and take turns
message by message with the in-process fsync floor (benchmarks.agents.FsyncFloor: write the
record and fsync it; for Maildir also link into new/ and fsync new/), the order rotating each
round, so a slow stretch of this shared machine falls on all three alike.  A message's time is
the client's, MAIL FROM to the final reply (the payload is dot-stuffed before the clock
starts); the figure is the median.  Server CPU per message comes from /proc over the run.

The goal (issue 21, "Large messages"): vdeliver's time per message at most 2x the floor's (the
floor's own write of 10 MB included) and below Dovecot LMTP's.  Afterwards every mailbox is
read back and each acknowledged message must be there once, body intact.

Results: benchmarks/results/lmtp-large.md (full mode); --quick writes a temporary file (the
harness's smoke test in tests/test_benchmarks.py: no figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

from benchmarks.agents import Agent, DovecotLmtp, FsyncFloor
from benchmarks.runner import cleanup_boxes, make_context, ready_agents, remove_workdir, write_results
from benchmarks.vdeliver_lmtp import VdeliverLmtp
from benchmarks.workloads import Message, check

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lmtp-large.md")
FLOOR_GOAL = 2.0  # vdeliver's time per message over the floor's


def run_format(ctx, fmt: str, servers: list[Agent], floor: Agent, size: int, messages: int,  # type: ignore[no-untyped-def]
               say) -> list[tuple[str, str, float | None, float | None, str, bool]]:
    """(label, key, median ms, server CPU ms/msg, integrity, intact) per agent, the floor first."""
    agents = [floor, *servers]
    boxes = {a.key: ctx.layout.box(fmt, f"{a.key}.large", f"large-{fmt}") for a in agents}
    times: dict[str, list[float]] = {a.key: [] for a in agents}
    expected: dict[str, dict[str, str]] = {a.key: {} for a in agents}
    errors: dict[str, list[str]] = {a.key: [] for a in agents}
    writers = {a.key: a.open_writer(fmt) for a in agents}
    cpu: dict[str, float | None] = {}
    try:
        for a in agents:  # warm-up, untimed: the mailbox, the page cache, Dovecot's index
            warm = Message(f"{a.key}.{fmt}.warm", size)
            sample = a.deliver(writers[a.key], boxes[a.key], warm)
            if not sample.ok:
                raise RuntimeError(f"{a.key}: warm-up delivery failed: {sample.error}")
            expected[a.key][warm.bench_id] = warm.body_digest
        # The floor alone, before the servers' turns: in the rotation it sometimes takes three
        # times as long (the harness's own write costs 20 ms of CPU then; see docs/benchmarks.md).
        alone = []
        for i in range(3):
            msg = Message(f"{floor.key}.{fmt}.alone.{i}", size)
            sample = floor.deliver(writers[floor.key], boxes[floor.key], msg)
            alone.append(sample.latency)
            expected[floor.key][msg.bench_id] = msg.body_digest
        times["alone"] = alone
        before = {a.key: a.usage(fmt) for a in servers}
        for i in range(messages):
            shift = i % len(agents)
            for a in agents[shift:] + agents[:shift]:
                msg = Message(f"{a.key}.{fmt}.{i}", size)
                sample = a.deliver(writers[a.key], boxes[a.key], msg)
                if sample.ok:
                    times[a.key].append(sample.latency)
                    expected[a.key][msg.bench_id] = msg.body_digest
                else:
                    errors[a.key].append(sample.error)
        for a in servers:
            u0, u1 = before[a.key], a.usage(fmt)
            n = len(times[a.key])
            cpu[a.key] = (u1[0] - u0[0]) / n * 1000 if u0 is not None and u1 is not None and n else None
    finally:
        for a in agents:
            a.close_writer(writers[a.key])
    out: list[tuple[str, str, float | None, float | None, str, bool]] = [
        ("fsync floor alone (3 messages before the servers' turns)", "floor-alone",
        statistics.median(times["alone"]) * 1000, None, "-", True)]
    for a in agents:
        result = check([boxes[a.key]], expected[a.key])
        intact = result.ok and not errors[a.key]
        ms = statistics.median(times[a.key]) * 1000 if times[a.key] else None
        out.append((a.label, a.key, ms, cpu.get(a.key), result.text() + (f"; {errors[a.key][0]}" if errors[a.key]
                                                                         else ""), intact))
        cleanup_boxes(ctx, [boxes[a.key]])
    say(f"  {fmt}: " + "  ".join(f"{k}: {ms or 0:.1f} ms" for _l, k, ms, _c, _i, _ok in out))
    return out


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(rows: dict[str, list[tuple[str, str, float | None, float | None, str, bool]]], size_mb: int) -> list[str]:
    lines = ["| format | run | ms/msg (median) | x fsync floor | x Dovecot LMTP | server CPU ms/msg | integrity |",
             "|---|---|---:|---:|---:|---:|---|"]
    goals = []
    for fmt, got in rows.items():
        by = {key: ms for _l, key, ms, _c, _i, _ok in got}
        # The stricter of the two floors: the one in the rotation or the one alone.
        floors = [f for f in (by.get("fsync-floor"), by.get("floor-alone")) if f]
        floor, dovecot = (min(floors) if floors else None), by.get("dovecot-lmtp")
        for label, _key, ms, cpu, integrity, _ok in got:
            xf = ms / floor if ms and floor else None
            xd = ms / dovecot if ms and dovecot else None
            lines.append(f"| {fmt} | {label} | {_f(ms)} | {_f(xf, 2)}x | {_f(xd, 2)}x | {_f(cpu)} | {integrity} |")
        v = by.get("vdeliver-lmtp")
        if v and floor:
            vs = f", {v / dovecot:.2f}x Dovecot LMTP's {dovecot:.1f} ms (goal: below 1x)" if dovecot else ""
            goals.append(f"- {fmt}, {size_mb} MB, 1 client: vdeliver LMTP {v:.1f} ms a message, {v / floor:.2f}x the "
                         f"fsync floor's {floor:.1f} ms (the lower of the floor alone and in the rotation; "
                         f"goal <= {FLOOR_GOAL:.0f}x){vs}.")
    return [*lines, "", *goals]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lmtp_large", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 MB, 3 messages: a smoke test of the harness")
    ap.add_argument("--messages", type=int, help="timed messages per server and format (default 15; --quick 3)")
    ap.add_argument("--formats", default="mbox,maildir")
    ap.add_argument("--servers", default="vdeliver-lmtp,dovecot-lmtp", help="agent keys (for profiling one)")
    ap.add_argument("--out", help=f"the Markdown file (default {RESULTS}; --quick: a temporary directory)")
    args = ap.parse_args(argv)
    size = (1 << 20) if args.quick else (10 << 20)
    messages = args.messages or (3 if args.quick else 15)
    workdir = tempfile.mkdtemp(prefix="vdeliver-lmtp-large-", dir="/tmp")
    out = args.out or (os.path.join(workdir, "lmtp-large.md") if args.quick else RESULTS)
    when = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    ctx = make_context(workdir, args.quick)

    def say(text: str) -> None:
        print(text, flush=True)

    vd = VdeliverLmtp()
    vd.lmtp_settings = f"processes = {os.cpu_count() or 1}\n"
    candidates: list[Agent] = [vd, DovecotLmtp()]
    servers, skipped = ready_agents(ctx, [a for a in candidates if a.key in args.servers.split(",")], say)
    floor = FsyncFloor()
    floor.prepare(ctx)
    rows = {}
    failed = []
    try:
        for fmt in args.formats.split(","):
            for agent in servers:
                agent.start(fmt)
            try:
                rows[fmt] = run_format(ctx, fmt, servers, floor, size, messages, say)
            except Exception as exc:  # noqa: BLE001 - name the format, keep the other
                failed.append(f"{fmt}: {type(exc).__name__}: {exc}")
                say(f"  {fmt}: FAILED: {exc}")
            for agent in servers:
                agent.stop()
    finally:
        for agent in servers:
            agent.stop()
    wall = time.monotonic() - started
    from benchmarks.report import machine

    quick = " (--quick: tiny counts, not a measurement)" if args.quick else ""
    mb = size >> 20
    header = [
        f"# Large messages through LMTP: vdeliver-lmtpd against Dovecot LMTP and the fsync floor{quick}",
        "",
        (f"- Date: {when:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min; command "
         f"`python -m benchmarks.lmtp_large{' --quick' if args.quick else ''}` ({mb} MB messages, one client, "
         f"{messages} timed messages per server and format after one untimed, interleaved message by message)."),
        (f"- Machine: {machine()}; shared with other jobs, so read the ratios (all measured in the same run, "
         "taking turns message by message, the order rotating)."),
        ("- Both servers as the vmail user, fsyncing every message, one persistent connection over the unix "
         "socket; time per message is the client's, MAIL FROM to the final reply. The floor writes the same "
         "record and fsyncs it in the harness's own process (Maildir: also link into new/ and fsync new/)."),
        *[f"- Skipped: {s}" for s in skipped],
        *[f"- Failed: {f}" for f in failed],
        "",
    ]
    text = "\n".join(header + report(rows, mb)) + "\n"
    write_results(out, text, say, wall)
    bad = [f"{fmt}: {key}: {integrity}" for fmt, got in rows.items() for _l, key, _ms, _c, integrity, ok in got
           if not ok]
    for problem in bad:
        say(f"INTEGRITY: {problem}")
    remove_workdir(workdir, out)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
