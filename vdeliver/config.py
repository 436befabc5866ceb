"""The TOML configuration (/etc/vdeliver.toml) and its defaults.

Every key is optional.  Errors name the file, the line and the key at fault.

Speed: importing tomllib costs more than the rest of a delivery (it pulls in re,
typing and datetime), so configurations in the flat subset that administrators
actually write (`key = "string" | 'string' | integer | true | false`, `[table]`,
comments) are read by a small reader here, and anything else falls back to
tomllib.  The tests check that both readers agree on every input the small one
accepts.

Over 400 lines on purpose: the key table, the small reader, the checks with file and line,
and the cache of the parsed form (keyed by the file's identity and bytes) are the one way a
configuration is read; every program imports this module first, so it stays one import.
"""

import posix as os  # not `os`, which costs 1 ms a process: see vdeliver/fileio.py

from vdeliver import fileio
from vdeliver.errors import DeliveryError, Status

DEFAULT_PATH = "/etc/vdeliver.toml"

# key -> (default, kind, allowed values or None).  kind: str, int, bool, path, template.
SCHEMA: "dict[str, tuple[object, str, tuple[str, ...] | None]]" = {
    "format": ("mbox", "str", ("mbox", "maildir")),
    "mbox_path": ("/var/spool/vbox/{domain}/{user}", "template", None),
    "maildir_path": ("/home/vmail-users/{domain}/{user}/Maildir", "template", None),
    "create_mailbox": (False, "bool", None),
    "lock_timeout": (60, "int", None),
    "stale_lock_age": (300, "int", None),
    "max_message_size": (0, "int", None),
    "mbox_escape": ("mboxo", "str", ("mboxo", "mboxrd")),
    "return_path": (True, "bool", None),
    "delivered_to": (True, "bool", None),
    "syslog_facility": (
        "mail",
        "str",
        ("mail", "user", "daemon", "local0", "local1", "local2", "local3", "local4",
         "local5", "local6", "local7"),
    ),
    "log": ("syslog", "str", ("syslog", "stderr", "none")),
    "keep_user_case": (False, "bool", None),
    "recipient_delimiter": ("+", "str", None),
    "detail_folders": (False, "bool", None),
    "detail_folders_allow": ("", "str", None),
    "over_quota": ("defer", "str", ("defer", "bounce")),
    "user": ("", "str", None),
    "group": ("", "str", None),
    "spool_threshold": (1 << 20, "int", None),
    "spool_dir": ("/var/tmp", "path", None),
    "hostname": ("", "str", None),
    "maildir_tmp_max_age": (36 * 3600, "int", None),
    "mbox_journal": (True, "bool", None),
    "dedup_seconds": (0, "int", None),
}

# Tables read by other parts of vdeliver (accounts, servers); each validates its own.
TABLES = ("accounts", "maps", "socketmap", "lmtp", "dovecot", "sieve", "tracking", "webmail")


class ConfigError(DeliveryError):
    """A configuration fault: always temporary (the mail waits for the fix)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(Status("4.3.5", "configuration error", f"{where}: {message}"))
        self.where = where
        self.message = message


class Config:
    """The validated configuration; attributes are the SCHEMA keys."""

    format: str
    mbox_path: str
    maildir_path: str
    create_mailbox: bool
    lock_timeout: int
    stale_lock_age: int
    max_message_size: int
    mbox_escape: str
    return_path: bool
    delivered_to: bool
    syslog_facility: str
    log: str
    keep_user_case: bool
    recipient_delimiter: str
    detail_folders: bool
    detail_folders_allow: str
    over_quota: str
    user: str
    group: str
    spool_threshold: int
    spool_dir: str
    hostname: str
    maildir_tmp_max_age: int
    mbox_journal: bool
    dedup_seconds: int

    def __init__(self, path: str = "", tables: "dict[str, dict[str, object]] | None" = None) -> None:
        for key, (default, _kind, _allowed) in SCHEMA.items():
            setattr(self, key, default)
        self.path = path
        self.tables: dict[str, dict[str, object]] = tables or {}
        self._lines: dict[tuple[str, str], int] = {}

    def where(self, table: str, key: str) -> str:
        """`/etc/vdeliver.toml:12: [accounts] database` for error messages."""
        line = self._lines.get((table, key))
        name = f"[{table}] {key}" if table else key
        if line:
            return f"{self.path}:{line}: {name}"
        return f"{self.path or '<defaults>'}: {name}"

    def table(self, name: str) -> "dict[str, object]":
        return self.tables.get(name, {})

    def host(self) -> str:
        return self.hostname or os.uname().nodename


# -- reading -----------------------------------------------------------------

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS = frozenset("0123456789")


def _simple_value(text: str) -> "tuple[bool, object, str]":
    """Parse one value of the flat subset; (ok, value, rest-after-value)."""
    if not text:
        return False, None, ""
    c = text[0]
    if c == '"' or c == "'":
        end = text.find(c, 1)
        if end < 0:
            return False, None, ""
        body = text[1:end]
        if c == '"' and "\\" in body:
            return False, None, ""
        if text.startswith(c * 3):
            return False, None, ""
        for ch in body:
            if (ch < " " and ch != "\t") or ch == "\x7f":
                return False, None, ""
        return True, body, text[end + 1 :]
    for word, value in (("true", True), ("false", False)):
        if text.startswith(word) and (len(text) == len(word) or text[len(word)] in " \t#"):
            return True, value, text[len(word) :]
    i = 0
    if c in "+-":
        i = 1
    j = i
    while j < len(text) and text[j] in _DIGITS:
        j += 1
    if j == i or (text[i] == "0" and j - i > 1):
        return False, None, ""
    if j < len(text) and text[j] not in " \t#":
        return False, None, ""
    return True, int(text[:j]), text[j:]


def parse_simple(text: str) -> "tuple[dict[str, object], dict[tuple[str, str], int]] | None":
    """Read the flat TOML subset; None when the text needs the full parser."""
    if "\r" in text.replace("\r\n", ""):
        return None  # a CR that does not end a line: tomllib refuses it, and says where
    data: dict[str, object] = {}
    lines: dict[tuple[str, str], int] = {}
    current: dict[str, object] = data
    table = ""
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        s = line.strip(" \t")
        if not s or s[0] == "#":
            if any((ch < " " and ch != "\t") or ch == "\x7f" for ch in s):
                return None
            continue
        if s[0] == "[":
            end = s.find("]")
            name = s[1:end].strip(" \t") if end > 0 else ""
            rest = s[end + 1 :].strip(" \t") if end > 0 else "x"
            if not name or not _BARE.issuperset(name) or (rest and rest[0] != "#"):
                return None
            if name in data:
                return None
            current = {}
            data[name] = current
            table = name
            lines[(name, "")] = n
            continue
        key, eq, value = s.partition("=")
        key = key.strip(" \t")
        if not eq or not key or not _BARE.issuperset(key) or key in current:
            return None
        ok, parsed, rest = _simple_value(value.strip(" \t"))
        if not ok:
            return None
        rest = rest.strip(" \t")
        if rest and rest[0] != "#":
            return None
        if any((ch < " " and ch != "\t") or ch == "\x7f" for ch in rest):
            return None
        current[key] = parsed
        lines[(table, key)] = n
    return data, lines


def _locate(text: str) -> "dict[tuple[str, str], int]":
    """Best-effort line numbers of `key =` lines, for errors after a tomllib parse."""
    found: dict[tuple[str, str], int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[") and not s.startswith("[["):
            table = s[1 : s.find("]")].strip() if "]" in s else table
            found.setdefault((table, ""), n)
        elif "=" in s and not s.startswith("#"):
            key = s.split("=", 1)[0].strip().strip("\"'")
            found.setdefault((table, key), n)
    return found


def read_file(path: str) -> "tuple[dict[str, object], dict[tuple[str, str], int]]":
    raw, _identity = _read_raw(path)
    return _parse(path, raw)


def _read_raw(path: str) -> "tuple[bytes, tuple[int, int, int, int, int]]":
    """The file's bytes (at most 1 MB) and its identity (dev, ino, size, mtime_ns, ctime_ns),
    both from one descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        chunks = []
        left = 1 << 20
        while left > 0:
            data = os.read(fd, min(left, max(st.st_size + 1, 4096)))  # os.read allocates what it is asked for
            if not data:
                break
            chunks.append(data)
            left -= len(data)
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse(path: str, raw: bytes) -> "tuple[dict[str, object], dict[tuple[str, str], int]]":
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 at byte {exc.start}") from None
    simple = parse_simple(text)
    if simple is not None:
        return simple
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None
    return data, _locate(text)


_MESSAGES = {"bool": "must be true or false", "int": "must be a whole number", "float": "must be a number",
             "str": "must be a string", "strs": "must be a string or a list of strings",
             "table": "must be a table of strings (name = \"value\")"}


def typed(where: str, value: object, kind: str) -> object:
    """The one type check of a configuration value, for every table: kind "bool", "int" (a
    whole number, not negative), "float" (a number, not negative; returned as float), "str",
    "strs" (a string or a list of strings; returned as a tuple) or "table" (a table of
    strings).  Raises ConfigError(where, ...)."""
    if kind == "table":
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
        raise ConfigError(where, _MESSAGES[kind])
    if kind == "strs":
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(where, _MESSAGES[kind])
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    else:
        ok = not isinstance(value, bool) and isinstance(value, int if kind == "int" else (int, float))
    if not ok:
        raise ConfigError(where, _MESSAGES[kind])
    if kind in ("int", "float"):
        if value < 0:  # type: ignore[operator]
            raise ConfigError(where, "must not be negative")
        if kind == "float":
            return float(value)  # type: ignore[arg-type]
    return value


def read_table(cfg: Config, table: str, kinds: "dict[str, str]") -> "dict[str, object]":
    """The keys set in [table], each checked by typed(); a key not in `kinds` is refused.
    What the values mean (ranges, paths, defaults) stays with the table's owner."""
    values: dict[str, object] = {}
    for key, value in cfg.table(table).items():
        kind = kinds.get(key)
        if kind is None:
            raise ConfigError(cfg.where(table, key), "unknown key")
        values[key] = typed(cfg.where(table, key), value, kind)
    return values


def _check(cfg: Config, key: str, value: object) -> object:
    _default, kind, allowed = SCHEMA[key]
    where = cfg.where("", key)
    value = typed(where, value, kind if kind in ("bool", "int") else "str")
    if isinstance(value, str):
        if allowed is not None and value not in allowed:
            raise ConfigError(where, f"must be one of {', '.join(allowed)} (got {value!r})")
        if kind in ("path", "template") and not value.startswith("/"):
            raise ConfigError(where, "must be an absolute path")
        if kind == "template":
            check_template(value, where)
        if key == "recipient_delimiter" and len(value) > 1:
            raise ConfigError(where, "must be one character or empty")
        if key == "recipient_delimiter" and value in ("/", "@", "."):
            raise ConfigError(where, f"{value!r} cannot separate a detail")
    return value


def check_template(value: str, where: str) -> None:
    rest = value.replace("{domain}", "").replace("{user}", "")
    if "{" in rest or "}" in rest:
        raise ConfigError(where, "only {domain} and {user} may appear in braces")
    if "{user}" not in value:
        raise ConfigError(where, "must contain {user}")
    if "/../" in value + "/" or "/./" in value + "/":
        raise ConfigError(where, "must not contain '.' or '..' components")


def build(data: "dict[str, object]", path: str = "", lines: "dict[tuple[str, str], int] | None" = None) -> Config:
    cfg = Config(path)
    cfg._lines = lines or {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in TABLES:
                raise ConfigError(cfg.where(key, ""), f"unknown table [{key}]")
            cfg.tables[key] = value
            continue
        if key not in SCHEMA:
            raise ConfigError(cfg.where("", key), "unknown key")
        setattr(cfg, key, _check(cfg, key, value))
    return cfg


GROUP_JOURNAL = ".vdeliver-group-journal.lock"  # beside the mbox domains (never a domain's name)


def group_journal(cfg: Config) -> str:
    """Where the LMTP server's group journal is ([lmtp] group_journal, vdeliver/groupjournal.py):
    by default in the directory above the first placeholder of mbox_path (/var/spool/vbox for
    /var/spool/vbox/{domain}/{user}).  Every mbox delivery looks there for a busy slot naming
    its mbox.  "" when the value is not an absolute path (vdeliver-lmtpd refuses to start
    with it, so no server wrote one anywhere)."""
    value = cfg.table("lmtp").get("group_journal", "")
    if value:
        return value if isinstance(value, str) and value.startswith("/") else ""
    template = cfg.mbox_path
    cut = template.find("{")
    prefix = template if cut < 0 else template[:cut]
    return (prefix[: prefix.rfind("/")] or "") + "/" + GROUP_JOURNAL


def home_template(cfg: Config) -> str:
    """A user's home as the generated Dovecot configuration gives it: `[dovecot] home`, else
    the Maildir template's parent (`/home/vmail-users/{domain}/{user}`)."""
    home = cfg.table("dovecot").get("home")
    if isinstance(home, str) and home:
        return home
    head, tail = fileio.split(cfg.maildir_path.rstrip("/"))
    return cfg.maildir_path.rstrip("/") if "{user}" in tail or "{domain}" in tail else head


def config_path(explicit: "str | None" = None) -> "tuple[str, bool]":
    """(path, must_exist): -c wins, then $VDELIVER_CONFIG, then the default."""
    if explicit:
        return explicit, True
    env = fileio.getenv("VDELIVER_CONFIG")
    if env:
        return env, True
    return DEFAULT_PATH, False


def load(explicit: "str | None" = None, cache: bool = False) -> Config:
    """The configuration; with cache=True (the per-message CLI) the parsed form of an unchanged
    file comes from the cache (see _cache_get), and a parsed one goes there."""
    path, must_exist = config_path(explicit)
    if not must_exist and not fileio.exists(path):
        return Config(path)
    raw, identity = _read_raw(path)
    if cache:
        cached = _cache_get(path, identity, raw)
        if cached is not None:
            try:
                return build(cached[0], path, cached[1])
            except ConfigError:
                pass  # valid when cached, not now (another vdeliver version): parse it again
    data, lines = _parse(path, raw)
    cfg = build(data, path, lines)
    if cache:
        _cache_put(path, identity, raw, data, lines)
    return cfg


# -- the cache of the parsed file ----------------------------------------------
#
# A per-message run parses the same file every time; the TOML fallback alone (tomllib pulls in
# re, typing and datetime) costs more than a delivery.  The cache keeps what _parse() returned,
# for a file that build() accepted, in CACHE_DIR (default /var/cache/vdeliver, or
# $VDELIVER_CACHE_DIR; empty: no cache), one file per reading user and configuration path:
# `config.<euid>.<path with / as %2F>`.  It is the marshal form (data only, never code) of
# (FORMAT, vdeliver version, path, identity, the file's bytes, data, lines).
#
# Used only when all of these hold, otherwise the file is parsed as if there were no cache:
# - opened without following a symlink, a regular file owned by the process's own user and
#   writable by nobody else (checked on the descriptor): content someone else could have
#   written is never read;
# - it reads back whole, in this format, from this vdeliver version and this Python;
# - it is for this path, the identity (dev, ino, size, mtime_ns, ctime_ns) is the one just
#   read from the file's descriptor, and its bytes are the ones just read: an edit within the
#   same clock tick, which timestamps cannot see, still misses;
# - build() still checks every value, so a cached form never skips validation, and a file's
#   errors (which are never cached) are reported with file and line as without a cache.
# Written to a new file (O_EXCL, O_NOFOLLOW, 0600) renamed over the old one, only into a
# directory owned by root or by us that nobody else can write (unless sticky, as /tmp is).
# A failure at any step is silent: the cache only ever saves time.

CACHE_DIR = "/var/cache/vdeliver"
CACHE_FORMAT = 1
MAX_CACHE = 1 << 21


def cache_file(path: str) -> "str | None":
    """Where the parsed form of the configuration at `path` is kept for this user, or None."""
    directory = fileio.getenv("VDELIVER_CACHE_DIR")
    if directory is None:
        directory = CACHE_DIR
    if not directory:
        return None
    name = f"config.{os.geteuid()}." + fileio.abspath(path).replace("%", "%25").replace("/", "%2F")
    if len(name) > 200:
        return None
    return fileio.join(directory, name)


def _cache_key(path: str, identity: "tuple[int, int, int, int, int]", raw: bytes) -> "tuple[object, ...]":
    from vdeliver import __version__

    return (CACHE_FORMAT, __version__, fileio.abspath(path), identity, raw)


def _cache_get(path: str, identity: "tuple[int, int, int, int, int]",
               raw: bytes) -> "tuple[dict[str, object], dict[tuple[str, str], int]] | None":
    where = cache_file(path)
    if where is None:
        return None
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if ((st.st_mode & 0o170000) != 0o100000 or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or not 0 < st.st_size <= MAX_CACHE):
            return None
        blob = os.read(fd, st.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    import marshal

    try:
        got = marshal.loads(blob)
    except (ValueError, EOFError, TypeError):
        return None
    key = _cache_key(path, identity, raw)
    if (type(got) is not tuple or len(got) != len(key) + 2 or got[: len(key)] != key
            or type(got[-2]) is not dict or type(got[-1]) is not dict):
        return None
    return got[-2], got[-1]


def _cache_put(path: str, identity: "tuple[int, int, int, int, int]", raw: bytes,
               data: "dict[str, object]", lines: "dict[tuple[str, str], int]") -> None:
    where = cache_file(path)
    if where is None:
        return
    import marshal

    try:
        blob = marshal.dumps((*_cache_key(path, identity, raw), data, lines))  # type: ignore[arg-type]
    except ValueError:
        return  # a value marshal does not take (a TOML date): no cache for this file
    if len(blob) > MAX_CACHE:
        return
    directory = fileio.dirname(where)
    try:
        st = os.lstat(directory)
        if ((st.st_mode & 0o170000) != 0o040000 or st.st_uid not in (0, os.geteuid())
                or (st.st_mode & 0o022 and not st.st_mode & 0o1000)):
            return
        tmp = f"{where}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, where)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# libpq's keepalives and TCP user timeout: a PostgreSQL server that vanishes from the network
# (a failed primary's host) must not hold a query for the kernel's TCP timeout (minutes).
# Unix-socket connections ignore them.
PG_TCP_LIVENESS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
                   "tcp_user_timeout": 10000}


def pg_liveness(dsn: str) -> "dict[str, Any]":
    """The PG_TCP_LIVENESS keywords the connection string does not set itself (typed Any:
    they are psycopg.connect's **kwargs)."""
    return {key: value for key, value in PG_TCP_LIVENESS.items() if key not in dsn}
