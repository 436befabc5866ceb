"""The compiled-script cache: a script is compiled once, not at every delivery.

`<script>.vdc` beside the script (for the active script, `~/.dovecot.sieve.vdc`, beside its
`.log`) holds the compiled form (compiled.dump()) with the exact bytes of the script and of
every script its include tree read when it was compiled.  It is used only when all of them
are still byte for byte the same, so a script changed, replaced or renamed over, or an
included one changed, added or removed, is compiled again at once: no timestamps, which a
quick edit within the same second would defeat.

Trust: the file is opened without following a symlink and used only when the process's own
user owns it and nobody else can write it (mode without group or other write); anything
else is ignored, as is a file that does not read back (truncated, another format, another
Python).  It is written to a new file and renamed over the old one, 0600, so a reader sees
the old file or the new one whole; when the directory cannot be written (a global script in
/etc), there is no cache, and nothing fails.

With a cache hit, a delivery imports nothing of the lexer, parser or validator: compiled.py
and marshal build the tree.
"""

from __future__ import annotations

import marshal
import os

from vdeliver.sieve import compiled as form

TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Callable

SUFFIX = ".vdc"
MAX_CACHE = 16 << 20  # bytes: a bigger file is not one of ours
Key = tuple[str, str]  # (location, name) of an included script


def path_for(script: str) -> str:
    return script + SUFFIX


def load(script: str, source: bytes, reread: Callable[[Key], bytes | None]) -> form.Compiled | None:
    """The cached compiled form of `script` whose text is `source`, or None (no cache, not
    ours, stale).  `reread(key)` reads an included script now (None: it does not exist)."""
    try:
        fd = os.open(path_for(script), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not 0 < st.st_size <= MAX_CACHE:
            return None
        data = os.read(fd, st.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        version, cached_source, included, tree = marshal.loads(data)
        if version != (form.FORMAT, marshal.version) or cached_source != source:
            return None
        for location, name, text in included:
            if reread((location, name)) != text:
                return None
        return form.load(tree)
    except (ValueError, EOFError, TypeError):
        return None


def store(script: str, source: bytes, included: dict[Key, bytes | None], compiled: form.Compiled) -> None:
    """Write the cache; never raises (a cache that cannot be written is no cache)."""
    target = path_for(script)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        data = marshal.dumps(((form.FORMAT, marshal.version), source,
                              [(loc, name, text) for (loc, name), text in included.items()], form.dump(compiled)))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except (OSError, ValueError):
        return
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            from vdeliver.fileio import write_all

            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, target)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
