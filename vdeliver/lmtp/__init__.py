"""LMTP (RFC 2033) for vdeliver: a protocol state machine with no I/O, and the server around it.

protocol.py is fed bytes and answers with events and reply bytes (h11's shape), so every
rule of the protocol is unit-tested without a socket; server.py is the thin threaded loop
that owns sockets, the spool file and the calls into the delivery core.
"""
