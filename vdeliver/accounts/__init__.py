"""Accounts: the database of domains, mailboxes, aliases and forwards, and what is built from it.

`vmailctl` is the only user of this package.  Nothing on the delivery hot path
(vdeliver/cli.py and what it imports) imports it: delivery reads the mailboxes on
disk and the maps sendmail compiled, never the database.

Modules: errors (one exception per kind of failure, each with its exit code),
names (normalised addresses), settings ([accounts] and [maps] tables), schema
(numbered migrations), store (the SQLite and PostgreSQL stores, one behaviour),
passwords, mailboxes (on disk), maps (sendmail map generation), importer, check.
"""
