"""The documented set-up, run word for word (issue 15): an admin's first day, as a test.

The shell blocks of README.md and docs/*.md are marked in the Markdown source:

    <!-- sh: ID -->                  the next code block is run by this walk-through
    <!-- sh: skip REASON -->         the next code block is an alternative not run here

The walk-through runs the marked blocks in the order of WALK (block ids, never their text),
as root, each with `/bin/sh -e` from the top of a copy of the clone, on the Debian packages as
installed, from a clean state: inside private mount, UTS, network and pid namespaces
(`unshare`), with overlays on /etc, /opt, /usr/local, /var, /home and /root and fresh tmpfs on
/run and /tmp, so that nothing on the real machine changes and every daemon the docs start dies
with the namespace.  The network namespace has only the loopback interface: sendmail's port 25
and Dovecot's 143 are private to it.  `apt-get install` lines are checked (each package
installed) instead of run.  pip installs from a wheelhouse built beforehand (PIP_NO_INDEX),
because the namespace has no network.

After the blocks: a message over SMTP, a queue run, and every message read back over IMAP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- sh: (?P<what>.+?) -->\s*$")
# Words that start a command an administrator runs; a code block starting with one must be marked.
ADMIN = re.compile(r"^(sudo\s+)?(/usr/s?bin/|/opt/vdeliver/bin/)?(vmailctl|sendmail|makemap|m4|install|cp|useradd|"
                   r"systemctl|hostnamectl|hostname|dovecot|doveadm|vdeliver-lmtpd|vdeliver-socketmapd|apt-get|"
                   r"python3?|pip|mkdir|ln|newaliases|kill|printf|echo|sed|cd)(?=\s|$)(?!.*\[-)")
# The walk-through: (file, block id), in the order an administrator meets them.
WALK = [
    ("docs/sendmail.md", "hostname"),
    ("docs/sendmail.md", "packages"),
    ("README.md", "install"),
    ("docs/sendmail.md", "spool"),
    ("docs/sendmail.md", "sendmail-cf"),
    ("docs/sendmail.md", "accounts"),
    ("docs/sendmail.md", "sendmail-start"),
    ("docs/sendmail.md", "sendmail-check"),
    ("docs/sendmail.md", "first-mail"),
    ("docs/dovecot.md", "dovecot-generate"),
    ("docs/dovecot.md", "dovecot-start"),
    ("docs/lmtp.md", "lmtp-switch"),
    ("docs/socketmap.md", "socketmap-switch"),
    ("docs/webmail.md", "webmail-packages"),
    ("docs/webmail.md", "webmail-generate"),
]
# The paper's way: maps and mailboxes by hand (docs/sendmail.md 2 and 3b), no accounts database.
WALK_BY_HAND = [
    ("docs/sendmail.md", "hostname"),
    ("docs/sendmail.md", "packages"),
    ("README.md", "install"),
    ("docs/sendmail.md", "spool"),
    ("docs/sendmail.md", "by-hand-mailboxes"),
    ("docs/sendmail.md", "sendmail-cf"),
    ("docs/sendmail.md", "by-hand-maps"),
    ("docs/sendmail.md", "sendmail-start"),
    ("docs/sendmail.md", "sendmail-check"),
    ("docs/sendmail.md", "first-mail"),
]
TIMEOUT = 240


@dataclass
class Block:
    file: str
    line: int
    what: str  # the id, or "skip REASON"
    text: str

    @property
    def skipped(self) -> bool:
        return self.what.startswith("skip")


def code_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, text, marker) of every code block (fenced or indented) of a Markdown file."""
    lines = path.read_text().split("\n")
    out: list[tuple[int, str, str | None]] = []
    marker: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARK.match(line)
        if m:
            marker = m.group("what")
            i += 1
            continue
        if line.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append((i + 1, "\n".join(lines[i + 1 : j]), marker))
            marker = None
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            out.append((i + 1, "\n".join(x[4:] for x in lines[i:j]).strip("\n"), marker))
            marker = None
            i = j
            continue
        if line.strip():
            marker = None
        i += 1
    return out


def marked_blocks() -> dict[tuple[str, str], Block]:
    found: dict[tuple[str, str], Block] = {}
    for path in DOCS:
        rel = str(path.relative_to(ROOT))
        for line, text, marker in code_blocks(path):
            if marker is not None:
                key = (rel, marker if not marker.startswith("skip") else f"{marker}@{line}")
                assert key not in found, f"{rel}:{line}: block id {marker!r} used twice"
                found[key] = Block(rel, line, marker, text)
    return found


# -- the Markdown side: cheap, always run --------------------------------------------------


def test_every_admin_command_block_in_the_docs_is_marked() -> None:
    unmarked = []
    for path in DOCS:
        for line, text, marker in code_blocks(path):
            first = next((x.strip() for x in text.split("\n") if x.strip() and not x.startswith("#")), "")
            if marker is None and ADMIN.match(first):
                unmarked.append(f"{path.relative_to(ROOT)}:{line}: {first}")
    assert not unmarked, "shell blocks neither run nor marked `<!-- sh: skip REASON -->`:\n" + "\n".join(unmarked)


def test_every_runnable_block_is_in_the_walkthrough_and_every_step_exists() -> None:
    blocks = marked_blocks()
    runnable = {k for k, b in blocks.items() if not b.skipped}
    walked = set(WALK) | set(WALK_BY_HAND)
    assert runnable == walked, f"marked but not walked: {runnable - walked}; walked but missing: {walked - runnable}"


# -- the walk-through ------------------------------------------------------------------------


def _wheelhouse() -> Path:
    """vdeliver's dependencies and build backend as wheels, built once per pyproject.toml."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    house = Path(f"/var/tmp/vdeliver-walkthrough-wheels-{key}")
    if (house / ".complete").exists():
        return house
    tmp = Path(f"{house}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    for args in (["download", "-d", str(tmp), "setuptools>=64", "wheel"], ["wheel", "-w", str(tmp), str(ROOT)]):
        r = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.fail(f"cannot build the wheelhouse: pip {' '.join(args)}: {r.stderr[-2000:]}", pytrace=False)
    for wheel in tmp.glob("vdeliver-*.whl"):
        wheel.unlink()  # the walk-through installs vdeliver from the clone, as the README says
    (tmp / ".complete").write_text("")
    if house.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(house)
    return house


def _clone_files() -> list[str]:
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"git ls-files failed: {r.stderr.decode(errors='replace')}", pytrace=False)
    return [f for f in r.stdout.decode().split("\0") if f and (ROOT / f).is_file()]


@pytest.mark.slow
def test_documented_setup_delivers_by_sendmail_and_smtp_and_reads_over_imap(tmp_path: Path) -> None:
    from tests.helpers import require, require_root

    require_root("the walk-through installs and starts sendmail and Dovecot (in private namespaces)")
    require("unshare", "ip", "sendmail", "m4", "makemap", "dovecot", "git", "dpkg-query")
    result = _walk(WALK, "accounts", tmp_path)
    assert result["mbox_fred_away"] and result["imap_fred_away"], result
    assert result["imap_fred_home"] and result["imap_wilma_home"], result
    assert result["lmtp_used"] and result["out_alive_after_hup"] and result["imap_fred_away_lmtp"], result
    assert result["socketmap_used"] and result["imap_barney_socketmap"], result
    assert result["managesieve_saved"] and result["imap_fred_home_filed"], result
    assert result["roundcube_login"], result


@pytest.mark.slow
def test_documented_setup_by_hand_delivers_by_sendmail_and_smtp(tmp_path: Path) -> None:
    from tests.helpers import require, require_root

    require_root("the walk-through installs and starts sendmail (in private namespaces)")
    require("unshare", "ip", "sendmail", "m4", "makemap", "git", "dpkg-query")
    result = _walk(WALK_BY_HAND, "by-hand", tmp_path)
    assert result["mbox_fred_away"] and result["maildir_fred_home"], result


def _walk(walk: list[tuple[str, str]], mode: str, tmp_path: Path) -> dict[str, object]:
    house = _wheelhouse()
    plan = [{"file": b.file, "line": b.line, "id": b.what, "text": b.text}
            for b in (marked_blocks()[k] for k in walk)]
    job = {"plan": plan, "files": _clone_files(), "root": str(ROOT), "wheels": str(house),
           "log": str(tmp_path / "walkthrough.log"), "mode": mode}
    r = subprocess.run(
        ["unshare", "--mount", "--uts", "--net", "--pid", "--fork", "--mount-proc", "--propagation", "private",
         "/usr/bin/python3", "-I", str(Path(__file__).resolve().parent / "walkthrough_inside.py")],
        input=json.dumps(job), capture_output=True, text=True, timeout=TIMEOUT,
    )
    report = r.stdout.strip().rsplit("\n", 1)[-1] if r.stdout.strip() else ""
    try:
        result = json.loads(report)
    except ValueError:
        pytest.fail(f"the walk-through died (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}",
                    pytrace=False)
    assert result.get("error") is None, (f"{result.get('error')} (full log: {tmp_path / 'walkthrough.log'})\n\n"
                                         f"{r.stdout[-6000:]}\n{r.stderr[-3000:]}")
    assert isinstance(result, dict)
    return result
