"""`python -m benchmarks.run [--quick]`: every delivery agent on the same workloads, one run.

Full mode takes about 15 minutes on 2 cores and writes benchmarks/results/latest.{md,csv,png};
`--quick` runs tiny counts and sizes (a smoke test of the harness, for CI) and writes its results
to a temporary directory unless --out is given.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

from benchmarks import fsyncs, report
from benchmarks.agents import (
    SYSTEM_PYTHON,
    VENV_PYTHON,
    Agent,
    Context,
    DovecotLda,
    DovecotLmtp,
    FsyncFloor,
    Maildrop,
    Procmail,
    PythonFloor,
    RunAs,
    VdeliverCli,
    VdeliverScript,
    VdeliverVenv,
)
from benchmarks.runner import Cell, Row, make_context, ready_agents, run_cell
from benchmarks.workloads import Message

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def all_agents() -> list[Agent]:
    from benchmarks.vdeliver_lmtp import VdeliverLmtp

    return [
        VdeliverCli(), VdeliverVenv(), VdeliverScript(),
        PythonFloor(SYSTEM_PYTHON, False, "system"), PythonFloor(SYSTEM_PYTHON, True, "system"),
        PythonFloor(VENV_PYTHON, False, "venv"), PythonFloor(VENV_PYTHON, True, "venv"),
        Procmail(), Maildrop(), DovecotLda(), DovecotLmtp(), VdeliverLmtp(), FsyncFloor(),
    ]


def cells(quick: bool) -> list[Cell]:
    """In order of importance: a time budget cuts the tail, never the basic cells."""
    out: list[Cell] = []
    if quick:
        # One of each kind of cell, tiny: the smoke test must stay well under a minute.
        for fmt in ("mbox", "maildir"):
            out.append(Cell(fmt, "4KB", messages=2, reps=2, basic=True))
        for fmt, large, label in (("mbox", 8 << 20, "8 MB"), ("maildir", 300, "300 msgs")):
            out.append(Cell(fmt, "4KB", large=large, large_label=label, messages=2, reps=2))
        out.append(Cell("mbox", "100KB", messages=2, reps=2))
        out.append(Cell("maildir", "4KB", writers=2, boxes=1, messages=2, reps=1))
        out.append(Cell("mbox", "4KB", writers=4, boxes=4, messages=4, reps=1))
        return out
    for fmt in ("mbox", "maildir"):
        out.append(Cell(fmt, "4KB", messages=40, reps=3, basic=True))
    for fmt, large, label in (("mbox", 1 << 30, "1 GB"), ("maildir", 100_000, "100k msgs")):
        out.append(Cell(fmt, "4KB", large=large, large_label=label, messages=30, reps=3))
    for fmt in ("mbox", "maildir"):
        out.append(Cell(fmt, "10MB", messages=3, reps=3))
    for fmt in ("mbox", "maildir"):
        out.append(Cell(fmt, "4KB", writers=8, boxes=1, messages=32, reps=3))
        out.append(Cell(fmt, "4KB", writers=8, boxes=8, messages=32, reps=3))
    for fmt in ("mbox", "maildir"):
        out.append(Cell(fmt, "100KB", messages=20, reps=3))
    return out


def versions() -> list[str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (out.stdout or out.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.SubprocessError):
            return "not installed"

    return [
        f"procmail: {first_line(['procmail', '-v'])}",
        f"maildrop: {first_line(['maildrop', '-v'])}",
        f"dovecot: {first_line(['dovecot', '--version'])}",
        (f"system python: {first_line([SYSTEM_PYTHON, '--version'])}; "
        f"venv python: {first_line([VENV_PYTHON, '--version'])}"),
    ]


def import_profile(ctx: Context, agent: VdeliverCli) -> list[str]:
    """`python -X importtime` of one real delivery: what vdeliver imports beyond the bare interpreter."""
    ctx.layout.box("mbox", "imports.test", "probe")
    msg = Message("imports.probe", 4096).with_from_line()

    def modules(argv: list[str], data: bytes | None) -> dict[str, int]:
        kwargs: RunAs = {}
        if ctx.creds is not None:
            kwargs = {"user": ctx.creds[0], "group": ctx.creds[1], "extra_groups": []}
        out = subprocess.run(argv, input=data, capture_output=True, env={"PATH": "/usr/bin:/bin", "LANG": "C"},
                             cwd="/", **kwargs)
        found = {}
        for line in out.stderr.decode(errors="replace").splitlines():
            if line.startswith("import time:") and "|" in line:
                parts = [p.strip() for p in line[len("import time:"):].split("|")]
                if parts[0].isdigit():
                    found[parts[2].strip()] = int(parts[0])  # self time, not cumulative
        return found

    base = modules([SYSTEM_PYTHON, "-I", "-X", "importtime", "-c", "pass"], None)
    used = modules([SYSTEM_PYTHON, "-I", "-X", "importtime", agent.launcher, "-c", agent.config, "-t", "-Y",
                    "-a", "imports.test", "-a", "probe"], msg)
    extra = {name: us for name, us in used.items() if name not in base}
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:12]
    total = sum(extra.values())
    shutil.rmtree(os.path.join(ctx.layout.vbox, "imports.test"), ignore_errors=True)
    return [f"{len(extra)} modules beyond `python3 -I -c pass`, {total / 1000:.1f} ms self time in all: "
            + ", ".join(f"`{name.strip()}` {us / 1000:.2f} ms" for name, us in top)]


def goal_lines(data: list[dict[str, object]]) -> list[str]:
    def pick(**match: object) -> list[dict[str, object]]:
        return [d for d in data if all(d.get(k) == v for k, v in match.items()) and d["msgs_per_s"]]

    lines = []
    for fmt in ("mbox", "maildir"):
        cell = pick(format=fmt, size="4KB", mailbox="empty", writers=1)
        for d in cell:
            if d["x_python"] is not None:
                env = "system" if "launcher" in str(d["agent"]) else "venv"
                floor = next((f for f in cell if f["agent"] == f"floor: {env} python -c pass"), None)
                cpu = ""
                if floor and floor["cpu_ms_per_msg"] and d["cpu_ms_per_msg"]:
                    cpu = (f"; CPU {d['cpu_ms_per_msg']:.1f} ms against {floor['cpu_ms_per_msg']:.1f} ms "
                           f"({d['cpu_ms_per_msg'] / floor['cpu_ms_per_msg']:.2f}x, less sensitive to the "  # type: ignore[operator]
                           "machine's load)")
                lines.append(
                    f"- vdeliver CLI, {fmt}: {d['agent']}: {d['ms_per_msg']:.1f} ms/msg = "
                    f"{d['x_python']:.2f}x `python -c pass` and {d['x_python_I']:.2f}x `python -I -c pass` from the "
                    f"same environment (goal: <= 1.5x), {d['x_procmail']:.1f}x procmail{cpu}."
                )
    for d in pick(size="4KB", writers=1, variant=""):
        if d["mailbox"] == "empty" or not str(d["agent"]).startswith("vdeliver"):
            continue
        twin = next((t for t in pick(cell=d["cell"], variant="twin") if str(t["agent"]).startswith(str(d["agent"]))),
                    None)
        if twin is not None:
            lines.append(f"- flat as the mailbox grows, {d['format']}: {d['agent']}: {d['ms_per_msg']:.1f} ms/msg "
                         f"with a {d['mailbox']} mailbox, {twin['ms_per_msg']:.1f} ms/msg into an empty one in the "
                         f"same turns ({d['ms_per_msg'] / twin['ms_per_msg']:.2f}x; CPU "  # type: ignore[operator]
                         f"{d['cpu_ms_per_msg'] or 0:.1f} against {twin['cpu_ms_per_msg'] or 0:.1f} ms).")
    for d in pick(kind="resident", variant=""):
        if "vdeliver" not in str(d["agent"]):
            continue
        cell = [o for o in data if o["cell"] == d["cell"] and o["msgs_per_s"] and o["kind"] in ("process", "resident")
                and o["agent"] != d["agent"] and not o["variant"]]
        best = max(cell, key=lambda o: o["msgs_per_s"]) if cell else None  # type: ignore[arg-type,return-value]
        lines.append(
            f"- vdeliver LMTP, {d['cell']}: {d['msgs_per_s']:.0f} msgs/s; best other agent "
            f"{best['agent'] if best else '-'} {best['msgs_per_s'] if best else 0:.0f} msgs/s; "
            f"{d['x_fsync_floor'] or 0:.2f}x the fsync floor's time per message (goal: faster than every "
            "other agent, within 2x of the floor)."
        )
    floors: dict[object, dict[str, object]] = {d["format"]: d for d in pick(agent="floor: system python -I -c pass")}
    for d in pick(size="10MB", writers=1):
        if str(d["agent"]).startswith("vdeliver (launcher") and d["rss_mb"]:
            f = floors.get(d["format"]) or next(iter(floors.values()), None)
            base = f["rss_mb"] if f else None
            lines.append(f"- peak RSS, 10 MB message, {d['format']}: vdeliver {d['rss_mb']:.1f} MB (max "
                         f"{d['rss_max_mb']:.1f}); `python3 -I -c pass` {base or 0:.1f} MB "
                         f"(+{(d['rss_mb'] - base) if base else 0:.1f} MB; goal: a few MB).")  # type: ignore[operator]
    return lines


def socketmap_run(out: str, say: Callable[[str], None]) -> None:
    """The socketmap server against its echo peer, and its growth curve: a run of its own
    (benchmarks/socketmap_load.py, about 3 minutes; its --quick is tests/test_benchmarks.py's)."""
    say("socketmap server: python -m benchmarks.socketmap_load")
    done = subprocess.run([sys.executable, "-m", "benchmarks.socketmap_load", "--out", out],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=1800)
    if done.returncode != 0:
        say(f"socketmap run failed (exit {done.returncode})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny counts and sizes: a smoke test, not a measurement")
    p.add_argument("--out", help=f"results directory (default: {RESULTS}; with --quick a temporary one)")
    p.add_argument("--workdir", help="where the mail tree goes (default: a new directory under /tmp)")
    p.add_argument("--only", help="comma-separated agent keys to run (e.g. vdeliver,procmail)")
    p.add_argument("--cells", help="comma-separated substrings: run only cells whose key contains one")
    p.add_argument("--budget", type=float, default=900, help="seconds; later cells are skipped past it")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--no-journal", action="store_true", help="skip the mbox journal's before/after run")
    p.add_argument("--no-cli", dest="cli", action="store_false",
                   help="skip benchmarks/cli_bench.py (command line start-up, 10 MB, growth curves)")
    p.add_argument("--no-socketmap", action="store_true",
                   help="skip the socketmap server's run (benchmarks/socketmap_load.py; full mode only)")
    p.add_argument("--no-lmtp-grid", action="store_true",
                   help="skip the LMTP grid and its large messages (benchmarks/lmtp_grid.py, lmtp_large.py)")
    args = p.parse_args(argv)

    started = time.monotonic()
    when = datetime.datetime.now(datetime.UTC)
    workdir = args.workdir or tempfile.mkdtemp(prefix="vdeliver-bench-", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    os.chmod(workdir, 0o755)
    out = args.out or (os.path.join(workdir, "results") if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    ctx = make_context(workdir, args.quick)
    layout = ctx.layout

    def say(text: str) -> None:
        print(text, flush=True)

    wanted = set(args.only.split(",")) if args.only else None
    agents, skipped = ready_agents(ctx, [a for a in all_agents() if wanted is None or a.key in wanted], say)

    rows: list[Row] = []
    notes: list[str] = []
    syncs: dict[tuple[str, str], str] = {}
    try:
        plan = cells(args.quick)
        if args.cells:
            subs = args.cells.split(",")
            plan = [c for c in plan if any(s in c.key for s in subs)]
        for cell in plan:
            elapsed = time.monotonic() - started
            if elapsed > args.budget:
                notes.append(f"skipped (time budget of {args.budget:.0f}s used up): {cell.title}")
                say(f"skip cell {cell.key}: over budget")
                continue
            say(f"[{elapsed:6.1f}s] {cell.title}")
            try:
                rows.extend(run_cell(ctx, cell, agents, say))
            except Exception as exc:  # noqa: BLE001 - report what ran; name the cell that broke
                traceback.print_exc()
                notes.append(f"cell failed ({type(exc).__name__}: {exc}): {cell.title}")
        if args.cli:
            say("command line: start-up, large messages, growth (benchmarks/cli_bench.py)")
            try:
                from benchmarks import cli_bench

                cli_bench.main([*(["--quick"] if args.quick else []), "--out", out])
            except Exception as exc:  # noqa: BLE001 - report what ran
                traceback.print_exc()
                notes.append(f"cli_bench failed ({type(exc).__name__}: {exc})")
        say("counting sync calls per delivery (strace)")
        syncs = fsyncs.audit(ctx, agents, say)
        imports = []
        vcli = next((a for a in agents if a.key == "vdeliver"), None)
        if isinstance(vcli, VdeliverCli):
            imports = import_profile(ctx, vcli)
    finally:
        for agent in agents:
            agent.stop()

    if not args.no_journal and not args.only:
        # Its own entry and results file (journal.md): the mbox crash journal before and after.
        from benchmarks import journal_bench

        say("mbox crash journal: before and after the persistent journal")
        try:
            journal_bench.main(["--out", out, *(["--quick"] if args.quick else [])])
        except Exception as exc:  # noqa: BLE001 - a failed side entry is a note, not a lost run
            notes.append(f"journal benchmark failed: {type(exc).__name__}: {exc}")

    if not args.no_journal and not args.only:
        # Its own entry and results file (group-commit.md): the LMTP server's group commit on and off.
        from benchmarks import group_bench

        say("mbox group commit in vdeliver-lmtpd: on against off")
        try:
            group_bench.main(["--out", os.path.join(out, "group-commit.md"), *(["--quick"] if args.quick else [])])
        except Exception as exc:  # noqa: BLE001 - a failed side entry is a note, not a lost run
            notes.append(f"group commit benchmark failed: {type(exc).__name__}: {exc}")

    wall = time.monotonic() - started
    data = report.figures(rows, syncs)
    header = [
        f"# vdeliver benchmarks{' (--quick smoke run: tiny counts, not a measurement)' if args.quick else ''}",
        "",
        (f"- Date: {when:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min; command "
        f"`python -m benchmarks.run{' --quick' if args.quick else ''}`."),
        f"- Machine: {report.machine()}.",
        ("- Shared machine: other jobs (test suites of other developers) ran at the same time, so absolute "
        "figures are noisy; agents are interleaved message by message so that noise falls on all of them "
        "alike, and ratios within a cell are the figures to read."),
        *[f"- {v}" for v in versions()],
        ("- Every agent runs as the unprivileged vmail user, message on a pipe, as sendmail runs it; "
        "resident LMTP servers get one connection per writer, reused for all its messages."),
        *[f"- Skipped agent: {s}" for s in skipped],
        *[f"- {n}" for n in notes],
        *[f"- Imports on vdeliver's delivery path (`python -X importtime`): {line}" for line in imports],
    ]
    md = os.path.join(out, "latest.md")
    report.write_markdown(md, data, header, goal_lines(data))
    report.write_csv(os.path.join(out, "latest.csv"), data)
    why = report.write_chart(os.path.join(out, "latest.png"), data)
    if why:
        say(why)
    bad = [f"{d['cell']}: {d['agent']}: {d['integrity']}, {d['failed']} failed" for d in data
           if d["integrity_ok"] is False or (d["failed"] and d["kind"] != "floor")]
    say(f"results: {md} ({wall:.0f}s)")
    if not args.quick and not args.no_socketmap and not args.cells and not args.only:
        socketmap_run(out, say)
    for line in bad:
        say(f"INTEGRITY: {line}")
    if not (args.no_lmtp_grid or args.only or args.cells):
        # Issue 21's LMTP grid: its own entry, its own results file (lmtp-grid.md beside latest.md).
        from benchmarks import lmtp_grid

        say("the LMTP grid (benchmarks/lmtp_grid.py)")
        if lmtp_grid.main(["--out", os.path.join(out, "lmtp-grid.md")] + (["--quick"] if args.quick else [])):
            bad.append("the LMTP grid: a cell failed or a message was not delivered intact")
        from benchmarks import lmtp_large

        say("large messages through LMTP (benchmarks/lmtp_large.py)")
        if lmtp_large.main(["--out", os.path.join(out, "lmtp-large.md")] + (["--quick"] if args.quick else [])):
            bad.append("LMTP, large messages: a delivery failed or a message was not delivered intact")
    if not args.quick and out == RESULTS and not (args.only or args.cells):
        # A full run into the committed results: the README's results block follows them.
        from benchmarks import readme

        try:
            say("README.md: results block " + ("rewritten" if readme.update() else "unchanged"))
        except (readme.MissingResult, ValueError) as exc:
            say(f"README.md: results block not rewritten: {exc}")
    if not args.keep and not args.workdir:
        if args.out or not args.quick:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            shutil.rmtree(layout.root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
