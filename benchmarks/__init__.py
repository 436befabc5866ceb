"""Benchmarks: vdeliver beside procmail, maildrop and Dovecot, measured in one interleaved run.

`python -m benchmarks.run [--quick]` (or `make bench`) runs every installed agent on the same
messages and mailboxes and writes benchmarks/results/latest.{md,csv,png}.  See docs/benchmarks.md.

Modules: workloads (messages, mailboxes, the integrity check), agents (one adapter per delivery
agent, with its fsync behaviour), runner (interleaving and measurement), report (Markdown, CSV,
chart), run (the command).
"""
