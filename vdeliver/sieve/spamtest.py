"""`spamtest`, `spamtestplus` and `virustest` (RFC 5235): a scanner's verdict in a header field
-> the normalized value the tests compare.

Where the verdict is, and what it looks like, is the site's configuration, read from `[sieve]`
under Pigeonhole's names (less the `sieve_` prefix), one set for spamtest and spamtestplus,
one for virustest:

    spamtest_status_type   "score" (a decimal number), "strlen" ("*****": its length) or "text"
    spamtest_status_header "Header-Name" or "Header-Name: ERE" whose first group is the verdict
    spamtest_max_header    the same form: where the highest score is ("score" and "strlen")
    spamtest_max_value     or the highest score itself
    spamtest_text_value0 .. spamtest_text_value10  ("text"): the verdict text that gives X
    (virustest_*: the same, text values 0 .. 5)

The value, as RFC 5235 and Pigeonhole compute it: the first field of that name is read
(unfolded, encoded words decoded); no such field, a regular expression that does not match
or a verdict that does not parse gives "0" (not tested).  Otherwise ratio = score / max,
cut to 0..1 (a negative score is 0: tested and clear), and

    spamtest            1 + 9 x ratio   (1 clear .. 10 spam)
    spamtest :percent   100 x ratio     (0 .. 100)
    virustest           1 + 4 x ratio   (1 clean .. 5 infected)

rounded down.  For "text", value X gives X itself (so text_value0 means "not tested"; in
Pigeonhole it gives 1).  Without :percent, `:count` is 1 when a verdict was found and 0
when not (RFC 5235 section 3.1).

The defaults read SpamAssassin's `X-Spam-Status: Yes, score=7.3 required=5.0 ...` (the
required score counts as the highest: at or above it, the message is certainly spam) and
clamav-milter's `X-Virus-Status: Clean` / `Infected (...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vdeliver.sieve.errors import SieveError

_NUMBER = "-?[[:digit:]]+[.,]?[[:digit:]]*"  # POSIX ERE has no (?:...): the verdict must be group 1


@dataclass(frozen=True, slots=True)
class ScanConfig:
    """One test's settings (Pigeonhole's sieve_spamtest_* or sieve_virustest_*)."""

    status_header: str = ""  # "" : not configured, the test always sees "0"
    status_type: str = "score"
    max_header: str = ""
    max_value: float | None = None
    text_values: tuple[str, ...] = ()  # index X: the verdict text that gives X ("" for none)


SPAMASSASSIN = ScanConfig(
    status_header=f"X-Spam-Status: ^[[:alpha:]]+, score=({_NUMBER})",
    status_type="score",
    max_header=f"X-Spam-Status: ^[[:alpha:]]+, score={_NUMBER} required=({_NUMBER})",
)
CLAMAV = ScanConfig(status_header="X-Virus-Status: ^([[:alpha:]]+)", status_type="text",
                    text_values=("", "Clean", "", "", "", "Infected"))


@dataclass(frozen=True, slots=True)
class SpamConfig:
    spamtest: ScanConfig = SPAMASSASSIN
    virustest: ScanConfig = CLAMAV


DEFAULT = SpamConfig()


_KINDS = {"status_type": "str", "status_header": "str", "max_header": "str", "max_value": "float"}
# The [sieve] keys (config.read_table kinds) this module reads.
KEYS: dict[str, str] = {
    **{f"{test}_{key}": kind for test in ("spamtest", "virustest") for key, kind in _KINDS.items()},
    **{f"spamtest_text_value{i}": "str" for i in range(11)},
    **{f"virustest_text_value{i}": "str" for i in range(6)},
}
STATUS_TYPES = ("score", "strlen", "text")


def from_settings(values: dict[str, object]) -> SpamConfig:
    """SpamConfig from the [sieve] keys in KEYS (others ignored); a test none of whose keys
    is set keeps its default.  ValueError names a bad key."""
    from vdeliver.sieve import regex

    tests: dict[str, ScanConfig] = {}
    for test, default, most in (("spamtest", SPAMASSASSIN, 10), ("virustest", CLAMAV, 5)):
        mine = {k[len(test) + 1:]: v for k, v in values.items() if k.startswith(test + "_")}
        if not mine:
            tests[test] = default
            continue
        status_type = str(mine.get("status_type", "score"))
        if status_type not in STATUS_TYPES:
            raise ValueError(f"{test}_status_type must be one of {', '.join(STATUS_TYPES)}")
        texts = tuple(str(mine.get(f"text_value{i}", "")) for i in range(most + 1))
        for key in ("status_header", "max_header"):
            spec = str(mine.get(key, ""))
            try:
                pattern = _spec(spec)[1] if spec else None
                if pattern is not None:
                    regex.translate(pattern)
            except (ValueError, regex.RegexError) as exc:
                raise ValueError(f"{test}_{key} is not 'Header-Name' or 'Header-Name: ERE': {exc}") from None
        max_value = mine.get("max_value")
        tests[test] = ScanConfig(str(mine.get("status_header", "")), status_type, str(mine.get("max_header", "")),
                                 float(max_value) if isinstance(max_value, (int, float)) else None, texts)
    return SpamConfig(tests["spamtest"], tests["virustest"])


def _spec(spec: str) -> tuple[str, str | None]:
    """'Name' or 'Name: ERE' -> (name, ERE or None), as Pigeonhole parses it."""
    text = spec.strip(" \t")
    end = 0
    while end < len(text) and text[end] not in ": \t":
        end += 1
    name, rest = text[:end], text[end:].lstrip(" \t")
    if not rest:
        return name, None
    if rest[0] != ":":
        raise ValueError(f"expecting ':' after the header name, not {rest[0]!r}")
    return name, rest[1:].lstrip(" \t")


def decimal(text: str) -> float | None:
    """Pigeonhole's decimal: [+-] up to five digits [. or , up to five digits]; None if not."""
    sign, i = 1.0, 0
    if not text:
        return None
    if text[0] in "+-":
        sign = -1.0 if text[0] == "-" else 1.0
        i = 1
    start = i
    while i < len(text) and text[i] in "0123456789":
        i += 1
    if i - start > 5:
        return None
    whole = text[start:i]
    fraction = ""
    if i < len(text) and text[i] in ".,":
        i += 1
        f_start = i
        while i < len(text) and text[i] in "0123456789":
            i += 1
        if i - f_start > 5:
            return None
        fraction = text[f_start:i]
    if i != len(text):
        return None
    return sign * float(f"{whole or '0'}.{fraction or '0'}")


def _strlen(text: str) -> float | None:
    if text and text.strip(text[0]):
        return None
    return float(len(text))


def _extract(spec: str, first_value: str | None) -> str | None:
    """The verdict a header spec finds in a header's first value, or None."""
    if first_value is None:
        return None
    _name, pattern = _spec(spec)
    if pattern is None:
        return first_value
    from vdeliver.sieve import regex

    groups = regex.search("i;octet", first_value, pattern, True)
    if groups is None or len(groups) < 2:
        return None
    return groups[1]


def value(config: ScanConfig, header: Callable[[str], str | None], test: str, percent: bool) -> tuple[str, bool]:
    """(the normalized value, whether a verdict was found).  `header(name)` gives the first
    field of that name, or None.  SieveError when the configuration itself is wrong."""
    most = 5 if test == "virustest" else 10
    try:
        score = _score(config, header, most)
    except ValueError as exc:
        raise SieveError(0, f"{test}: the configuration is wrong: {exc}") from None
    if score is None:
        return "0", False
    if percent:
        return str(int(score * 100 + 0.001)), True
    return str(int(score * (most - 1) + 1.001)), True


def _score(config: ScanConfig, get: Callable[[str], str | None], most: int) -> float | None:
    """The ratio 0..1, or None: not tested."""
    from vdeliver.sieve import regex

    if not config.status_header:
        return None
    try:
        if config.status_type == "text":
            top: float | None = float(most)
        elif config.max_header:
            top = decimal(_extract(config.max_header, get(_spec(config.max_header)[0])) or "")
        else:
            top = config.max_value
        if top is None or top == 0:
            return None
        verdict = _extract(config.status_header, get(_spec(config.status_header)[0]))
    except regex.RegexError as exc:
        raise ValueError(f"invalid regular expression: {exc}") from None
    if verdict is None:
        return None
    if config.status_type == "score":
        status = decimal(verdict)
    elif config.status_type == "strlen":
        status = _strlen(verdict)
    else:
        found = next((i for i, t in enumerate(config.text_values[:most + 1]) if t and t == verdict), None)
        if found is None or found == 0:
            return None  # text value 0: not tested (RFC 5235); Pigeonhole gives 1
        status = float(found)
    if status is None:
        return None
    return max(0.0, min(1.0, status / top))
