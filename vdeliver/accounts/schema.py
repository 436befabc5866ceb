"""The database schema as numbered migrations, shared by SQLite and PostgreSQL.

Each migration is a list of statements in the SQL both engines accept.  A store
applies the missing ones in order, each in its own transaction together with its
row in `schema_migrations`, so a database is never left half-migrated.  Never edit
a released migration: append a new one.

Constraints live here, not only in Python: foreign keys, the (username, domain)
primary key, CHECKs on status, format, quota and normalised (lower-case) names.
Booleans are INTEGER 0/1 so both engines read them alike.
"""

from __future__ import annotations

_NAME_CHECK = "CHECK ({col} <> '' AND {col} = lower({col}))"

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "domains, mailboxes, aliases, forwards", [
        """CREATE TABLE domains (
            name VARCHAR(253) PRIMARY KEY """ + _NAME_CHECK.format(col="name") + """,
            alias_of VARCHAR(253) REFERENCES domains(name) ON DELETE RESTRICT,
            catchall VARCHAR(320),
            created_at VARCHAR(40) NOT NULL,
            CHECK (alias_of IS NULL OR alias_of <> name),
            CHECK (alias_of IS NULL OR catchall IS NULL)
        )""",
        """CREATE TABLE mailboxes (
            username VARCHAR(64) NOT NULL """ + _NAME_CHECK.format(col="username") + """,
            domain VARCHAR(253) NOT NULL REFERENCES domains(name) ON DELETE RESTRICT,
            password VARCHAR(1024) NOT NULL DEFAULT '',
            format VARCHAR(8) NOT NULL CHECK (format IN ('mbox', 'maildir')),
            quota_bytes BIGINT NOT NULL DEFAULT 0 CHECK (quota_bytes >= 0),
            status VARCHAR(10) NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled', 'suspended')),
            reason VARCHAR(500) NOT NULL DEFAULT '',
            keep_copy INTEGER NOT NULL DEFAULT 0 CHECK (keep_copy IN (0, 1)),
            created_at VARCHAR(40) NOT NULL,
            PRIMARY KEY (username, domain)
        )""",
        """CREATE TABLE aliases (
            username VARCHAR(64) NOT NULL """ + _NAME_CHECK.format(col="username") + """,
            domain VARCHAR(253) NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
            target VARCHAR(320) NOT NULL CHECK (target LIKE '%_@_%'),
            PRIMARY KEY (username, domain, target)
        )""",
        """CREATE TABLE forwards (
            username VARCHAR(64) NOT NULL,
            domain VARCHAR(253) NOT NULL,
            target VARCHAR(320) NOT NULL CHECK (target LIKE '%_@_%'),
            PRIMARY KEY (username, domain, target),
            FOREIGN KEY (username, domain) REFERENCES mailboxes(username, domain) ON DELETE CASCADE
        )""",
        """CREATE TABLE meta (
            key VARCHAR(40) PRIMARY KEY,
            value VARCHAR(200) NOT NULL
        )""",
        "INSERT INTO meta (key, value) VALUES ('serial', '0')",
        "INSERT INTO meta (key, value) VALUES ('changed_at', '')",
    ]),
    (2, "indexes for listings by domain and reverse target lookups", [
        "CREATE INDEX mailboxes_domain ON mailboxes (domain)",
        "CREATE INDEX aliases_target ON aliases (target)",
        "CREATE INDEX forwards_target ON forwards (target)",
    ]),
    (3, "tracking: what delivery remembers (Sieve duplicate, deduplication, vacation)", [
        """CREATE TABLE tracking (
            kind VARCHAR(16) NOT NULL,
            mailbox VARCHAR(320) NOT NULL,
            key VARCHAR(1000) NOT NULL,
            expires BIGINT NOT NULL,
            PRIMARY KEY (kind, mailbox, key)
        )""",
        "CREATE INDEX tracking_expires ON tracking (expires)",
    ]),
]

LATEST = MIGRATIONS[-1][0]

CREATE_MIGRATIONS_TABLE = """CREATE TABLE schema_migrations (
    version INTEGER PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    applied_at VARCHAR(40) NOT NULL
)"""


# What the readers (Dovecot's SQL auth, the socketmap server) read: nothing else is granted.
READER_TABLES = ("domains", "mailboxes", "aliases", "forwards", "meta")


def readonly_grants(role: str) -> list[str]:
    """PostgreSQL statements that make `role` (created if missing, LOGIN) able to read the
    accounts tables of the current database and schema, and nothing more.  `role` must be
    a plain identifier (checked by the caller)."""
    tables = ", ".join(READER_TABLES)
    return [
        (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
        f"THEN CREATE ROLE \"{role}\" LOGIN; END IF; END $$"),
        (f"DO $$ BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), '{role}'); "
        f"EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), '{role}'); END $$"),
        f"REVOKE ALL ON {tables} FROM \"{role}\"",
        f"GRANT SELECT ON {tables} TO \"{role}\"",
    ]


def tracking_grants(role: str) -> list[str]:
    """PostgreSQL statements that let `role` (the delivering user's, created if missing)
    read and write the tracking table ([tracking] dsn) and nothing else."""
    return [
        (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
         f"THEN CREATE ROLE \"{role}\" LOGIN; END IF; END $$"),
        (f"DO $$ BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), '{role}'); "
         f"EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', current_schema(), '{role}'); END $$"),
        f"REVOKE ALL ON tracking FROM \"{role}\"",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON tracking TO \"{role}\"",
    ]
