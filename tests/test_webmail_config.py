"""`vmailctl webmail-config`: Dovecot's ManageSieve service and Roundcube's configuration fragment,
generated from vdeliver's configuration; every bad [webmail] value is one clear line (exit 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, require
from vdeliver import config
from vdeliver.accounts import dovecot, webmail
from vdeliver.accounts.errors import ConfigurationError


def vmailctl(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(cfg), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def site(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "vdeliver.toml"
    path.write_text(text)
    return path


def test_the_three_files(tmp_path: Path) -> None:
    cfg = config.load(str(site(tmp_path, '[webmail]\nmanagesieve_port = 14190\nplugins = ["archive"]\n')))
    files = webmail.render_files(cfg)
    assert list(files) == [webmail.MANAGESIEVE_FILE, webmail.SIEVE_FILE, webmail.ROUNDCUBE_FILE, webmail.PLUGIN_FILE]
    managesieve = files[webmail.MANAGESIEVE_FILE]
    assert "protocols = $protocols sieve\n" in managesieve
    assert "    address = 127.0.0.1\n    port = 14190\n" in managesieve
    # The Pigeonhole part is dovecot-config's, word for word: one truth for both commands.
    assert files[webmail.SIEVE_FILE] == dovecot.render_files(cfg, lookup_uid=False)["conf.d/90-vdeliver-sieve.conf"]
    php = files[webmail.ROUNDCUBE_FILE]
    for line in ("$config['managesieve_host'] = '127.0.0.1:14190';",
                 "$config['managesieve_mbox_encoding'] = 'UTF-8';",
                 "$config['managesieve_vacation'] = 1;",
                 "$config['managesieve_forward'] = 1;",
                 "$config['imap_host'] = 'localhost:143';",
                 "$config['smtp_host'] = 'localhost:25';",
                 "$config['smtp_user'] = '';",
                 "$config['db_dsnw'] = 'sqlite:////var/lib/roundcube/db/roundcube.sqlite?mode=0640';"):
        assert line in php.splitlines(), line
    assert "['managesieve', 'vdeliver', 'archive']" in php


def test_the_sieve_extensions_are_exactly_what_vdeliver_runs(tmp_path: Path) -> None:
    from vdeliver.sieve.validator import EXTENSIONS

    files = webmail.render_files(config.load(str(site(tmp_path))))
    (line,) = [x for x in files[webmail.SIEVE_FILE].splitlines() if "sieve_extensions =" in x]
    offered = set(line.split("=", 1)[1].split())
    assert offered == set(EXTENSIONS) - dovecot.PIGEONHOLE_LACKS
    assert offered <= set(EXTENSIONS)


def test_smtp_auth_and_tls(tmp_path: Path) -> None:
    cfg = config.load(str(site(tmp_path, '[webmail]\nsmtp_auth = true\nsmtp_host = "tls://mail.example.org:587"\n'
                                         'managesieve_address = "192.0.2.10"\nmanagesieve_tls = true\n')))
    files = webmail.render_files(cfg)
    php = files[webmail.ROUNDCUBE_FILE]
    assert "$config['smtp_user'] = '%u';" in php and "$config['smtp_pass'] = '%p';" in php
    assert "$config['managesieve_host'] = 'tls://192.0.2.10:4190';" in php
    assert "disable_plaintext_auth = yes" in files[webmail.MANAGESIEVE_FILE]


def test_php_strings_are_escaped(tmp_path: Path) -> None:
    cfg = config.load(str(site(tmp_path, "[webmail]\nproduct_name = \"Fred's \\\\ mail ?> <?php\"\n")))
    php = webmail.render_files(cfg)[webmail.ROUNDCUBE_FILE]
    assert "$config['product_name'] = 'Fred\\'s \\\\ mail ?> <?php';" in php


@pytest.mark.parametrize(("text", "message"), [
    ('[webmail]\nmanagesieve_address = "0.0.0.0"\n', "is not a loopback address"),
    ('[webmail]\nmanagesieve_address = "localhost"\n', "an IP address"),
    ("[webmail]\nmanagesieve_port = 70000\n", "a port, 1 to 65535"),
    ("[webmail]\nmanagesieve_port = \"4190\"\n", "must be a whole number"),
    ('[webmail]\nplugins = ["../evil"]\n', "is not a Roundcube plugin name"),
    ('[webmail]\ndatabase = "roundcube.sqlite"\n', "an absolute path to an SQLite file"),
    ('[webmail]\nimap_host = "localhost:143\' ; evil"\n', "a host, host:port or ssl://host:port"),
    ('[webmail]\nproduct_name = "two\\nlines"\n', "one line of text"),
    ("[webmail]\nlisten = 1\n", "unknown key"),
    ("[sieve]\nenabled = false\n", "would never run"),
])
def test_bad_values_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    cfg_path = site(tmp_path, text)
    with pytest.raises(ConfigurationError, match=message):
        webmail.render_files(config.load(str(cfg_path)))
    r = vmailctl(cfg_path, "webmail-config")
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"vmailctl: error: {cfg_path}:") and message in line


def test_output_writes_once_and_then_is_up_to_date(tmp_path: Path) -> None:
    cfg_path = site(tmp_path)
    out = tmp_path / "etc"
    r = vmailctl(cfg_path, "webmail-config", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 4
    assert (out / "roundcube" / "vdeliver.inc.php").stat().st_mode & 0o777 == 0o644
    r = vmailctl(cfg_path, "webmail-config", "--output", str(out))
    assert r.stdout == f"{out}: up to date\n"
    r = vmailctl(cfg_path, "webmail-config", "--file", webmail.ROUNDCUBE_FILE)
    assert r.returncode == 0 and r.stdout.startswith("<?php\n")
    r = vmailctl(cfg_path, "webmail-config", "--file", "nope")
    assert r.returncode == 1 and "no generated file 'nope'" in r.stderr
    r = vmailctl(cfg_path, "webmail-config", "--bogus")
    assert r.returncode == 1 and "unexpected argument '--bogus'" in r.stderr
    r = vmailctl(cfg_path, "webmail-config", "--help")
    assert r.returncode == 0 and "Roundcube" in r.stdout


@pytest.mark.peers
def test_php_accepts_the_fragment(tmp_path: Path) -> None:
    php = require("php")["php"]
    path = tmp_path / "vdeliver.inc.php"
    path.write_text(webmail.render_files(config.load(str(site(tmp_path))))[webmail.ROUNDCUBE_FILE])
    code = f"$config = ['plugins' => ['archive']]; include '{path}'; echo json_encode($config);"
    r = subprocess.run([php, "-r", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    import json

    got = json.loads(r.stdout)
    assert got["plugins"] == ["archive", "managesieve", "vdeliver"]
    assert got["managesieve_mbox_encoding"] == "UTF-8" and got["managesieve_vacation"] == 1
    plugin = tmp_path / "vdeliver.php"
    plugin.write_text(webmail.render_files(config.load(str(site(tmp_path))))[webmail.PLUGIN_FILE])
    r = subprocess.run([php, "-l", str(plugin)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
