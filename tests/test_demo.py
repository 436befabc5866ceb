"""`make demo` keeps working: the demo runs in a scratch directory and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_demo_runs_and_delivers(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vdeliver.demo"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "demo-out"
    assert (out / "accounts.sqlite").exists()
    assert (out / "vbox" / "away.com" / "fred").read_bytes().count(b"\nFrom barney@") + 1 >= 2
    assert len(list((out / "vmail-users" / "home.com" / "fred" / "Maildir" / "new").iterdir())) == 1
    assert "exit  67" in done.stdout and "exit  75" in done.stdout
