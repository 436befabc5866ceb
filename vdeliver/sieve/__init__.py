"""Sieve (RFC 5228 and its extensions): users' filters, run at delivery.

The pipeline has one module per stage, like Pigeonhole's lib-sieve:

    lexer.py        script bytes -> tokens (comments, strings, text: blocks, numbers, tags)
    parser.py       tokens -> the tree (tree.py: frozen dataclasses; tree.to_sieve() prints one back)
    validator.py    tree -> checked nodes, against one signature table per command and test
    interpreter.py  checked nodes + message + envelope -> the actions (no I/O)
    match.py        comparators and match types;  headers.py: header values and addresses
    tool.py         `vdeliver sieve-test`
    delivery.py     at delivery: the user's active script -> the mailboxes to store into
    errors.py       SieveError: what is wrong, on which line

Nothing here is imported on a delivery for a user without an active script (docs/sieve.md
says what works).
"""
