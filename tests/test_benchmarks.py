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


def test_quick_run_delivers_every_message_intact(tmp_path: Path) -> None:
    peers = ["procmail", "maildrop", "dovecot-lda"] + (["dovecot"] if IS_ROOT else [])
    require(*peers)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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


def test_lmtp_grid_quick_run_fills_every_cell_intact(tmp_path: Path) -> None:
    """benchmarks/lmtp_grid.py --quick: both LMTP servers in every cell of the grid (1 and a few
    clients, 1 and 8 mailboxes, both formats), every message read back intact."""
    require_root("a private Dovecot and the vmail user")
    require("dovecot")
    out = tmp_path / "lmtp-grid.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lmtp_grid", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| mbox", "| maildir"))]
    assert len(rows) == 8, rows  # 2 formats x (1, 4 clients) x (1, 8 mailboxes)
    for row in rows:
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert cols[3] != "-" and cols[4] != "-", row  # both servers measured
        v, d = cols[9].split(" / ")
        assert v.endswith("intact") and d.endswith("intact") and "missing" not in cols[9], row
    assert "the fsync floor" in out.read_text()
    # Several recipients a message: the hard-link variant stores one file for all 8 recipients.
    multi = [line for line in out.read_text().splitlines() if line.startswith(("| vdeliver LMTP", "| Dovecot LMTP"))]
    assert len(multi) == 3, multi
    links = next(line for line in multi if "delivered_to = false" in line)
    assert "| 8.0 |" in links and all(line.rstrip(" |").endswith("intact") for line in multi), multi
