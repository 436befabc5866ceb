"""Sieve (RFC 5228 and its extensions): users' filters, run at delivery.

The pipeline has one module per stage, like Pigeonhole's lib-sieve:

    lexer.py    script bytes -> tokens (comments, strings, text: blocks, numbers, tags)
    parser.py   tokens -> the tree (tree.py: frozen dataclasses; tree.to_sieve() prints one back)
    errors.py   SieveError: what is wrong, on which line

Nothing here is imported on a delivery for a user without a script.  Later stages (the
validator with one signature table per command, the compiled form, the interpreter that
returns an action list and does no I/O) come next; see docs/architecture.md.
"""
