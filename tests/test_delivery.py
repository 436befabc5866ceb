"""vdeliver as sendmail runs it: a process as the vmail user, real files, real exit codes."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT, MailRoot, RunAs, install_vdeliver, mbox_messages, run_as, run_vdeliver

MSG = b"From sender@example.org Wed Nov 25 02:56:49 2026\nSubject: test\nStatus: RO\n\nHello\nFrom the body\n"
MAILDIR_NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)R([0-9a-f]+)\.([^,/]+),S=(\d+),W=(\d+)$")


def deliver(root: MailRoot, *args: str, msg: bytes = MSG, **kw: object) -> subprocess.CompletedProcess[bytes]:
    return run_vdeliver(list(args), msg, config=root.config, as_user=root.owner, **kw)  # type: ignore[arg-type]



# -- the happy paths -------------------------------------------------------------------


def test_mbox_delivery_as_sendmail_calls_it(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    done = deliver(mailroot, "-t", "-Y", "-a", "away.com", "-a", "fred@vm.localdomain")
    assert done.returncode == 0, done.stderr
    data = box.read_bytes()
    assert data.startswith(b"From sender@example.org  ")
    assert b"\nReturn-Path: <sender@example.org>\nDelivered-To: fred@away.com\nSubject: test\n\n" in data
    assert b"Status:" not in data
    assert data.endswith(b"\nHello\n>From the body\n\n")
    assert b"to=<fred@away.com>, sender=<sender@example.org>, size=" in done.stderr
    assert b"status=sent (mbox " + str(box).encode() + b")" in done.stderr
    assert os.stat(box).st_mode & 0o777 == 0o600
    assert not Path(str(box) + ".lock").exists()


def test_maildir_delivery_name_sizes_and_bytes(mailroot: MailRoot) -> None:
    md = mailroot.add_maildir("home.com", "fred")
    done = deliver(mailroot, "-f", "a@b.org", "-a", "<home.com>", "-a", "<Fred@home.com>")
    assert done.returncode == 0, done.stderr
    (name,) = os.listdir(md / "new")
    m = MAILDIR_NAME.match(name)
    assert m, name
    data = (md / "new" / name).read_bytes()
    assert int(m.group(6)) == len(data)
    assert int(m.group(7)) == len(data) + data.count(b"\n")
    assert int(m.group(3)) > 0
    assert data == (
        b"Return-Path: <a@b.org>\nDelivered-To: fred@home.com\nSubject: test\nStatus: RO\n\nHello\nFrom the body\n"
    )
    assert os.listdir(md / "tmp") == []
    assert os.stat(md / "new" / name).st_mode & 0o777 == 0o600


def test_same_user_in_two_domains(mailroot: MailRoot) -> None:
    away = mailroot.add_mbox("away.com", "fred")
    home = mailroot.add_maildir("home.com", "fred")
    assert deliver(mailroot, "-a", "away.com", "-a", "fred").returncode == 0
    assert deliver(mailroot, "-a", "home.com", "-a", "fred").returncode == 0
    assert len(mbox_messages(away)) == 1
    assert len(os.listdir(home / "new")) == 1


def test_one_argument_form_and_manual_use(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    assert deliver(mailroot, "-d", "fred@away.com", msg=b"Subject: x\n\nbody\n").returncode == 0
    assert deliver(mailroot, "-f", "a@b", "-a", "away.com", "-a", "fred", msg=b"Subject: y\n\nb\n").returncode == 0
    msgs = mbox_messages(box)
    assert len(msgs) == 2 and b"Return-Path: <a@b>" in msgs[1]


def test_maildir_at_the_mbox_path_is_detected(mailroot: MailRoot) -> None:
    mailroot.add_domain("away.com")
    md = mailroot.vbox / "away.com" / "fred"
    for sub in ("", "tmp", "new", "cur"):
        (md / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(md / sub, mailroot.owner.uid, mailroot.owner.gid)
    assert deliver(mailroot, "-a", "away.com", "-a", "fred").returncode == 0
    assert len(os.listdir(md / "new")) == 1


@pytest.mark.parametrize("fmt", ["mbox", "maildir"])
def test_create_mailbox(mailroot: MailRoot, fmt: str) -> None:
    mailroot.write_config(create_mailbox=True, format=fmt)
    mailroot.add_domain("away.com")
    done = deliver(mailroot, "-a", "away.com", "-a", "newbie")
    assert done.returncode == 0, done.stderr
    if fmt == "mbox":
        box = mailroot.vbox / "away.com" / "newbie"
        assert os.stat(box).st_mode & 0o777 == 0o600 and len(mbox_messages(box)) == 1
    else:
        md = mailroot.home / "away.com" / "newbie" / "Maildir"
        for sub in ("tmp", "new", "cur"):
            assert os.stat(md / sub).st_mode & 0o777 == 0o700
        assert len(os.listdir(md / "new")) == 1


def test_detail_delivers_to_user_or_folder(mailroot: MailRoot) -> None:
    md = mailroot.add_maildir("away.com", "fred")
    assert deliver(mailroot, "-a", "away.com", "-a", "fred+lists").returncode == 0
    assert len(os.listdir(md / "new")) == 1
    folder = md / ".lists"
    for sub in ("", "tmp", "new", "cur"):
        (folder / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(folder / sub, mailroot.owner.uid, mailroot.owner.gid)
    mailroot.write_config(detail_folders=True)
    assert deliver(mailroot, "-a", "away.com", "-a", "fred+lists").returncode == 0
    assert deliver(mailroot, "-a", "away.com", "-a", "fred+nofolder").returncode == 0
    assert len(os.listdir(folder / "new")) == 1
    assert len(os.listdir(md / "new")) == 2


def test_dry_run_writes_nothing(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    done = deliver(mailroot, "--dry-run", "-a", "away.com.virtuser.", "-a", "Fred@vm")
    assert done.returncode == 0
    assert done.stdout.decode().strip() == f"mbox {box}"
    assert box.read_bytes() == b""


def test_mboxrd_escaping(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(mbox_escape="mboxrd")
    assert deliver(mailroot, "-a", "away.com", "-a", "fred", msg=b"S: x\n\nFrom a\n>From b\n").returncode == 0
    assert box.read_bytes().endswith(b"\n\n>From a\n>>From b\n\n")


def test_missing_separator_before_our_message_is_repaired(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred", b"From x  Wed Nov 25 02:56:49 2026\nS: 1\n\nno final newline")
    assert deliver(mailroot, "-a", "away.com", "-a", "fred").returncode == 0
    assert len(mbox_messages(box)) == 2


# -- exit codes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-a", "nowhere.com", "-a", "fred"], 67),
        (["-a", "away.com", "-a", "nobody"], 67),
        (["-a", "away.com", "-a", "../../etc/passwd"], 75),
        (["-a", "away.com", "-a", "fred", "-x"], 75),
        (["-a", "away.com"], 75),
        (["-a", "away.com", "-a", "fred", "extra"], 75),
        (["-a", "away.com", "-a", "fred", "-a", "third"], 75),
        (["-d", "fred@away.com", "-d", "fred@away.com"], 75),
        (["-f"], 75),
        (["--bogus"], 75),
        (["-a", "away.com", "-a", "fred", "-t", "-Y", "-p", "-o", "-tY"], 0),
        (["-a", "away.com", "-afred"], 0),
        (["--help"], 0),
        (["--version"], 0),
    ],
)
def test_exit_codes(mailroot: MailRoot, args: list[str], code: int) -> None:
    mailroot.add_mbox("away.com", "fred")
    done = deliver(mailroot, *args)
    assert done.returncode == code, done.stderr
    if code:
        first = done.stderr.decode().splitlines()[0]
        assert first.startswith("vdeliver: ") and "Traceback" not in done.stderr.decode()


def test_help_reads_like_a_man_page(mailroot: MailRoot) -> None:
    out = deliver(mailroot, "--help").stdout.decode()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXIT STATUS", "FILES"):
        assert f"\n{section}\n" in "\n" + out
    assert deliver(mailroot, "--version").stdout.startswith(b"vdeliver ")


def test_bad_configuration_defers(mailroot: MailRoot) -> None:
    mailroot.add_mbox("away.com", "fred")
    mailroot.config.write_text(mailroot.config.read_text() + 'format = "nonsense"\n')
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 75
    assert f"{mailroot.config}:".encode() in done.stderr and b"format" in done.stderr


def test_missing_config_file_defers(mailroot: MailRoot) -> None:
    done = run_vdeliver(["-c", "/nonexistent.toml", "-a", "away.com", "-a", "fred"], MSG, as_user=mailroot.owner)
    assert done.returncode == 75 and b"/nonexistent.toml" in done.stderr


def test_loop_and_size_bounce(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    looped = b"Delivered-To: fred@away.com\nSubject: x\n\nb\n"
    assert deliver(mailroot, "-a", "away.com", "-a", "fred", msg=looped).returncode == 69
    mailroot.write_config(max_message_size=1000)
    assert deliver(mailroot, "-a", "away.com", "-a", "fred", msg=b"S: x\n\n" + b"x" * 200_000).returncode == 69
    assert box.read_bytes() == b""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run as root")
def test_refuses_root_without_user(mailroot: MailRoot) -> None:
    mailroot.add_mbox("away.com", "fred")
    text = "\n".join(line for line in mailroot.config.read_text().splitlines() if not line.startswith("user ="))
    mailroot.config.write_text(text + "\n")
    done = run_vdeliver(["-a", "away.com", "-a", "fred"], MSG, config=mailroot.config)
    assert done.returncode == 75 and b"root" in done.stderr


@pytest.mark.skipif(not IS_ROOT, reason="needs root to switch user")
def test_root_switches_to_the_configured_user(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    done = run_vdeliver(["-a", "away.com", "-a", "fred"], MSG, config=mailroot.config)
    assert done.returncode == 0, done.stderr
    assert os.stat(box).st_uid == mailroot.owner.uid and len(mbox_messages(box)) == 1


# -- failures leave the mailbox exactly as it was ---------------------------------------------


def test_symlinked_mailbox_is_refused(mailroot: MailRoot) -> None:
    target = mailroot.add_mbox("away.com", "real", b"")
    link = mailroot.vbox / "away.com" / "fred"
    link.symlink_to(target)
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 75 and b"symbolic link" in done.stderr
    assert target.read_bytes() == b""


def test_hard_linked_mailbox_is_refused(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred", b"")
    os.link(box, mailroot.vbox / "away.com" / "other")
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 75 and b"link" in done.stderr
    assert box.read_bytes() == b""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to chown")
def test_mailbox_of_another_owner_is_refused(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred", b"")
    os.chown(box, 0, 0)
    box.chmod(0o666)
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 75 and b"owner" in done.stderr
    assert box.read_bytes() == b""


def test_file_in_place_of_maildir(mailroot: MailRoot) -> None:
    mailroot.write_config(format="maildir")
    mailroot.add_domain("away.com")
    (mailroot.home / "away.com" / "fred").mkdir()
    os.chown(mailroot.home / "away.com" / "fred", mailroot.owner.uid, mailroot.owner.gid)
    bogus = mailroot.home / "away.com" / "fred" / "Maildir"
    bogus.write_bytes(b"x")
    os.chown(bogus, mailroot.owner.uid, mailroot.owner.gid)
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 75 and b"not a Maildir" in done.stderr
    assert bogus.read_bytes() == b"x"


def test_efbig_rolls_back(mailroot: MailRoot) -> None:
    before = b"From x  Wed Nov 25 02:56:49 2026\nS: 1\n\nold\n\n"
    box = mailroot.add_mbox("away.com", "fred", before)
    limit = len(before) + 4096

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = [str(install_vdeliver() / "bin" / "vdeliver"), "-c", str(mailroot.config), "-a", "away.com", "-a", "fred"]
    kw: RunAs = {}
    if IS_ROOT:
        kw = run_as(mailroot.owner.uid, mailroot.owner.gid)
    done = subprocess.run(argv, input=b"S: big\n\n" + b"y" * 100_000, capture_output=True, preexec_fn=cap,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60, **kw)
    assert done.returncode == 75, done.stderr
    assert b"mailbox full" in done.stderr
    assert box.read_bytes() == before


def test_efbig_can_bounce_when_configured(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred", b"")
    mailroot.write_config(over_quota="bounce")
    argv = [str(install_vdeliver() / "bin" / "vdeliver"), "-c", str(mailroot.config), "-a", "away.com", "-a", "fred"]
    kw: RunAs = {}
    if IS_ROOT:
        kw = run_as(mailroot.owner.uid, mailroot.owner.gid)
    done = subprocess.run(argv, input=b"S: big\n\n" + b"y" * 100_000, capture_output=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)),
                          env={"PATH": "/usr/bin:/bin"}, timeout=60, **kw)
    assert done.returncode == 73 and b"5.2.2" in done.stderr
    assert box.read_bytes() == b""


def test_read_only_directory(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred", b"")
    (mailroot.vbox / "away.com").chmod(0o500)
    try:
        done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    finally:
        (mailroot.vbox / "away.com").chmod(0o700)
    if IS_ROOT or os.geteuid() != 0:
        assert done.returncode == 75 and b"lock" in done.stderr
        assert box.read_bytes() == b""


def test_read_only_maildir(mailroot: MailRoot) -> None:
    md = mailroot.add_maildir("away.com", "fred")
    (md / "tmp").chmod(0o500)
    try:
        done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    finally:
        (md / "tmp").chmod(0o700)
    assert done.returncode == 75
    assert os.listdir(md / "new") == [] and os.listdir(md / "tmp") == []


def test_maildir_quota(mailroot: MailRoot) -> None:
    md = mailroot.add_maildir("away.com", "fred")
    quota = md / "maildirsize"
    quota.write_text("300S,10C\n0 0\n")
    os.chown(quota, mailroot.owner.uid, mailroot.owner.gid)
    assert deliver(mailroot, "-a", "away.com", "-a", "fred", msg=b"S: a\n\nsmall\n").returncode == 0
    lines = quota.read_text().splitlines()
    (name,) = os.listdir(md / "new")
    size = int(MAILDIR_NAME.match(name).group(6))  # type: ignore[union-attr]
    assert lines == ["300S,10C", "0 0", f"{size} 1"]
    big = b"S: b\n\n" + b"z" * 400
    done = deliver(mailroot, "-a", "away.com", "-a", "fred", msg=big)
    assert done.returncode == 75 and b"mailbox full" in done.stderr
    mailroot.write_config(over_quota="bounce")
    assert deliver(mailroot, "-a", "away.com", "-a", "fred", msg=big).returncode == 73
    assert len(os.listdir(md / "new")) == 1 and os.listdir(md / "tmp") == []


def test_large_maildirsize_is_recalculated(mailroot: MailRoot) -> None:
    md = mailroot.add_maildir("away.com", "fred")
    quota = md / "maildirsize"
    quota.write_text("1000000S\n" + "100 1\n" * 1000)  # claims 100000 bytes, > 5120 bytes long
    os.chown(quota, mailroot.owner.uid, mailroot.owner.gid)
    assert deliver(mailroot, "-a", "away.com", "-a", "fred").returncode == 0
    lines = quota.read_text().splitlines()
    assert lines[0] == "1000000S" and lines[1] == "0 0" and len(lines) == 3


# -- locks --------------------------------------------------------------------------------------


def _start(root: MailRoot, msg: bytes = MSG) -> subprocess.Popen[bytes]:
    argv = [str(install_vdeliver() / "bin" / "vdeliver"), "-c", str(root.config), "-a", "away.com", "-a", "fred"]
    kw: RunAs = {}
    if IS_ROOT:
        kw = run_as(root.owner.uid, root.owner.gid)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={"PATH": "/usr/bin:/bin"}, **kw)
    assert proc.stdin is not None
    proc.stdin.write(msg)
    proc.stdin.close()
    proc.stdin = None  # closed: communicate() must not flush it
    return proc


def _finish(proc: subprocess.Popen[bytes]) -> int:
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc.returncode


def _waits(proc: subprocess.Popen[bytes], box: Path, before: bytes) -> None:
    time.sleep(1.0)
    assert proc.poll() is None, "vdeliver did not wait for the lock"
    assert box.read_bytes() == before


def test_waits_for_a_peers_fcntl_lock(mailroot: MailRoot) -> None:
    import fcntl

    box = mailroot.add_mbox("away.com", "fred")
    with open(box, "rb+") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        proc = _start(mailroot)
        _waits(proc, box, b"")
        fcntl.lockf(f, fcntl.LOCK_UN)
    assert _finish(proc) == 0
    assert len(mbox_messages(box)) == 1


def test_waits_for_a_live_peers_dotlock(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    lock = Path(str(box) + ".lock")
    lock.write_text(f"{os.getpid()}:{os.uname().nodename}")
    proc = _start(mailroot)
    _waits(proc, box, b"")
    lock.unlink()
    assert _finish(proc) == 0
    assert len(mbox_messages(box)) == 1


def test_lock_timeout_defers(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(lock_timeout=1)
    lock = Path(str(box) + ".lock")
    lock.write_text(f"{os.getpid()}:{os.uname().nodename}")
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 75 and b"locked" in done.stderr
    assert box.read_bytes() == b"" and lock.exists()


def test_dead_holders_dotlock_is_broken_at_once(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    dead = subprocess.Popen(["true"])
    dead.wait()
    Path(str(box) + ".lock").write_text(f"{dead.pid}:{os.uname().nodename}")
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 0, done.stderr
    assert b"broke stale lock" in done.stderr and b"is dead" in done.stderr
    assert not Path(str(box) + ".lock").exists()


def test_old_foreign_dotlock_is_broken(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    lock = Path(str(box) + ".lock")
    lock.write_text("0")  # procmail's content: no pid to check
    old = time.time() - 1000
    os.utime(lock, (old, old))
    os.utime(box, (old, old))
    mailroot.write_config(stale_lock_age=300)
    done = deliver(mailroot, "-a", "away.com", "-a", "fred")
    assert done.returncode == 0, done.stderr
    assert b"unchanged for" in done.stderr


@pytest.mark.slow
def test_sixteen_writers_fifty_messages_each(mailroot: MailRoot) -> None:
    box = mailroot.add_mbox("away.com", "fred")
    mailroot.write_config(lock_timeout=120, log="none")
    launcher = str(install_vdeliver() / "bin" / "vdeliver")
    script = (
        "set -e\n"
        'i=0; while [ $i -lt 50 ]; do\n'
        '  printf "From w%s@x Wed Nov 25 02:56:49 2026\\nSubject: w$1 m$i\\n\\nbody of w$1 m$i\\nFrom x\\n" "$1" | '
        f'{launcher} -c {mailroot.config} -a away.com -a fred\n'
        "  i=$((i+1))\n"
        "done\n"
    )
    kw: RunAs = {}
    if IS_ROOT:
        kw = run_as(mailroot.owner.uid, mailroot.owner.gid)
    procs = [subprocess.Popen(["sh", "-c", script, "sh", str(w)], env={"PATH": "/usr/bin:/bin"},
                              **kw) for w in range(16)]
    assert [p.wait(600) for p in procs] == [0] * 16
    msgs = mbox_messages(box)
    assert len(msgs) == 800
    seen = set()
    for m in msgs:
        subject = re.search(rb"\nSubject: (w\d+ m\d+)\n", m)
        assert subject, m
        key = subject.group(1)
        assert m.endswith(b"\n\nbody of " + key + b"\n>From x\n")
        seen.add(key)
    assert len(seen) == 800


@pytest.mark.skipif(not IS_ROOT, reason="needs root to provide /dev/log")
def test_syslog_line_in_postfix_style(mailroot: MailRoot) -> None:
    """vdeliver's own line, picked out of whatever else reaches /dev/log meanwhile (another
    program's datagram must not make this fail)."""
    from tests.helpers import DevLog

    log = DevLog()
    if log.sock is None:
        pytest.skip("the machine has a syslog daemon on /dev/log; not replacing its socket")
    try:
        box = mailroot.add_mbox("away.com", "fred")
        mailroot.write_config(log="syslog")
        done = deliver(mailroot, "-a", "away.com", "-a", "fred")
        assert done.returncode == 0, done.stderr
        pid = re.compile(r"vdeliver\[\d+\]: to=<fred@away\.com>")
        lines = [x for x in log.lines(wait_for="to=<fred@away.com>") if pid.search(x)]
    finally:
        log.close()
    assert len(lines) == 1, lines
    line = lines[0]
    # <22> = facility mail (2) * 8 + priority info (6)
    assert re.match(r"<22>\w{3} [ \d]\d \d\d:\d\d:\d\d vdeliver\[\d+\]: to=<fred@away\.com>, "
                    r"sender=<sender@example\.org>, size=\d+, delay=\d+\.\d{3}, dsn=2\.0\.0, "
                    rf"status=sent \(mbox {re.escape(str(box))}\)$", line), line
    assert done.stderr == b""
