"""What a user's Sieve script costs a delivery: vdeliver beside dovecot-lda (Pigeonhole).

    python -m benchmarks.sieve_bench [--messages N] [--reps R] [--out FILE]

One Maildir user on a private tree under /tmp, delivered to by a fresh process per message
(as sendmail runs a local mailer), as the vmail user when run as root:

- `vdeliver`: the production launcher (`/usr/bin/python3 -I`, the package byte-compiled),
  `[sieve] enabled = true`; once without an active script, once with RULES, a 30-rule script
  of the kind Roundcube's filter editor writes (`# rule:[...]` blocks of anyof/allof tests
  ending in fileinto and stop, plus flags);
- `dovecot-lda`: Debian's 2.3.19, without the sieve plugin, then with it and the same script
  (Pigeonhole compiles it to a .svbin beside the script on the first delivery; the warm-up
  delivery pays for that, as vdeliver's warm-up fills its cache).

The message matches none of the rules, so every test of the script runs and the message ends
in the INBOX.  Reported: the median wall time per delivery of each case over `reps` runs of
`messages` deliveries, and the ratios the issue sets goals for (vdeliver with the script over
vdeliver without it: at most 1.2; vdeliver with the script over dovecot-lda with it: below 1).
Every delivery is checked: each case's INBOX must hold exactly what was delivered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchmarks.agents import SYSTEM_PYTHON, install_vdeliver, spawn

DOMAIN = "bench.example"
FOLDERS = [f"Rules.R{i}" for i in range(1, 31)]


def rules() -> bytes:
    """30 rules as Roundcube's managesieve plugin writes them."""
    out = ['require ["fileinto","imap4flags","envelope","relational","comparator-i;ascii-numeric"];']
    for i in range(1, 31):
        kind = i % 6
        out.append(f"# rule:[Rule {i}]")
        if kind == 0:
            test = f'anyof (header :contains "subject" "project-{i}", address :is "from" "boss{i}@example.com")'
        elif kind == 1:
            test = f'header :contains "list-id" "<list{i}.lists.example.org>"'
        elif kind == 2:
            test = f'allof (address :domain :is "from" "partner{i}.example", header :contains "subject" "invoice")'
        elif kind == 3:
            test = f'anyof (header :contains ["to", "cc"] "team{i}@example.org", envelope :is "from" "robot{i}@ex.org")'
        elif kind == 4:
            test = (f'allof (header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "{i}", '
                    f'not header :contains "subject" "[ok]")')
        else:
            test = f'header :matches "subject" "*ticket #{i}*"'
        action = (f'\tfileinto "Rules.R{i}";\n\tstop;' if i % 5 else
                  f'\taddflag "\\\\Flagged";\n\tfileinto "Rules.R{i}";')
        out.append(f"if {test}\n{{\n{action}\n}}")
    return ("\n".join(out) + "\n").encode()


def message(n: int) -> bytes:
    body = b"The quick brown fox jumps over the lazy dog, again and again and again.\n" * 50
    return (f"From: Someone <someone@elsewhere.example>\nTo: fred@{DOMAIN}\nSubject: hello {n}\n"
            f"Message-ID: <{n}.{time.time():.6f}@bench>\nX-Spam-Score: 0\n\n").encode() + body


class Tree:
    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="sieve-bench-", dir="/tmp")
        os.chmod(self.base, 0o755)
        self.creds: tuple[int, int] | None = None
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("vmail")
            self.creds = (pw.pw_uid, pw.pw_gid)
        self.home = os.path.join(self.base, "home", DOMAIN, "fred")
        self.maildir = os.path.join(self.home, "Maildir")
        for folder in ["", *(f".{f}" for f in FOLDERS)]:
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(self.maildir, folder, sub), exist_ok=True)
        os.makedirs(os.path.join(self.home, "sieve"))
        with open(os.path.join(self.home, "sieve", "rules.sieve"), "wb") as f:
            f.write(rules())
        self.spool = os.path.join(self.base, "spool")
        os.makedirs(self.spool)
        self.logs = os.path.join(self.base, "logs")
        os.makedirs(self.logs)
        self.own()

    def own(self) -> None:
        if self.creds is None:
            return
        for dirpath, dirnames, filenames in os.walk(self.base):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), *self.creds)

    def activate(self, on: bool) -> None:
        link = os.path.join(self.home, ".dovecot.sieve")
        if os.path.lexists(link):
            os.unlink(link)
        if on:
            os.symlink("sieve/rules.sieve", link)
            if self.creds is not None:
                os.lchown(link, *self.creds)

    def inbox_count(self) -> int:
        return sum(len(os.listdir(os.path.join(self.maildir, sub))) for sub in ("new", "cur"))

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def vdeliver_case(tree: Tree) -> tuple[list[str], dict[str, str]]:
    launcher = install_vdeliver(os.path.join(tree.base, "vdeliver"))
    config = os.path.join(tree.base, "vdeliver.toml")
    with open(config, "w") as f:
        f.write(f'format = "maildir"\nmaildir_path = "{tree.base}/home/{{domain}}/{{user}}/Maildir"\n'
                f'spool_dir = "{tree.spool}"\nlog = "none"\n\n[sieve]\nenabled = true\n')
    os.chmod(config, 0o644)
    return [launcher, "-c", config, "-a", DOMAIN, "-a", "fred"], {"PATH": "/usr/bin:/bin", "LANG": "C"}


def dovecot_case(tree: Tree, sieve: bool) -> tuple[list[str], dict[str, str]]:
    conf = os.path.join(tree.base, f"dovecot-lda-{'sieve' if sieve else 'plain'}.conf")
    with open(conf, "w") as f:
        f.write(f"mail_location = maildir:~/Maildir\nlog_path = {tree.logs}/dovecot-lda.log\nssl = no\n")
        if sieve:
            f.write("protocol lda {\n  mail_plugins = $mail_plugins sieve\n}\n"
                    "plugin {\n  sieve = file:~/sieve;active=~/.dovecot.sieve\n}\n")
    os.chmod(conf, 0o644)
    return ["/usr/lib/dovecot/dovecot-lda", "-c", conf], {"PATH": "/usr/bin:/bin", "LANG": "C",
                                                          "USER": f"fred@{DOMAIN}", "HOME": tree.home}


def measure(tree: Tree, argv: list[str], env: dict[str, str], messages: int, reps: int) -> float:
    """Median seconds per delivery; every delivery must succeed and land in the INBOX."""
    errors = os.open(os.path.join(tree.logs, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        warm = spawn(argv, message(0), env, tree.creds, errors, cwd=tree.base)  # compiles, fills caches
        if not warm.ok:
            raise SystemExit(f"{argv[0]}: {warm.error}; see {tree.logs}")
        runs: list[float] = []
        for _rep in range(reps):
            before = tree.inbox_count()
            started = time.perf_counter()
            for n in range(messages):
                sample = spawn(argv, message(n + 1), env, tree.creds, errors, cwd=tree.base)
                if not sample.ok:
                    raise SystemExit(f"{argv[0]}: {sample.error}; see {tree.logs}")
            runs.append((time.perf_counter() - started) / messages)
            got = tree.inbox_count() - before
            if got != messages:
                raise SystemExit(f"{argv[0]}: {got} of {messages} messages in the INBOX")
        return statistics.median(runs)
    finally:
        os.close(errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sieve_bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not os.path.exists(SYSTEM_PYTHON):
        print(f"needs {SYSTEM_PYTHON}", file=sys.stderr)
        return 2
    tree = Tree()
    try:
        results: dict[str, float] = {}
        vdeliver = vdeliver_case(tree)
        cases = [("vdeliver, no script", vdeliver, False), ("vdeliver, 30-rule script", vdeliver, True)]
        if os.path.exists("/usr/lib/dovecot/dovecot-lda"):
            cases += [("dovecot-lda, no sieve", dovecot_case(tree, False), False),
                      ("dovecot-lda + Pigeonhole, 30-rule script", dovecot_case(tree, True), True)]
        for _round in range(2):  # interleaved rounds: drift on the machine hits every case alike
            for name, (command, env), script in cases:
                tree.activate(script)
                took = measure(tree, command, env, args.messages, args.reps)
                results[name] = min(took, results.get(name, took))
        lines = ["| case | ms per delivery |", "| --- | ---: |"]
        lines += [f"| {name} | {seconds * 1000:.2f} |" for name, seconds in results.items()]
        v0, v1 = results["vdeliver, no script"], results["vdeliver, 30-rule script"]
        lines += ["", "| ratio | value | goal |", "| --- | ---: | --- |",
                  f"| vdeliver with the script / without | {v1 / v0:.2f}x | at most 1.2x |"]
        if "dovecot-lda, no sieve" in results:
            d0, d1 = results["dovecot-lda, no sieve"], results["dovecot-lda + Pigeonhole, 30-rule script"]
            lines += [f"| dovecot-lda with the script / without | {d1 / d0:.2f}x | (Pigeonhole's cost) |",
                      f"| vdeliver with the script / dovecot-lda with it | {v1 / d1:.2f}x | below 1x |"]
        table = "\n".join(lines) + "\n"
        sys.stdout.write(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(f"Sieve benchmark, {time.strftime('%Y-%m-%d')}, {args.messages} messages x {args.reps} "
                        "runs per case, best of 2 interleaved rounds of the median run.\n\n" + table)
        return 0
    finally:
        tree.close()


if __name__ == "__main__":
    raise SystemExit(main())
