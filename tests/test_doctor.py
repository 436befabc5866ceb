"""`vmailctl doctor` (issue 15): a good set-up says ok; each broken condition is reported with its fix.

Each test builds a private site under /run (not /tmp: a world-writable directory above a map
is itself a problem sendmail reports), compiles the SHIPPED .mc with its paths moved into the
site, writes the real launcher, builds the maps with Debian's makemap (which chowns the .db
files to smmta), and breaks one thing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import SYSTEM_PYTHON, ensure_vmail, install_vdeliver, require, require_root
from vdeliver import launcher
from vdeliver.accounts import vmailctl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PARENT = Path("/run/vdeliver-doctor-tests")


@dataclass
class Site:
    root: Path
    config: Path
    cf: Path

    def doctor(self, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, object]]:
        rc = vmailctl.main(["-c", str(self.config), "doctor", "--cf", str(self.cf),
                            "--dovecot-dir", str(self.root / "dovecot"), "--json", *extra])
        return rc, json.loads(capsys.readouterr().out)

    def compile(self, mc: str, replace: dict[str, str] | None = None) -> None:
        text = subprocess.run(["m4", str(EXAMPLES / mc)], capture_output=True, text=True, check=True,
                              timeout=60).stdout
        for old, new in {"/etc/mail": str(self.root / "mail"), "/usr/local/libexec": str(self.root / "libexec"),
                         "/run/vdeliver/": f"{self.root}/run/", **(replace or {})}.items():
            text = text.replace(old, new)
        self.cf.write_text(text)


@pytest.fixture
def site() -> Iterator[Site]:
    require("m4", "makemap")
    require_root("the doctor runs the mailer as vmail, as sendmail does")
    vmail = ensure_vmail()
    PARENT.mkdir(mode=0o755, exist_ok=True)
    root = Path(subprocess.run(["mktemp", "-d", "-p", str(PARENT)], capture_output=True, text=True,
                               check=True).stdout.strip())
    root.chmod(0o755)
    try:
        mail = root / "mail"
        mail.mkdir(mode=0o755)
        for name in ("virtuserdomains", "virtusertable", "access_out", "local-host-names", "aliases"):
            shutil.copy(EXAMPLES / "maps" / name, mail / name)
        (mail / "vdeliver-aliases").write_text("")
        for name in ("virtusertable", "access_out"):
            subprocess.run(f"makemap hash {mail / name} < {mail / name}", shell=True, check=True, timeout=30)
        for name in ("aliases", "vdeliver-aliases"):
            subprocess.run(["makemap", "hash", str(mail / name)], stdin=subprocess.DEVNULL, check=True, timeout=30)
        (root / "libexec").mkdir()
        launcher.write(str(root / "libexec" / "vdeliver"), python=SYSTEM_PYTHON,
                       libdir=str(install_vdeliver() / "lib"))
        for d in ("vbox", "home", "lib"):
            (root / d).mkdir(mode=0o700)
            os.chown(root / d, vmail.uid, vmail.gid)
        config = root / "vdeliver.toml"
        config.write_text(f'mbox_path = "{root}/vbox/{{domain}}/{{user}}"\n'
                          f'maildir_path = "{root}/home/{{domain}}/{{user}}/Maildir"\n'
                          f'[accounts]\ndatabase = "{root}/lib/accounts.sqlite"\n')
        (root / "dovecot").mkdir()
        assert vmailctl.main(["-c", str(config), "dovecot-config", "-o", str(root / "dovecot")]) == 0
        s = Site(root, config, root / "out.cf")
        s.compile("sendmail_out.mc")
        yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _problems(data: dict[str, object]) -> list[dict[str, str]]:
    problems = data["problems"]
    assert isinstance(problems, list)
    return problems


def test_doctor_on_the_documented_setup_says_ok(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    assert _problems(data) == [] and rc == 0
    checked = data["checked"]
    assert isinstance(checked, list)
    assert any("starts vdeliver as vmail:vmail with an empty environment" in c for c in checked)


def test_doctor_reports_bare_python_argv0_with_the_launcher_fix(site: Site,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    site.compile("sendmail_out.mc", {f"P={site.root}/libexec/vdeliver": "P=/opt/vdeliver/bin/python",
                                     "A=vdeliver -t": "A=python -I -m vdeliver -t"})
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    (p,) = _problems(data)
    assert rc == 1 and "argv[0] is 'python'" in p["problem"] and "vdeliver.launcher" in p["fix"]


def test_doctor_reports_a_launcher_that_cannot_import_vdeliver(site: Site,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    launcher.write(str(site.root / "libexec" / "vdeliver"), python=SYSTEM_PYTHON, libdir="/nonexistent-venv")
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    (p,) = _problems(data)
    assert rc == 1 and "exit 75: vdeliver: 4.3.0 cannot load vdeliver" in p["problem"]
    assert "-m vdeliver.launcher" in p["fix"]


def test_doctor_reports_smmta_owned_maps_without_trusted_user(site: Site,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    site.cf.write_text(site.cf.read_text().replace("O TrustedUser=smmta\n", ""))
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    problems = _problems(data)
    assert rc == 1 and problems
    assert all("neither root nor TrustedUser" in p["problem"] for p in problems), problems
    assert all("confTRUSTED_USER" in p["fix"] for p in problems)


def test_doctor_reports_a_group_writable_map_directory(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    (site.root / "mail").chmod(0o775)
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    problems = _problems(data)
    assert rc == 1 and any("group- or world-writable" in p["problem"] for p in problems)


def test_doctor_reports_a_missing_alias_file_and_map(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    (site.root / "mail" / "vdeliver-aliases").unlink()
    (site.root / "mail" / "virtusertable.db").unlink()
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    text = json.dumps(_problems(data))
    assert rc == 1 and "vdeliver-aliases does not exist" in text and "vmailctl maps build" in text
    assert "virtusertable.db does not exist" in text


def test_doctor_reports_a_mailbox_directory_owned_by_root(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    os.chown(site.root / "vbox", 0, 0)
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    (p,) = _problems(data)
    assert rc == 1 and "is owned by root, not vmail" in p["problem"] and p["fix"].startswith("chown vmail:vmail")


def test_doctor_reports_lmtp_without_user(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.compile("sendmail_out-lmtp.mc")
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    text = json.dumps(_problems(data))
    assert rc == 1 and "[lmtp] user" in text and "refuses to deliver" in text
    assert "no socket at" in text


def test_doctor_reports_a_dovecot_config_that_is_not_the_generated_one(site: Site,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    conf = site.root / "dovecot" / "conf.d" / "90-vdeliver.conf"
    conf.write_text(conf.read_text() + "mail_location = mbox:~/mail\n")
    capsys.readouterr()
    rc, data = site.doctor(capsys)
    (p,) = _problems(data)
    assert rc == 1 and "differs from what vmailctl generates" in p["problem"]
    assert p["fix"] == f"vmailctl dovecot-config -o {site.root / 'dovecot'}"


def test_doctor_text_output_prints_each_fix(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    os.chown(site.root / "vbox", 0, 0)
    capsys.readouterr()
    rc = vmailctl.main(["-c", str(site.config), "doctor", "--cf", str(site.cf),
                        "--dovecot-dir", str(site.root / "dovecot")])
    out = capsys.readouterr().out
    assert rc == 1 and "problem: " in out and "    fix: chown vmail:vmail" in out
