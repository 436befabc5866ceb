"""Run one cell (format x size x mailbox x writers) for every agent, interleaved, and measure it.

With one writer the agents take turns message by message (the order rotates each round), so
a slow minute on this shared machine costs every agent alike; with several writers each agent
runs its batch in turn, again in rotating order.  Each cell runs `reps` repetitions; the
report takes the median across them.  A warm-up message per mailbox, not timed, lets each
agent fill caches and build its indexes first (for Dovecot: the index of a large mailbox).
"""

from __future__ import annotations

import os
import pwd
import shutil
import statistics
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field

from benchmarks.agents import Agent, Context, Sample
from benchmarks.workloads import SIZES, Box, Integrity, Layout, Message, check

RSS_PROBES = 3


@dataclass
class Cell:
    fmt: str
    size_name: str
    writers: int = 1
    boxes: int = 1
    large: int = 0  # 0: empty mailbox; mbox: bytes; Maildir: message count
    large_label: str = "empty"
    messages: int = 20  # per repetition and agent (all writers together)
    reps: int = 3
    basic: bool = False  # also run the floors and the console-script variant

    @property
    def key(self) -> str:
        spread = "" if self.writers == 1 else ("-one" if self.boxes == 1 else "-many")
        mailbox = self.large_label.replace(" ", "").lower()
        return f"{self.fmt}-{self.size_name.lower()}-{mailbox}-{self.writers}w{spread}"

    @property
    def title(self) -> str:
        where = "one mailbox" if self.boxes == 1 else f"{self.boxes} mailboxes"
        mailbox = "empty mailbox" if not self.large else f"large mailbox ({self.large_label})"
        writers = "1 writer" if self.writers == 1 else f"{self.writers} concurrent writers into {where}"
        return f"{self.fmt}, {self.size_name} messages, {mailbox}, {writers}"


@dataclass
class Row:
    cell: Cell
    agent: Agent
    samples: list[list[Sample]] = field(default_factory=list)  # per repetition
    walls: list[float] = field(default_factory=list)  # per repetition, for concurrent batches
    usage: list[tuple[float, int]] = field(default_factory=list)  # resident: (cpu s, peak KB) per rep
    peaks: list[int] = field(default_factory=list)  # per-process agents: peak RSS KB of probe deliveries
    integrity: Integrity | None = None
    variant: str = ""  # "twin": the empty mailbox delivered to in turn with a large one
    window_n: list[int] = field(default_factory=list)  # deliveries inside each usage window, when shared
    note: str = ""
    errors: list[str] = field(default_factory=list)

    # -- figures -------------------------------------------------------------------------------
    def all(self) -> list[Sample]:
        return [s for rep in self.samples for s in rep]

    def ok_count(self) -> int:
        return sum(1 for s in self.all() if s.ok)

    def rates(self) -> list[float]:
        out = []
        for i, rep in enumerate(self.samples):
            if not rep:
                continue
            busy = self.walls[i] if self.cell.writers > 1 else sum(s.latency for s in rep)
            if busy > 0:
                out.append(len(rep) / busy)
        return out

    def msgs_per_s(self) -> float | None:
        rates = self.rates()
        return statistics.median(rates) if rates else None

    def ms_per_msg(self) -> float | None:
        rate = self.msgs_per_s()
        return 1000 / rate if rate else None

    def percentile(self, q: float) -> float | None:
        lat = sorted(s.latency for s in self.all())
        if not lat:
            return None
        k = min(len(lat) - 1, max(0, round(q / 100 * (len(lat) - 1))))
        return lat[k] * 1000

    def cpu_ms(self) -> float | None:
        per_rep = []
        if self.usage:
            for i in range(0, len(self.usage) - 1, 2):
                n = len(self.samples[i // 2]) if i // 2 < len(self.samples) else 0
                if i // 2 < len(self.window_n):
                    n = self.window_n[i // 2]
                if n:
                    per_rep.append((self.usage[i + 1][0] - self.usage[i][0]) / n * 1000)
        else:
            for rep in self.samples:
                cpus = [s.cpu for s in rep if s.cpu is not None]
                if cpus:
                    per_rep.append(sum(cpus) / len(cpus) * 1000)
        return statistics.median(per_rep) if per_rep else None

    def rss_mb(self) -> float | None:
        """Median peak RSS of one delivery (per-process agents) or the server's peak (resident)."""
        if self.usage:
            return max(u[1] for u in self.usage) / 1024 if any(u[1] for u in self.usage) else None
        return statistics.median(self.peaks) / 1024 if self.peaks else None

    def rss_max_mb(self) -> float | None:
        if self.usage:
            return self.rss_mb()
        return max(self.peaks) / 1024 if self.peaks else None


def make_context(workdir: str, quick: bool) -> Context:
    """The mail tree and the vmail user (made if missing, as root) every benchmark delivers as."""
    creds = None
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("vmail")
        except KeyError:
            subprocess.run(["useradd", "--system", "--user-group", "--home-dir", "/nonexistent", "--no-create-home",
                            "--shell", "/usr/sbin/nologin", "vmail"], check=True)
            pw = pwd.getpwnam("vmail")
        creds = (pw.pw_uid, pw.pw_gid)
    uid, gid = creds or (os.getuid(), os.getgid())
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    os.chmod(workdir, 0o755)
    os.chmod(os.path.join(workdir, "logs"), 0o777)
    layout = Layout(os.path.join(workdir, "mail"), uid, gid)
    layout.setup()
    return Context(workdir, layout, creds, quick=quick)


def ready_agents(ctx: Context, candidates: list[Agent], say) -> tuple[list[Agent], list[str]]:  # type: ignore[no-untyped-def]
    """The candidates whose peer is installed and whose set-up worked (each prepared), and a
    line for each one skipped, saying why."""
    ready: list[Agent] = []
    skipped: list[str] = []
    for agent in candidates:
        why = agent.missing()
        if why is None:
            try:
                agent.prepare(ctx)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot be set up is skipped, named
                why = f"setup failed: {type(exc).__name__}: {exc}"
        if why is None:
            ready.append(agent)
        else:
            skipped.append(f"{agent.label}: {why}")
            say(f"skip {agent.key}: {why}")
    return ready, skipped


def write_results(out: str, text: str, say, wall: float) -> None:  # type: ignore[no-untyped-def]
    """A benchmark module's Markdown results, written and echoed."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    say(text)
    say(f"results: {out} ({wall:.0f}s)")


def remove_workdir(workdir: str, out: str) -> None:
    """The work directory goes, unless the results file is in it (--quick without --out): then
    everything else in it goes."""
    if os.path.dirname(os.path.abspath(out)) == workdir:
        for name in os.listdir(workdir):
            if name != os.path.basename(out):
                path = os.path.join(workdir, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _boxes(ctx: Context, cell: Cell, agent: Agent) -> list[Box]:
    return [ctx.layout.box(cell.fmt, f"{agent.key}.test", f"{cell.key}-{i}", cell.large, ctx.quick)
            for i in range(cell.boxes)]


def cleanup_boxes(ctx: Context, boxes: list[Box]) -> None:
    """Remove the mailboxes of a cell (and what Dovecot kept for them)."""
    for box in boxes:
        if box.fmt == "mbox":
            for path in (box.path, box.path + ".lock"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        else:
            shutil.rmtree(os.path.dirname(box.path), ignore_errors=True)
        shutil.rmtree(ctx.path("dovecot-mail", box.domain, box.user), ignore_errors=True)


def run_cell(ctx: Context, cell: Cell, agents: list[Agent], say) -> list[Row]:  # type: ignore[no-untyped-def]
    size = SIZES[cell.size_name]
    active = [a for a in agents if cell.fmt in a.formats and (cell.basic or not a.only_basic)]
    rows = {a.key: Row(cell, a) for a in active}
    boxes: dict[str, list[Box]] = {}
    expected: dict[str, dict[str, str]] = {a.key: {} for a in active}
    # A large mailbox is read against an empty one delivered to in the same turns, so that
    # the machine's drift between cells does not pass for a cost of mailbox size.
    paired = bool(cell.large) and cell.writers == 1
    twins = {a.key: Row(cell, a, variant="twin") for a in active if paired and a.kind != "floor"}
    twin_boxes: dict[str, list[Box]] = {}
    twin_expected: dict[str, dict[str, str]] = {k: {} for k in twins}
    states: dict[str, object] = {}
    started = time.monotonic()

    def drop(agent: Agent, why: str) -> None:
        rows[agent.key].note = why
        active.remove(agent)
        say(f"    {agent.key}: dropped from this cell: {why}")

    def one(agent: Agent, state: object, box: Box, bench_id: str, twin: bool = False) -> Sample:
        msg = Message(bench_id, size)
        sample = agent.deliver(state, box, msg)
        if sample.ok and agent.kind != "floor":
            (twin_expected if twin else expected)[agent.key][bench_id] = msg.body_digest
        elif not sample.ok:
            (twins if twin else rows)[agent.key].errors.append(sample.error)
        return sample

    try:
        # Mailboxes and warm-up (untimed): one message into each mailbox.
        for agent in list(active):
            try:
                agent.start(cell.fmt)
                boxes[agent.key] = _boxes(ctx, cell, agent) if agent.kind != "floor" else [
                    Box(cell.fmt, "floor.test", "none", "/nonexistent")]
                states[agent.key] = agent.open_writer(cell.fmt)
                for i, box in enumerate(boxes[agent.key]):
                    sample = one(agent, states[agent.key], box, f"{agent.key}.{cell.key}.warm.{i}")
                    if not sample.ok:
                        raise RuntimeError(f"warm-up delivery failed: {sample.error}")
                if agent.key in twins:
                    twin_boxes[agent.key] = [ctx.layout.box(cell.fmt, f"{agent.key}.test", f"{cell.key}-twin")]
                    one(agent, states[agent.key], twin_boxes[agent.key][0], f"{agent.key}.{cell.key}.twinwarm", True)
            except Exception as exc:  # noqa: BLE001 - one agent's fault must not stop the run
                drop(agent, f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
        if cell.large:
            os.sync()  # the fill must not be flushed during someone's fsync
        say(f"    set up in {time.monotonic() - started:.1f}s; agents: {', '.join(a.key for a in active)}")
        if not active:
            return list(rows.values())

        for rep in range(cell.reps):
            shift = rep % max(1, len(active))
            order = active[shift:] + active[:shift]
            if cell.writers == 1:
                for agent in order:
                    rows[agent.key].samples.append([])
                    if agent.key in twins:
                        twins[agent.key].samples.append([])
                    u = agent.usage(cell.fmt)
                    if u is not None:
                        rows[agent.key].usage.append(u)
                for i in range(cell.messages):
                    turn = order[i % len(order):] + order[: i % len(order)]
                    for agent in turn:
                        box = boxes[agent.key][0]
                        twin_first = agent.key in twins and i % 2 == 1
                        if twin_first:
                            twins[agent.key].samples[-1].append(one(
                                agent, states[agent.key], twin_boxes[agent.key][0],
                                f"{agent.key}.{cell.key}.{rep}.{i}.twin", True))
                        s = one(agent, states[agent.key], box, f"{agent.key}.{cell.key}.{rep}.{i}")
                        rows[agent.key].samples[-1].append(s)
                        if agent.key in twins and not twin_first:
                            twins[agent.key].samples[-1].append(one(
                                agent, states[agent.key], twin_boxes[agent.key][0],
                                f"{agent.key}.{cell.key}.{rep}.{i}.twin", True))
                for agent in order:
                    u = agent.usage(cell.fmt)
                    if u is not None:
                        rows[agent.key].usage.append(u)
                        if agent.key in twins:  # one server served both mailboxes: share its CPU
                            n = len(rows[agent.key].samples[-1]) + len(twins[agent.key].samples[-1])
                            rows[agent.key].window_n.append(n)
                            twins[agent.key].window_n = rows[agent.key].window_n
                            twins[agent.key].usage = rows[agent.key].usage
            else:
                for agent in order:
                    _batch(ctx, cell, agent, rows[agent.key], boxes[agent.key], rep, one)
            say(f"    rep {rep + 1}/{cell.reps} done at {time.monotonic() - started:.1f}s")
        # Peak RSS: a few more deliveries, each under GNU time (not timed; checked like the rest).
        for agent in active:
            targets = [(rows, boxes, expected, "")]
            if agent.key in twins:
                targets.append((twins, twin_boxes, twin_expected, ".twin"))
            for row_map, box_map, exp_map, tag in targets:
                for i in range(1 if ctx.quick else RSS_PROBES):
                    msg = Message(f"{agent.key}.{cell.key}.rss.{i}{tag}", size)
                    probe = agent.peak_rss(box_map[agent.key][0], msg)
                    if probe is None:
                        break
                    sample, peak = probe
                    if sample.ok and agent.kind != "floor":
                        exp_map[agent.key][msg.bench_id] = msg.body_digest
                    elif not sample.ok:
                        row_map[agent.key].errors.append(sample.error)
                    if peak:
                        row_map[agent.key].peaks.append(peak)
    finally:
        for row in rows.values():
            state = states.pop(row.agent.key, None)
            if state is not None:
                try:
                    row.agent.close_writer(state)
                except Exception:  # noqa: BLE001
                    pass

    for agent in active:
        if agent.kind != "floor":
            rows[agent.key].integrity = check(boxes[agent.key], expected[agent.key])
        if agent.key in twin_boxes:
            twins[agent.key].integrity = check(twin_boxes[agent.key], twin_expected[agent.key])
    for agent_boxes in [*boxes.values(), *twin_boxes.values()]:
        if agent_boxes and agent_boxes[0].path != "/nonexistent":
            cleanup_boxes(ctx, agent_boxes)
    out = []
    for key, row in rows.items():
        out.append(row)
        if key in twins and twins[key].samples:
            out.append(twins[key])
    return out


def _batch(ctx: Context, cell: Cell, agent: Agent, row: Row, boxes: list[Box], rep: int, one) -> None:  # type: ignore[no-untyped-def]
    """`cell.writers` threads deliver `cell.messages` messages together; wall time from the barrier."""
    per_writer = max(1, cell.messages // cell.writers)
    states = [agent.open_writer(cell.fmt) for _ in range(cell.writers)]
    results: list[list[Sample]] = [[] for _ in range(cell.writers)]
    barrier = threading.Barrier(cell.writers + 1)

    def work(w: int) -> None:
        box = boxes[w % len(boxes)]
        barrier.wait()
        for i in range(per_writer):
            results[w].append(one(agent, states[w], box, f"{agent.key}.{cell.key}.{rep}.w{w}.{i}"))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(cell.writers)]
    for t in threads:
        t.start()
    u0 = agent.usage(cell.fmt)
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    u1 = agent.usage(cell.fmt)
    for state in states:
        if state is not None:
            agent.close_writer(state)
    row.samples.append([s for r in results for s in r])
    row.walls.append(wall)
    if u0 is not None and u1 is not None:
        row.usage.extend([u0, u1])
