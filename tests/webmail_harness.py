"""Webmail for the browser tests: a private Dovecot (IMAP and ManageSieve, SQL auth from the
vdeliver database), Roundcube from Debian's roundcube-core on PHP's built-in server, and a
headless Chromium from Debian's chromium package driven by Selenium through chromedriver.

Why Selenium and not Playwright: Debian's `chromium-driver` is built from the same source and
version as its `chromium`, so the driver always speaks the browser's protocol; the Python
package is pure Python and downloads nothing.  Playwright for Python bundles its own Node.js
driver and is tested against its own Chromium build, not Debian's.

Everything listens on loopback; every wait has a deadline; each step's screenshot is written to
the directory the test gives (`shots`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.dovecot_harness import Dovecot, vdeliver_config
from tests.helpers import ROOT, Account, MailRoot, free_port, require, run_vdeliver, world_tmpdir
from tests.smtp_capture import SmtpCapture
from tests.test_lmtp_server import Lmtpd

RC_HOME = Path("/var/lib/roundcube")  # Debian's INSTALL_PATH for roundcube-core
RC_PUBLIC = RC_HOME / "public_html"  # its document root
RC_ETC = Path("/etc/roundcube")
FAST_HASHES = {"argon2_time_cost": 1, "argon2_memory_cost": 1024, "argon2_parallelism": 1}

# What /usr/sbin/sendmail's MSP does for vdeliver's vacation replies: hand them over SMTP to the
# next hop, here the SMTP sink.  Run as vmail: Debian's python3 (the venv is under root's home).
SUBMIT = """#!/usr/bin/python3
import smtplib, sys
args = sys.argv[1:]
sender = args[args.index("-f") + 1] if "-f" in args else ""
rcpts = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-f")]
data = sys.stdin.buffer.read().replace(b"\\r\\n", b"\\n").replace(b"\\n", b"\\r\\n")
with smtplib.SMTP("127.0.0.1", {port}, local_hostname="hub.test", timeout=30) as smtp:
    smtp.sendmail("" if sender == "<>" else sender, rcpts, data)
"""


def need_webmail() -> dict[str, str]:
    """The peers: php, chromium, chromedriver, Roundcube's files, Selenium (fails, not skips,
    under VDELIVER_REQUIRE_PEERS=1 through require())."""
    found = require("php", "chromium", "chromedriver", "dovecot")
    if not (RC_PUBLIC / "index.php").exists() or not (RC_PUBLIC / "plugins" / "managesieve").exists():
        import pytest

        message = "Roundcube is not installed (roundcube-core, roundcube-plugins, roundcube-sqlite3)"
        if os.environ.get("VDELIVER_REQUIRE_PEERS"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class WebmailSite:
    """The hub of one test: accounts, vdeliver (CLI and LMTP), Dovecot, Roundcube, an SMTP sink."""

    def __init__(self, vmail: Account, shots: Path) -> None:
        need_webmail()
        self.vmail = vmail
        self.shots = shots
        self.root = MailRoot(world_tmpdir("vdeliver-webmail-"), vmail)
        self.base = self.root.base
        self.generated = self.base / "etc"  # plays /etc: vmailctl writes dovecot/ and roundcube/ here
        self.capture = SmtpCapture()
        self.dovecot: Dovecot | None = None
        self.roundcube: Roundcube | None = None
        self.lmtpd: Lmtpd | None = None
        self.tables: dict[str, dict[str, object]] = {}

    # -- configuration: one vdeliver.toml, as the administrator keeps it -----------------

    def write_config(self) -> None:
        self.root.write_config(hostname="hub.test", lock_timeout=10)
        text = self.root.config.read_text()
        for name, table in self.tables.items():
            text += f"\n[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
        self.root.config.write_text(text)

    def vmailctl(self, *args: str, stdin: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(self.root.config), *args],
                           input=stdin, capture_output=True, text=True, timeout=60, cwd=ROOT)
        if check:
            assert r.returncode == 0, f"vmailctl {' '.join(args)}: {r.stderr}"
        return r

    def start(self) -> WebmailSite:
        self.capture.start()
        state = self.base / "state"  # as /var/lib/vdeliver: the vmail user's
        state.mkdir(mode=0o700)
        os.chown(state, self.vmail.uid, self.vmail.gid)
        dbdir = self.base / "db"
        dbdir.mkdir(mode=0o755)
        submit = self.base / "submit"
        submit.write_text(SUBMIT.format(port=self.capture.port))
        submit.chmod(0o755)
        self.tables = {
            "accounts": {"database": str(dbdir / "accounts.sqlite"), "vmail_user": self.vmail.name,
                         "vmail_group": self.vmail.name, **FAST_HASHES},
            "dovecot": {"config_dir": str(self.generated / "dovecot")},
            "sieve": {"enabled": True, "sendmail": str(submit)},
            "tracking": {"database": str(state / "tracking.sqlite")},
            "webmail": {"managesieve_port": free_port(), "database": str(self.base / "roundcube" / "rc.sqlite")},
        }
        self.write_config()
        self.vmailctl("domain", "add", "home.com")
        return self

    def add_user(self, address: str, password: str, fmt: str) -> None:
        self.vmailctl("user", "add", address, "--format", fmt, "--password-stdin", stdin=password + "\n")
        user, domain = address.split("@")
        home = self.root.home / domain / user
        home.mkdir(parents=True, exist_ok=True)  # where managesieved keeps the scripts
        os.chown(home, self.vmail.uid, self.vmail.gid)
        os.chown(home.parent, self.vmail.uid, self.vmail.gid)

    def serve(self) -> None:
        """What the administrator runs (docs/webmail.md), then the servers."""
        self.vmailctl("dovecot-config", "--output", str(self.generated / "dovecot"))
        self.vmailctl("webmail-config", "--output", str(self.generated))
        conf_d = self.generated / "dovecot" / "conf.d"
        extra = f"!include {conf_d}/20-vdeliver-managesieve.conf\n!include {conf_d}/90-vdeliver-sieve.conf\n"
        self.dovecot = Dovecot(self.root, self.vmail, cfg=vdeliver_config(self.root),
                               generated=self.generated / "dovecot", extra=extra).start()
        self.wait_port(int(self.tables["webmail"]["managesieve_port"]), b"\"IMPLEMENTATION\"")  # type: ignore[call-overload]
        # Roundcube's IMAP host is the private Dovecot's port, known once it started.
        self.tables["webmail"]["imap_host"] = f"localhost:{self.dovecot.port}"
        self.write_config()
        out = self.vmailctl("webmail-config", "--output", str(self.generated)).stdout
        assert out == f"wrote {self.generated}/roundcube/vdeliver.inc.php\n", out  # only the IMAP host changed
        self.roundcube = Roundcube(self.generated / "roundcube", self.base / "roundcube").start()
        lmtpd = Lmtpd(self.root)
        self.tables["lmtp"] = dict(lmtpd.settings)
        self.write_config()
        self.lmtpd = lmtpd.start()

    @staticmethod
    def wait_port(port: int, greeting: bytes, timeout: float = 20) -> None:
        import socket

        deadline = time.monotonic() + timeout
        last = b""
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.settimeout(5)
                    last = s.recv(4096)
                    if greeting in last:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nothing answered on 127.0.0.1:{port} ({last[:200]!r})")

    # -- delivery, both ways sendmail reaches vdeliver -------------------------------------

    def deliver_cli(self, address: str, message: bytes, sender: str) -> None:
        user, domain = address.split("@")
        r = run_vdeliver(["-a", domain, "-a", user, "-f", sender], message, config=self.root.config,
                         as_user=self.vmail)
        assert r.returncode == 0, r.stderr

    def deliver_lmtp(self, address: str, message: bytes, sender: str) -> None:
        assert self.lmtpd is not None
        client = self.lmtpd.client()
        try:
            assert client.sendmail(sender, [address], message) == {}
        finally:
            client.quit()

    def close(self) -> str:
        """Stop everything; return Dovecot's log (for the test's last look)."""
        log = ""
        for stop in (self._stop_lmtpd, self._stop_roundcube, self._stop_dovecot, self.capture.stop):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - teardown goes on; the test already has its verdict
                print(f"teardown: {exc}", file=sys.stderr)
        if self.dovecot is not None:
            log = self.dovecot.log_text()
            self.dovecot.cleanup()
        shutil.rmtree(self.base, ignore_errors=True)
        return log

    def _stop_lmtpd(self) -> None:
        if self.lmtpd is not None:
            self.lmtpd.stop()

    def _stop_roundcube(self) -> None:
        if self.roundcube is not None:
            self.roundcube.stop()

    def _stop_dovecot(self) -> None:
        if self.dovecot is not None:
            self.dovecot.stop()


class Roundcube:
    """Debian's Roundcube on PHP's built-in server (127.0.0.1, a few workers), in a private copy of
    Debian's /var/lib/roundcube made of links (so the vdeliver plugin is linked in as docs/webmail.md
    says, without touching the machine's), and a private configuration directory
    (ROUNDCUBE_CONFIG_DIR) that includes the generated fragment, as Debian's
    /etc/roundcube/config.inc.php does once the administrator adds the include line."""

    def __init__(self, generated: Path, base: Path) -> None:
        self.php = require("php")["php"]
        self.fragment = generated / "vdeliver.inc.php"
        self.plugin = generated / "plugins" / "vdeliver"
        self.base = base
        self.home = base / "home"  # plays /var/lib/roundcube
        self.conf = base / "config"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def build_home(self) -> None:
        home = self.home
        (home / "public_html").mkdir(parents=True, exist_ok=True)
        (home / "plugins").mkdir(exist_ok=True)
        for name in ("index.php", "program", "SQL", "skins"):
            (home / name).symlink_to(os.path.realpath(RC_HOME / name) if name != "skins" else RC_HOME / name)
        for plugin in sorted((RC_HOME / "plugins").iterdir()):
            (home / "plugins" / plugin.name).symlink_to(plugin)
        (home / "plugins" / "vdeliver").symlink_to(self.plugin)  # the administrator's one `ln -s`
        # public_html/index.php finds INSTALL_PATH from its own directory: a copy, not a link.
        shutil.copy(RC_PUBLIC / "index.php", home / "public_html" / "index.php")
        (home / "public_html" / "program").symlink_to(RC_PUBLIC / "program")
        for name in ("plugins", "skins"):
            (home / "public_html" / name).symlink_to(f"../{name}")

    def start(self) -> Roundcube:
        for sub in ("config", "temp", "logs"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        if not self.home.exists():
            self.build_home()
        for name in ("defaults.inc.php", "mimetypes.php"):
            link = self.conf / name
            if not link.exists():
                link.symlink_to(RC_ETC / name)
        (self.conf / "config.inc.php").write_text(
            "<?php\n"
            "// The test's stand-in for Debian's /etc/roundcube/config.inc.php.\n"
            "$config = [];\n"
            f"$config['des_key'] = '{secrets.token_hex(12)}';\n"
            "$config['skin'] = 'elastic';\n"
            "$config['enable_spellcheck'] = false;\n"
            f"$config['temp_dir'] = '{self.base}/temp/';\n"
            f"$config['log_dir'] = '{self.base}/logs/';\n"
            "$config['imap_timeout'] = 30;\n"
            f"include '{self.fragment}';\n"
        )
        last = ""
        for _attempt in range(5):
            self.port = free_port()
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "ROUNDCUBE_CONFIG_DIR": str(self.conf),
                   "PHP_CLI_SERVER_WORKERS": "4"}
            with open(self.base / "php.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [self.php, "-S", f"127.0.0.1:{self.port}", "-t", str(self.home / "public_html")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=str(self.base),
                    start_new_session=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(self.url, timeout=10) as page:
                        if b"rcmloginuser" in page.read():
                            return self
                except OSError:
                    time.sleep(0.1)
            last = self.log()
            self.stop()
        raise RuntimeError(f"Roundcube did not start: {last[-2000:]}")

    def log(self) -> str:
        text = ""
        for path in (self.base / "php.log", self.base / "logs" / "errors.log"):
            if path.exists():
                text += path.read_text(errors="replace")
        return text

    def errors(self) -> str:
        path = self.base / "logs" / "errors.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)


class Browser:
    """Headless Chromium, as a user at a desk: find, click, type, wait, and a screenshot a step."""

    def __init__(self, base_url: str, shots: Path, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        found = require("chromium", "chromedriver")
        options = webdriver.ChromeOptions()
        options.binary_location = found["chromium"]
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900", "--lang=en-US",
                    f"--user-data-dir={profile}"):
            options.add_argument(arg)
        self.driver: Any = webdriver.Chrome(service=Service(found["chromedriver"]), options=options)
        self.driver.set_page_load_timeout(60)
        self.base_url = base_url
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def quit(self) -> None:
        self.driver.quit()

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = 30) -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            path = self.shot("timeout")
            raise AssertionError(f"browser: {what} did not happen within {timeout} s (see {path})") from None

    def css(self, selector: str, timeout: float = 30) -> Any:
        """The first visible element matching `selector`, waiting for it."""
        from selenium.webdriver.common.by import By

        def visible(driver: Any) -> Any:
            for element in driver.find_elements(By.CSS_SELECTOR, selector):
                try:
                    if element.is_displayed():
                        return element
                except Exception:  # noqa: BLE001 - a stale element: look again
                    continue
            return False

        return self.wait(visible, f"{selector!r} visible", timeout)

    def text_in(self, selector: str, text: str, timeout: float = 30) -> Any:
        from selenium.webdriver.common.by import By

        def found(driver: Any) -> Any:
            for element in driver.find_elements(By.CSS_SELECTOR, selector):
                try:
                    if text in element.text:
                        return element
                except Exception:  # noqa: BLE001 - a stale element: look again
                    continue
            return False

        return self.wait(found, f"{text!r} in {selector!r}", timeout)

    def frame(self, name: str) -> None:
        """Switch into the iframe `name` (Roundcube's forms live in one)."""
        from selenium.webdriver.support import expected_conditions as ec

        self.driver.switch_to.default_content()
        self.wait(ec.frame_to_be_available_and_switch_to_it(name), f"frame {name!r}")

    def top(self) -> None:
        self.driver.switch_to.default_content()

    def login(self, user: str, password: str) -> None:
        self.driver.get(self.base_url)
        self.css("#rcmloginuser").clear()
        self.css("#rcmloginuser").send_keys(user)
        self.css("#rcmloginpwd").send_keys(password)
        self.css("#rcmloginsubmit").click()
