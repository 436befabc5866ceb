"""TCP liveness for PostgreSQL connections (issue 20's failover finding): a primary whose host
vanishes from the network must not hold a query for the kernel's TCP timeout.  Every vdeliver
connection (vmailctl, the socketmap server, the tracking store, vacation's address lookup)
asks libpq for keepalives and a TCP user timeout, unless the connection string sets them."""

from __future__ import annotations

import pytest

from tests.pg import pg_cluster, pg_conninfo  # noqa: F401 - fixtures
from vdeliver.accounts.settings import Settings
from vdeliver.config import PG_TCP_LIVENESS, pg_liveness


def test_defaults_and_the_dsn_wins() -> None:
    assert pg_liveness("host=db1,db2 dbname=vmail") == PG_TCP_LIVENESS
    assert "tcp_user_timeout" not in pg_liveness("host=db1 tcp_user_timeout=500")
    assert "keepalives_idle" not in pg_liveness("postgresql://db1/vmail?keepalives_idle=60")
    assert PG_TCP_LIVENESS["tcp_user_timeout"] <= 30000  # bounded: seconds, not minutes


def test_vmailctl_and_the_readers_ask_for_it() -> None:
    dsn, extra = Settings(dsn="host=db1,db2 dbname=vmail").connect_args()
    assert dsn == "host=db1,db2 dbname=vmail" and extra == PG_TCP_LIVENESS
    _dsn, extra = Settings(dsn="host=db1", readonly_dsn="host=db2 keepalives=0").connect_args(readonly=True)
    assert "keepalives" not in extra and extra["tcp_user_timeout"] == PG_TCP_LIVENESS["tcp_user_timeout"]


@pytest.mark.peers
def test_libpq_takes_the_keywords(pg_conninfo: str) -> None:  # noqa: F811
    import psycopg

    with psycopg.connect(pg_conninfo, connect_timeout=5, **pg_liveness(pg_conninfo)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.get_parameters() is not None
