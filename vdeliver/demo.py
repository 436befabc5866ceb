"""`make demo`: a whole virtual-hosting set-up in ./demo-out, on the embedded SQLite default.

It runs the same commands an administrator would: vmailctl creates two domains that share
the user name `fred` (one mbox, one Maildir), an alias, a forward, a disabled account and
a quota, and builds the sendmail maps; then vdeliver is run exactly as sendmail runs it
(`-t -Y -a $h -a $u`, the message with sendmail's From_ line on stdin) for each
recipient of one envelope, and the demo shows where every message went, what the
mailboxes hold and what each exit code told sendmail.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("demo-out")
EXIT_MEANING = {0: "delivered", 67: "unknown user: sendmail bounces", 69: "bounce", 73: "bounce (mailbox full)",
                75: "temporary: sendmail keeps it queued and retries"}


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text} " + "=" * max(0, 72 - len(text)))


def vmailctl(cfg: Path, *args: str, stdin: str | None = None, show: bool = True) -> str:
    if show:
        say(f"$ vmailctl {' '.join(args)}")
    done = subprocess.run([sys.executable, "-m", "vdeliver.accounts.vmailctl", "-c", str(cfg), *args], input=stdin,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        say(done.stdout + done.stderr)
        raise SystemExit(f"demo: vmailctl {' '.join(args)} failed with exit {done.returncode}")
    return done.stdout


def write_config(out: Path) -> Path:
    me = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    makemap = shutil.which("makemap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or ""
    cfg = out / "vdeliver.toml"
    cfg.write_text(
        "# Written by `make demo`: everything lives under demo-out/.\n"
        f'mbox_path = "{out.resolve()}/vbox/{{domain}}/{{user}}"\n'
        f'maildir_path = "{out.resolve()}/vmail-users/{{domain}}/{{user}}/Maildir"\n'
        'log = "stderr"\n'
        f'user = "{me}"            # the user deliveries run as (sendmail: U=vmail:vmail)\n'
        "\n[accounts]\n"
        f'database = "{out.resolve()}/accounts.sqlite"\n'
        f'vmail_user = "{me}"\n'
        f'vmail_group = "{group}"\n'
        "\n[maps]\n"
        f'directory = "{out.resolve()}/maps"\n'
        f'makemap = "{makemap}"\n'
    )
    return cfg


MESSAGE = (
    "From barney@bedrock.example {date}\n"
    "Received: (from barney@localhost) by hub.example; {date}\n"
    "From: Barney <barney@bedrock.example>\n"
    "To: fred@away.com, fred@home.com, postmaster@away.com\n"
    "Subject: bowling tonight?\n"
    "Message-ID: <demo-1@bedrock.example>\n"
    "\n"
    "Fred, bowling at eight.\n"
    "From the quarry, Barney\n"
)


def deliver(cfg: Path, domain: str, user: str, message: bytes) -> int:
    argv = ["-I", "-m", "vdeliver", "-c", str(cfg), "-t", "-Y", "-a", domain, "-a", user]
    say(f"$ vdeliver -t -Y -a {domain} -a {user} < message")
    done = subprocess.run([sys.executable, *argv], input=message, capture_output=True, timeout=60)
    for line in done.stderr.decode(errors="replace").splitlines():
        say(f"    {line}")
    say(f"    exit {done.returncode}: {EXIT_MEANING.get(done.returncode, 'bounce')}")
    return done.returncode


def show_tree(out: Path) -> None:
    for top in ("vbox", "vmail-users"):
        base = out / top
        for path in sorted(base.rglob("*")):
            if path.is_file():
                rel = path.relative_to(out)
                mode = oct(path.stat().st_mode & 0o777)[2:]
                say(f"    {mode}  {path.stat().st_size:6d}  {rel}")


def main() -> int:
    started = time.time()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(mode=0o755)
    cfg = write_config(OUT)
    (OUT / "maps").mkdir(mode=0o755)

    heading("1. accounts in SQLite (demo-out/accounts.sqlite)")
    for domain in ("away.com", "home.com"):
        vmailctl(cfg, "domain", "add", domain)
    vmailctl(cfg, "user", "add", "--format", "mbox", "--password-stdin", "fred@away.com", stdin="yabba-dabba\n")
    vmailctl(cfg, "user", "add", "--format", "maildir", "--password-stdin", "fred@home.com", stdin="doo\n")
    vmailctl(cfg, "user", "add", "--format", "maildir", "--quota", "10M", "--no-password", "wilma@home.com")
    vmailctl(cfg, "user", "add", "--format", "mbox", "--no-password", "dino@away.com")
    vmailctl(cfg, "user", "disable", "dino@away.com")
    vmailctl(cfg, "alias", "add", "postmaster@away.com", "fred@away.com")
    vmailctl(cfg, "forward", "set", "--keep-copy", "wilma@home.com", "fred@home.com")
    say()
    say(vmailctl(cfg, "user", "list", show=True).rstrip())

    heading("2. sendmail maps generated from the database (demo-out/maps)")
    vmailctl(cfg, "maps", "build")
    for name in ("virtusertable", "access.in"):
        path = OUT / "maps" / name
        if path.exists():
            say(f"--- {name}")
            for line in path.read_text().splitlines():
                if line and not line.startswith("#"):
                    say(f"    {line}")

    heading("3. one envelope, split by the incoming sendmail, delivered by vdeliver")
    date = time.strftime("%a %b %d %H:%M:%S %Y")
    message = MESSAGE.format(date=date).encode()
    # What the outgoing sendmail runs, one process per recipient ($h, $u):
    # fred@away.com and fred@home.com are two mailboxes: no name folding.
    # postmaster@away.com is an alias: the virtusertable already rewrote it to fred@away.com.
    codes = {
        "fred@away.com": deliver(cfg, "away.com", "fred@hub.example", message),
        "fred@home.com": deliver(cfg, "home.com.virtuser.", "<fred@home.com>", message),
        "postmaster@away.com (alias of fred@away.com)": deliver(cfg, "away.com", "fred", message),
    }
    say()
    say("and what sendmail hears when things are not right:")
    codes["nobody@away.com"] = deliver(cfg, "away.com", "nobody", message)
    codes["a hostile argument"] = deliver(cfg, "away.com", "../../etc/passwd", message)

    heading("4. where the messages went")
    show_tree(OUT)
    mbox = OUT / "vbox" / "away.com" / "fred"
    say()
    say(f"--- {mbox} (an mbox: {mbox.read_bytes().count(b'From barney')} messages)")
    for line in mbox.read_text(errors="replace").splitlines()[:12]:
        say(f"    {line}")
    new = sorted((OUT / "vmail-users" / "home.com" / "fred" / "Maildir" / "new").iterdir())
    if new:
        say()
        say(f"--- {new[0]} (a Maildir file: ,S= is its size, ,W= its size with CRLF, as IMAP reports)")
        for line in new[0].read_text(errors="replace").splitlines()[:4]:
            say(f"    {line}")

    heading("summary")
    for who, code in codes.items():
        say(f"    {who:45s} exit {code:3d}  {EXIT_MEANING.get(code, 'bounce')}")
    say()
    say(f"Everything is in {OUT.resolve()} (config: {cfg}). Took {time.time() - started:.1f}s.")
    say("Next: `make test` runs the whole suite against real sendmail, Dovecot, PostgreSQL and procmail.")
    ok = codes["fred@away.com"] == 0 and codes["fred@home.com"] == 0 and codes["nobody@away.com"] == 67
    return 0 if ok and codes["a hostile argument"] == 75 else 1


if __name__ == "__main__":
    raise SystemExit(main())
