"""A PostgreSQL connection the answer loop drives itself: libpq in non-blocking mode.

A miss through a lookup thread costs two thread hand-offs and the GIL passed back and
forth between the threads (measured with `strace -c -f`: 13 futex calls a lookup, and
about 150 us of CPU beyond the lookup's own 60 us).  Most misses are one statement,
snapshot.SLICE_SQL (lookup.Backend.slice_plan), so the loop sends that statement
itself, prepared once per connection, on a few connections of its own registered in
its epoll: one round trip, no thread.  A lookup thread opens each connection
(lookup.Backend.open_link: connect, prepare, then non-blocking) and hands it over.

Anything unusual is not handled here: a connection error or an error result closes
the link, and the loop sends that key the thread way (cache.Resolver.fetch), which
retries on a fresh connection and keeps track of database trouble.
"""

from __future__ import annotations

from typing import Any

from psycopg import pq

from vdeliver.socketmap.lookup import SLICE_STATEMENT

_TUPLES_OK, _CONN_OK = pq.ExecStatus.TUPLES_OK, pq.ConnStatus.OK


class LinkError(Exception):
    """The link cannot be used any more (its statement failed, or the connection did)."""


class Link:
    """One connection; at most one statement out at a time (`job`)."""

    __slots__ = ("conn", "pg", "fd", "codec", "job", "since", "result", "error")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pg = conn.pgconn
        self.fd: int = self.pg.socket
        self.codec: str = conn.info.encoding
        self.job: Any = None  # (key, domain, file name) while a statement is out; the loop's
        self.since = 0.0  # when the statement went out
        self.result: list[tuple[Any, ...]] | None = None
        self.error = ""

    def send(self, params: tuple[str, ...]) -> bool:
        """Send the slice statement; True once all of it is written (else flush() on EPOLLOUT)."""
        codec = self.codec
        self.result, self.error = None, ""
        try:
            self.pg.send_query_prepared(SLICE_STATEMENT, [v.encode(codec) for v in params])
            return self.flush()
        except Exception as exc:  # noqa: BLE001 - psycopg raises its own OperationalError
            raise LinkError(_text(exc)) from None

    def flush(self) -> bool:
        try:
            return bool(self.pg.flush() == 0)
        except Exception as exc:  # noqa: BLE001
            raise LinkError(_text(exc)) from None

    def read(self) -> list[tuple[Any, ...]] | None:
        """What arrived: the statement's rows once its answer is complete, None until then
        (and for an idle link: notices and the like).  Raises LinkError."""
        pg = self.pg
        try:
            pg.consume_input()
            while not pg.is_busy():
                res = pg.get_result()
                if res is None:  # the end of the statement's answer
                    if self.error:
                        raise LinkError(self.error)
                    rows, self.result = self.result, None
                    return rows
                if res.status == _TUPLES_OK:
                    self.result = self._rows(res)
                else:
                    self.error = _text(res.get_error_message()) or f"result status {res.status}"
            if pg.status != _CONN_OK:
                raise LinkError("connection lost")
        except LinkError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise LinkError(_text(exc)) from None
        return None

    def _rows(self, res: Any) -> list[tuple[Any, ...]]:
        """Text results as the psycopg path gives them: column 0 an int, the others str or None."""
        codec, value = self.codec, res.get_value
        rows = []
        for r in range(res.ntuples):
            row: list[Any] = [int(value(r, 0))]
            for col in range(1, res.nfields):
                v = value(r, col)
                row.append(None if v is None else v.decode(codec))
            rows.append(tuple(row))
        return rows

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass


def _text(what: object) -> str:
    if isinstance(what, bytes):
        what = what.decode("utf-8", "replace")
    return " ".join(str(what).split())[:200]
