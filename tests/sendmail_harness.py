"""Run the real sendmail with private everything: config, queue, pid file, maps.

Integration tests (sendmail, LMTP, socketmap, accounts) share this harness.  A
`Site` is one private mail set-up under a temporary directory:

    /run/vdeliver-sendmail-tests/site-XXXX/ (not /tmp: see SITE_PARENT)
    base/etc/        compiled .cf files, map sources and their .db, hosts,
                     service.switch, aliases (root-owned, 0755: sendmail
                     ignores maps in group/world-writable directories)
    base/mqueue/     the queue (0700 root, as sendmail demands)
    base/run/        pid files;  base/lib/  status file (absent: no stats)

Nothing of the machine's own set-up is used: every `.mc` is compiled with its
`/etc/mail/` and `/var/spool/mqueue` paths rewritten into the site, and
`Site.compile()` refuses a .cf that still names /etc/mail, /var/spool,
/var/lib/sendmail or /run/sendmail.  Every sendmail command gets `-C`.

The host name: sendmail sleeps 60 s at start-up ("My unqualified host name
(vm) unknown; sleeping for retry") when the machine's name has no dot.  Each
sendmail process therefore runs in its own UTS namespace (`unshare -u`) whose
host name is `HOSTNAME`, and `confDOMAIN_NAME` says the same; /etc/hosts is
never touched.  Where namespaces are not allowed, sendmail runs directly if the
machine's name is qualified, and the harness refuses to run otherwise.

API (all paths are pathlib.Path; IN_MC, OUT_MC, MAILSCANNER_MC, MAPS name the
shipped examples):

    need_sendmail()                       require sendmail, m4, makemap, unshare and
                                          root (skip, or fail under VDELIVER_REQUIRE_PEERS=1)
    need_m4()                             require m4 + sendmail-cf only (no root)
    compile_mc(mc) -> (cf_text, warnings) plain m4 of an .mc, nothing rewritten
    vdeliver_mailer(config)               replace= mapping that points OUT_MC's
                                          mailer at the test vdeliver, `-c config`
    site = Site.create()                  a fresh private site; site.close() stops
                                          its daemons and removes it (also a
                                          context manager); site.close_daemons()
    site.install_maps(MAPS, **texts)
                                          copy map sources (texts: name=content,
                                          access_in= for access.in), makemap the
                                          hash maps (virtusertable, access.in, access_out)
    site.makemap(name)                    rebuild one hash map after editing etc/<name>
    site.compile(mc, name, replace={old: new}, defines="m4 text",
                 smart_host_port=N, smtp_port=N) -> etc/<name>.cf
                                          (pid file run/<name>.pid)
    site.sendmail(cf, *args, input=b"", check=False) -> CompletedProcess
    site.newaliases(cf)                   `sendmail -C cf -bi`
    site.address_test(cf, addresses, ruleset="3,0")
                                          -> {address: "$# mailer $@ host $: user"}
    site.start_daemon(cf, port)           `sendmail -bD` on 127.0.0.1:port -> Daemon
    site.serve(mc, name, **compile_args)  compile for a free port + start_daemon,
                                          retrying on a lost port race -> (cf, port, Daemon)
    site.start_background(cf, *args)      production form (`-bd`, `-q2m`), stopped
                                          through its private PidFile
    site.run_queue(cf, *args)             one foreground queue run (`-qf`)
    site.queue_files(); site.wait_queue(n)
                                          the qf files of the queue (waiting for n);
                                          both take queue= for another queue
    site.add_queue(name)                  another 0700 queue directory in the site
    read_qf(path)                         {"sender": "<a@b>", "recipients": ["<c@d>"]}
    free_port()                           an unused loopback TCP port
    HOSTNAME                              the qualified name every test sendmail has

`Site.compile()` inserts the test-only m4 definitions (pid file, host name,
private hosts/service switch, no host status, load limits off, optional smart
host on a loopback port) just before the first MAILER() line, so they override
what the .mc and OSTYPE(debian) defined and still reach the mailer definitions.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import pytest

from tests.helpers import REQUIRE_PEERS, free_port, install_vdeliver, require, require_root

CF_DIR = Path("/usr/share/sendmail/cf")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAPS = EXAMPLES / "maps"
IN_MC = EXAMPLES / "sendmail_in.mc"
OUT_MC = EXAMPLES / "sendmail_out.mc"
MAILSCANNER_MC = EXAMPLES / "sendmail_in-mailscanner.mc"
# The production mailer lines of sendmail_out.mc that tests rewrite.
PRODUCTION_PYTHON = "/usr/local/libexec/vdeliver"
PRODUCTION_ARGS = "vdeliver -t -Y -a $h -a $u"
# Not under /tmp: sendmail ignores map and class files below a world-writable
# directory ("World writable directory /tmp"), sticky or not.
SITE_PARENT = Path("/run/vdeliver-sendmail-tests")
HOSTNAME = "mail.vdeliver.test"
SHORTNAME = HOSTNAME.split(".")[0]
# Paths of the machine's own mail set-up that a test .cf must never name.
FORBIDDEN = ("/etc/mail", "/var/spool/mqueue", "/var/spool/mqueue.in", "/var/lib/sendmail", "/run/sendmail")
# Map sources that makemap turns into hash .db files.
HASH_MAPS = ("virtusertable", "access.in", "access_out")
# Domains the private hosts file resolves (sendmail checks that sender domains exist).
HOSTS = ("remote.example", "partner.example", "bedrock.example", "away.com", "home.com")
# m4's own warnings that the .mc files are known to produce; empty means "none is acceptable".
KNOWN_M4_WARNINGS: tuple[str, ...] = ()


def need_sendmail() -> dict[str, str]:
    """The peer programs (sendmail, m4, makemap, unshare) and root; skip or fail under CI."""
    found = need_m4()
    found.update(require("sendmail", "makemap", "unshare"))
    require_root("sendmail runs as root with a private -C configuration")
    return found


def need_m4() -> dict[str, str]:
    """m4 and the sendmail-cf macros (enough to compile an .mc; no root needed)."""
    found = require("m4")
    if not (CF_DIR / "m4" / "cf.m4").exists():
        message = f"{CF_DIR}/m4/cf.m4 is missing (package sendmail-cf)"
        if REQUIRE_PEERS:
            pytest.fail(message + " (VDELIVER_REQUIRE_PEERS=1)", pytrace=False)
        pytest.skip(message)
    return found


_UTS: list[bool] = []


def _uts_namespaces() -> bool:
    """Can we give sendmail its own host name?  Checked once per test session."""
    if not _UTS:
        try:
            ok = subprocess.run(["unshare", "-u", "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if not ok and "." not in socket.gethostname():
            raise RuntimeError(
                f"`unshare -u` is not allowed and the host name {socket.gethostname()!r} is unqualified: "
                "sendmail would sleep 60 s in every command; give the machine a qualified name"
            )
        _UTS.append(ok)
    return _UTS[0]


def vdeliver_mailer(config: Path, install: Path | None = None) -> dict[str, str]:
    """`replace=` for Site.compile(OUT_MC, ...): run the test copy of vdeliver
    (helpers.install_vdeliver()) with `-c config`.  sendmail empties the
    environment, so $VDELIVER_CONFIG cannot carry the path; production uses the
    default /etc/vdeliver.toml."""
    if install is None:
        install = install_vdeliver()
    return {
        PRODUCTION_PYTHON: f"{install}/bin/vdeliver",
        PRODUCTION_ARGS: f"vdeliver -c {config} -t -Y -a $h -a $u",
    }



def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Wait until OUR sendmail greets on the port (its 220 names HOSTNAME): a port
    taken by someone else between free_port() and bind() must not pass for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sendmail daemon exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512)
                if greeting.startswith(b"220 ") and HOSTNAME.encode() in greeting:
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"sendmail daemon did not greet on 127.0.0.1:{port} within {timeout}s")


@dataclass
class Daemon:
    """A sendmail started by a Site; stop() kills its whole process group."""

    proc: subprocess.Popen[bytes]
    port: int
    cf: Path
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            # The daemon's children (SMTP sessions) may outlive it; end the group anyway.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@dataclass
class BackgroundDaemon:
    """A sendmail started the production way (it forks and detaches); found and
    stopped through its private PidFile."""

    pidfile: Path
    cf: Path

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Site:
    base: Path
    daemons: list[Daemon | BackgroundDaemon] = field(default_factory=list)

    # -- layout ---------------------------------------------------------------
    @classmethod
    def create(cls, base: Path | None = None) -> Site:
        """A fresh site under a new /tmp directory (0755, root) with etc/, mqueue/, run/, lib/."""
        if base is None:
            SITE_PARENT.mkdir(mode=0o755, exist_ok=True)
            SITE_PARENT.chmod(0o755)
            base = Path(tempfile.mkdtemp(prefix="site-", dir=str(SITE_PARENT)))
        base.chmod(0o755)
        site = cls(base)
        for d, mode in ((site.etc, 0o755), (site.queue, 0o700), (site.run, 0o755), (site.lib, 0o755)):
            d.mkdir(exist_ok=True)
            d.chmod(mode)
        (site.etc / "service.switch").write_text("hosts\tfiles\naliases\tfiles\n")
        (site.etc / "hosts").write_text(
            f"127.0.0.1\t{HOSTNAME} {SHORTNAME} localhost\n" + "".join(f"127.0.0.1\t{h}\n" for h in HOSTS)
        )
        (site.etc / "aliases").write_text("postmaster: root\nMAILER-DAEMON: postmaster\n")
        (site.etc / "local-host-names").write_text(f"{HOSTNAME}\nlocalhost\n")
        for f in site.etc.iterdir():
            f.chmod(0o644)
        return site

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def queue(self) -> Path:
        return self.base / "mqueue"

    @property
    def run(self) -> Path:
        return self.base / "run"

    @property
    def lib(self) -> Path:
        return self.base / "lib"

    def add_queue(self, name: str) -> Path:
        """Another queue directory in the site (0700 root), e.g. MailScanner's mqueue.in."""
        path = self.base / name
        path.mkdir(exist_ok=True)
        path.chmod(0o700)
        return path

    def close(self) -> None:
        """Stop every daemon this site started, then remove the site."""
        try:
            self.close_daemons()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def close_daemons(self) -> None:
        """Stop every daemon this site started (the site stays)."""
        errors: list[BaseException] = []
        for d in self.daemons:
            try:
                d.stop()
            except BaseException as exc:  # noqa: BLE001 - stop the others first
                errors.append(exc)
        self.daemons.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- maps -----------------------------------------------------------------
    def install_maps(self, src_dir: Path | None = MAPS, /, **texts: str) -> None:
        """Copy the map sources of src_dir (default: examples/maps), then the ones given
        as name=text (`access_in=` means access.in; `**{"local-host-names": ...}`
        works too), and build every hash map with makemap.  The examples'
        local-host-names is skipped: the site's own names HOSTNAME and localhost."""
        sources: dict[str, str] = {}
        if src_dir is not None:
            for f in sorted(src_dir.iterdir()):
                if f.is_file() and f.name != "local-host-names":
                    sources[f.name] = f.read_text()
        for key, text in texts.items():
            name = "access.in" if key == "access_in" else key.replace("__", ".")
            sources[name] = text
        for name, text in sources.items():
            path = self.etc / name
            path.write_text(text)
            path.chmod(0o644)
        for name in HASH_MAPS:
            if name in sources:
                self.makemap(name)

    def makemap(self, name: str) -> None:
        src = self.etc / name
        with src.open("rb") as f:
            res = subprocess.run(["makemap", "hash", str(src)], stdin=f, capture_output=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"makemap {name} failed: {res.stderr.decode(errors='replace')}")
        (self.etc / f"{name}.db").chmod(0o644)

    # -- compiling ------------------------------------------------------------
    def test_defines(self, name: str, smart_host_port: int | None) -> str:
        """The test-only m4 text inserted before the first MAILER() of an .mc."""
        d = [
            f"define(`confDOMAIN_NAME', `{HOSTNAME}')",
            f"define(`confPID_FILE', `{self.run}/{name}.pid')",
            f"define(`STATUS_FILE', `{self.lib}/{name}.st')",
            "undefine(`confHOST_STATUS_DIRECTORY')",
            f"define(`confDEAD_LETTER_DROP', `{self.lib}/dead.letter')",
            f"define(`confSERVICE_SWITCH_FILE', `{self.etc}/service.switch')",
            f"define(`confHOSTS_FILE', `{self.etc}/hosts')",
            f"define(`ALIAS_FILE', `{self.etc}/aliases')",
            "define(`confDEF_USER_ID', `vmail:vmail')",
            "define(`confDONT_PROBE_INTERFACES', `True')",
            # No MSA on port 587 of every address: a test daemon listens on its own port only.
            "FEATURE(`no_default_msa')",
            # A busy CI machine must not make sendmail refuse or only queue.
            "define(`confQUEUE_LA', `1000')",
            "define(`confREFUSE_LA', `1000')",
            "define(`confDELAY_LA', `0')",
            "define(`confMIN_QUEUE_AGE', `0')",
            "define(`confTO_IDENT', `0s')",
        ]
        if smart_host_port is not None:
            d += [
                "define(`SMART_HOST', `relay:[127.0.0.1]')",
                f"define(`RELAY_MAILER_ARGS', `TCP $h {smart_host_port}')",
                f"define(`ESMTP_MAILER_ARGS', `TCP $h {smart_host_port}')",
            ]
        return "dnl # --- test-only definitions (tests/sendmail_harness.py) ---\n" + "".join(
            line + "dnl\n" for line in d
        )

    def rewrite_paths(self, text: str) -> str:
        """Point the production paths of an .mc into this site."""
        text = text.replace("/etc/mail/", f"{self.etc}/")
        text = text.replace("/var/spool/mqueue.in", str(self.queue))
        return text.replace("/var/spool/mqueue", str(self.queue))

    def compile(
        self,
        mc: Path | str,
        name: str,
        *,
        replace: dict[str, str] | None = None,
        defines: str = "",
        smart_host_port: int | None = None,
        smtp_port: int | None = None,
    ) -> Path:
        """Compile an .mc (a path, or its text) into etc/<name>.cf for this site.

        replace: exact strings to substitute in the .mc first (each must occur);
        defines: extra m4 text inserted with the test definitions;
        smtp_port: rewrite the DAEMON_OPTIONS `Port=smtp` to 127.0.0.1:<port>.
        Raises RuntimeError on an m4 error or warning not in KNOWN_M4_WARNINGS,
        or when the .cf still names a path of the machine's own mail set-up.
        """
        text = Path(mc).read_text() if isinstance(mc, Path) else mc
        for old, new in (replace or {}).items():
            if old not in text:
                raise RuntimeError(f"compile {name}: {old!r} does not occur in the .mc")
            text = text.replace(old, new)
        if smtp_port is not None:
            if "Port=smtp" not in text:
                raise RuntimeError(f"compile {name}: no `Port=smtp` DAEMON_OPTIONS to rewrite")
            text = text.replace("Port=smtp", f"Port={smtp_port}, Addr=127.0.0.1")
        text = self.rewrite_paths(text)
        # OSTYPE(debian) derives class w/R files and the help file from MAIL_SETTINGS_DIR.
        cf_m4 = text.find("cf.m4')")
        if cf_m4 < 0:
            raise RuntimeError(f"compile {name}: no include of cf.m4")
        eol = text.index("\n", cf_m4) + 1
        text = text[:eol] + f"define(`MAIL_SETTINGS_DIR', `{self.etc}/')dnl\n" + text[eol:]
        insert = self.test_defines(name, smart_host_port) + defines
        at = text.find("\nMAILER(")
        if at < 0:
            raise RuntimeError(f"compile {name}: no MAILER() line to insert test definitions before")
        text = text[: at + 1] + insert + ("\n" if insert and not insert.endswith("\n") else "") + text[at + 1 :]
        mc_path = self.etc / f"{name}.mc"
        mc_path.write_text(text)
        cf_text, warnings = compile_mc(mc_path)
        unexplained = [w for w in warnings if not any(k in w for k in KNOWN_M4_WARNINGS)]
        if unexplained:
            raise RuntimeError(f"m4 {name}.mc: " + "\n".join(unexplained))
        leaks = [
            line for line in cf_text.splitlines() if not line.startswith("#") and any(p in line for p in FORBIDDEN)
        ]
        if leaks:
            raise RuntimeError(f"{name}.cf names the machine's own mail set-up: {leaks[:5]}")
        cf = self.etc / f"{name}.cf"
        cf.write_text(cf_text)
        cf.chmod(0o644)
        return cf

    # -- running --------------------------------------------------------------
    def argv(self, cf: Path, *args: str) -> list[str]:
        """sendmail -C cf args, inside its own UTS namespace named HOSTNAME (or
        directly, when namespaces are not allowed and the machine's name is qualified)."""
        if not _uts_namespaces():
            return ["sendmail", "-C", str(cf), *args]
        return [
            "unshare",
            "-u",
            "--",
            "/bin/sh",
            "-c",
            'hostname "$0" && exec "$@"',
            HOSTNAME,
            "sendmail",
            "-C",
            str(cf),
            *args,
        ]

    def sendmail(
        self, cf: Path, *args: str, input: bytes = b"", timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        res = subprocess.run(
            self.argv(cf, *args),
            input=input,
            capture_output=True,
            timeout=timeout,
            cwd="/",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
        )
        if check and res.returncode != 0:
            raise RuntimeError(
                f"sendmail {' '.join(args)} exited {res.returncode}: "
                f"{res.stdout.decode(errors='replace')}{res.stderr.decode(errors='replace')}"
            )
        return res

    def newaliases(self, cf: Path) -> None:
        self.sendmail(cf, "-bi", check=True)

    def address_test(self, cf: Path, addresses: Iterable[str], ruleset: str = "3,0") -> dict[str, str]:
        """Run `sendmail -bt` and return each address's final rewriting, e.g.
        {"fred@away.com": "$# procmail $@ away . com $: fred < @ away . com >"}."""
        addresses = list(addresses)
        script = "".join(f"{ruleset} {a}\n" for a in addresses)
        res = self.sendmail(cf, "-bt", input=script.encode(), check=True)
        return parse_address_test(res.stdout.decode(errors="replace"), addresses)

    def start_daemon(self, cf: Path, port: int, *extra: str, timeout: float = 20) -> Daemon:
        """Start `sendmail -bD` (a daemon kept in the foreground, in its own process
        group) and wait until it greets on 127.0.0.1:port.  close() stops it."""
        log = self.run / f"daemon-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.argv(cf, "-bD", *extra),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
                start_new_session=True,
            )
        daemon = Daemon(proc, port, cf, log)
        self.daemons.append(daemon)
        try:
            _wait_port(port, proc, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')}") from None
        return daemon

    def serve(
        self, mc: Path | str, name: str, *, attempts: int = 3, **compile_args: object
    ) -> tuple[Path, int, Daemon]:
        """Compile an .mc whose DAEMON_OPTIONS say `Port=smtp` for a free loopback port
        and start it with -bD; on a lost race for the port, try another one.
        Returns (cf, port, daemon)."""
        last: Exception | None = None
        for _ in range(attempts):
            port = free_port()
            cf = self.compile(mc, name, smtp_port=port, **compile_args)  # type: ignore[arg-type]
            try:
                return cf, port, self.start_daemon(cf, port, timeout=10)
            except RuntimeError as exc:
                last = exc
                daemon = self.daemons.pop()
                daemon.stop()
        raise RuntimeError(f"could not start {name} after {attempts} ports: {last}")

    def start_background(self, cf: Path, *args: str, timeout: float = 20) -> BackgroundDaemon:
        """Start sendmail exactly as in production (`-bd`, `-q2m`: it forks and
        detaches) and wait for its PidFile (etc/<name>.cf -> run/<name>.pid)."""
        pidfile = self.run / f"{cf.stem}.pid"
        daemon = BackgroundDaemon(pidfile, cf)
        self.daemons.append(daemon)
        self.sendmail(cf, *args, check=True)
        deadline = time.monotonic() + timeout
        while daemon.pid is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sendmail {' '.join(args)} wrote no pid file {pidfile}")
            time.sleep(0.05)
        return daemon

    def run_queue(self, cf: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """One queue run in the foreground (`-qf`): returns once every entry was tried."""
        return self.sendmail(cf, "-qf", *extra, timeout=timeout)

    def queue_files(self, queue: Path | None = None) -> list[Path]:
        return sorted((queue or self.queue).glob("qf*"))

    def wait_queue(self, count: int, timeout: float = 20, queue: Path | None = None) -> list[Path]:
        """Wait until the queue holds `count` qf files (a daemon writes them after replying)."""
        deadline = time.monotonic() + timeout
        while True:
            files = self.queue_files(queue)
            if len(files) >= count or time.monotonic() > deadline:
                return files
            time.sleep(0.05)


def compile_mc(mc: Path) -> tuple[str, list[str]]:
    """m4 an .mc against /usr/share/sendmail/cf; (cf text, m4's stderr lines)."""
    res = subprocess.run(["m4", str(mc)], capture_output=True, timeout=60, cwd=str(mc.parent))
    warnings = [w for w in res.stderr.decode(errors="replace").splitlines() if w.strip()]
    if res.returncode != 0:
        raise RuntimeError(f"m4 {mc} exited {res.returncode}: " + "\n".join(warnings))
    return res.stdout.decode(), warnings


_RESULT = re.compile(r"^(?:parse|canonify|Parse0|Parse1|ParseLocal|final)?\s*returns:\s*(.*)$")


def parse_address_test(output: str, addresses: Sequence[str]) -> dict[str, str]:
    """Split `-bt` output into one block per `ruleset address` line and keep the
    last `returns:` of each block: the mailer triple sendmail would use."""
    results: dict[str, str] = {}
    blocks = re.split(r"^> ", output, flags=re.M)[1:]
    # The first "> " prompt precedes the first address; the final one is an empty prompt.
    if len(blocks) < len(addresses):
        raise RuntimeError(f"sendmail -bt answered {len(blocks)} of {len(addresses)} addresses:\n{output}")
    for address, block in zip(addresses, blocks[: len(addresses)], strict=True):
        last = ""
        for line in block.splitlines():
            m = _RESULT.match(line.strip())
            if m:
                last = m.group(1).strip()
        results[address] = last
    return results


class QueueEnvelope(TypedDict):
    sender: str
    recipients: list[str]


def read_qf(path: Path) -> QueueEnvelope:
    """The envelope of a queue file: sender (S line) and recipients (R lines)."""
    sender = ""
    rcpts: list[str] = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        if line.startswith("S"):
            sender = line[1:]
        elif line.startswith("R"):
            # R<flags>:<address> in version 8 queue files
            rcpts.append(line.split(":", 1)[1] if ":" in line else line[1:])
    return {"sender": sender, "recipients": rcpts}
