"""cli.py in-process: argument parsing never raises anything but UsageError; bugs defer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import ROOT
from vdeliver import cli, errors
from vdeliver.cli import UsageError, parse_args


def test_sendmail_form() -> None:
    a = parse_args(["-t", "-Y", "-a", "away.com", "-a", "fred@vm"])
    assert a.a == ["away.com", "fred@vm"] and a.d is None and a.sender is None


def test_attached_values_and_grouped_flags() -> None:
    a = parse_args(["-tYfsender@x", "-aaway.com", "-afred", "-c/etc/x.toml"])
    assert a.sender == "sender@x" and a.a == ["away.com", "fred"] and a.config == "/etc/x.toml"
    b = parse_args(["--config=/c", "--dry-run", "-d", "fred@away.com"])
    assert b.config == "/c" and b.dry_run and b.d == "fred@away.com"
    c = parse_args(["-a", "away.com", "-d", "fred"])
    assert c.a == ["away.com"] and c.d == "fred"


@given(st.lists(st.sampled_from(["-a", "-d", "-f", "-c", "-t", "-Y", "-x", "--", "--dry-run", "--help", "x", "",
                                 "-", "-aX", "-tq", "--config", "--version=1", "-p", "-o"]) | st.text(max_size=6),
                max_size=8))
def test_any_argv_parses_or_is_a_usage_error(argv: list[str] | str) -> None:
    if isinstance(argv, str):
        argv = [argv]
    try:
        parse_args(argv)
    except UsageError as exc:
        assert exc.status.exit_code() == errors.EX_TEMPFAIL
        assert "\n" not in exc.status.text()


def test_internal_error_defers_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(cli, "parse_args", boom)
    monkeypatch.setattr(cli, "_drain", lambda fd=0: None)
    assert cli.main(["-a", "away.com", "-a", "fred"]) == 75
    err = capsys.readouterr().err
    first = err.splitlines()[0]  # a second line is the log's stderr fallback when there is no /dev/log
    assert first.startswith("vdeliver: 4.3.0 internal error") and "ZeroDivisionError" in first
    assert "Traceback" not in err


def test_exit_codes_table() -> None:
    assert errors.exit_code("2.0.0") == 0
    assert errors.exit_code("5.1.1") == 67
    assert errors.exit_code("5.1.2") == 67
    assert errors.exit_code("5.4.6") == 69
    assert errors.exit_code("5.2.2") == 73
    assert errors.exit_code("5.7.1") == 77  # a Sieve reject: EX_NOPERM, its reason in the DSN
    assert errors.exit_code("5.7.2") == 69
    for dsn in ("4.2.0", "4.3.0", "4.3.5", "4.2.2", "9.9.9", ""):
        assert errors.exit_code(dsn) == 75


def test_errno_mapping() -> None:
    import errno

    assert errors.status_for_errno(errno.ENOSPC, "x").temporary
    assert errors.status_for_errno(errno.ENOSPC, "x", over_quota_bounce=True).temporary
    assert errors.status_for_errno(errno.EDQUOT, "x").dsn == "4.2.2"
    assert errors.status_for_errno(errno.EDQUOT, "x", over_quota_bounce=True).dsn == "5.2.2"
    assert errors.status_for_errno(errno.EIO, "x").dsn == "4.3.0"


def test_delivery_path_imports_stay_small() -> None:
    """The hot path must not import the heavy modules (see benchmarks for the cost)."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv=['vdeliver','--version'];"
        "from vdeliver.cli import main; import vdeliver.deliver, vdeliver.message, vdeliver.mbox, vdeliver.maildir,"
        " vdeliver.config, vdeliver.recipient, vdeliver.log, vdeliver.locking;"
        "heavy={'re','typing','tomllib','argparse','socket','enum','dataclasses','email','tempfile','logging',"
        "'os','posixpath','_collections_abc'};"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_launcher_runs_vdeliver_without_site(tmp_path: "object") -> None:
    import os
    import subprocess
    from pathlib import Path

    from vdeliver import launcher

    path = Path(str(tmp_path)) / "vdeliver"
    assert launcher.main([str(path)]) == 0
    text = path.read_text()
    assert text.startswith("#!/bin/sh\n") and " -IS -c " in text
    assert os.stat(path).st_mode & 0o777 == 0o755
    done = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30, env={})
    assert done.returncode == 0 and done.stdout.startswith("vdeliver ")
    assert launcher.main([]) == 2
