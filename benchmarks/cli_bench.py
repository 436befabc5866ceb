"""Issue 21, the per-message command line: start-up, large messages, growing mailboxes.

    python -m benchmarks.cli_bench [--quick] [--out DIR] [--baseline SOURCE_DIR] [--parts start,large,growth]

Every vdeliver run goes through the production launcher (`python -m vdeliver.launcher`: /bin/sh,
then `/usr/bin/python3 -IS`), as the vmail user when run as root, the message on a pipe, and
is measured against its peer in the same run, interleaved turn by turn:

- start: a 4 KB message into an mbox and into a Maildir, through the /bin/sh launcher and
  through `--direct` (a `#!` script), against `python3 -IS -c pass` (goal:
  at most 1.2x; own CPU, the process's CPU beyond the bare interpreter's, at most 3 ms), with
  the phase timer's line (VDELIVER_PHASES=1) of one delivery of each;
- large: a 10 MB message against the fsync floor for that size (the harness writes the same
  record and fsyncs it, plus link and directory fsync for a Maildir: goal at most 2x; timed
  alone first and in the turns, the lower counts) and procmail (goal: faster), with the runtime
  floor beside them: a bare `python3 -IS` program reading the pipe and storing with the fsync
  floor's syscalls, nothing else (what any delivery process in this interpreter costs at least);
  each process also delivers a 4 KB message in the same turns, and the difference is its data
  path (what the 10 MB cost it, start-up aside: vdeliver's start is a Python interpreter's,
  procmail's a C program's);
- growth: 4 KB deliveries into an mbox filled with real 4 KB messages up to 2 GB (no sparse
  file: the delivery reads the end of the mbox), and into a Maildir with up to 200000 messages
  in cur/ and new/, each point against an empty mailbox in the same turns (goal: within 10%);
  the curves go to cli-growth.png (matplotlib, in this process, never on the delivery path).

--baseline SOURCE_DIR adds the start and large rows of another checkout (the directory holding
its `vdeliver` package), for before/after ratios.  --quick: tiny counts and sizes, checks the
harness, not the figures.  Results: DIR/cli.md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.agents import SYSTEM_PYTHON, spawn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PACKAGE = Path(__file__).resolve().parent.parent / "vdeliver"
DOMAIN = "bench.example"
FROM_LINE = b"From sender@example.org Sat Dec  5 10:00:00 2026\n"


def message(size: int, tag: str) -> bytes:
    head = (f"From: Bench <sender@example.org>\nTo: <rcpt@{DOMAIN}>\nSubject: cli bench {tag}\n"
            f"Message-ID: <{tag}@bench.example.org>\n\n").encode()
    line = b"the quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstu\n"
    body = bytearray()
    i = 0
    while len(body) < size - len(head):
        body += b"From the desk of line %d\n" % i if i % 500 == 0 else line  # a few From_ lines to escape
        i += 1
    return FROM_LINE + head + bytes(body)


# benchmarks: Bench.bare() runs this as the vmail user: argv[1] the format, argv[2] the mbox or Maildir.
# How a delivery ends (vdeliver.cli.run): straight out, no interpreter teardown.
EXIT = "; import posix; posix._exit(0)"

BARE = """\
import posix as os, sys
fmt, target = sys.argv[1], sys.argv[2]
if fmt == "mbox":
    fd = os.open(target, os.O_WRONLY | os.O_APPEND)
else:
    name = "%d.bare" % os.getpid()
    fd = os.open(target + "/tmp/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
while True:
    data = os.read(0, 65536)
    if not data:
        break
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
os.fsync(fd)
os.close(fd)
if fmt != "mbox":
    os.link(target + "/tmp/" + name, target + "/new/" + name)
    dfd = os.open(target + "/new", os.O_RDONLY)
    os.fsync(dfd)
    os.unlink(target + "/tmp/" + name)
os._exit(0)
"""


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.work = Path(tempfile.mkdtemp(prefix="vdeliver-clibench-", dir="/tmp"))
        self.work.chmod(0o755)
        self.creds: tuple[int, int] | None = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("vmail")
            self.creds = (pw.pw_uid, pw.pw_gid)
        for d in ("vbox/" + DOMAIN, "home/" + DOMAIN, "spool", "cache", "logs"):
            (self.work / d).mkdir(parents=True, mode=0o700)
            self.own(self.work / d.split("/")[0])
            self.own(self.work / d)
        self.config = self.work / "vdeliver.toml"
        self.config.write_text(
            f'mbox_path = "{self.work}/vbox/{{domain}}/{{user}}"\n'
             f'maildir_path = "{self.work}/home/{{domain}}/{{user}}/Maildir"\n'
             f'spool_dir = "{self.work}/spool"\nlog = "none"\n')
        self.config.chmod(0o644)
        self.devnull = os.open(os.devnull, os.O_WRONLY)
        self.launchers: dict[str, str] = {}

    def own(self, path: Path) -> None:
        if self.creds is not None:
            os.chown(path, *self.creds)

    def install(self, name: str, source: Path, direct: bool = False) -> None:
        """The package copied and byte-compiled, and the production launcher written for it."""
        lib = self.work / f"lib-{name}"
        shutil.copytree(source / "vdeliver", lib / "vdeliver", ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([SYSTEM_PYTHON, "-I", "-m", "compileall", "-q", str(lib)], check=True)
        launcher = self.work / f"vdeliver-{name}"
        program = ("import sys; sys.path.insert(0, sys.argv[1]);"
                   "from vdeliver.launcher import main; raise SystemExit(main([sys.argv[2]]))")
        subprocess.run([SYSTEM_PYTHON, "-I", "-c", program, str(lib), str(launcher)], check=True, capture_output=True)
        if direct:
            subprocess.run([SYSTEM_PYTHON, "-I", "-c", program.replace("[sys.argv[2]]", '["--direct", sys.argv[2]]'),
                            str(lib), f"{launcher}-direct"], check=True, capture_output=True)
            self.launchers[f"{name} --direct"] = f"{launcher}-direct"
        for dirpath, _dirs, files in os.walk(lib):
            os.chmod(dirpath, 0o755)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)
        self.launchers[name] = str(launcher)

    def mbox(self, user: str) -> Path:
        path = self.work / "vbox" / DOMAIN / user
        path.write_bytes(b"")
        path.chmod(0o600)
        self.own(path)
        return path

    def maildir(self, user: str) -> Path:
        top = self.work / "home" / DOMAIN / user
        top.mkdir(mode=0o700)
        self.own(top)
        md = top / "Maildir"
        md.mkdir(mode=0o700)
        self.own(md)
        for sub in ("cur", "new", "tmp"):
            (md / sub).mkdir(mode=0o700)
            self.own(md / sub)
        return md

    def env(self, phases: bool = False) -> dict[str, str]:
        env = {"VDELIVER_CACHE_DIR": str(self.work / "cache")}
        if phases:
            env["VDELIVER_PHASES"] = "1"
        return env

    def vdeliver(self, name: str, user: str, data: bytes) -> tuple[float, float]:
        argv = [self.launchers[name], "-c", str(self.config), "-t", "-Y", "-a", DOMAIN, "-a", user]
        s = spawn(argv, data, self.env(), self.creds, self.devnull)
        if not s.ok:
            raise SystemExit(f"vdeliver {name} -> {user} failed: {s.error}")
        return s.latency, s.cpu or 0.0

    def phases(self, name: str, user: str, data: bytes) -> str:
        argv = [self.launchers[name], "-c", str(self.config), "-a", DOMAIN, "-a", user]
        kwargs = {"user": self.creds[0], "group": self.creds[1], "extra_groups": []} if self.creds else {}
        out = subprocess.run(argv, input=data, capture_output=True, env=self.env(True), cwd="/", timeout=60,
                             **kwargs)  # type: ignore[call-overload]
        lines = [line for line in out.stderr.decode(errors="replace").splitlines() if "phases:" in line]
        return lines[-1].split("phases: ", 1)[1] if lines else "(no phase line: an older vdeliver)"

    def python_floor(self, program: str = "pass") -> tuple[float, float]:
        s = spawn([SYSTEM_PYTHON, "-IS", "-c", program], None, {}, self.creds, self.devnull)
        return s.latency, s.cpu or 0.0

    def import_floors(self, name: str, fmt: str) -> dict[str, object]:
        """Two floors between the bare interpreter and a delivery: `python3 -IS` importing the
        modules one delivery imports (benchmarks.import_set: the code, no work), and importing as
        many empty modules of a package (what a package of that many modules costs whatever its
        code: the import system's fixed work per module)."""
        from benchmarks.import_set import measure

        lib = self.work / f"lib-{name.split()[0]}"
        modules = measure(str(lib), fmt)
        ours = [m for m in modules if m == "vdeliver" or m.startswith("vdeliver.")]
        empty = self.work / f"empty-{fmt}"
        (empty / "pkg").mkdir(parents=True, exist_ok=True)
        for i, _m in enumerate(ours):
            (empty / "pkg" / ("__init__.py" if i == 0 else f"m{i}.py")).write_text("")
        subprocess.run([SYSTEM_PYTHON, "-I", "-m", "compileall", "-q", str(empty)], check=True)
        for dirpath, _dirs, files in os.walk(empty):
            os.chmod(dirpath, 0o755)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)
        stdlib = [m for m in modules if m not in ours]
        # Each floor ends as a delivery does (vdeliver.cli.run: posix._exit, no interpreter
        # teardown), or it would carry the teardown of every module it imported, which no
        # delivery pays (about 1.5 ms here for these modules: more than a delivery's own work).
        code = f"import sys; sys.path.insert(0, {str(lib)!r}); import " + ", ".join(modules) + EXIT
        blank = (f"import sys; sys.path.insert(0, {str(empty)!r}); import "
                 + ", ".join(["pkg", *(f"pkg.m{i}" for i in range(1, len(ours))), *stdlib]) + EXIT)

        def run(program: str) -> tuple[float, float]:
            s = spawn([SYSTEM_PYTHON, "-IS", "-c", program], None, {}, self.creds, self.devnull)
            if not s.ok:
                raise SystemExit(f"import floor failed: {s.error}")
            return s.latency, s.cpu or 0.0

        return {f"floor: {len(ours)} empty modules + the stdlib ones, {fmt}": lambda: run(blank),
                f"floor: the {len(modules)} modules of a delivery imported, {fmt}": lambda: run(code)}

    def procmail(self, target: str, data: bytes) -> tuple[float, float]:
        rc = self.work / f"procmailrc-{abs(hash(target))}"
        if not rc.exists():
            rc.write_text(f"LOGFILE=/dev/null\nVERBOSE=no\n:0{':' if not target.endswith('/') else ''}\n{target}\n")
            rc.chmod(0o644)
        s = spawn(["procmail", "-Y", "-m", str(rc)], data, {"PATH": "/usr/bin:/bin"}, self.creds, self.devnull)
        if not s.ok:
            raise SystemExit(f"procmail -> {target} failed: {s.error}")
        return s.latency, s.cpu or 0.0

    def bare(self, fmt: str, target: str, data: bytes) -> tuple[float, float]:
        """The runtime floor of a delivery process: `python3 -IS` reading the message from the pipe in
        64 KB reads and storing it with the fsync floor's syscalls, and nothing else (no locks,
        no journal, no escaping, no headers, no imports beyond the interpreter's own)."""
        s = spawn([SYSTEM_PYTHON, "-IS", "-c", BARE, fmt, target], data, {}, self.creds, self.devnull)
        if not s.ok:
            raise SystemExit(f"bare python -> {target} failed: {s.error}")
        return s.latency, s.cpu or 0.0

    def fsync_floor(self, fmt: str, data: bytes) -> tuple[float, float]:
        """What storing the record costs at the least, in this process: write it, fsync it (and
        for a Maildir link it into new/ and fsync new/)."""
        d = self.work / "floor"
        d.mkdir(exist_ok=True)
        (d / "new").mkdir(exist_ok=True)
        started, cpu = time.perf_counter(), time.process_time()
        fd = os.open(d / "f", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        if fmt == "maildir":
            os.link(d / "f", d / "new" / "f")
            dfd = os.open(d / "new", os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
        elapsed, used = time.perf_counter() - started, time.process_time() - cpu
        shutil.rmtree(d)
        return elapsed, used


def median_rows(samples: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in samples.items()}


def interleave(turns: int, runs: dict[str, object]) -> dict[str, tuple[float, float]]:
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    for _ in range(turns):
        for key, run in runs.items():
            samples[key].append(run())  # type: ignore[operator]
    return median_rows(samples)


def part_start(b: Bench, names: list[str]) -> list[str]:
    msg = message(4096, "start")
    runs: dict[str, object] = {"python3 -IS -c pass": b.python_floor,
                               "python3 -IS, ended with posix._exit(0)": lambda: b.python_floor(EXIT[2:])}
    record = msg[len(FROM_LINE):]
    for fmt in ("mbox", "maildir"):
        # The least a delivery process of this runtime costs: the interpreter, the pipe read and the
        # store's syscalls (mbox: one write and one fsync, no journal), nothing imported.
        target = str(b.mbox("start-bare")) if fmt == "mbox" else str(b.maildir("start-bare-md"))
        runs[f"bare python3 -IS: read the pipe, write, fsync, {fmt}"] = lambda f=fmt, t=target: b.bare(f, t, record)
        runs.update(b.import_floors(names[0], fmt))
    for name in names:
        for fmt in ("mbox", "maildir"):
            user = f"start-{name.replace(' --', '-')}-{fmt}"
            b.mbox(user) if fmt == "mbox" else b.maildir(user)
            b.vdeliver(name, user, msg)  # warm-up: fills the configuration cache
            runs[f"vdeliver {name}, {fmt}"] = (lambda n=name, u=user: b.vdeliver(n, u, msg))
    turns = 6 if b.quick else 100
    got = interleave(turns, runs)
    fw, fc = got["python3 -IS -c pass"]
    lines = [f"## Start-up: one 4 KB message (median of {turns}, interleaved)", "",
             "| run | wall ms | x `python3 -IS -c pass` | CPU ms | own CPU ms (beyond the interpreter) |",
             "|---|---:|---:|---:|---:|"]
    for key, (w, c) in got.items():
        lines.append(f"| {key} | {w * 1000:.2f} | {w / fw:.2f}x | {c * 1000:.2f} | {(c - fc) * 1000:+.2f} |")
    lines += ["", ("The floors decompose the start-up. The goal's yardstick, `python3 -IS -c pass`, includes "
              "the interpreter's teardown; a delivery skips it (vdeliver.cli.run ends with posix._exit), "
              "and so do the floors below the first: the interpreter ended that way; a bare program that "
              "reads the message from the pipe and stores it with the syncs of the format (mbox: one fsync, "
              "no journal) and imports nothing; the interpreter plus the import "
              "system's fixed work for a package of as many modules (empty ones) and the standard-library "
              "modules a delivery imports; plus the delivery's own code imported (no work done). A "
              "delivery adds its work and two syncs (the fsync floor of a 4 KB record is about 0.3 ms "
              "for an mbox, 0.5 ms for a Maildir: benchmarks/results/lmtp-grid.md). The goal's 1.2x leaves "
              f"{fw * 0.2 * 1000:.2f} ms beyond the interpreter for all of it."),
              "", "Phase timer (VDELIVER_PHASES=1), one delivery each:", ""]
    for name in names:
        for fmt in ("mbox", "maildir"):
            user = f"start-{name.replace(' --', '-')}-{fmt}"
            lines.append(f"- {name}, {fmt}: {b.phases(name, user, msg)}")
    return [*lines, ""]


def part_large(b: Bench, names: list[str]) -> list[str]:
    size = (1 << 20) if b.quick else (10 << 20)
    turns = 2 if b.quick else 15
    msg = message(size, "large")
    small = message(4096, "large-4k")
    record, small_record = msg[len(FROM_LINE):], small[len(FROM_LINE):]
    lines = [f"## Large messages: {size >> 20} MB through the command line (median of {turns}, interleaved)", "",
             ("Each process also delivers a 4 KB message in the same turns: the difference is what the "
              f"{size >> 20} MB cost it beyond starting and ending (its data path), start-up aside."), "",
             "| format | run | wall ms | x fsync floor | x procmail | CPU ms | 4 KB ms | data path ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for fmt in ("mbox", "maildir"):
        runs: dict[str, object] = {"fsync floor (write + fsync in one process)": lambda f=fmt: b.fsync_floor(f, record)}
        twins: dict[str, object] = {}  # the same run with a 4 KB message, same target
        pm_target = str(b.mbox("large-procmail")) if fmt == "mbox" else str(b.maildir("large-procmail-md")) + "/"
        runs["procmail 3.22"] = lambda t=pm_target: b.procmail(t, msg)
        twins["procmail 3.22"] = lambda t=pm_target: b.procmail(t, small)
        bare_target = str(b.mbox("large-bare")) if fmt == "mbox" else str(b.maildir("large-bare-md"))
        bare = "bare python3 -IS: read the pipe, write, fsync"
        runs[bare] = lambda f=fmt, t=bare_target: b.bare(f, t, record)
        twins[bare] = lambda f=fmt, t=bare_target: b.bare(f, t, small_record)
        for name in names:
            user = f"large-{name.replace(' --', '-')}-{fmt}"
            b.mbox(user) if fmt == "mbox" else b.maildir(user)
            runs[f"vdeliver {name}"] = (lambda n=name, u=user: b.vdeliver(n, u, msg))
            twins[f"vdeliver {name}"] = (lambda n=name, u=user: b.vdeliver(n, u, small))
        # The floor alone first: in the rotation it sometimes costs three times as much (20 ms
        # of this process's own CPU in the write; docs/benchmarks.md).  The lower floor counts.
        alone = median_rows({"x": [b.fsync_floor(fmt, record) for _ in range(3)]})["x"]
        got = {"fsync floor alone (3 runs before the others)": alone,
               **interleave(turns, {**runs, **{f"{k} (4 KB)": v for k, v in twins.items()}})}
        floor = min(alone[0], got["fsync floor (write + fsync in one process)"][0])
        pm = got["procmail 3.22"][0]
        for key, (w, c) in got.items():
            if key.endswith(" (4 KB)"):
                continue
            four = got.get(f"{key} (4 KB)")
            extra = f" {four[0] * 1000:.1f} | {(w - four[0]) * 1000:.1f} |" if four else " - | - |"
            lines.append(f"| {fmt} | {key} | {w * 1000:.1f} | {w / floor:.2f}x | {w / pm:.2f}x | {c * 1000:.1f} |"
                         + extra)
        for user in [u for u in os.listdir(b.work / "vbox" / DOMAIN) if u.startswith("large")]:
            os.truncate(b.work / "vbox" / DOMAIN / user, 0)  # keep the disk free between formats
    return [*lines, ""]


def fill_mbox(path: Path, size: int) -> None:
    """Append real 4 KB messages (From_ line, headers, body) until the mbox holds `size` bytes."""
    one = message(4096, "filler") + b"\n"
    block = one * max(1, (1 << 20) // len(one))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        have = os.fstat(fd).st_size
        while have < size:
            chunk = block[: size - have] if size - have < len(block) else block
            if len(chunk) < len(block):
                chunk = one * max(1, len(chunk) // len(one))
            os.write(fd, chunk)
            have += len(chunk)
    finally:
        os.close(fd)


def fill_maildir(md: Path, count: int, uid_gid: tuple[int, int] | None) -> None:
    have = len(os.listdir(md / "cur")) + len(os.listdir(md / "new"))
    body = message(2048, "filler")[len(FROM_LINE):]
    wsize = len(body) + body.count(b"\n")
    for i in range(have, count):
        sub = "cur" if i % 2 else "new"
        name = f"1764900000.M{i}P1.bench,S={len(body)},W={wsize}" + (":2,S" if sub == "cur" else "")
        fd = os.open(md / sub / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, body)
        os.close(fd)
        if uid_gid is not None:
            os.chown(md / sub / name, *uid_gid)


def part_growth(b: Bench) -> tuple[list[str], dict[str, list[tuple[float, float, float]]]]:
    msg = message(4096, "growth")
    turns = 3 if b.quick else 25
    mbox_points = [0, 1 << 20, 4 << 20] if b.quick else [0, 256 << 20, 1 << 30, 2 << 30]
    md_points = [0, 200, 1000] if b.quick else [0, 20000, 100000, 200000]
    lines = [(f"## Growth: 4 KB deliveries into a growing mailbox, against an empty one in the same turns "
              f"(median of {turns})"), "",
             "| format | mailbox | ms/msg | empty twin ms/msg | ratio | CPU ms | twin CPU ms | CPU ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    curves: dict[str, list[tuple[float, float, float]]] = {"mbox": [], "maildir": []}
    big = b.mbox("grow")
    for point in mbox_points:
        fill_mbox(big, point)
        b.mbox("twin")
        got = interleave(turns, {"big": lambda: b.vdeliver("new", "grow", msg),
                                 "twin": lambda: b.vdeliver("new", "twin", msg)})
        (w, c), (tw, tc) = got["big"], got["twin"]
        lines.append(f"| mbox | {point / (1 << 20):.0f} MB | {w * 1000:.2f} | {tw * 1000:.2f} | {w / tw:.2f} | "
                     f"{c * 1000:.2f} | {tc * 1000:.2f} | {c / tc:.2f} |")
        curves["mbox"].append((point / (1 << 20), w * 1000, tw * 1000))
    os.truncate(big, 0)
    md = b.maildir("grow-md")
    for point in md_points:
        fill_maildir(md, point, b.creds)
        twin = b.work / "home" / DOMAIN / "twin-md"
        shutil.rmtree(twin, ignore_errors=True)
        b.maildir("twin-md")
        got = interleave(turns, {"big": lambda: b.vdeliver("new", "grow-md", msg),
                                 "twin": lambda: b.vdeliver("new", "twin-md", msg)})
        (w, c), (tw, tc) = got["big"], got["twin"]
        lines.append(f"| Maildir | {point} messages | {w * 1000:.2f} | {tw * 1000:.2f} | {w / tw:.2f} | "
                     f"{c * 1000:.2f} | {tc * 1000:.2f} | {c / tc:.2f} |")
        curves["maildir"].append((float(point), w * 1000, tw * 1000))
    return [*lines, ""], curves


def plot(path: str, curves: dict[str, list[tuple[float, float, float]]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no chart"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (fmt, xlabel) in zip(axes, (("mbox", "mbox size (MB)"), ("maildir", "messages in cur/ + new/")),
                                 strict=True):
        pts = curves[fmt]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="into this mailbox")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="into an empty one, same turns")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per delivery (median)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"vdeliver CLI, {fmt}")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cli_bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny counts and sizes: checks the harness only")
    p.add_argument("--out", help=f"results directory (default {RESULTS})")
    p.add_argument("--baseline", help="another checkout's directory holding `vdeliver`: before/after rows")
    p.add_argument("--parts", default="start,large,growth")
    args = p.parse_args(argv)
    out = args.out or RESULTS
    os.makedirs(out, exist_ok=True)
    parts = set(args.parts.split(","))
    b = Bench(args.quick)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = ["# vdeliver command line: start-up, large messages, growth (issue 21)", "",
             (f"- {when}; `python -m benchmarks.cli_bench{' --quick' if args.quick else ''}`; "
              f"{os.cpu_count()} CPUs, shared with other jobs: read the ratios, not the absolute times."),
             ("- `new` is this checkout" + (f", `base` is {args.baseline}" if args.baseline else "")
              + "; every run through the production launcher (`new --direct`: the #! one) as the vmail user, "
              "message on a pipe."), ""]
    try:
        b.install("new", PACKAGE.parent, direct=True)
        names = ["new", "new --direct"]
        if args.baseline:
            b.install("base", Path(args.baseline))
            names.append("base")
        if "start" in parts:
            lines += part_start(b, names)
        if "large" in parts:
            lines += part_large(b, names)
        if "growth" in parts:
            more, curves = part_growth(b)
            lines += more
            why = plot(os.path.join(out, "cli-growth.png"), curves)
            lines += [why or "![growth curves](cli-growth.png)", ""]
    finally:
        os.close(b.devnull)
        shutil.rmtree(b.work, ignore_errors=True)
    with open(os.path.join(out, "cli.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
