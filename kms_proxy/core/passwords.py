"""GetRandomPassword: a password from the operating system's CSPRNG (``secrets``).

Four character classes (lower case, upper case, digits, ASCII punctuation), each of which
may be left out, less any characters named in ``exclude``. With ``require_each`` every
class that still has characters appears at least once. Passwords are drawn until one has
them all, which keeps the result uniform over the passwords that meet the rule (at the
default length 32 about 97 draws in 100 are kept, at length 8 about one in two). When a
class is cut down to a character or two that could take thousands of draws, so after
``_UNIFORM_DRAWS`` a password is built instead: one character from each class, the rest
from all of them, shuffled. That is bounded but not uniform (it favours small classes a
little), and only such narrow requests reach it. The password is never logged or
audited: it is returned, and gone.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from kms_proxy.core.errors import InvalidParameter

__all__ = ["CLASSES", "random_password"]

# ``secrets`` has no shuffle; SystemRandom is the same source (os.urandom).
_SYSTEM_RANDOM: Final = secrets.SystemRandom()
# Whole-password draws before the bounded construction (see the module docstring): at
# length 8 with every class, 64 draws all fail about once in 10^19 requests.
_UNIFORM_DRAWS: Final = 64

# Name of the parameter that leaves the class out -> the class's characters.
CLASSES: Final[Mapping[str, str]] = MappingProxyType({
    "ExcludeLowercase": string.ascii_lowercase,
    "ExcludeUppercase": string.ascii_uppercase,
    "ExcludeNumbers": string.digits,
    "ExcludePunctuation": string.punctuation,
})


def random_password(length: int, *, excluded_classes: frozenset[str] = frozenset(),
                    exclude: str = "", require_each: bool = False) -> str:
    """:raises InvalidParameter: if nothing is left to draw from, or ``require_each`` asks
    for more classes than ``length`` has characters."""
    # A character no class holds (a space, a letter of another script) is left out anyway.
    pools = [chars for name, chars in CLASSES.items() if name not in excluded_classes]
    if not pools:
        raise InvalidParameter("Exclude*", "every character type is excluded")
    pools = [kept for kept in ("".join(c for c in pool if c not in exclude) for pool in pools)
             if kept]
    if not pools:
        raise InvalidParameter("ExcludeCharacters", "it excludes every character left")
    if require_each and len(pools) > length:
        raise InvalidParameter("PasswordLength", f"too short to hold each of the "
                                                 f"{len(pools)} included character types")
    alphabet = "".join(pools)
    for _ in range(_UNIFORM_DRAWS if require_each else 1):
        password = "".join(secrets.choice(alphabet) for _ in range(length))
        if not require_each or all(any(c in pool for c in password) for pool in pools):
            return password
    chosen = [secrets.choice(pool) for pool in pools]
    chosen += [secrets.choice(alphabet) for _ in range(length - len(chosen))]
    _SYSTEM_RANDOM.shuffle(chosen)
    return "".join(chosen)
