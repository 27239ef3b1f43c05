"""``random_password``: the rules hold, and RequireEachIncludedType does not tilt the
characters towards the small classes."""

from __future__ import annotations

import string

import pytest

from kms_proxy.core import passwords
from kms_proxy.core.errors import InvalidParameter
from kms_proxy.core.passwords import random_password


def test_each_included_type_keeps_the_distribution_uniform() -> None:
    """Uniform over the passwords that hold every type, digits are about 10.9% of the
    characters at length 32 (10/94, raised a little by the condition). Building one of
    each type into every password and filling the rest gave 12.4%."""
    drawn = "".join(random_password(32, require_each=True) for _ in range(4000))
    share = sum(c in string.digits for c in drawn) / len(drawn)
    assert 0.100 < share < 0.118, share


@pytest.mark.parametrize("uniform_draws", [passwords._UNIFORM_DRAWS, 0])
def test_narrow_classes_are_still_present(monkeypatch: pytest.MonkeyPatch,
                                          uniform_draws: int) -> None:
    """Three classes cut to one character each: about one draw in 94 holds all three, so
    some calls end in the bounded construction; with no uniform draws every call does."""
    monkeypatch.setattr(passwords, "_UNIFORM_DRAWS", uniform_draws)
    exclude = string.digits[1:] + string.ascii_uppercase[1:] + string.punctuation[1:]
    for _ in range(200):
        password = random_password(8, exclude=exclude, require_each=True)
        assert len(password) == 8
        assert {"0", "A", string.punctuation[0]} <= set(password)
        assert set(password) <= set(string.ascii_lowercase + "0A" + string.punctuation[0])


def test_the_refusals_name_the_parameter_at_fault() -> None:
    every = frozenset({"ExcludeLowercase", "ExcludeUppercase", "ExcludeNumbers",
                       "ExcludePunctuation"})
    with pytest.raises(InvalidParameter) as caught:
        random_password(8, excluded_classes=every)
    assert caught.value.name == "Exclude*"
    with pytest.raises(InvalidParameter) as caught:
        random_password(8, exclude=string.ascii_letters + string.digits + string.punctuation)
    assert caught.value.name == "ExcludeCharacters"
    with pytest.raises(InvalidParameter) as caught:
        random_password(3, require_each=True)
    assert caught.value.name == "PasswordLength"
