"""scripts/hubs-demo (issue 20): the failover drill and the failure run with mail, in network namespaces.

A PostgreSQL primary and a streaming standby, two hubs and a client, each in its own
namespace on a private bridge; the primary is killed, the standby promoted, the old
primary rebuilt as a standby.  The script is run for real (`--json --quick`) and its
report is checked; so is its teardown after a Ctrl-C or SIGTERM in the middle of the drill.
`--mail --quick`: each hub also runs the sendmail pair, vdeliver-lmtpd, vdeliver-socketmapd and
Dovecot, 150 letters go through both while the primary fails, and every invariant of the
issue is one of the report's checks.
Needs root (namespaces) and PostgreSQL's server programs (--mail: sendmail, Dovecot, m4).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REQUIRE_PEERS, ROOT, require, require_root, world_tmpdir

pytestmark = [pytest.mark.peers, pytest.mark.slow]

SCRIPT = ROOT / "scripts" / "hubs-demo"
ENV = {"PATH": "/usr/lib/postgresql/15/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
       "PYTHONPATH": str(ROOT)}


def our_namespaces() -> list[str]:
    try:
        return sorted(name for name in os.listdir("/run/netns") if name.startswith("vd-"))
    except FileNotFoundError:
        return []


@pytest.fixture
def base() -> Iterator[Path]:
    """What the script needs, or skip (fail under VDELIVER_REQUIRE_PEERS=1); a private --base."""
    require_root("network namespaces and the postgres user")
    require("ip", "runuser", "initdb", "pg_ctl", "pg_basebackup")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        message = "no postgres system user (Debian's postgresql package creates it)"
        if REQUIRE_PEERS:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    path = world_tmpdir("vdeliver-hubs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_failover_drill_report(base: Path) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--quick", "--base", str(base / "lab")],
                          capture_output=True, text=True, timeout=300, env=ENV, cwd=str(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] and all(report["checks"].values()), report["checks"]
    assert report["quick"] and report["total_seconds"] < 60
    names = [phase["name"] for phase in report["phases"]]
    assert names[0] == "network" and names[-1] == "teardown" and "drill: promotion" in names
    # The accounts: vmailctl on hubA through the multi-host dsn, read back on hubB, replicated.
    accounts = report["accounts"]
    assert accounts["schema_version"] >= 1 and accounts["replicated_to_standby"]
    assert accounts["users_listed_on_hubB"] == sorted(accounts["users"])
    # Writes: fine before the failure, refused while no primary exists, fine again after promotion.
    writes = report["writes"]
    assert writes["ok"] > 20
    # Refused by the standby (the dead primary refuses at once); a write in flight at the kill may
    # also fail otherwise ("server closed the connection").
    assert writes["failed_in_outage"] > 0
    assert max(writes["errors"], key=writes["errors"].get) == "standby only (no read-write server)"
    assert writes["first_ok_after_kill"] is not None
    assert 0 < writes["outage_seconds"] < 10 and writes["first_ok_after_promote_seconds"] < 5
    assert writes["acknowledged_then_lost"] == 0
    assert writes["servers"].get("10.77.0.1 (primary)", 0) > 0 and writes["servers"].get("10.77.0.2 (primary)", 0) > 0
    # Reads never stopped: the standby answered while there was no primary.
    reads = report["reads"]
    assert reads["failed"] == 0 and reads["ok_started_without_primary"] > 0
    assert reads["longest_gap_seconds"] < 2
    # The old primary, rebuilt from the new one, replicates what was written after the rebuild.
    rebuild = report["rebuild"]
    assert rebuild["drill_write_visible_on_rebuilt_standby"] and rebuild["domain_visible_on_rebuilt_standby_ms"] < 10000
    assert rebuild["rebuilt_in_recovery"] and not rebuild["new_primary_in_recovery"]
    assert rebuild["reads_served_by_rebuilt_standby"] > 0
    # Nothing left behind.
    assert report["namespaces_left"] == [] and our_namespaces() == []
    assert not (base / "lab").exists()


def test_failover_drill_with_the_primary_host_gone(base: Path) -> None:
    """--failure link: the old primary's cable is cut too.  Nothing fails, but every new connection
    first waits for the vanished host (connect_timeout, or the failed ARP resolution, whichever
    comes first) until it is back as a standby."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--quick", "--failure", "link",
                           "--base", str(base / "lab")], capture_output=True, text=True, timeout=300, env=ENV,
                          cwd=str(ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] and all(report["checks"].values()), report["checks"]
    writes, reads = report["writes"], report["reads"]
    assert writes["outage_seconds"] > 1.9
    assert writes["latency_after_promotion_until_rebuild_ms"]["p50"] > 1900
    assert reads["failed"] == 0 and reads["latency_started_without_primary_ms"]["max"] > 1900
    assert writes["acknowledged_then_lost"] == 0
    assert report["rebuild"]["drill_write_visible_on_rebuilt_standby"]
    assert report["namespaces_left"] == [] and our_namespaces() == []


def interrupt_at(args: list[str], phase: str, sig: signal.Signals,
                 running: Callable[[], object]) -> tuple[int, str]:
    """Run hubs-demo with args until its stderr announces `phase`, check running() there, send
    sig and return (exit code, all of stderr).  Never leaves the process or its pipes behind."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=str(ROOT))
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if phase in line:
                break
        assert running(), "".join(seen)
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):  # a failed assertion must not leak the pipes
            if stream is not None:
                stream.close()
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)],
                         ids=["SIGINT", "SIGTERM"])
def test_interrupted_mid_drill_tears_down(base: Path, sig: signal.Signals, code: int) -> None:
    lab = base / "lab"
    returncode, output = interrupt_at(
        ["--quick", "--baseline", "30", "--base", str(lab)], "drill: baseline", sig,
        lambda: our_namespaces() and any(lab.glob("db*/data*/postmaster.pid")))
    assert returncode == code, output
    assert our_namespaces() == []
    assert not lab.exists()
    assert "torn down" in output


MAIL_ROOT = Path("/run/vdeliver-hubs")  # hubs-demo --mail keeps the hubs' mail side here
# The invariants, each a check of the --mail report (and the drill's own).
MAIL_CHECKS = {
    "every_accepted_letter_delivered_exactly_once", "nothing_to_an_existing_address_refused",
    "no_bounce_no_backscatter", "unknown_refused_at_rcpt_when_database_reachable",
    "socketmap_temp_never_notfound_without_database", "sendmail_queued_during_outage",
    "vacation_at_most_one_reply_per_sender", "dovecot_reads_every_mailbox",
    "writes_recovered_after_promotion", "no_acknowledged_write_lost", "rebuilt_standby_in_recovery",
}


def processes_naming(*needles: str) -> list[str]:
    """Command lines of the processes that name one of the needles (what a run may leave)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(n in cmd for n in needles):
                found.append(f"{entry.name}: {cmd[:160]}")
    return found


@pytest.fixture
def mail_peers(base: Path) -> Path:
    require("sendmail", "dovecot", "m4", "unshare")
    try:
        pwd.getpwnam("vmail")
    except KeyError:
        message = "no vmail system user"
        if REQUIRE_PEERS:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return base


def test_mail_failure_run_keeps_every_invariant(mail_peers: Path) -> None:
    """150 letters over SMTP to both hubs, the primary killed at a third: every invariant holds."""
    lab = mail_peers / "lab"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--mail", "--quick", "--base", str(lab)],
                          capture_output=True, text=True, timeout=400, env=ENV, cwd=str(ROOT))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    checks = report["checks"]
    assert set(checks) == MAIL_CHECKS and all(checks.values()), checks
    mail = report["mail"]
    kinds = mail["kinds"]
    assert mail["letters"] == 150 and mail["accepted"] == 150 - kinds["unknown"]
    assert mail["refused_unknown"] == kinds["unknown"]
    assert mail["missing_count"] == mail["duplicated_count"] == mail["misplaced_count"] == 0
    assert mail["in_mailboxes"] + mail["at_sink"] == mail["accepted"]
    assert mail["at_sink"] == sum(kinds.get(k, 0) for k in ("alias-out", "forward"))
    assert mail["imap_messages"] == mail["in_mailboxes"]
    # The outage reached the mail: hubB's readers need the primary, hubA's use the standby.
    hub_a, hub_b = mail["per_hub"]["hubA"], mail["per_hub"]["hubB"]
    assert hub_b["socketmap_probe_temp_without_database"] > 0
    assert hub_b["socketmap_probe_notfound_without_database"] == 0
    assert hub_b["deliveries_deferred"] > 0 and hub_b["queue_left"] == []
    assert hub_a["socketmap_probe_temp"] == 0 and hub_a["smtp_temporary_replies_to_unknown"] == 0
    assert mail["outage"]["hubB"]["socketmap_temp"] is not None
    vacation = mail["vacation"]
    assert vacation["replies"] > 0 and vacation["most_replies_to_one_pair"] == 1
    assert mail["sink_dsn"] == 0 and mail["sink_null_sender_not_vacation"] == []
    # Nothing left behind: namespaces, servers, files.
    assert report["namespaces_left"] == [] and our_namespaces() == []
    assert not lab.exists() and not MAIL_ROOT.exists()
    assert processes_naming(str(MAIL_ROOT), str(lab)) == []


def test_interrupted_mail_run_tears_down(mail_peers: Path) -> None:
    lab = mail_peers / "lab"
    returncode, output = interrupt_at(
        ["--mail", "--quick", "--promote-after", "30", "--base", str(lab)], "mail: primary down", signal.SIGINT,
        lambda: processes_naming(str(MAIL_ROOT)))  # sendmail, the servers, Dovecot
    assert returncode == 130, output
    assert our_namespaces() == []
    assert not lab.exists() and not MAIL_ROOT.exists()
    assert processes_naming(str(MAIL_ROOT), str(lab)) == []
    assert "torn down" in output
