"""``Params.repeated`` and ``Params.repeated_objects``: the SDK's flattened lists
(``ResourceId.1``, ``Tag.1.Key``) read back exactly, and anything else refused by name."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_proxy.api.params import Params
from kms_proxy.core.errors import InvalidParameter


def test_a_list_reads_back_in_index_order() -> None:
    params = Params({"ResourceId.2": "b", "ResourceId.1": "a", "ResourceId.10": "j",
                     **{f"ResourceId.{i}": chr(96 + i) for i in range(3, 10)},
                     "Other": "x", "ResourceIdentity": "not ours"})
    assert params.repeated("ResourceId", max_items=50) == list("abcdefghij")
    assert Params({}).repeated("ResourceId", max_items=50) == []


def test_objects_keep_the_fields_they_were_sent_with() -> None:
    params = Params({"Tag.1.Key": "k1", "Tag.1.Value": "v1", "Tag.2.Key": "k2"})
    assert params.repeated_objects("Tag", ("Key", "Value"), max_items=20) == [
        {"Key": "k1", "Value": "v1"}, {"Key": "k2"}]


@pytest.mark.parametrize(("values", "named"), [
    ({"ResourceId.0": "a"}, "ResourceId.0"),
    ({"ResourceId.01": "a"}, "ResourceId.01"),
    ({"ResourceId.+1": "a"}, "ResourceId.+1"),
    ({"ResourceId.1": "a", "ResourceId.3": "c"}, "ResourceId.N"),
    ({"ResourceId.51": "a"}, "ResourceId.51"),
    ({"ResourceId.1.Key": "a"}, "ResourceId.1.Key"),
    ({"ResourceId.1": ""}, "ResourceId.1"),
    ({"ResourceId.1": "x" * 129}, "ResourceId.1"),
    ({"ResourceId.": "a"}, "ResourceId."),
    ({"ResourceId.1": "a", "ResourceId.1.": "b"}, "ResourceId.1."),  # not a second .1
    ({"ResourceId.\u0661": "a"}, "ResourceId.\u0661"),  # an Arabic-Indic digit one
])
def test_bad_lists_are_refused_by_name(values: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        Params(values).repeated("ResourceId", max_items=50)
    assert caught.value.name == named


@pytest.mark.parametrize(("values", "named"), [
    ({"Tag.1": "k"}, "Tag.1"),
    ({"Tag.1.Colour": "red"}, "Tag.1.Colour"),
    ({"Tag.1.Key.x": "k"}, "Tag.1.Key.x"),
    ({"Tag.1.Key": "k", "Tag.1.": "v"}, "Tag.1."),
    ({"Tag.21.Key": "k"}, "Tag.21.Key"),
    ({"Tag.2.Key": "k"}, "Tag.N"),
])
def test_bad_object_lists_are_refused_by_name(values: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidParameter) as caught:
        Params(values).repeated_objects("Tag", ("Key", "Value"), max_items=20)
    assert caught.value.name == named


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(
    st.one_of(st.builds(lambda s: "Tag." + s, st.text(max_size=12)),
              st.builds(lambda n, f: f"Tag.{n}.{f}", st.integers(-2, 25),
                        st.sampled_from(["Key", "Value", "", "key", "Key.1"])),
              st.text(max_size=8)),
    st.text(max_size=140), max_size=12))
def test_any_input_is_a_list_or_a_named_refusal(values: dict[str, str]) -> None:
    params = Params(values)
    for read in (lambda: params.repeated("Tag", max_items=20),
                 lambda: params.repeated_objects("Tag", ("Key", "Value"), max_items=20)):
        try:
            items = read()
        except InvalidParameter as exc:
            assert exc.name.startswith("Tag.")
        else:
            assert len(items) <= 20
            # Every item came from a parameter of the family, none invented.
            sent = {v for k, v in values.items() if k.startswith("Tag.")}
            for item in items:
                got = item.values() if isinstance(item, dict) else [item]
                assert set(got) <= sent
