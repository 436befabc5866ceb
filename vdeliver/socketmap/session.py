"""What one socketmap connection remembers between its requests: the FallbackChain.

The connections themselves are served by loop.py (one epoll thread for all of them);
this module keeps sendmail's virtuser fallbacks from routing around a failed lookup.
"""

from __future__ import annotations

from vdeliver.socketmap import protocol as p


class FallbackChain:
    """Keep sendmail's virtuser fallbacks from routing around a failed lookup.

    For `user+detail@d` sendmail asks `user+detail@d`, `user++@d`, `user+*@d`,
    `user@d`, `++@d`, `+*@d`, `@d` in turn on one connection (for `user@d`:
    `user@d`, `@d`), and a temporary failure of one key does NOT stop it from
    using the answer to a later one (measured: with `fred@home.com` failing and
    `@home.com` cached, the mail went to the catch-all).  A cached `@d
    error:nouser` would then bounce mail for a user who exists.  So once a key
    fails, the keys that can only be its later fallbacks fail too, on that
    connection; any other key (including the failed one again) starts afresh.
    """

    MAPS = frozenset({"virtuser"})

    def __init__(self) -> None:
        self.failed: tuple[str, str, frozenset[str]] | None = None  # (map, domain, later local parts)

    def check(self, map_name: str, key: str) -> p.Reply | None:
        if self.failed is None or map_name not in self.MAPS:
            return None
        fmap, fdomain, later = self.failed
        local, _, domain = key.rpartition("@")
        if map_name == fmap and domain == fdomain and local in later:
            return p.temp("an earlier lookup for this address failed")
        self.failed = None  # another address: a new chain
        return None

    def record(self, map_name: str, key: str, reply: p.Reply) -> None:
        if map_name not in self.MAPS or reply.status not in ("TEMP", "TIMEOUT"):
            return
        local, _, domain = key.rpartition("@")
        later = {""}
        if "+" in local:
            user = local.split("+", 1)[0]
            later |= {f"{user}++", f"{user}+*", user, "++", "+*"}
        later.discard(local)
        self.failed = (map_name, domain, frozenset(later))

