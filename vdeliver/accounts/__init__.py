"""Accounts: the database of domains, mailboxes, aliases and forwards, and what is built from it.

`vmailctl` (accounts/vmailctl.py) writes; the socketmap server and Dovecot read.  Nothing on the delivery hot path
(vdeliver/cli.py and what it imports) imports it: delivery reads the mailboxes on
disk and the maps sendmail compiled, never the database.

Modules: errors (one exception per kind of failure, each with its exit code),
names (normalised addresses), settings ([accounts] and [maps] tables), schema
(numbered migrations), snapshot (the one read path: rows into a Snapshot), routing
(next hops and loops), store (every operation, in one transaction), engines (SQLite
and PostgreSQL), passwords, mailboxes (on disk), maps (sendmail map generation),
dovecot (its configuration), importer, check; commands and vmailctl (the CLI).
"""
