"""The LMTP grid (issue 21): vdeliver-lmtpd against Dovecot's LMTP server, cell by cell.

    python -m benchmarks.lmtp_grid [--quick] [--messages N] [--reps R] [--clients 1,8,32]
                                   [--boxes 1,8] [--formats mbox,maildir] [--out FILE]

Cells: 1, 8 and 32 concurrent clients, into 1 and 8 mailboxes, mbox and Maildir, 4 KB
messages.  Both servers run at once (each started once per format, as in production) and are
measured in the same run, taking turns batch by batch with the order alternating each
repetition, so a slow stretch of this shared machine falls on both alike.  A batch is
`messages` messages (200) sent by `clients` threads, one persistent connection each (opened before
the clock starts); client w sends its i-th message to mailbox (w + i*clients) mod boxes, so
8 clients into 8 mailboxes is one client a mailbox, 1 client into 8 goes round them, and 32
into 8 is four clients a mailbox.  msgs/s is a batch's messages over its wall time (median
over repetitions); latency is each message's MAIL FROM to final reply (p50, p99 over all
repetitions); CPU is the server's own (all its processes and threads) per message.  With one
client the in-process fsync floor (benchmarks.agents.FsyncFloor: write+fsync, and for Maildir
link + fsync of new/) takes its turns too, and the table gives the time per message against it;
for mbox also the two-sync floor of a journalled append (benchmarks.agents.JournalFloor: the
journal record's fdatasync and the append's fsync, the least crash safety costs); and the runtime
floor, a bare Python LMTP responder that frames the protocol and makes the same syncs and nothing
else (benchmarks.lmtp_floor.BareLmtp: what any LMTP server in this interpreter costs at the least,
as the netstring echo server is for the socketmap; its messages are read back too).

Afterwards every mailbox is read back and every acknowledged message must be there once, body
intact (benchmarks.workloads.check), so no server wins by skipping work.

Results: benchmarks/results/lmtp-grid.md (full mode); --quick runs tiny counts into a
temporary file (a smoke test of the harness, run by tests/test_benchmarks.py: no figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.agents import Agent, Context, DovecotLmtp, FsyncFloor, JournalFloor, LmtpClient, Sample, lmtp_payload
from benchmarks.lmtp_floor import BareLmtp
from benchmarks.runner import cleanup_boxes, make_context, ready_agents, remove_workdir, write_results
from benchmarks.vdeliver_lmtp import VdeliverLmtp
from benchmarks.workloads import SENDER, SIZES, Box, Message, check

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lmtp-grid.md")
GOAL = 1.2  # vdeliver's msgs/s over Dovecot's, in every cell
FLOOR_GOAL = {"maildir": 1.5, "mbox": 2.0}  # one client: time per message over the fsync floor's


@dataclass
class Line:
    """One server (or the floor) in one cell: per-batch rates, every latency, CPU per message."""

    agent: Agent
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # seconds per message, per batch
    expected: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    integrity: str = ""
    intact: bool = True

    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def pct(self, q: float) -> float | None:
        lat = sorted(self.latencies)
        if not lat:
            return None
        return lat[min(len(lat) - 1, round(q / 100 * (len(lat) - 1)))] * 1000

    def cpu_ms(self) -> float | None:
        return statistics.median(self.cpu) * 1000 if self.cpu else None


@dataclass
class GridCell:
    fmt: str
    clients: int
    boxes: int
    lines: dict[str, Line] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.fmt}-{self.clients}c-{self.boxes}b"


def _batch(agent: Agent, line: Line, boxes: list[Box], clients: int, messages: int, size: int, tag: str) -> None:
    """`clients` threads, one connection each, `messages` messages in all; wall time from the barrier."""
    per = [messages // clients + (1 if w < messages % clients else 0) for w in range(clients)]
    states = [agent.open_writer(boxes[0].fmt) for _ in range(clients)]
    samples: list[list[tuple[str, Sample, str]]] = [[] for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def work(w: int) -> None:
        barrier.wait()
        for i in range(per[w]):
            box = boxes[(w + i * clients) % len(boxes)]
            msg = Message(f"{agent.key}.{tag}.w{w}.{i}", size)
            samples[w].append((msg.bench_id, agent.deliver(states[w], box, msg), msg.body_digest))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    u0 = agent.usage(boxes[0].fmt)
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    u1 = agent.usage(boxes[0].fmt)
    for state in states:
        agent.close_writer(state)
    done = [s for w in samples for s in w]
    for bench_id, sample, body in done:
        if sample.ok:
            line.expected[bench_id] = body
            line.latencies.append(sample.latency)
        else:
            line.errors.append(sample.error)
    ok = sum(1 for _b, s, _d in done if s.ok)
    if wall > 0 and ok:
        line.rates.append(ok / wall)
    if u0 is not None and u1 is not None and ok:
        line.cpu.append((u1[0] - u0[0]) / ok)


def run_cell(ctx: Context, cell: GridCell, servers: list[Agent], floor: Agent | None, messages: int, reps: int,
             say: Callable[[str], None], floor2: Agent | None = None, bare: Agent | None = None) -> None:
    size = SIZES["4KB"]
    boxes: dict[str, list[Box]] = {}
    for agent in servers:
        cell.lines[agent.key] = Line(agent)
        boxes[agent.key] = [ctx.layout.box(cell.fmt, f"{agent.key}.grid", f"{cell.key}-{i}") for i in range(cell.boxes)]
        state = agent.open_writer(cell.fmt)  # warm-up, untimed: one message into each mailbox
        try:
            for i, box in enumerate(boxes[agent.key]):
                msg = Message(f"{agent.key}.{cell.key}.warm.{i}", size)
                sample = agent.deliver(state, box, msg)
                if not sample.ok:
                    raise RuntimeError(f"{agent.key}: warm-up delivery failed: {sample.error}")
                cell.lines[agent.key].expected[msg.bench_id] = msg.body_digest
        finally:
            agent.close_writer(state)
    # With one client into one mailbox the floors take their turns too: the fsync floor, for
    # mbox the two-sync floor of a journalled append (floor2), and the bare LMTP responder.
    floors: list[tuple[Agent, Box]] = []
    if cell.clients == 1 and cell.boxes == 1:
        for f in (floor, floor2 if cell.fmt == "mbox" else None, bare):
            if f is not None:
                cell.lines[f.key] = Line(f)
                floors.append((f, ctx.layout.box(cell.fmt, f"{f.key}.grid", cell.key)))
    for rep in range(reps):
        order = servers if rep % 2 == 0 else servers[::-1]
        for agent in order:
            _batch(agent, cell.lines[agent.key], boxes[agent.key], cell.clients, messages, size, f"{cell.key}.{rep}")
        for f, fbox in floors:
            _batch(f, cell.lines[f.key], [fbox], 1, messages, size, f"{cell.key}.{rep}")
    for agent in servers:
        line = cell.lines[agent.key]
        result = check(boxes[agent.key], line.expected)
        line.integrity, line.intact = result.text(), result.ok and not line.errors
        cleanup_boxes(ctx, boxes[agent.key])
    if bare is not None and bare.key in cell.lines:  # it stores real messages: they are checked too
        line = cell.lines[bare.key]
        result = check([fbox for f, fbox in floors if f is bare], line.expected)
        line.integrity, line.intact = result.text(), result.ok and not line.errors
    if floors:
        cleanup_boxes(ctx, [fbox for _f, fbox in floors])
    v, d = cell.lines.get("vdeliver-lmtp"), cell.lines.get("dovecot-lmtp")
    ratio = (v.rate() or 0) / (d.rate() or 1) if v and d and d.rate() else None
    say(f"  {cell.key:18} " + "  ".join(f"{k}: {ln.rate() or 0:7.0f}/s p99 {ln.pct(99) or 0:6.1f} ms"
                                          for k, ln in cell.lines.items())
        + (f"  ratio {ratio:.2f}" if ratio is not None else ""))


# -- several recipients a message ---------------------------------------------------------------

def send_many(client: LmtpClient, rcpts: list[str], payload: bytes) -> tuple[bool, str]:
    """One transaction for several recipients; ok when every recipient's reply is 250."""
    return client.transaction(SENDER, rcpts, payload)


@dataclass
class Multi:
    """Maildir, one client, `rcpts` recipients a message (one mailbox each)."""

    rcpts: int
    lines: dict[str, Line] = field(default_factory=dict)
    links: dict[str, float] = field(default_factory=dict)  # agent -> links per stored copy (nlink)


def run_multi(ctx: Context, multi: Multi, servers: list[Agent], messages: int, reps: int,
              say: Callable[[str], None]) -> None:
    size = SIZES["4KB"]
    boxes = {a.key: [ctx.layout.box("maildir", f"{a.key}.multi", f"r{i}") for i in range(multi.rcpts)]
             for a in servers}
    clients = {a.key: a.open_writer("maildir") for a in servers}
    try:
        for agent in servers:
            multi.lines[agent.key] = Line(agent)
        for rep in range(reps):
            for agent in servers if rep % 2 == 0 else servers[::-1]:
                line, client = multi.lines[agent.key], clients[agent.key]
                assert isinstance(client, LmtpClient)
                rcpts = [f"{b.user}@{b.domain}" for b in boxes[agent.key]]
                started = time.perf_counter()
                ok = 0
                for i in range(messages):
                    msg = Message(f"{agent.key}.multi.{rep}.{i}", size)
                    t0 = time.perf_counter()
                    good, why = send_many(client, rcpts, lmtp_payload(msg.bare()))
                    if good:
                        ok += 1
                        line.latencies.append(time.perf_counter() - t0)
                        line.expected[msg.bench_id] = msg.body_digest
                    else:
                        line.errors.append(why)
                line.rates.append(ok / (time.perf_counter() - started))
    finally:
        for agent in servers:
            agent.close_writer(clients[agent.key])
    for agent in servers:
        line = multi.lines[agent.key]
        results = [check([box], line.expected) for box in boxes[agent.key]]
        line.intact = all(r.ok for r in results) and not line.errors
        line.integrity = f"{sum(r.intact for r in results)}/{sum(r.expected for r in results)} intact"
        nlinks = [os.stat(os.path.join(box.path, "new", n)).st_nlink for box in boxes[agent.key][:1]
                  for n in os.listdir(os.path.join(box.path, "new"))]
        multi.links[agent.key] = statistics.mean(nlinks) if nlinks else 0.0
        cleanup_boxes(ctx, boxes[agent.key])
    say(f"  maildir, {multi.rcpts} recipients a message: " + "  ".join(
        f"{k}: {ln.rate() or 0:6.0f} msgs/s p99 {ln.pct(99) or 0:6.1f} ms" for k, ln in multi.lines.items()))


def multi_table(multi: Multi) -> list[str]:
    d = multi.lines.get("dovecot-lmtp")
    out = ["| server | messages/s | recipients/s | ratio to Dovecot | p50 ms | p99 ms | links per file | integrity |",
           "|---|---|---|---|---|---|---|---|"]
    for key, line in multi.lines.items():
        rate = line.rate()
        ratio = rate / d.rate() if rate and d is not None and d.rate() else None  # type: ignore[operator]
        out.append(f"| {line.agent.label} | {_f(rate, 0)} | {_f(rate * multi.rcpts if rate else None, 0)} | "
                   f"{_f(ratio, 2)} | {_f(line.pct(50))} | {_f(line.pct(99))} | {multi.links.get(key, 0):.1f} | "
                   f"{line.integrity} |")
    return out


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 or digits == 0 else f"{value:.{digits}f}"


def table(cells: list[GridCell]) -> list[str]:
    out = [("| format | clients | mailboxes | vdeliver msgs/s | Dovecot msgs/s | ratio (goal >= 1.2) | "
            "p50 ms v / D | p99 ms v / D | CPU ms/msg v / D | integrity v / D |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        v, d = cell.lines.get("vdeliver-lmtp"), cell.lines.get("dovecot-lmtp")
        if v is None or d is None:
            continue
        vr, dr = v.rate(), d.rate()
        ratio = vr / dr if vr and dr else None
        mark = "" if ratio is None else (" ok" if ratio >= GOAL else " **below**")
        out.append(
            f"| {cell.fmt} | {cell.clients} | {cell.boxes} | {_f(vr, 0)} | {_f(dr, 0)} | "
            f"{_f(ratio, 2) if ratio is not None else '-'}{mark} | {_f(v.pct(50))} / {_f(d.pct(50))} | "
            f"{_f(v.pct(99))} / {_f(d.pct(99))} | {_f(v.cpu_ms(), 2)} / {_f(d.cpu_ms(), 2)} | "
            f"{v.integrity or '-'} / {d.integrity or '-'} |")
    return out


def floor_lines(cells: list[GridCell]) -> list[str]:
    out = []
    for cell in cells:
        f = cell.lines.get("fsync-floor")
        if f is None or not f.rate():
            continue
        for key, label in (("vdeliver-lmtp", "vdeliver LMTP"), ("dovecot-lmtp", "Dovecot LMTP")):
            line = cell.lines.get(key)
            if line is None or not line.rate():
                continue
            x = f.rate() / line.rate()  # type: ignore[operator]
            goal = f" (goal <= {FLOOR_GOAL[cell.fmt]}x)" if key == "vdeliver-lmtp" else ""
            two = cell.lines.get("journal-floor")
            beside = ""
            if two is not None and two.rate():
                beside = (f"; {two.rate() / line.rate():.2f}x the two-sync floor of a journalled append "  # type: ignore[operator]
                          f"({1000 / two.rate():.2f} ms: journal fdatasync + append fsync)")  # type: ignore[operator]
            bare = cell.lines.get("bare-lmtp")
            if bare is not None and bare.rate():
                beside += (f"; {bare.rate() / line.rate():.2f}x the bare Python LMTP responder "  # type: ignore[operator]
                           f"({1000 / bare.rate():.2f} ms, {f.rate() / bare.rate():.2f}x the floor: the "  # type: ignore[operator]
                           "protocol and the same syncs in this interpreter, nothing else)")
            out.append(f"- {cell.fmt}, 1 client: {label} {1000 / line.rate():.2f} ms/msg against the fsync floor's "  # type: ignore[operator]
                       f"{1000 / f.rate():.2f} ms (floor p50 {_f(f.pct(50), 2)} ms): {x:.2f}x the floor{goal}{beside}.")  # type: ignore[operator]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lmtp_grid", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke test of the harness, not a measurement")
    ap.add_argument("--messages", type=int, help="messages per batch (default 200; --quick 4)")
    ap.add_argument("--reps", type=int, help="batches per server and cell (default 5; --quick 1)")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--boxes", default="1,8")
    ap.add_argument("--formats", default="mbox,maildir")
    ap.add_argument("--servers", default="vdeliver-lmtp,dovecot-lmtp", help="agent keys (for profiling one)")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                    help="vdeliver-lmtpd's [lmtp] processes (default: the number of CPUs)")
    ap.add_argument("--rcpts", type=int, default=8, help="recipients a message in the several-recipients row (0: none)")
    ap.add_argument("--out", help=f"the Markdown file (default {RESULTS}; --quick: a temporary directory)")
    args = ap.parse_args(argv)
    # Five shorter batches rather than three long ones: a burst of someone else's I/O spoils
    # one batch of each server, and the median leaves it out.
    messages = args.messages or (4 if args.quick else 200)
    reps = args.reps or (1 if args.quick else 5)
    clients = [int(c) for c in args.clients.split(",")]
    if args.quick:
        clients = sorted({min(c, 4) for c in clients})
    workdir = tempfile.mkdtemp(prefix="vdeliver-lmtp-grid-", dir="/tmp")
    out = args.out or (os.path.join(workdir, "lmtp-grid.md") if args.quick else RESULTS)
    when = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    ctx = make_context(workdir, args.quick)

    def say(text: str) -> None:
        print(text, flush=True)

    vd = VdeliverLmtp()
    vd.connections = max(clients) + 8
    vd.lmtp_settings = f"processes = {args.processes}\n"
    candidates: list[Agent] = [vd, DovecotLmtp()]
    servers, skipped = ready_agents(ctx, [a for a in candidates if a.key in args.servers.split(",")], say)
    floor = FsyncFloor()
    floor.prepare(ctx)
    floor2 = JournalFloor()
    floor2.prepare(ctx)
    bare = BareLmtp()
    bare.prepare(ctx)
    cells: list[GridCell] = []
    failed = []
    multi = Multi(args.rcpts)
    links = VdeliverLmtp()
    links.key, links.label = "vdeliver-lmtp-links", "vdeliver LMTP, delivered_to = false (hard links)"
    links.settings = "delivered_to = false\n"
    links.lmtp_settings = vd.lmtp_settings
    links.prepare(ctx)
    try:
        for fmt in args.formats.split(","):
            for agent in servers:
                agent.start(fmt)
            if 1 in clients and "1" in args.boxes.split(","):
                bare.start(fmt)
            for n in clients:
                for b in (int(x) for x in args.boxes.split(",")):
                    cell = GridCell(fmt, n, b)
                    try:
                        run_cell(ctx, cell, servers, floor, messages, reps, say, floor2, bare)
                    except Exception as exc:  # noqa: BLE001 - name the cell, keep the others
                        failed.append(f"{cell.key}: {type(exc).__name__}: {exc}")
                        say(f"  {cell.key}: FAILED: {exc}")
                    cells.append(cell)
            if fmt == "maildir" and args.rcpts > 0 and servers:
                many = [links, *servers] if vd in servers else list(servers)
                links.start(fmt)
                try:
                    run_multi(ctx, multi, many, max(2, messages // 4), reps, say)
                except Exception as exc:  # noqa: BLE001
                    failed.append(f"several recipients: {type(exc).__name__}: {exc}")
                    say(f"  several recipients: FAILED: {exc}")
                links.stop()
            for agent in servers:
                agent.stop()
            bare.stop()
    finally:
        for agent in [*servers, links, bare]:
            agent.stop()
    wall = time.monotonic() - started
    from benchmarks.report import machine

    quick = " (--quick: tiny counts, not a measurement)" if args.quick else ""
    header = [
        f"# The LMTP grid: vdeliver-lmtpd against Dovecot LMTP{quick}",
        "",
        (f"- Date: {when:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min; command "
         f"`python -m benchmarks.lmtp_grid{' --quick' if args.quick else ''}` ({messages} messages a batch, "
         f"{reps} batches per server and cell, 4 KB messages)."),
        (f"- Machine: {machine()}; shared with other jobs, so read the ratios (both servers measured in the "
         "same run, taking turns batch by batch, the order alternating)."),
        ("- Both servers as the vmail user, fsyncing every message (vdeliver: as its command line; Dovecot: "
         "`mail_fsync = optimized`); one persistent connection per client over the unix socket. "
         f"vdeliver-lmtpd with `[lmtp] processes = {args.processes}` (Dovecot: a process per connection)."),
        *[f"- Skipped: {s}" for s in skipped],
        *[f"- Cell failed: {f}" for f in failed],
        "",
    ]
    body = table(cells)
    floors = floor_lines(cells)
    if floors:
        body += ["", *floors]
    if multi.lines:
        body += ["", (f"## Several recipients a message (Maildir, 1 client, {multi.rcpts} recipients, one mailbox "
                      "each)"), "",
                 ("vdeliver adds a `Delivered-To:` per recipient by default, so each copy differs: one parse, "
                  "one write per recipient. With `delivered_to = false` the copies are the same bytes and the "
                  "others are hard links to the first, as Dovecot's LMTP does (it leaves `Delivered-To:` out when "
                  "a message has several recipients). Messages/s are transactions; \"links per file\" is the "
                  "link count of a delivered file (1: copies; the recipient count: one file for all)."),
                 "", *multi_table(multi)]
    text = "\n".join(header + body) + "\n"
    write_results(out, text, say, wall)
    bad = [f"{c.key}: {k}: {ln.integrity} {ln.errors[:2]}" for c in cells for k, ln in c.lines.items()
           if k not in ("fsync-floor", "journal-floor") and not ln.intact]
    bad += [f"several recipients: {k}: {ln.integrity} {ln.errors[:2]}" for k, ln in multi.lines.items()
            if not ln.intact]
    for problem in bad:
        say(f"INTEGRITY: {problem}")
    remove_workdir(workdir, out)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
