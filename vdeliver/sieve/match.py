"""Comparators (RFC 4790, as RFC 5228 section 2.7.3 uses them) and match types.

    i;octet          strings compared as they are
    i;ascii-casemap  ASCII letters folded to lower case, everything else as it is (the default)
    i;ascii-numeric  the leading digits as a whole number; no leading digit is "infinity",
                     equal only to another such value; only :is and the relational types

Match types: `:is`, `:contains`, `:matches` (`*` any run of characters, `?` one character,
`\\` takes the next character literally) and RFC 5231's `:value` with a relation (gt, ge, lt,
le, eq, ne).  A test is true when any value matches any key (RFC 5228 section 2.7.1).

`:matches` runs in O(len(value) x len(key)) at worst: a star is never backtracked past
the next star, so a hostile key like `*a*a*a*a*b` cannot stall a delivery.

Where Pigeonhole (Debian's sieve-test) was asked and what we do:
- i;ascii-casemap folds to lower case (RFC 4790 section 9.2.1 folds to upper), so under
  `:value` the six characters between "Z" and "a" sort before the letters: "_" lt "a".
  Pigeonhole's strncasecmp() does the same, and we follow it.
- i;ascii-numeric: "" and any value without a leading digit are "positive infinity",
  equal to each other and greater than every number; Pigeonhole agrees.
- `?` is one character, as the brief and RFC 5228 section 2.7.1 say; Pigeonhole takes one
  octet, so "caf?" does not match "caf\u00e9" there, and its match variables can split a
  UTF-8 character.  We differ on purpose.
- A key ending in a lone backslash takes it as a backslash; Pigeonhole aborts there.
- Relations are taken in any case ("EQ"), as RFC 5234 strings are; Pigeonhole's validator
  refuses "EQ" at compile time.
"""


_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


class MatchError(ValueError):
    """A comparator or match type that does not exist, or that a comparator cannot do."""


def fold(comparator: str, text: str) -> str:
    if comparator == "i;ascii-casemap":
        return text.translate(_FOLD)
    if comparator in ("i;octet", "i;ascii-numeric"):
        return text
    raise MatchError(f"unknown comparator '{comparator}'")


def _number(text: str) -> int | None:
    """i;ascii-numeric: the leading digits, or None for "positive infinity"."""
    end = 0
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    return int(text[:end]) if end else None


def _order(comparator: str, value: str, key: str) -> int:
    """-1, 0 or 1 as value sorts before, with or after key."""
    if comparator == "i;ascii-numeric":
        a, b = _number(value), _number(key)
        if a is None or b is None:
            return 0 if a is None and b is None else (1 if a is None else -1)
        return (a > b) - (a < b)
    a_s, b_s = fold(comparator, value), fold(comparator, key)
    # Strings compare as their UTF-8 octets do, which for str is code point order.
    return (a_s > b_s) - (a_s < b_s)


_RELATIONS = {
    "gt": lambda o: o > 0, "ge": lambda o: o >= 0, "lt": lambda o: o < 0,
    "le": lambda o: o <= 0, "eq": lambda o: o == 0, "ne": lambda o: o != 0,
}


def match(match_type: str, comparator: str, value: str, key: str, relation: str | None = None) -> bool:
    """Does `value` match `key`?"""
    if match_type == "value":
        test = _RELATIONS.get((relation or "").lower())
        if test is None:
            raise MatchError(f"unknown relation '{relation}'")
        return bool(test(_order(comparator, value, key)))
    if comparator == "i;ascii-numeric":
        if match_type != "is":
            raise MatchError(f"comparator 'i;ascii-numeric' cannot do :{match_type}")
        return _order(comparator, value, key) == 0
    v, k = fold(comparator, value), fold(comparator, key)
    if match_type == "is":
        return v == k
    if match_type == "contains":
        return k in v
    if match_type == "matches":
        return glob(v, k) is not None
    raise MatchError(f"unknown match type ':{match_type}'")


def matches_any(match_type: str, comparator: str, values: list[str], keys: list[str],
                relation: str | None = None) -> bool:
    return any(match(match_type, comparator, v, k, relation) for v in values for k in keys)


# -- :matches -------------------------------------------------------------------------------------


def _pieces(key: str) -> list[list[str | None]]:
    """The key split at its stars: each piece a list of characters, None standing for `?`."""
    pieces: list[list[str | None]] = [[]]
    i = 0
    while i < len(key):
        ch = key[i]
        if ch == "\\" and i + 1 < len(key):
            pieces[-1].append(key[i + 1])
            i += 2
            continue
        if ch == "*":
            pieces.append([])
        elif ch == "?":
            pieces[-1].append(None)
        else:
            pieces[-1].append(ch)
        i += 1
    return pieces


def _at(value: str, start: int, piece: list[str | None]) -> bool:
    if start + len(piece) > len(value):
        return False
    return all(p is None or value[start + i] == p for i, p in enumerate(piece))


def _find(value: str, start: int, stop: int, piece: list[str | None]) -> int:
    """The first position >= start where piece fits and ends by stop, or -1."""
    for pos in range(start, stop - len(piece) + 1):
        if _at(value, pos, piece):
            return pos
    return -1


def glob(value: str, key: str) -> list[str] | None:
    """None when value does not match the wildcard key; else what each `*` and `?` matched, in
    order (RFC 5229's ${1}, ${2}, ...; ${0} is the whole value).  Stars take as little as
    they can, except the last, which takes the rest, as RFC 5229 section 3.2 asks."""
    spans = _spans(value, key)
    return None if spans is None else [value[a:b] for a, b in spans]


def glob_groups(comparator: str, value: str, key: str) -> list[str] | None:
    """glob() under a comparator, the groups taken from the value as it was written."""
    if comparator == "i;ascii-numeric":
        raise MatchError("comparator 'i;ascii-numeric' cannot do :matches")
    spans = _spans(fold(comparator, value), fold(comparator, key))  # folding keeps every length
    return None if spans is None else [value[a:b] for a, b in spans]


def _spans(value: str, key: str) -> list[tuple[int, int]] | None:
    pieces = _pieces(key)
    first, last = pieces[0], pieces[-1]
    if len(pieces) == 1:
        if len(first) != len(value) or not _at(value, 0, first):
            return None
        return [(i, i + 1) for i, p in enumerate(first) if p is None]
    if not _at(value, 0, first) or len(first) + len(last) > len(value):
        return None
    end = len(value) - len(last)
    if not _at(value, end, last):
        return None
    spans = [(i, i + 1) for i, p in enumerate(first) if p is None]
    pos = len(first)
    for piece in pieces[1:-1]:
        found = _find(value, pos, end, piece)
        if found < 0:
            return None
        spans.append((pos, found))
        spans += [(found + i, found + i + 1) for i, p in enumerate(piece) if p is None]
        pos = found + len(piece)
    spans.append((pos, end))
    spans += [(end + i, end + i + 1) for i, p in enumerate(last) if p is None]
    return spans
