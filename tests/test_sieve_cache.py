"""The compiled-script cache (vdeliver/sieve/compiled.py): compiled once, used only while the script
and everything it includes are byte for byte the same, never trusted when another user could
have written it, and a delivery with a cache hit imports nothing of the compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import IS_ROOT
from tests.test_sieve_validator import VALID
from vdeliver.sieve import compiled
from vdeliver.sieve import compiled as cache
from vdeliver.sieve.validator import compile_script

ROOT = Path(__file__).resolve().parent.parent
MAIN = b'require ["include", "fileinto"];\ninclude "other";\nfileinto "Main";'
OTHER = b'require "fileinto";\nfileinto "Other";'


@pytest.mark.parametrize("script", VALID, ids=[repr(v[:40]) for v in VALID])
def test_the_byte_form_gives_back_the_same_tree(script: bytes) -> None:
    c = compile_script(script)
    assert compiled.load(compiled.dump(c)) == c


def test_an_include_tree_is_written_once() -> None:
    scripts = {"a": b'require "include";\ninclude "b";', "b": b"keep;"}
    c = compile_script(b'require "include";\ninclude "a";\ninclude "b";', resolve=lambda _loc, n: scripts.get(n))
    back = compiled.load(compiled.dump(c))
    assert back == c and back.includes[("personal", "a")].includes is back.includes


def _setup(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], bytes | None]]:
    script = tmp_path / "main.sieve"
    script.write_bytes(MAIN)
    (tmp_path / "other.sieve").write_bytes(OTHER)
    included: dict[tuple[str, str], bytes | None] = {}

    def resolve(location: str, name: str) -> bytes | None:
        included[(location, name)] = text = reread((location, name), tmp_path)
        return text

    cache.store_cached(str(script), MAIN, included, compile_script(MAIN, resolve=resolve))
    return script, included


def reread(key: tuple[str, str], where: Path) -> bytes | None:
    path = where / f"{key[1]}.sieve"
    return path.read_bytes() if path.exists() else None


def test_a_hit_while_nothing_changed(tmp_path: Path) -> None:
    script, _ = _setup(tmp_path)
    path = Path(cache.path_for(str(script)))
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    hit = cache.load_cached(str(script), MAIN, lambda key: reread(key, tmp_path))
    assert hit == compile_script(MAIN, resolve=lambda _loc, name: reread(("personal", name), tmp_path))


def test_a_changed_script_or_include_is_a_miss(tmp_path: Path) -> None:
    script, _ = _setup(tmp_path)
    changed = MAIN.replace(b"Main", b"Mine")  # same length: size and a same-second mtime would not tell
    assert cache.load_cached(str(script), changed, lambda key: reread(key, tmp_path)) is None
    (tmp_path / "other.sieve").write_bytes(OTHER.replace(b"Other", b"Otter"))
    assert cache.load_cached(str(script), MAIN, lambda key: reread(key, tmp_path)) is None
    (tmp_path / "other.sieve").unlink()
    assert cache.load_cached(str(script), MAIN, lambda key: reread(key, tmp_path)) is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "group-writable", "symlink", "other-owner"])
def test_a_cache_that_cannot_be_trusted_is_ignored(tmp_path: Path, damage: str) -> None:
    script, _ = _setup(tmp_path)
    path = Path(cache.path_for(str(script)))
    if damage == "garbage":
        path.write_bytes(b"\x00not marshal")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "group-writable":
        path.chmod(0o620)
    elif damage == "symlink":
        real = tmp_path / "elsewhere"
        path.rename(real)
        path.symlink_to(real)
    else:
        if not IS_ROOT:
            pytest.skip("needs root to give the file to another user")
        os.chown(path, 65534, 65534)
    assert cache.load_cached(str(script), MAIN, lambda key: reread(key, tmp_path)) is None


def test_an_unwritable_directory_means_no_cache(tmp_path: Path) -> None:
    cache.store_cached(str(tmp_path / "missing" / "x.sieve"), b"keep;", {}, compile_script(b"keep;"))
    assert not list(tmp_path.rglob("*.vdc*"))


def test_a_delivery_with_a_cache_hit_does_not_import_the_compiler(tmp_path: Path) -> None:
    """The second delivery for a user reads the compiled form; a changed script is compiled
    again at once, and what it does changes with it."""
    home = tmp_path / "home" / "example.org" / "fred"
    (home / "sieve").mkdir(parents=True)
    for folder in ("", ".A", ".B"):
        for sub in ("cur", "new", "tmp"):
            (home / "Maildir" / folder / sub).mkdir(parents=True, exist_ok=True)
    (home / "sieve" / "main.sieve").write_bytes(b'require "fileinto";\nfileinto "A";')
    (home / ".dovecot.sieve").symlink_to("sieve/main.sieve")
    code = (
        "import os, sys\n"
        "from vdeliver import config\n"
        "from vdeliver.deliver import deliver\n"
        "from vdeliver.recipient import Recipient\n"
        f"cfg = config.build({{'format': 'maildir', 'maildir_path': '{tmp_path}/home/{{domain}}/{{user}}/Maildir',"
        f" 'spool_dir': '{tmp_path}', 'log': 'none', 'sieve': {{'enabled': True}}}})\n"
        f"fd = os.open('{tmp_path}/m.eml', os.O_RDONLY)\n"
        "deliver(cfg, Recipient('example.org', 'fred'), fd, 'a@example.org')\n"
        "print(sorted(m for m in sys.modules if m.startswith('vdeliver.sieve')))\n"
    )
    (tmp_path / "m.eml").write_bytes(b"From: a@example.org\nSubject: x\n\nbody\n")

    def delivery() -> str:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        return done.stdout

    assert "vdeliver.sieve.validator" in delivery()  # the first compiles, and writes the cache
    second = delivery()
    assert "vdeliver.sieve.validator" not in second and "vdeliver.sieve.parser" not in second
    assert len(os.listdir(home / "Maildir" / ".A" / "new")) == 2
    (home / "sieve" / "main.sieve").write_bytes(b'require "fileinto";\nfileinto "B";')  # same size
    assert "vdeliver.sieve.validator" in delivery()
    assert len(os.listdir(home / "Maildir" / ".B" / "new")) == 1


def test_a_resident_server_reuses_a_compiled_script_until_it_changes(tmp_path: Path) -> None:
    """In one process (the LMTP server): the memo serves the script while it and the script it
    includes read the same; a change to either, even of the same size, is seen at once."""
    from vdeliver.sieve import delivery

    home = tmp_path / "home"
    (home / "sieve").mkdir(parents=True)
    (home / "sieve" / "inc.sieve").write_bytes(b'require "fileinto";\nfileinto "A";')
    script = home / ".dovecot.sieve"
    script.write_bytes(b'require "include";\ninclude "inc";')
    opts = delivery.Settings()
    first = delivery._compile(opts, str(script), str(home))
    assert delivery._compile(opts, str(script), str(home)) is first  # from the memo
    (home / "sieve" / "inc.sieve").write_bytes(b'require "fileinto";\nfileinto "B";')
    changed = delivery._compile(opts, str(script), str(home))
    assert changed is not first
    assert changed.includes[("personal", "inc")].commands[0].args == ("B",)
    script.write_bytes(b'require "include";\ninclude "inc";\n')
    assert delivery._compile(opts, str(script), str(home)) is not changed
