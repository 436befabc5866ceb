"""LMTP (RFC 2033) for vdeliver: `vdeliver-lmtpd`.

    protocol.py  the protocol as a state machine: bytes in, events and reply bytes out (no I/O)
    settings.py  the [lmtp] table, validated
    session.py   one connection: socket, deadlines, spool file, calls into the delivery core
    daemon.py    listeners, connection threads, signals, start-up and the drop of root
"""
