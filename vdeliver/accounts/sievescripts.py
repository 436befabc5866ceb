"""`vmailctl sieve ...`: a user's Sieve scripts, in the layout Dovecot's managesieved keeps.

    <home>/sieve/NAME.sieve      the scripts
    <home>/.dovecot.sieve        the active one: a symbolic link to sieve/NAME.sieve

`<home>` is the home the generated Dovecot configuration gives the user (`[dovecot] home`,
by default the Maildir template's parent), so ManageSieve, webmail and vmailctl all see the
same files.  Every file operation runs with the vmail user's ids (root's rights are never
used in a directory vmail owns): scripts are written 0600 through a temporary name and
renamed into place, the link is made beside and renamed over the old one.  `put` refuses a
script that does not compile, as managesieved does, and `delete` refuses the active script.

A folder the script names in a constant string (`fileinto "Foo.lock"`, `:fcc`) that the
mailbox's format cannot hold (vdeliver.sieve.delivery.folder_problem: names Dovecot hides)
is reported by `check` as an error and by `put` as a warning (the script is stored: it
compiles, and managesieved would store it too); at delivery such a message stays in the INBOX.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vdeliver.accounts.errors import Conflict, InvalidName, NotFound
from vdeliver.config import Config
from vdeliver.sieve.compiled import Compiled, Node

ACTIVE = ".dovecot.sieve"
DIRECTORY = "sieve"
MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Layout:
    home: str

    @property
    def directory(self) -> str:
        return os.path.join(self.home, DIRECTORY)

    @property
    def active_link(self) -> str:
        return os.path.join(self.home, ACTIVE)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, check_name(name) + ".sieve")


def check_name(name: str) -> str:
    """A script name managesieved would accept: not empty, no '/', no control characters,
    not starting with '.'."""
    if not name or len(name.encode("utf-8")) > MAX_NAME:
        raise InvalidName(f"script name must be 1 to {MAX_NAME} bytes")
    if "/" in name or name.startswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidName(f"invalid script name {name[:60]!r} (no '/', no control characters, no leading '.')")
    return name


def layout(cfg: Config, user: str, domain: str) -> Layout:
    from vdeliver.accounts.dovecot import Settings
    from vdeliver.deliver import expand
    from vdeliver.recipient import Recipient

    home = expand(Settings(cfg, lookup_uid=False).home, Recipient(domain, user))
    return Layout(home)


def scripts(lay: Layout) -> list[tuple[str, bool]]:
    """(name, active) for each script, by name."""
    active = active_name(lay)
    try:
        names = sorted(n[:-6] for n in os.listdir(lay.directory) if n.endswith(".sieve") and not n.startswith("."))
    except FileNotFoundError:
        return []
    return [(n, n == active) for n in names]


def active_name(lay: Layout) -> str | None:
    try:
        target = os.readlink(lay.active_link)
    except (FileNotFoundError, OSError):
        return None
    base = os.path.basename(target)
    if os.path.dirname(target).rstrip("/") not in (DIRECTORY, lay.directory) or not base.endswith(".sieve"):
        return None
    return base[:-6]


def read(lay: Layout, name: str) -> bytes:
    try:
        fd = os.open(lay.path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no script {name!r}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def put(lay: Layout, name: str, text: bytes, fmt: str = "") -> list[tuple[int, str]]:
    """Store the script; the folders it names that a mailbox of format `fmt` cannot hold
    (folder_problems()), for the caller to warn about."""
    from vdeliver import fileio
    from vdeliver.sieve.errors import SieveError
    from vdeliver.sieve.validator import compile_script

    path = lay.path(name)
    try:
        compiled = compile_script(text)
    except SieveError as exc:
        raise InvalidName("script does not compile: " + "; ".join(str(e) for e in exc.errors)) from None
    os.makedirs(lay.directory, mode=0o700, exist_ok=True)
    fileio.replace(path, text, 0o600)
    return folder_problems(compiled, fmt) if fmt else []


def activate(lay: Layout, name: str) -> None:
    if not os.path.isfile(lay.path(name)):
        raise NotFound(f"no script {name!r}")
    from vdeliver import fileio

    fileio.replace_symlink(os.path.join(DIRECTORY, name + ".sieve"), lay.active_link)


def deactivate(lay: Layout) -> bool:
    if not os.path.islink(lay.active_link):
        return False
    os.unlink(lay.active_link)
    return True


def delete(lay: Layout, name: str) -> None:
    if active_name(lay) == name:
        raise Conflict(f"script {name!r} is active: deactivate it or activate another first")
    try:
        os.unlink(lay.path(name))
    except FileNotFoundError:
        raise NotFound(f"no script {name!r}") from None


def check(lay: Layout, name: str | None, fmt: str = "") -> list[tuple[int, str]]:
    """The errors of a script (the active one when no name), with their lines; with the
    mailbox's format, also the folders it names that the format cannot hold."""
    from vdeliver.sieve.errors import SieveError
    from vdeliver.sieve.validator import compile_script

    if name is None:
        name = active_name(lay)
        if name is None:
            raise NotFound("no active script")
    try:
        compiled = compile_script(read(lay, name))
    except SieveError as exc:
        return [(e.line, e.message) for e in exc.errors]
    return folder_problems(compiled, fmt) if fmt else []


def folder_problems(compiled: Compiled, fmt: str) -> list[tuple[int, str]]:
    """The folders named in constant strings (`fileinto`, `:fcc`) that a mailbox of this format
    cannot hold, with their lines, in order.  A name made with variables is known only at
    delivery, where it is checked the same way."""
    from vdeliver.sieve.delivery import folder_problem

    out: list[tuple[int, str]] = []

    def visit(nodes: tuple[Node, ...], variables: bool) -> None:
        for node in nodes:
            named = [(node.name, node.args[0])] if node.name == "fileinto" and node.args else []
            named += [(":fcc", node.tags["fcc"])] if "fcc" in node.tags else []
            for what, folder in named:
                if not isinstance(folder, str) or folder.upper() == "INBOX" or (variables and "${" in folder):
                    continue
                why = folder_problem(fmt, folder)
                if why:
                    out.append((node.line, (f"{what} {folder!r}: invalid folder name for this {fmt} mailbox "
                                            f"({why}); the message would be kept in the INBOX")))
            visit(node.block or (), variables)

    visit(compiled.commands, "variables" in compiled.extensions)
    for included in compiled.includes.values():
        out += folder_problems(included, fmt)
    return out
