"""The launcher sendmail's mailer line runs (issue 15, items 1 and 7).

sendmail starts a mailer with argv[0] exactly as the mailer line writes it and an empty
environment.  The launcher must work under those conditions, and the one failure that
happens before vdeliver's own exit-code table applies (the import) must defer (75).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.helpers import PACKAGE, SYSTEM_PYTHON, world_tmpdir
from vdeliver import launcher


def _write(tmp: Path, libdir: Path) -> Path:
    path = tmp / "vdeliver"
    launcher.write(str(path), python=SYSTEM_PYTHON, libdir=str(libdir))
    return path


def test_launcher_runs_with_empty_environment_and_bare_argv0(tmp_path: Path) -> None:
    lib = world_tmpdir("vdeliver-launcher-")
    shutil.copytree(PACKAGE, lib / "vdeliver", ignore=shutil.ignore_patterns("__pycache__"))
    path = _write(tmp_path, lib)
    result = subprocess.run(["vdeliver", "--version"], executable=str(path), env={}, capture_output=True,
                            timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    assert b"vdeliver" in result.stdout + result.stderr


def test_launcher_exits_75_not_1_when_vdeliver_cannot_be_imported(tmp_path: Path) -> None:
    path = _write(tmp_path, tmp_path / "no-such-venv")
    result = subprocess.run(["vdeliver", "-a", "away.com", "-a", "fred"], executable=str(path), env={},
                            input=b"From a@b Sat Dec  5 09:00:00 2026\n\nx\n", capture_output=True, timeout=30)
    assert result.returncode == 75, result
    assert result.stderr.startswith(b"vdeliver: 4.3.0 cannot load vdeliver from "), result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_launcher_interpreter_path_is_absolute() -> None:
    text = launcher.render()
    assert text.startswith("#!/bin/sh\n")
    (py_line,) = [line for line in text.splitlines() if line.startswith("PY=")]
    assert py_line.startswith("PY='/") and ' -IS -c ' in text


def test_launcher_exits_75_when_its_interpreter_has_gone(tmp_path: Path) -> None:
    """A Python upgrade removes the interpreter: a `#!python` script then fails in execve()
    and sendmail bounces; the launcher defers instead."""
    path = tmp_path / "vdeliver"
    launcher.write(str(path), python="/usr/bin/python3.9-removed-by-an-upgrade", libdir=str(tmp_path))
    result = subprocess.run(["vdeliver", "-a", "away.com", "-a", "fred"], executable=str(path), env={},
                            input=b"x\n", capture_output=True, timeout=30)
    assert result.returncode == 75, result
    assert b"interpreter /usr/bin/python3.9-removed-by-an-upgrade is missing" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_launcher_names_the_missing_directory(tmp_path: Path, capsys: object) -> None:
    target = tmp_path / "libexec" / "vdeliver"
    assert launcher.main([str(target)]) == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert f"directory {tmp_path / 'libexec'} does not exist" in err
    assert f"mkdir -p {tmp_path / 'libexec'}" in err
    (tmp_path / "libexec").mkdir()
    assert launcher.main([str(target)]) == 0
    assert target.stat().st_mode & 0o777 == 0o755


def test_direct_launcher_runs_with_empty_environment_and_bare_argv0(tmp_path: Path) -> None:
    """`--direct` (issue 21): a `#!python -IS` script, no /bin/sh; the same conditions hold."""
    lib = world_tmpdir("vdeliver-launcher-")
    shutil.copytree(PACKAGE, lib / "vdeliver", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "vdeliver"
    launcher.write(str(path), python=SYSTEM_PYTHON, libdir=str(lib), direct=True)
    assert path.read_text().startswith(f"#!{SYSTEM_PYTHON} -IS\n")
    result = subprocess.run(["vdeliver", "--version"], executable=str(path), env={}, capture_output=True,
                            timeout=30, cwd="/")
    assert result.returncode == 0, result.stderr
    assert b"vdeliver" in result.stdout + result.stderr


def test_direct_launcher_exits_75_not_1_when_vdeliver_cannot_be_imported(tmp_path: Path) -> None:
    path = tmp_path / "vdeliver"
    launcher.write(str(path), python=SYSTEM_PYTHON, libdir=str(tmp_path / "no-such-venv"), direct=True)
    result = subprocess.run(["vdeliver", "-a", "away.com", "-a", "fred"], executable=str(path), env={},
                            input=b"From a@b Sat Dec  5 09:00:00 2026\n\nx\n", capture_output=True, timeout=30)
    assert result.returncode == 75, result
    assert result.stderr.startswith(b"vdeliver: 4.3.0 cannot load vdeliver from "), result.stderr


def test_direct_launcher_refuses_an_interpreter_path_a_shebang_cannot_carry() -> None:
    import pytest

    with pytest.raises(ValueError, match="#! line"):
        launcher.render(python="/opt/my python/bin/python3", libdir="/opt/x", direct=True)
