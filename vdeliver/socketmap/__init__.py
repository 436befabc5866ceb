"""sendmail socket maps answered from the vdeliver accounts database: `vdeliver-socketmapd`.

    protocol.py  netstring framing, request parsing, reply encoding (no I/O)
    settings.py  the [socketmap] table, validated
    loop.py      the answer loop: every connection in one epoll thread, cached answers at once,
                 deadlines, the connection cap
    session.py   what a connection remembers: the virtuser fallback guard
    cache.py     positive/negative TTL cache that serves stale answers on trouble
    lookup.py    the answers themselves, from the accounts database
    daemon.py    listeners, connection cap, signals, start-up and the drop of root
"""
