"""`python -I -m vdeliver ...`: the fastest way to run the delivery agent."""

from vdeliver.cli import run

run()
