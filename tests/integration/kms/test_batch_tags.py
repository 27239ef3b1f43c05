"""The batch tag actions (TagResources, UntagResources, ListTagResources) through the
official SDK: lists flattened as ``ResourceId.N`` and ``Tag.N.Key``, all or none, and a
``NextToken`` that neither repeats nor skips a row."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from alibabacloud_kms20160120 import models
from alibabacloud_kms20160120.client import Client

from tests.integration.kms.conftest import (
    ACCOUNT_A,
    ACCOUNT_B,
    REGION,
    Kms,
    StartKms,
    assert_error,
)


def tag_rows(kms: Kms) -> set[tuple[str, str, str]]:
    """Every tag in the database (opened read-only)."""
    with sqlite3.connect(f"file:{kms.config.database}?mode=ro", uri=True) as db:
        return set(db.execute("SELECT key_id, tag_key, tag_value FROM tags").fetchall())


async def new_key(kms: Kms, client: Client, **kwargs: Any) -> str:
    body = await kms.sdk(client, "create_key", models.CreateKeyRequest(**kwargs))
    return str(body.key_metadata.key_id)


def tag(key: str, value: str | None = None) -> Any:
    return models.TagResourcesRequestTag(key=key, value=value)


async def listed(kms: Kms, client: Client, **kwargs: Any) -> tuple[list[tuple[str, ...]],
                                                                    str | None]:
    body = await kms.sdk(client, "list_tag_resources", models.ListTagResourcesRequest(
        region_id=REGION, resource_type="key", **kwargs))
    rows = [(r.resource_id, r.resource_type, r.tag_key, r.tag_value)
            for r in body.tag_resources.tag_resource]
    return rows, body.next_token


async def test_tag_list_and_untag_several_keys(kms: Kms, client: Client) -> None:
    one, two, three = [await new_key(kms, client) for _ in range(3)]
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(
        alias_name="alias/two", key_id=two))
    arn_three = f"acs:kms:{REGION}:{ACCOUNT_A}:key/{three}"
    # The same key twice (by id and by alias) is tagged once.
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[one, "alias/two", arn_three, two],
        tag=[tag("team", "blue"), tag("env", "prod"), tag("empty")]))
    expected = sorted((k, "key", t, v) for k in (one, two, three)
                      for t, v in (("team", "blue"), ("env", "prod"), ("empty", "")))
    rows, token = await listed(kms, client, resource_id=[three, one, two])
    assert rows == expected
    assert token is None
    # The single-key action sees the same tags.
    single = await kms.sdk(client, "list_resource_tags",
                           models.ListResourceTagsRequest(key_id=two))
    assert {(t.tag_key, t.tag_value) for t in single.tags.tag} == {
        ("team", "blue"), ("env", "prod"), ("empty", "")}

    # A filter keeps the keys that carry every tag asked for (with its value when given).
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[two],
        tag=[tag("team", "red")]))
    rows, _ = await listed(kms, client, tag=[models.ListTagResourcesRequestTag(
        key="team", value="blue"), models.ListTagResourcesRequestTag(key="env")])
    assert {r[0] for r in rows} == {one, three}
    rows, _ = await listed(kms, client, tag=[models.ListTagResourcesRequestTag(
        key="team", value="red")])
    assert {r[0] for r in rows} == {two}

    await kms.sdk(client, "untag_resources", models.UntagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[one, two],
        tag_key=["team", "never-there"]))
    await kms.sdk(client, "untag_resources", models.UntagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[arn_three], all=True))
    assert tag_rows(kms) == {(k, t, v) for k in (one, two)
                             for t, v in (("env", "prod"), ("empty", ""))}
    # Without ResourceId: every key of the account.
    rows, _ = await listed(kms, client)
    assert {(r[0], r[2]) for r in rows} == {(k, t) for k in (one, two)
                                            for t in ("env", "empty")}


async def test_a_batch_changes_all_its_keys_or_none(kms: Kms, client: Client) -> None:
    full, free, doomed = [await new_key(kms, client) for _ in range(3)]
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[full],
        tag=[tag(f"k{i:02d}", "v") for i in range(19)]))
    await kms.sdk(client, "schedule_key_deletion", models.ScheduleKeyDeletionRequest(
        key_id=doomed, pending_window_in_days=7))
    other_account = kms.client("b1")
    foreign = await new_key(kms, other_account)
    foreign_arn = f"acs:kms:{REGION}:{ACCOUNT_B}:key/{foreign}"
    before = tag_rows(kms)

    two_more = [tag("new1", "v"), tag("new2", "v")]
    cases: list[tuple[list[str], int, str, str | None]] = [
        ([free, full], 400, "InvalidParameter", "Tag"),  # full would have 21
        ([free, "key-not-there"], 404, "Forbidden.KeyNotFound", None),
        ([free, doomed], 409, "Rejected.PendingDeletion", None),
        ([free, foreign_arn], 403, "Forbidden.NoPermission", None),
    ]
    for refs, status, code, names in cases:
        reply = await kms.sdk_error(client, "tag_resources", models.TagResourcesRequest(
            region_id=REGION, resource_type="key", resource_id=refs, tag=two_more))
        assert_error(reply, status, code, names=names)
        if names == "Tag":
            assert full in reply.body["Message"]
        assert tag_rows(kms) == before, refs
    reply = await kms.sdk_error(client, "untag_resources", models.UntagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[full, doomed], all=True))
    assert_error(reply, 409, "Rejected.PendingDeletion")
    assert tag_rows(kms) == before
    # A key pending deletion still lists (a read).
    rows, _ = await listed(kms, client, resource_id=[doomed])
    assert rows == []


async def test_pages_of_200_rows_neither_repeat_nor_skip(kms: Kms, client: Client) -> None:
    keys = [await new_key(kms, client) for _ in range(12)]
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=keys,
        tag=[tag(f"t{i:02d}", str(i)) for i in range(19)]))
    first, token = await listed(kms, client, resource_id=keys)
    assert len(first) == 200 and token
    # A tag that sorts before the page boundary, added between pages, is not repeated;
    # the rows after the boundary all come.
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[min(keys)],
        tag=[tag("a-late", "x")]))
    second, last = await listed(kms, client, resource_id=keys, next_token=token)
    assert last is None
    assert len(second) == 12 * 19 - 200
    everything = sorted((k, "key", f"t{i:02d}", str(i)) for k in keys for i in range(19))
    assert first + second == everything


async def test_bad_batch_parameters_change_nothing(kms: Kms, client: Client) -> None:
    key = await new_key(kms, client)
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[key], tag=[tag("keep", "me")]))
    before = tag_rows(kms)
    base = {"RegionId": REGION, "ResourceType": "key", "ResourceId.1": key,
            "Tag.1.Key": "k", "Tag.1.Value": "v"}
    cases: list[tuple[str, dict[str, Any], int, str, str | None]] = [
        ("TagResources", {"RegionId": None}, 400, "MissingParameter", "RegionId"),
        ("TagResources", {"RegionId": "cn-elsewhere"}, 400, "InvalidParameter", "RegionId"),
        ("TagResources", {"ResourceType": None}, 400, "MissingParameter", "ResourceType"),
        ("TagResources", {"ResourceType": "secret"}, 400, "Rejected.UnsupportedOperation",
         None),
        ("TagResources", {"ResourceType": "Key"}, 400, "InvalidParameter", "ResourceType"),
        ("TagResources", {"ResourceId.1": None}, 400, "MissingParameter", "ResourceId.1"),
        ("TagResources", {"ResourceId.3": key}, 400, "InvalidParameter", "ResourceId.N"),
        ("TagResources", {"ResourceId.0": key}, 400, "InvalidParameter", "ResourceId.0"),
        ("TagResources", {"ResourceId.01": key}, 400, "InvalidParameter", "ResourceId.01"),
        ("TagResources", {"ResourceId.1.Key": key}, 400, "InvalidParameter",
         "ResourceId.1.Key"),
        ("TagResources", {f"ResourceId.{i}": key for i in range(1, 52)}, 400,
         "InvalidParameter", "ResourceId.51"),
        ("TagResources", {"ResourceId.1": "x" * 513}, 400, "InvalidParameter",
         "ResourceId.1"),
        ("TagResources", {"Tag.1.Key": None, "Tag.1.Value": None}, 400, "MissingParameter",
         "Tag.1.Key"),
        ("TagResources", {"Tag.1.Key": None}, 400, "MissingParameter", "Tag.1.Key"),
        ("TagResources", {"Tag.1.Colour": "red"}, 400, "InvalidParameter", "Tag.1.Colour"),
        ("TagResources", {"Tag.1": "k"}, 400, "InvalidParameter", "Tag.1"),
        ("TagResources", {"Tag.2.Key": "k"}, 400, "InvalidParameter", "Tag"),
        ("TagResources", {f"Tag.{i}.Key": f"k{i}" for i in range(2, 22)}, 400,
         "InvalidParameter", "Tag.21.Key"),
        ("TagResources", {"Tag.1.Key": "acs:reserved"}, 400, "InvalidParameter", "Tag"),
        ("TagResources", {"Tag.1.Value": "bad#value"}, 400, "InvalidParameter", "Tag"),
        ("UntagResources", {"Tag.1.Key": None, "Tag.1.Value": None}, 400,
         "MissingParameter", "TagKey.1"),
        ("UntagResources", {"Tag.1.Key": None, "Tag.1.Value": None, "All": "false"}, 400,
         "MissingParameter", "TagKey.1"),
        ("UntagResources", {"Tag.1.Key": None, "Tag.1.Value": None, "All": "maybe"}, 400,
         "InvalidParameter", "All"),
        ("UntagResources", {"TagKey.2": "keep"}, 400, "InvalidParameter", "TagKey.N"),
        ("ListTagResources", {"NextToken": "not-a-token"}, 400, "InvalidParameter",
         "NextToken"),
        ("ListTagResources", {"NextToken": "WyJhIl0"}, 400, "InvalidParameter",
         "NextToken"),  # base64url of ["a"]: JSON, but not a position
    ]
    for action, change, status, code, names in cases:
        query = {k: v for k, v in {**base, **change}.items() if v is not None}
        reply = await kms.call(client, action, query)
        assert_error(reply, status, code, names=names)
        assert tag_rows(kms) == before, (action, change)


async def test_a_long_alias_names_a_resource_as_it_names_a_key(kms: Kms,
                                                                client: Client) -> None:
    key = await new_key(kms, client)
    alias = "alias/" + "a" * 255
    await kms.sdk(client, "create_alias", models.CreateAliasRequest(alias_name=alias,
                                                                    key_id=key))
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key",
        resource_id=[alias, f"acs:kms:{REGION}:{ACCOUNT_A}:{alias}"], tag=[tag("k", "v")]))
    assert tag_rows(kms) == {(key, "k", "v")}


async def test_a_batch_is_audited_with_every_key(start_kms: StartKms) -> None:
    kms = await start_kms()
    client = kms.client()
    one, two = [await new_key(kms, client) for _ in range(2)]
    await kms.sdk(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[one, two], tag=[tag("a", "b")]))
    await kms.sdk_error(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[one, "alias/nowhere", two],
        tag=[tag("a", "b")]))
    await kms.sdk(client, "schedule_key_deletion", models.ScheduleKeyDeletionRequest(
        key_id=two, pending_window_in_days=7))
    await kms.sdk_error(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=[one, two], tag=[tag("a", "b")]))
    await kms.sdk_error(client, "tag_resources", models.TagResourcesRequest(
        region_id=REGION, resource_type="key", resource_id=["key-nowhere"],
        tag=[tag("a", "b")]))
    await kms.stop()  # flushes the audit log
    events = [json.loads(line) for line in kms.config.audit_log.read_text().splitlines()]
    tagged, refused, pending, alone = [e for e in events if e["action"] == "TagResources"]
    assert tagged["outcome"] == "Success"
    assert tagged["details"]["ResourceIds"] == f"{one},{two}"
    assert tagged["key_id"] is None
    # Refused for an alias not found: the line names no key (not the one found before it)
    # and lists the batch as sent.
    assert refused["error_code"] == "Forbidden.AliasNotFound"
    assert refused["key_id"] is None
    assert refused["details"]["ResourceIds"] == f"{one},alias/nowhere,{two}"
    # Refused for a key found: that key is named.
    assert pending["error_code"] == "Rejected.PendingDeletion"
    assert pending["key_id"] == two
    # A one-key batch refused before its key was found names it as sent, as a single
    # action's refusal does.
    assert (alone["error_code"], alone["key_id"]) == ("Forbidden.KeyNotFound", "key-nowhere")
