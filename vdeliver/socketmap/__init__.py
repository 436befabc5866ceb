"""sendmail socket maps answered from the vdeliver accounts database.

    protocol.py  netstring framing, request parsing, reply encoding (no I/O)
    cache.py     positive/negative TTL cache that serves stale answers on trouble
    lookup.py    the answers themselves, from the accounts database
    server.py    the asyncio daemon (`vdeliver-socketmapd`, `vmailctl serve socketmap`)
"""
