"""GetRandomPassword: a password from the operating system's CSPRNG (``secrets``).

Four character classes (lower case, upper case, digits, ASCII punctuation), each of which
may be left out, less any characters named in ``exclude``. With ``require_each`` one
character of each class that still has characters is drawn from that class, the rest from
all of them, and the order is shuffled, all with the CSPRNG: a bounded draw, where drawing
until a password happens to hold every class could take thousands of tries when several
classes are cut down to a character or two. The password is never logged or audited: it
is returned, and gone.
"""

from __future__ import annotations

import secrets
import string
from typing import Final

from kms_proxy.core.errors import InvalidParameter

__all__ = ["CLASSES", "random_password"]

# ``secrets`` has no shuffle; SystemRandom is the same source (os.urandom).
_SYSTEM_RANDOM: Final = secrets.SystemRandom()

# Name of the parameter that leaves the class out -> the class's characters.
CLASSES: Final = {
    "ExcludeLowercase": string.ascii_lowercase,
    "ExcludeUppercase": string.ascii_uppercase,
    "ExcludeNumbers": string.digits,
    "ExcludePunctuation": string.punctuation,
}


def random_password(length: int, *, excluded_classes: frozenset[str] = frozenset(),
                    exclude: str = "", require_each: bool = False) -> str:
    """:raises InvalidParameter: if nothing is left to draw from, or ``require_each`` asks
    for more classes than ``length`` has characters."""
    # A character no class holds (a space, a letter of another script) is left out anyway.
    pools = [chars for name, chars in CLASSES.items() if name not in excluded_classes]
    pools = [kept for kept in ("".join(c for c in pool if c not in exclude) for pool in pools)
             if kept]
    if not pools:
        raise InvalidParameter("ExcludeCharacters", "every character is excluded")
    if require_each and len(pools) > length:
        raise InvalidParameter("PasswordLength", f"too short to hold each of the "
                                                 f"{len(pools)} included character types")
    alphabet = "".join(pools)
    chosen = [secrets.choice(pool) for pool in pools] if require_each else []
    chosen += [secrets.choice(alphabet) for _ in range(length - len(chosen))]
    _SYSTEM_RANDOM.shuffle(chosen)
    return "".join(chosen)
