"""Variables (RFC 5229) and IMAP flags (RFC 5232): what `set`, the `${...}` references and the
flag commands do to the script's state.

- `${name}` is a variable (names are case-insensitive), `${1}` a match variable of the last
  `:matches` that succeeded (`${0}` the whole value); an unknown variable is "", a reference
  that is not well formed (`${}`, `${a b}`) stays as written; expansion is one pass.
- `set` modifiers apply by precedence: :lower/:upper, then :lowerfirst/:upperfirst, then
  :quotewildcard or :quoteregex, then :length.  A value is cut at MAX_VALUE characters (Pigeonhole's
  sieve_variables_max_variable_size, 4 KiB).
- Flags are kept as one space-separated string, in the internal variable FLAGS unless a
  command names another; a flag appears once, compared without case, system flags written
  as IMAP spells them (`\\Seen`).
"""


TYPE_CHECKING = False  # typing costs an import on the delivery path; mypy knows this name
if TYPE_CHECKING:
    from collections.abc import Mapping

MAX_VALUE = 4096
FLAGS = " flags"  # the internal variable: a name no script can write
_SYSTEM = {f.lower(): f for f in ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "\\Recent")}


def _is_name(name: str) -> bool:
    return bool(name) and (name[0] == "_" or (name[0].isascii() and name[0].isalpha())) and all(
        c == "_" or (c.isascii() and c.isalnum()) for c in name)


class Scope(dict[str, str]):
    """One script's variables when include (RFC 6609) is in use: a name the script declared
    with `global`, and any `global.NAME`, lives in the table all scripts of the run share
    (`shared`); every other name is the script's own (this dict).  The imap4flags internal
    variable is shared too: the flags the implicit keep stores with are the run's.  (A dict,
    not a MutableMapping: collections.abc costs an import on the delivery path.)"""

    __slots__ = ("shared", "declared")

    def __init__(self, shared: dict[str, str]) -> None:
        super().__init__()
        self.shared = shared
        self.declared: set[str] = set()

    def declare(self, names: list[str]) -> None:
        self.declared.update(n.lower() for n in names)

    def _shared_key(self, name: str) -> str | None:
        if name.startswith("global."):
            return name[7:]
        if name in self.declared or name == FLAGS:
            return name
        return None

    def __getitem__(self, name: str) -> str:
        key = self._shared_key(name)
        return super().__getitem__(name) if key is None else self.shared[key]

    def get(self, name: str, default: str = "") -> str:  # type: ignore[override]
        key = self._shared_key(name)
        return super().get(name, default) if key is None else self.shared.get(key, default)

    def __setitem__(self, name: str, value: str) -> None:
        key = self._shared_key(name)
        if key is None:
            super().__setitem__(name, value)
        else:
            self.shared[key] = value


def expand(text: str, variables: "Mapping[str, str]", match_vars: list[str]) -> str:
    out: list[str] = []
    pos = 0
    while True:
        start = text.find("${", pos)
        if start < 0:
            out.append(text[pos:])
            return "".join(out)
        end = text.find("}", start + 2)
        if end < 0:
            out.append(text[pos:])
            return "".join(out)
        name = text[start + 2:end]
        out.append(text[pos:start])
        if name.isdigit() and name.isascii():
            index = int(name)
            out.append(match_vars[index] if index < len(match_vars) else "")
            pos = end + 1
        elif _is_name(name) or (name[:7].lower() == "global." and _is_name(name[7:])):
            out.append(variables.get(name.lower(), ""))
            pos = end + 1
        else:
            out.append("${")  # not a reference: keep it, and look for one inside
            pos = start + 2


def modify(value: str, tags: dict[str, object]) -> str:
    if "lower" in tags:
        value = value.lower()
    elif "upper" in tags:
        value = value.upper()
    if "lowerfirst" in tags and value:
        value = value[0].lower() + value[1:]
    elif "upperfirst" in tags and value:
        value = value[0].upper() + value[1:]
    if "quotewildcard" in tags:
        value = value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
    elif "quoteregex" in tags:
        from vdeliver.sieve.regex import quote

        value = quote(value)
    if "encodeurl" in tags:  # RFC 5435 4.1: after the others but :length
        from vdeliver.sieve.notify import encode_url

        value = encode_url(value)
    if "length" in tags:
        value = str(len(value))
    return value


def limit(value: str) -> str:
    return value[:MAX_VALUE]


def flags_of(text: str) -> tuple[str, ...]:
    """The flags in a space-separated string, each once, in order."""
    seen: set[str] = set()
    out: list[str] = []
    for flag in text.split():
        key = flag.lower()
        if key not in seen:
            seen.add(key)
            out.append(_SYSTEM.get(key, flag))
    return tuple(out)


def change_flags(command: str, current: str, given: list[str]) -> str:
    new = flags_of(" ".join(given))
    if command == "setflag":
        return " ".join(new)
    if command == "addflag":
        return " ".join(flags_of(current + " " + " ".join(new)))
    gone = {f.lower() for f in new}
    return " ".join(f for f in flags_of(current) if f.lower() not in gone)
