"""Smoke test of the benchmark harness (issue 9): `python -m benchmarks.run --quick` works and
every message of every agent arrived intact.  No timing assertions: speed lives in the results."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT, ROOT, require, require_root

pytestmark = [pytest.mark.slow, pytest.mark.peers]


def quick_run(module: str, *args: str, timeout: int) -> "subprocess.CompletedProcess[str]":
    """`python -m MODULE --quick ARGS` from the checkout; it must exit 0 (its output tail if not)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_plotted(text: str, png: Path) -> None:
    """A curve was drawn, or the results say why not (matplotlib is optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
    else:
        assert png.stat().st_size > 1000


def test_quick_run_delivers_every_message_intact(tmp_path: Path) -> None:
    peers = ["procmail", "maildrop", "dovecot-lda"] + (["dovecot"] if IS_ROOT else [])
    require(*peers)
    out = tmp_path / "results"
    proc = quick_run("benchmarks.run", "--no-cli", "--out", str(out), timeout=240)
    assert (out / "latest.md").read_text().startswith("# vdeliver benchmarks")
    with open(out / "latest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows

    measured = {r["agent"] for r in rows if r["msgs_per_s"]}
    expected = ["vdeliver (launcher", "procmail", "maildrop", "dovecot-lda", "floor: system python -c pass",
                "floor: write+fsync"] + (["Dovecot LMTP"] if IS_ROOT else [])
    for name in expected:
        assert any(a.startswith(name) for a in measured), f"{name} did not run: {sorted(measured)}"

    for r in rows:
        if r["kind"] == "floor" or not r["msgs_per_s"]:
            continue
        # Every acknowledged message is in the mailbox once, with its body byte for byte.
        assert r["integrity_ok"] == "True", (r["cell"], r["agent"], r["integrity"])
        assert r["failed"] == "0", (r["cell"], r["agent"], r["note"])
        delivered, expected_count = r["integrity"].split()[0].split("/")
        assert delivered == expected_count and int(delivered) > 0
    cells = {r["cell"] for r in rows}
    assert any("-1w" in c for c in cells) and any("w-one" in c for c in cells) and any("w-many" in c for c in cells)
    assert {r["format"] for r in rows} == {"mbox", "maildir"}

    if IS_ROOT:
        grid = (out / "lmtp-grid.md").read_text()
        assert grid.startswith("# The LMTP grid") and "| maildir | 1 | 8 |" in grid

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
    else:
        assert (out / "latest.png").stat().st_size > 1000


def test_journal_benchmark_quick_run_counts_two_syncs_a_message(tmp_path: Path) -> None:
    """`python -m benchmarks.journal_bench --quick` runs before/after/off and strace shows what
    the persistent journal is for: two syncs a message, where the journal file made per
    delivery took three.  Counts, not times: no timing assertion."""
    require("strace", "git")
    quick_run("benchmarks.journal_bench", "--out", str(tmp_path), timeout=240)
    rows = {line.split("|")[1].strip(): line for line in (tmp_path / "journal.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| variant")}
    assert "| 2 a message (1 fdatasync, 1 fsync); first delivery into a new mbox: 3 |" in rows["after"]
    assert "| 1 a message (1 fsync)" in rows["off"]
    if "No 'before' variant" not in (tmp_path / "journal.md").read_text():  # a shallow clone has no history
        before = next(v for k, v in rows.items() if k.startswith("before"))
        assert "| 3 a message (3 fsync)" in before


def test_group_commit_benchmark_quick_run_counts_syncs_on_and_off(tmp_path: Path) -> None:
    """`python -m benchmarks.group_bench --quick`: on this machine's disk and on a disk whose cache
    flush takes 4 ms (benchmarks/slowdisk.py), both servers deliver every message, and strace counts
    what group commit is for: off, two syncs a message (its journal record, the mbox); on, never
    more; the slow disk also counts its cache flushes.  Counts, not times: no timing assertion."""
    require("strace", "nbdkit", "nbdfuse", "fusermount3", "losetup", "mkfs.ext4")
    if os.geteuid() != 0:
        pytest.skip("the servers start as root serving as vmail")
    out = tmp_path / "group-commit.md"
    quick_run("benchmarks.group_bench", "--out", str(out), timeout=240)
    sections = out.read_text().split("\n## ")[1:]
    assert [s.split(" (")[0] for s in sections] == ["This machine's disk", "A disk whose cache flush takes 4 ms"]
    for section in sections:
        rows = {line.split("|")[1].strip(): line.split("|") for line in section.splitlines()
                if line.startswith(("| true", "| false"))}
        assert float(rows["false"][2]) == 2.0, section
        assert 1.0 <= float(rows["true"][2]) <= 2.0, section
        assert "Delivered: 24 and 24 of 24 each; errors: 0." in section
    flushes = [line.split("|")[3] for line in sections[1].splitlines() if line.startswith(("| true", "| false"))]
    assert len(flushes) == 2 and all(float(f) > 0 for f in flushes), sections[1]


def test_cli_bench_quick_run_writes_its_rows_and_curves(tmp_path: Path) -> None:
    """benchmarks/cli_bench.py --quick (issue 21): every part runs, every delivery succeeds."""
    require("procmail")
    quick_run("benchmarks.cli_bench", "--out", str(tmp_path), timeout=240)
    text = (tmp_path / "cli.md").read_text()
    for row in ("| vdeliver new, mbox |", "| vdeliver new, maildir |", "| mbox | procmail 3.22 |",
                "| Maildir | 1000 messages |", ": main cpu=", "| mbox | bare python3 -IS",
                "| maildir | bare python3 -IS", "| python3 -IS, ended with posix._exit(0) |",
                "| bare python3 -IS: read the pipe, write, fsync, mbox |",
                "| bare python3 -IS: read the pipe, write, fsync, maildir |", "| 4 KB ms | data path ms |"):
        assert row in text, row
    assert_plotted(text, tmp_path / "cli-growth.png")


def test_socketmap_quick_run_measures_every_cell(tmp_path: Path) -> None:
    """`python -m benchmarks.socketmap_load --quick` (issue 21): the server and both echo peers in
    every cell, the uncached PostgreSQL cell, the growth curve with its query plan; no figure is
    checked, only that each row was measured and every reply was the right one."""
    require("initdb", "pg_ctl")
    out = tmp_path / "results"
    proc = quick_run("benchmarks.socketmap_load", "--out", str(out), timeout=240)
    assert "WRONG REPLIES" not in proc.stdout
    md = (out / "socketmap.md").read_text()
    for text in ("| 1 | vdeliver-socketmapd (cached)", "| 16 | vdeliver-socketmapd (cached)", "| 1 | echo (asyncio)",
                 "| 16 | echo (threads)", "| 16 | vdeliver-socketmapd (uncached, PostgreSQL)", "| 100 |", "| 1,000 |",
                 "Index", "x echo"):
        assert text in md, text
    assert_plotted(md, out / "socketmap-growth.png")


def test_lmtp_grid_quick_run_fills_every_cell_intact(tmp_path: Path) -> None:
    """benchmarks/lmtp_grid.py --quick: both LMTP servers in every cell of the grid (1 and a few
    clients, 1 and 8 mailboxes, both formats), every message read back intact."""
    require_root("a private Dovecot and the vmail user")
    require("dovecot")
    out = tmp_path / "lmtp-grid.md"
    quick_run("benchmarks.lmtp_grid", "--out", str(out), timeout=180)
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| mbox", "| maildir"))]
    assert len(rows) == 8, rows  # 2 formats x (1, 4 clients) x (1, 8 mailboxes)
    for row in rows:
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert cols[3] != "-" and cols[4] != "-", row  # both servers measured
        v, d = cols[9].split(" / ")
        assert v.endswith("intact") and d.endswith("intact") and "missing" not in cols[9], row
    assert "the fsync floor" in out.read_text()
    # The runtime floor (benchmarks/lmtp_floor.py) takes its turns in the one-client cells, and
    # what it stored was read back intact (the run exits 1 otherwise).
    assert "x the bare Python LMTP responder" in out.read_text()
    # Several recipients a message: the hard-link variant stores one file for all 8 recipients.
    multi = [line for line in out.read_text().splitlines() if line.startswith(("| vdeliver LMTP", "| Dovecot LMTP"))]
    assert len(multi) == 3, multi
    links = next(line for line in multi if "delivered_to = false" in line)
    assert "| 8.0 |" in links and all(line.rstrip(" |").endswith("intact") for line in multi), multi


def test_lmtp_large_quick_run_measures_both_servers_and_the_floor_intact(tmp_path: Path) -> None:
    """benchmarks/lmtp_large.py --quick (issue 21, large messages): vdeliver-lmtpd, Dovecot LMTP and
    the fsync floor in both formats, every message read back intact, the goal lines printed."""
    require_root("a private Dovecot and the vmail user")
    require("dovecot")
    out = tmp_path / "lmtp-large.md"
    quick_run("benchmarks.lmtp_large", "--out", str(out), timeout=180)
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| mbox", "| maildir"))]
    assert len(rows) == 8, rows  # 2 formats x (floor alone, floor in the rotation, vdeliver, Dovecot)
    for row in rows:
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert cols[2] != "-", row
        if "alone" not in cols[1]:  # the floor's messages alone are read back with its others
            assert cols[6].endswith("intact") and "missing" not in cols[6], row
    goals = [line for line in text.splitlines() if line.startswith("- ") and "goal" in line]
    assert len(goals) == 2 and all("the fsync floor" in g and "Dovecot" in g for g in goals), goals


def test_readme_results_block_is_what_the_results_make() -> None:
    """The README's results block is made from benchmarks/results by benchmarks/readme.py, never
    typed: after a result file changes, `python -m benchmarks.readme` must be run (make bench does)."""
    from benchmarks import readme

    text = (ROOT / "README.md").read_text()
    assert readme.BEGIN in text and readme.END in text
    assert readme.splice(text, readme.render()) == text, "run: python -m benchmarks.readme"


def test_readme_block_names_a_missing_result_file(tmp_path: Path) -> None:
    from benchmarks import readme

    with pytest.raises(readme.MissingResult, match="missing"):
        readme.render(str(tmp_path))
