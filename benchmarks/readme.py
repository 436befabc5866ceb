"""`python -m benchmarks.readme [--check]`: the README's results block, made from benchmarks/results.

The README's "Results" section opens with a block this module writes between two marker lines:
for each result file of `make bench` (the key rows of every agent, the command line, the mbox
journal, the LMTP grid, the socketmap server), its title, the date and machine line of the run
that wrote it, its main tables and the lines that read a figure against a goal.  Nothing in the
block is typed by hand, so the README cannot drift from the files it links to: `benchmarks.run`
calls update() after a full run, and a test checks that the committed README holds exactly what
render() makes of the committed results (`--check` does the same from the command line).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "README.md")
BEGIN = "<!-- results: made by `python -m benchmarks.readme` from benchmarks/results; do not edit by hand -->"
END = "<!-- results: end -->"


@dataclass(frozen=True)
class Source:
    path: str  # under benchmarks/results
    title: str  # what the README calls it
    sections: tuple[str, ...]  # heading prefixes ("## ...") whose tables are shown; "" = before the first heading


SOURCES = (
    Source("key-rows/latest.md", "Every agent, 4 KB messages, empty mailbox, one writer", ("## Summary",)),
    Source("cli.md", "The command line: start-up, 10 MB messages, growing mailboxes",
           ("## Start-up", "## Large messages", "## Growth")),
    Source("journal.md", "mbox crash journal: syncs a message", ("",)),
    Source("lmtp-grid.md", "LMTP: vdeliver-lmtpd against Dovecot LMTP", ("",)),
    Source("lmtp-large.md", "LMTP, 10 MB messages: against Dovecot LMTP and the fsync floor", ("",)),
    Source("socketmap.md", "socketmap server against bare echo servers", ("## Goals",)),
)


class MissingResult(Exception):
    """A result file the block is made from is not there."""


def _sections(lines: list[str]) -> dict[str, list[str]]:
    """Heading ("" for the part before the first "## ") -> its lines."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines[1:]:  # the first line is the file's title
        if line.startswith("## "):
            current = line
            out[current] = []
        else:
            out[current].append(line)
    return out


def _when(lines: list[str]) -> str:
    """The run's date line, shortened to the date and the machine's core count if it says them."""
    for line in lines:
        if "UTC" in line and line.startswith("- "):
            text = line[2:].removeprefix("Date: ")
            return text.split(";")[0].strip()
    return "date not recorded"


def _wanted(line: str) -> bool:
    """Table rows and the lines that read a figure against a goal."""
    return line.startswith("|") or (line.startswith("- ") and "goal" in line)


def render_source(source: Source, results: str = RESULTS) -> list[str]:
    path = os.path.join(results, source.path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MissingResult(f"{path}: missing (run `make bench`)") from None
    parts = _sections(lines)
    link = f"[benchmarks/results/{source.path}](benchmarks/results/{source.path})"
    out = [f"**{source.title}** ({_when(lines)}; {link}):", ""]
    for heading in source.sections:
        found = [lines for name, lines in parts.items() if name == heading or (heading and name.startswith(heading))]
        chosen = [line for lines in found for line in lines if _wanted(line)]
        if not chosen:
            continue
        if out[-1].startswith("|") and chosen[0].startswith("|"):
            out.append("")  # two tables must not run together
        for line in chosen:
            if out[-1].startswith("|") and not line.startswith("|"):
                out.append("")  # a list right after a table starts a paragraph of its own
            out.append(line)
    out.append("")
    return out


def render(results: str = RESULTS) -> str:
    """The whole block, markers included."""
    body = [BEGIN, ""]
    for source in SOURCES:
        body.extend(render_source(source, results))
    body.append(END)
    return "\n".join(body) + "\n"


def splice(readme: str, block: str) -> str:
    """The README with its block replaced (or, the first time, put right after "## Results")."""
    if BEGIN in readme and END in readme:
        start = readme.index(BEGIN)
        end = readme.index(END, start) + len(END) + 1
        return readme[:start] + block + readme[end:]
    anchor = "## Results\n\n"
    if anchor not in readme:
        raise ValueError("README.md has no '## Results' section to put the results block in")
    at = readme.index(anchor) + len(anchor)
    return readme[:at] + block + "\n" + readme[at:]


def update(readme: str = README, results: str = RESULTS) -> bool:
    """Rewrite the block; True if the README changed."""
    with open(readme, encoding="utf-8") as f:
        old = f.read()
    new = splice(old, render(results))
    if new == old:
        return False
    tmp = readme + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new)
    os.replace(tmp, readme)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the README's block is not what the results make")
    args = p.parse_args(argv)
    try:
        if args.check:
            with open(README, encoding="utf-8") as f:
                text = f.read()
            if splice(text, render()) != text:
                print("README.md: the results block differs from benchmarks/results (run python -m benchmarks.readme)",
                      file=sys.stderr)
                return 1
            return 0
        print("README.md updated" if update() else "README.md already up to date")
    except (MissingResult, ValueError) as exc:
        print(f"benchmarks.readme: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
