"""One adapter per delivery agent: how to run it the production way, and what it fsyncs.

Per-process agents (vdeliver, procmail, maildrop, dovecot-lda) are spawned once per message,
as the vmail user, with the message on a pipe as sendmail gives it; `os.wait4` returns the
child's own CPU time and peak RSS, so each delivery is measured by itself.  Resident agents
(Dovecot's LMTP server, vdeliver's LMTP server) are started once per mailbox format and
driven over unix sockets by one connection per concurrent writer; their CPU and peak RSS come
from /proc.  Floors (`python -c pass`, the in-process fsync floor) deliver nothing or deliver
without any agent, to read the others against.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import TypedDict

from benchmarks.workloads import SENDER, Box, Layout, Message

VENV_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "python")
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vdeliver")
HOSTNAME = "vm.localdomain"  # what sendmail appends to $u (FEATURE(always_add_domain))
_SEARCH = os.pathsep.join([os.environ.get("PATH", "/usr/bin:/bin"), "/usr/sbin", "/sbin", "/usr/lib/dovecot"])
CLK_TCK = os.sysconf("SC_CLK_TCK")


def which(program: str) -> str | None:
    return shutil.which(program, path=_SEARCH)


@dataclass
class Sample:
    latency: float  # seconds, wall, whole delivery
    cpu: float | None = None  # seconds, user + system, of the delivering process
    rss_kb: int | None = None  # peak RSS of the delivering process
    ok: bool = True
    error: str = ""


@dataclass
class Context:
    """What every agent needs: the work directory, the mail tree, whom to run as."""

    workdir: str
    layout: Layout
    creds: tuple[int, int] | None  # (uid, gid) to run per-process agents as, when we are root
    quick: bool = False
    notes: list[str] = field(default_factory=list)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def own(self, path: str) -> None:
        if self.creds is not None:
            os.chown(path, *self.creds)

    def errlog(self, name: str) -> int:
        return os.open(self.path("logs", f"{name}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)


class RunAs(TypedDict, total=False):
    """The subprocess.run()/Popen() keywords that start a child as another user."""

    user: int
    group: int
    extra_groups: list[int]


def spawn(argv: list[str], data: bytes | None, env: dict[str, str], creds: tuple[int, int] | None,
          stderr_fd: int, cwd: str = "/") -> Sample:
    """Run one delivery process; wall time from fork to reap, its own rusage from wait4."""
    kwargs: RunAs = {}
    if creds is not None:
        kwargs = {"user": creds[0], "group": creds[1], "extra_groups": []}
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=stderr_fd, env=env, cwd=cwd, close_fds=True, **kwargs,
    )
    if data is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
        except BrokenPipeError:
            pass
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    # ru_maxrss is not used: a forked child starts with its parent's high-water mark (the
    # harness's own RSS), so peak memory is measured separately through peak_rss().
    return Sample(elapsed, usage.ru_utime + usage.ru_stime, None, code == 0, "" if code == 0 else f"exit {code}")


TIME = "/usr/bin/time"  # GNU time: a small process that forks the agent and reports its peak RSS


def spawn_rss(argv: list[str], data: bytes | None, env: dict[str, str], creds: tuple[int, int] | None,
              stderr_fd: int, report: str) -> tuple[Sample, int | None]:
    """One delivery under GNU time: (sample, peak RSS KB of the agent process itself)."""
    if os.path.exists(report):
        os.unlink(report)
    sample = spawn([TIME, "-f", "%M", "-o", report, *argv], data, env, creds, stderr_fd)
    try:
        with open(report) as f:
            lines = [line.strip() for line in f if line.strip()]
        return sample, int(lines[-1])
    except (OSError, ValueError, IndexError):
        return sample, None


class Agent:
    key = ""
    label = ""
    fsync = ""
    kind = "process"  # process | resident | floor | inproc
    formats = ("mbox", "maildir")
    stdin_from_line = True  # feed the message with sendmail's From_ line
    only_basic = False  # run only in the basic cells (4 KB, 1 writer)

    def missing(self) -> str | None:
        """Why this agent cannot run here, or None."""
        return None

    def prepare(self, ctx: Context) -> None:
        self.ctx = ctx
        self._stderr = ctx.errlog(self.key)

    def start(self, fmt: str) -> None:
        pass

    def stop(self) -> None:
        pass

    def open_writer(self, fmt: str) -> object:
        return None

    def close_writer(self, state: object) -> None:
        pass

    def usage(self, fmt: str) -> tuple[float, int] | None:
        """Resident agents: (CPU seconds so far, peak RSS KB) of the server."""
        return None

    def argv(self, box: Box) -> list[str]:
        raise NotImplementedError

    def env(self, box: Box) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LANG": "C"}

    def deliver(self, state: object, box: Box, msg: Message) -> Sample:
        data = msg.with_from_line() if self.stdin_from_line else msg.bare()
        return spawn(self.argv(box), data, self.env(box), self.ctx.creds, self._stderr)

    def peak_rss(self, box: Box, msg: Message) -> tuple[Sample, int | None] | None:
        """Per-process agents: one delivery under GNU time, for its peak RSS; None if not measurable."""
        if self.kind not in ("process", "floor") or not os.path.exists(TIME):
            return None
        data: bytes | None = msg.with_from_line() if self.stdin_from_line else msg.bare()
        argv = self.argv(box)
        if self.kind == "floor":
            data = None
        return spawn_rss(argv, data, self.env(box), self.ctx.creds, self._stderr,
                         self.ctx.path("logs", f"{self.key}.rss"))


# -- vdeliver, the command line ---------------------------------------------------------------

def install_vdeliver(workdir: str) -> str:
    """The package copied world-readable with a `#!/usr/bin/python3 -I` launcher (production form)."""
    lib = os.path.join(workdir, "install", "lib")
    shutil.copytree(PACKAGE, os.path.join(lib, "vdeliver"), ignore=shutil.ignore_patterns("__pycache__"))
    bindir = os.path.join(workdir, "install", "bin")
    os.makedirs(bindir)
    launcher = os.path.join(bindir, "vdeliver")
    with open(launcher, "w") as f:
        f.write(f"#!{SYSTEM_PYTHON} -I\nimport sys\nsys.path.insert(0, {lib!r})\n"
                "from vdeliver.cli import main\nraise SystemExit(main())\n")
    for dirpath, _dirnames, filenames in os.walk(os.path.join(workdir, "install")):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(launcher, 0o755)
    # Byte-compile once, as a Debian package's postinst does, so no run pays for compiling.
    subprocess.run([SYSTEM_PYTHON, "-I", "-m", "compileall", "-q", lib], check=True)
    return launcher


def write_vdeliver_config(ctx: Context) -> str:
    path = ctx.path("vdeliver.toml")
    spool = ctx.path("spool")
    os.makedirs(spool, exist_ok=True)
    ctx.own(spool)
    with open(path, "w") as f:
        f.write(
            f'mbox_path = "{ctx.layout.mbox_template()}"\n'
            f'maildir_path = "{ctx.layout.maildir_template()}"\n'
            f'spool_dir = "{spool}"\n'
            '# no /dev/log on the benchmark machine: one line per delivery to stderr (a file)\n'
            'log = "stderr"\n'
        )
    os.chmod(path, 0o644)
    return path


class VdeliverCli(Agent):
    key = "vdeliver"
    label = "vdeliver (launcher, /usr/bin/python3 -IS)"
    fsync = ("mbox: the crash journal's record (fdatasync; the first delivery into an mbox makes the journal,"
             " its file and directory), the mbox; Maildir: file, new/")

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.launcher = install_vdeliver(ctx.workdir)
        self.config = write_vdeliver_config(ctx)

    def missing(self) -> str | None:
        return None if os.path.exists(SYSTEM_PYTHON) else f"{SYSTEM_PYTHON} not installed"

    def command(self) -> list[str]:
        return [self.launcher]

    def argv(self, box: Box) -> list[str]:
        return [*self.command(), "-c", self.config, "-t", "-Y", "-a", box.domain, "-a", f"{box.user}@{HOSTNAME}"]


class VdeliverVenv(VdeliverCli):
    key = "vdeliver-venv"
    label = "vdeliver (.venv python -I -m vdeliver)"

    def prepare(self, ctx: Context) -> None:
        Agent.prepare(self, ctx)
        self.config = write_vdeliver_config(ctx)

    def missing(self) -> str | None:
        return None if os.path.exists(VENV_PYTHON) else "no .venv"

    def command(self) -> list[str]:
        return [VENV_PYTHON, "-I", "-m", "vdeliver"]


class VdeliverScript(VdeliverVenv):
    key = "vdeliver-script"
    label = "vdeliver (pip console script in .venv)"
    only_basic = True

    def missing(self) -> str | None:
        return None if os.path.exists(self._script()) else "no .venv/bin/vdeliver"

    def _script(self) -> str:
        return os.path.join(os.path.dirname(VENV_PYTHON), "vdeliver")

    def command(self) -> list[str]:
        return [self._script()]


class PythonFloor(Agent):
    """A Python process that does nothing: what any per-message Python agent pays first."""

    kind = "floor"
    fsync = "-"
    only_basic = True

    def __init__(self, python: str, isolated: bool, env_name: str) -> None:
        self.python = python
        self.flags = ["-I"] if isolated else []
        flag = " -I" if isolated else ""
        self.key = f"python{flag.replace(' ', '')}-{env_name}"
        self.label = f"floor: {env_name} python{flag} -c pass"

    def missing(self) -> str | None:
        return None if os.path.exists(self.python) else f"{self.python} not installed"

    def argv(self, box: Box) -> list[str]:
        return [self.python, *self.flags, "-c", "pass"]

    def deliver(self, state: object, box: Box, msg: Message) -> Sample:
        return spawn(self.argv(box), None, self.env(box), self.ctx.creds, self._stderr)


# -- procmail, maildrop, dovecot-lda -------------------------------------------------------------

PROCMAILRC = """\
# The paper's /etc/procmailrc, with its regular expressions repaired (the published text's
# `()\\[^\\<]*@` never matches): domain from $1, user from the part of $2 before the @.
ROOTHOMEDIR={home}
ROOTINBOXDIR={vbox}
DOMAIN="$1"
RECIPIENT="$2"

:0
* RECIPIENT ?? ^<?\\/[^<@>]+
{{
    USER=$MATCH
}}

:0 a
* DOMAIN ?? ^<?\\/[^<>]+
{{
    DOMAINNOBRACKET=$MATCH
}}

{last}
"""


class Procmail(Agent):
    key = "procmail"
    label = "procmail 3.22 (-Y -m rcfile)"
    fsync = "the file only (no directory fsync for Maildir)"

    def missing(self) -> str | None:
        return None if which("procmail") else "procmail not installed"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.program = which("procmail") or "procmail"
        self.rc = {}
        for fmt, last in (
            ("mbox", ":0 a:\n${ROOTINBOXDIR}/${DOMAINNOBRACKET}/${USER}"),
            ("maildir", ":0 a\n${ROOTHOMEDIR}/${DOMAINNOBRACKET}/${USER}/Maildir/"),
        ):
            path = ctx.path(f"procmailrc.{fmt}")
            with open(path, "w") as f:
                f.write(PROCMAILRC.format(home=ctx.layout.home, vbox=ctx.layout.vbox, last=last))
            os.chmod(path, 0o644)
            self.rc[fmt] = path

    def argv(self, box: Box) -> list[str]:
        # sendmail's `-a $h -a $u` become $1 $2; -m takes them after the rcfile.
        return [self.program, "-Y", "-m", self.rc[box.fmt], box.domain, f"{box.user}@{HOSTNAME}"]


class Maildrop(Agent):
    key = "maildrop"
    label = "maildrop 2.9 (filter file)"
    fsync = "the file only"
    stdin_from_line = False  # it would keep (and escape) the From_ line; give it -f instead

    def missing(self) -> str | None:
        return None if which("maildrop") else "maildrop not installed"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.program = which("maildrop") or "maildrop"
        self.rc = {}
        for fmt, target in (("mbox", f"{ctx.layout.vbox}/$1/$2"), ("maildir", f"{ctx.layout.home}/$1/$2/Maildir")):
            path = ctx.path(f"maildroprc.{fmt}")
            with open(path, "w") as f:
                f.write(f'to "{target}"\n')
            os.chmod(path, 0o600)  # maildrop insists: owned by the user, no group/world access
            ctx.own(path)
            self.rc[fmt] = path

    def argv(self, box: Box) -> list[str]:
        return [self.program, "-f", SENDER, self.rc[box.fmt], box.domain, box.user]


def _dovecot_location(ctx: Context, fmt: str) -> str:
    if fmt == "mbox":
        # INBOX is the procmail-style spool file; Dovecot keeps its index beside, per user.
        return f"mbox:{ctx.path('dovecot-mail')}/%d/%n:INBOX={ctx.layout.vbox}/%d/%n"
    return f"maildir:{ctx.layout.home}/%d/%n/Maildir"


class DovecotLda(Agent):
    key = "dovecot-lda"
    label = "dovecot-lda 2.3.19"
    fsync = "mbox: fdatasync of the mbox; Maildir: file, directory, index (mail_fsync=optimized)"

    def missing(self) -> str | None:
        return None if os.path.exists("/usr/lib/dovecot/dovecot-lda") else "dovecot-lda not installed"

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        mail = ctx.path("dovecot-mail")
        os.makedirs(mail, exist_ok=True)
        ctx.own(mail)
        self.conf = {}
        for fmt in ("mbox", "maildir"):
            path = ctx.path(f"dovecot-lda.{fmt}.conf")
            with open(path, "w") as f:
                # A private configuration: no /etc/dovecot, no auth process; the user comes
                # from $USER (%d, %n), as when an MTA runs dovecot-lda without -d.
                f.write(f"mail_location = {_dovecot_location(ctx, fmt)}\n"
                        f"log_path = {ctx.path('logs', 'dovecot-lda.log')}\nssl = no\n")
            os.chmod(path, 0o644)
            self.conf[fmt] = path
        log = ctx.path("logs", "dovecot-lda.log")
        open(log, "a").close()
        os.chmod(log, 0o666)

    def argv(self, box: Box) -> list[str]:
        return ["/usr/lib/dovecot/dovecot-lda", "-c", self.conf[box.fmt]]

    def env(self, box: Box) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "LANG": "C", "USER": f"{box.user}@{box.domain}",
                "HOME": os.path.join(self.ctx.layout.home, box.domain, box.user)}


# -- LMTP ----------------------------------------------------------------------------------------

def lmtp_payload(data: bytes) -> bytes:
    """CRLF line ends and dot-stuffing, then the terminating dot line."""
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


class LmtpClient:
    """A lean LMTP client on a unix socket: one connection, many transactions, pipelined as the
    real sendmail 8.17 pipelines LMTP (tests/test_lmtp_sendmail.py records it): MAIL FROM alone,
    then every RCPT TO and DATA in one write, then the message.  Three round trips a message."""

    def __init__(self, path: str, timeout: float = 60) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self._expect(b"220", self._reply())
        self.sock.sendall(b"LHLO bench.example.org\r\n")
        self._expect(b"250", self._reply())

    def _reply(self) -> bytes:
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                raise ConnectionError("LMTP server closed the connection")
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    @staticmethod
    def _expect(code: bytes, reply: bytes) -> None:
        if not reply.startswith(code):
            raise ConnectionError(reply.decode("latin-1").strip())

    def transaction(self, sender: str, rcpts: list[str], payload: bytes) -> tuple[bool, str]:
        """One transaction; ok when every recipient's final reply is 250."""
        self.sock.sendall(f"MAIL FROM:<{sender}>\r\n".encode())
        reply = self._reply()
        if not reply.startswith(b"250"):
            self.sock.sendall(b"RSET\r\n")
            self._reply()
            return False, reply.decode("latin-1").strip()
        self.sock.sendall("".join(f"RCPT TO:<{r}>\r\n" for r in rcpts).encode() + b"DATA\r\n")
        refused = [r for r in (self._reply() for _ in rcpts) if not r.startswith(b"250")]
        data = self._reply()
        if not data.startswith(b"354"):
            self.sock.sendall(b"RSET\r\n")
            self._reply()
            return False, (refused[0] if refused else data).decode("latin-1").strip()
        self.sock.sendall(payload)
        replies = [self._reply() for _ in range(len(rcpts) - len(refused))]
        bad = [r.decode("latin-1").strip() for r in refused + [r for r in replies if not r.startswith(b"250")]]
        return not bad, "; ".join(bad) or replies[0].decode("latin-1").strip()

    def send(self, sender: str, rcpt: str, payload: bytes) -> tuple[bool, str]:
        return self.transaction(sender, [rcpt], payload)

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self._reply()
        except OSError:
            pass
        self.reader.close()
        self.sock.close()


def proc_usage(pids: list[int], rss_names: tuple[str, ...] = ()) -> tuple[float, int]:
    """CPU seconds of the live processes and threads (schedstat: ns, not 10 ms ticks) plus what
    their reaped children used, and the largest peak RSS among those named in rss_names (all if
    empty).  Connections stay open through each measured window, so no thread ends inside one."""
    cpu = 0.0
    hwm = 0
    for pid in pids:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):  # every thread of a threaded server
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    cpu += int(f.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/stat") as f:
                comm, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            fields = rest.split()
            cpu += (int(fields[13]) + int(fields[14])) / CLK_TCK  # cutime cstime: reaped children
            if rss_names and comm not in rss_names:
                continue
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except (OSError, IndexError, ValueError):
            continue
    return cpu, hwm


def session_pids(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of stat: session id
                out.append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return out


class ResidentAgent(Agent):
    kind = "resident"
    stdin_from_line = False

    def socket_path(self, fmt: str) -> str:
        raise NotImplementedError

    def open_writer(self, fmt: str) -> object:
        return LmtpClient(self.socket_path(fmt))

    def close_writer(self, state: object) -> None:
        assert isinstance(state, LmtpClient)
        state.close()

    def deliver(self, state: object, box: Box, msg: Message) -> Sample:
        assert isinstance(state, LmtpClient)
        payload = lmtp_payload(msg.bare())
        started = time.perf_counter()
        ok, reply = state.send(SENDER, f"{box.user}@{box.domain}", payload)
        return Sample(time.perf_counter() - started, ok=ok, error="" if ok else reply)


DOVECOT_LMTP_CONF = """\
# A private Dovecot: only the LMTP service, on a unix socket under {base}.
base_dir = {base}
state_dir = {base}/state
instance_name = vdeliver-bench-{fmt}
protocols = lmtp
listen = 127.0.0.1
ssl = no
log_path = {log}
mail_location = {location}
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 0
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={home}/%d/%n
}}
passdb {{
  driver = static
  args = nopassword=y
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""


class DovecotLmtp(ResidentAgent):
    key = "dovecot-lmtp"
    label = "Dovecot LMTP 2.3.19 (resident)"
    fsync = "as dovecot-lda"

    def missing(self) -> str | None:
        if not which("dovecot"):
            return "dovecot not installed"
        if not os.path.exists("/usr/lib/dovecot/lmtp"):
            return "dovecot-lmtpd not installed"
        if os.geteuid() != 0:
            return "a private Dovecot master needs root"
        return None

    def prepare(self, ctx: Context) -> None:
        super().prepare(ctx)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        mail = ctx.path("dovecot-mail")
        os.makedirs(mail, exist_ok=True)
        ctx.own(mail)

    def _base(self, fmt: str) -> str:
        return self.ctx.path(f"dovecot-lmtp-{fmt}")

    def socket_path(self, fmt: str) -> str:
        return os.path.join(self._base(fmt), "lmtp")

    def start(self, fmt: str) -> None:
        if fmt in self.procs:
            return
        base = self._base(fmt)
        os.makedirs(base, exist_ok=True)
        uid, gid = self.ctx.creds or (os.getuid(), os.getgid())
        conf = self.ctx.path(f"dovecot-lmtp.{fmt}.conf")
        with open(conf, "w") as f:
            f.write(DOVECOT_LMTP_CONF.format(base=base, fmt=fmt, log=self.ctx.path("logs", f"dovecot-lmtp-{fmt}.log"),
                                             location=_dovecot_location(self.ctx, fmt), uid=uid, gid=gid,
                                             home=self.ctx.layout.home))
        proc = subprocess.Popen([which("dovecot") or "dovecot", "-F", "-c", conf], stdin=subprocess.DEVNULL,
                                stdout=self._stderr, stderr=self._stderr, start_new_session=True)
        self.procs[fmt] = proc
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket_path(fmt)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private dovecot did not start (see {self.ctx.path('logs')})")
            time.sleep(0.05)

    def usage(self, fmt: str) -> tuple[float, int] | None:
        proc = self.procs.get(fmt)
        if proc is None:
            return None
        return proc_usage(session_pids(proc.pid), ("lmtp",))

    def stop(self) -> None:
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


# -- the fsync floor -----------------------------------------------------------------------------

class FsyncFloor(Agent):
    """No agent at all: the least a durable delivery costs, done in this process.

    Maildir: write tmp/<name>, fsync, link to new/<name>, fsync new/, unlink tmp (as vdeliver
    does).  mbox: append with O_APPEND and fsync (no locks).
    """

    key = "fsync-floor"
    label = "floor: write+fsync(+link+dir fsync), in-process"
    fsync = "mbox: the file (1); Maildir: file, new/ (2)"
    kind = "inproc"
    stdin_from_line = False

    def deliver(self, state: object, box: Box, msg: Message) -> Sample:
        data = (b"From " + SENDER.encode() + b"  Wed Nov 25 02:56:49 2026\n" + msg.bare() + b"\n"
                if box.fmt == "mbox" else msg.bare())
        cpu0 = time.thread_time()
        started = time.perf_counter()
        if box.fmt == "mbox":
            fd = os.open(box.path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            name = f"{time.time():.6f}.P{os.getpid()}T{id(state)}R{os.urandom(4).hex()}.floor"
            tmp = os.path.join(box.path, "tmp", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, os.path.join(box.path, "new", name))
            dfd = os.open(os.path.join(box.path, "new"), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            os.unlink(tmp)
        return Sample(time.perf_counter() - started, time.thread_time() - cpu0, None)

    def open_writer(self, fmt: str) -> object:
        return object()  # a distinct token per writer thread, for unique names


class JournalFloor(FsyncFloor):
    """The least an mbox delivery with a crash journal costs, in this process: a 512-byte record
    into a preallocated journal and its fdatasync, the append and its fsync, the idle record back
    (not synced), as vdeliver's persistent journal does (vdeliver/recovery.py).  No locks, no
    protocol, no parsing: against it, a server's time is its own work, not the two syncs that
    crash safety takes.  mbox only (for a Maildir the fsync floor already makes two syncs)."""

    key = "journal-floor"
    label = "floor: journal record fdatasync + append fsync (mbox), in-process"
    fsync = "mbox: the journal (fdatasync), the file (fsync)"

    def deliver(self, state: object, box: Box, msg: Message) -> Sample:
        data = b"From " + SENDER.encode() + b"  Wed Nov 25 02:56:49 2026\n" + msg.bare() + b"\n"
        journal = os.path.join(os.path.dirname(box.path), f".{os.path.basename(box.path)}.floor-journal")
        if not os.path.exists(journal):
            with open(journal, "wb") as f:
                f.write(bytes(4096))
                f.flush()
                os.fsync(f.fileno())
        busy, idle = b"busy".ljust(511) + b"\n", b"idle".ljust(511) + b"\n"
        cpu0 = time.thread_time()
        started = time.perf_counter()
        jfd = os.open(journal, os.O_WRONLY)
        fd = os.open(box.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.pwrite(jfd, busy, 0)
            os.fdatasync(jfd)
            _write_all(fd, data)
            os.fsync(fd)
            os.pwrite(jfd, idle, 0)
        finally:
            os.close(fd)
            os.close(jfd)
        return Sample(time.perf_counter() - started, time.thread_time() - cpu0, None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
