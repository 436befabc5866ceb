"""The cache of the parsed configuration (issue 21): an unchanged file is not parsed again, an
edited one always is, and a cache file anyone else could have written is never read."""

from __future__ import annotations

import marshal
import os
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT, MailRoot, run_vdeliver
from vdeliver import config
from vdeliver.config import ConfigError

SITE = 'format = "maildir"\nlock_timeout = 7\n[lmtp]\nlisten = ["/run/a", "/run/b"]\n'  # tomllib's subset


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("VDELIVER_CACHE_DIR", str(d))
    return d


def _site(tmp_path: Path, text: str = SITE) -> str:
    p = tmp_path / "vdeliver.toml"
    p.write_text(text)
    return str(p)


def _no_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: str, raw: bytes) -> object:
        raise AssertionError("parsed although the cache holds this file")

    monkeypatch.setattr(config, "_parse", refuse)


def test_unchanged_config_is_read_from_the_cache_without_a_parse(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _site(tmp_path)
    first = config.load(path, cache=True)
    cached = config.cache_file(path)
    assert cached is not None and os.path.exists(cached)
    assert os.stat(cached).st_mode & 0o777 == 0o600
    _no_parse(monkeypatch)
    again = config.load(path, cache=True)
    assert (again.format, again.lock_timeout, again.table("lmtp")) == ("maildir", 7, {"listen": ["/run/a", "/run/b"]})
    assert again.where("", "lock_timeout") == first.where("", "lock_timeout") == f"{path}:2: lock_timeout"


def test_stale_cache_after_an_edit_is_not_used(tmp_path: Path, cache_dir: Path) -> None:
    path = _site(tmp_path)
    config.load(path, cache=True)
    st = os.stat(path)
    # Same size, same mtime: an edit within one clock tick, which timestamps alone cannot see.
    Path(path).write_text(SITE.replace("lock_timeout = 7", "lock_timeout = 8"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert config.load(path, cache=True).lock_timeout == 8
    Path(path).write_text("max_message_size = 1000\n" + SITE)
    assert config.load(path, cache=True).max_message_size == 1000


def test_config_error_names_file_and_line_after_a_cached_load(tmp_path: Path, cache_dir: Path) -> None:
    path = _site(tmp_path)
    config.load(path, cache=True)
    Path(path).write_text(SITE.replace("lock_timeout = 7", "lock_timeout = -7"))
    with pytest.raises(ConfigError) as info:
        config.load(path, cache=True)
    assert f"{path}:2: lock_timeout: must not be negative" in info.value.status.text()
    with pytest.raises(ConfigError):  # and again: an error is never cached
        config.load(path, cache=True)


def _forge(path: str, data: dict[str, object]) -> str:
    """A cache file that passes every check but the one under test."""
    raw, identity = config._read_raw(path)
    blob = marshal.dumps((*config._cache_key(path, identity, raw), data, {}))  # type: ignore[arg-type]
    cached = config.cache_file(path)
    assert cached is not None
    fd = os.open(cached, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, blob)
    os.close(fd)
    return cached


def test_forged_cache_is_ignored(tmp_path: Path, cache_dir: Path) -> None:
    path = _site(tmp_path)
    evil: dict[str, object] = {"format": "mbox", "mbox_path": "/tmp/{user}"}
    cached = _forge(path, evil)
    assert config.load(path, cache=True).format == "mbox"  # the control: a well-formed cache is used
    os.chmod(cached, 0o620)  # group-writable: someone else could have written it
    assert config.load(path, cache=True).format == "maildir"
    cached = _forge(path, evil)
    if IS_ROOT:
        os.chown(cached, 65534, 65534)  # another user's file
        assert config.load(path, cache=True).format == "maildir"
        cached = _forge(path, evil)
    os.rename(cached, str(tmp_path / "elsewhere"))
    os.symlink(tmp_path / "elsewhere", cached)  # a symlink is never followed
    assert config.load(path, cache=True).format == "maildir"
    os.unlink(cached)
    Path(cached).write_bytes(b"\x00garbage")
    os.chmod(cached, 0o600)
    assert config.load(path, cache=True).format == "maildir"
    other = tmp_path / "other.toml"
    other.write_text(SITE)
    _forge(str(other), evil)
    os.rename(config.cache_file(str(other)) or "", cached)  # another file's cache under this name
    assert config.load(path, cache=True).format == "maildir"


def test_cache_is_not_written_into_a_directory_others_can_write(tmp_path: Path, cache_dir: Path) -> None:
    path = _site(tmp_path)
    os.chmod(cache_dir, 0o777)
    assert config.load(path, cache=True).format == "maildir"
    assert os.listdir(cache_dir) == []
    os.chmod(cache_dir, 0o1777)  # sticky, as /tmp: nobody can replace our file
    config.load(path, cache=True)
    assert len(os.listdir(cache_dir)) == 1


def test_value_marshal_cannot_take_means_no_cache(tmp_path: Path, cache_dir: Path) -> None:
    path = _site(tmp_path, '[dovecot]\nwhen = 1979-05-27\n')
    config.load(path, cache=True)
    assert os.listdir(cache_dir) == []


def test_unwritable_cache_dir_still_delivers(mailroot: MailRoot) -> None:
    locked = mailroot.base / "root-only"
    locked.mkdir(mode=0o755)  # owned by root (or the test user): vmail cannot write here
    mailroot.add_maildir("away.com", "fred")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C", "VDELIVER_CACHE_DIR": str(locked)}
    for _ in range(2):
        proc = run_vdeliver(["-a", "away.com", "-a", "fred"], b"Subject: x\n\nhello\n", config=mailroot.config,
                            as_user=mailroot.owner, env=env)
        assert proc.returncode == 0, proc.stderr
    assert len(os.listdir(mailroot.home / "away.com" / "fred" / "Maildir" / "new")) == 2
    if IS_ROOT:
        assert os.listdir(locked) == []


def test_cli_fills_and_uses_the_cache(mailroot: MailRoot) -> None:
    cache = mailroot.base / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, mailroot.owner.uid, mailroot.owner.gid)
    mailroot.add_mbox("away.com", "fred")
    env = {"PATH": "/usr/bin:/bin", "LANG": "C", "VDELIVER_CACHE_DIR": str(cache)}
    for _ in range(2):
        proc = run_vdeliver(["-a", "away.com", "-a", "fred"], b"Subject: x\n\nhello\n", config=mailroot.config,
                            as_user=mailroot.owner, env=env)
        assert proc.returncode == 0, proc.stderr
    names = os.listdir(cache)
    assert len(names) == 1 and names[0].startswith(f"config.{mailroot.owner.uid}.")
    assert (mailroot.vbox / "away.com" / "fred").read_bytes().count(b"\nhello\n") == 2
