"""Password hashes Dovecot verifies: `{ARGON2ID}` (argon2-cffi) and `{BLF-CRYPT}` (bcrypt).

The scheme prefix is always stored: Dovecot's default_pass_scheme is MD5, so an
unprefixed hash would be misread.  Hashes imported from another Dovecot scheme
(`{SHA512-CRYPT}...`) are kept as they are; Dovecot still verifies them.
bcrypt looks at 72 bytes at most (bcrypt 5 refuses longer input): longer
passwords are refused, never silently truncated.
"""

from __future__ import annotations

import re

from vdeliver.accounts.errors import AccountsError, InvalidName
from vdeliver.accounts.settings import Settings

BCRYPT_MAX = 72
MAX_PASSWORD = 1024
_SCHEME = re.compile(r"^\{([A-Z0-9.-]+)\}\S+$")


class PasswordError(AccountsError):
    """A password the hasher refuses."""


def check_password(password: str, scheme: str) -> bytes:
    raw = password.encode("utf-8")
    if not raw:
        raise PasswordError("empty password")
    if len(raw) > MAX_PASSWORD:
        raise PasswordError(f"password longer than {MAX_PASSWORD} bytes")
    if "\n" in password or "\r" in password or "\0" in password:
        raise PasswordError("password contains a line break or NUL")
    if scheme == "BLF-CRYPT" and len(raw) > BCRYPT_MAX:
        raise PasswordError(f"password longer than {BCRYPT_MAX} bytes, the limit of {{BLF-CRYPT}} (bcrypt)")
    return raw


def hash_password(password: str, settings: Settings, scheme: str | None = None) -> str:
    scheme = (scheme or settings.password_scheme).upper()
    raw = check_password(password, scheme)
    if scheme == "ARGON2ID":
        from argon2 import PasswordHasher, Type

        hasher = PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_cost,
            parallelism=settings.argon2_parallelism,
            type=Type.ID,
        )
        return "{ARGON2ID}" + hasher.hash(raw)
    if scheme == "BLF-CRYPT":
        try:
            import bcrypt
        except ImportError:
            raise PasswordError("{BLF-CRYPT} needs the bcrypt package (pip install vdeliver[bcrypt])") from None
        return "{BLF-CRYPT}" + bcrypt.hashpw(raw, bcrypt.gensalt(settings.bcrypt_rounds)).decode("ascii")
    raise PasswordError(f"unsupported password scheme {scheme!r}")


def verify(password: str, stored: str) -> bool:
    """True when password matches a stored {ARGON2ID} or {BLF-CRYPT} hash."""
    raw = password.encode("utf-8")
    if stored.startswith("{ARGON2ID}"):
        from argon2 import PasswordHasher
        from argon2.exceptions import InvalidHashError, VerificationError

        try:
            return PasswordHasher().verify(stored[len("{ARGON2ID}"):], raw)
        except (VerificationError, InvalidHashError):
            return False
    if stored.startswith("{BLF-CRYPT}"):
        import bcrypt

        if len(raw) > BCRYPT_MAX:
            return False
        try:
            return bcrypt.checkpw(raw, stored[len("{BLF-CRYPT}"):].encode("ascii"))
        except ValueError:
            return False
    return False


def check_imported(stored: str) -> str:
    """An imported hash must carry a {SCHEME} prefix, as Dovecot needs."""
    if not _SCHEME.match(stored):
        raise InvalidName("imported password hash has no {SCHEME} prefix (or contains white space)")
    return stored


def scheme_of(stored: str) -> str:
    m = _SCHEME.match(stored)
    return m.group(1) if m else ""
