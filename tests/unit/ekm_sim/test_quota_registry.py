"""Unit tests for ekm_sim.quota.TokenBucket and ekm_sim.registry.KeyRegistry."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from ekm_sim.registry import KeyRecord, KeyRegistry, RegistryError
from shared.ratelimit import TokenBucket


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def drain(bucket: TokenBucket, limit: int = 10_000) -> int:
    """Take until refused; return how many were granted."""
    granted = 0
    while bucket.take():
        granted += 1
        assert granted < limit, "bucket never ran dry"
    return granted


# ------------------------------------------------------------------------------ TokenBucket


def test_bucket_starts_full_and_allows_a_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]


def test_bucket_refills_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert drain(bucket) == 3
    clock.advance(0.25)  # half a token
    assert bucket.take() is False
    clock.advance(0.25)  # one token in total
    assert bucket.take() is True
    assert bucket.take() is False
    clock.advance(1.0)  # two tokens
    assert drain(bucket) == 2


def test_refused_take_spends_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.take() is True
    for _ in range(10):
        assert bucket.take() is False
    clock.advance(1.0)
    assert bucket.take() is True


def test_bucket_does_not_overfill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100, burst=4, clock=clock)
    assert drain(bucket) == 4
    clock.advance(3600)
    assert drain(bucket) == 4


def test_bucket_full_bucket_stays_at_burst_after_idle_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=2, clock=clock)
    clock.advance(100)  # never taken from: still only the burst
    assert drain(bucket) == 2


def test_sustained_rate_over_time() -> None:
    # Binary fractions keep the float arithmetic exact, so the count is exact too.
    clock = FakeClock(now=1024.0)
    bucket = TokenBucket(rate=8, burst=1, clock=clock)
    granted = 0
    for _ in range(640):  # 10 s in 1/64 s steps, trying 3 times per step
        clock.advance(1 / 64)
        granted += sum(bucket.take() for _ in range(3))
    # The full bucket pays the first take at t=1/64 s; after that one token per 8 steps
    # (1/8 s): steps 9, 17, ... 633. Refill while full is discarded, never banked.
    assert granted == 1 + (640 - 1) // 8


def test_fractional_burst_and_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=0.5, burst=1.5, clock=clock)
    assert drain(bucket) == 1  # 1.5 tokens: one whole one
    clock.advance(1.0)  # 0.5 + 0.5 = 1.0
    assert drain(bucket) == 1
    clock.advance(1.0)
    assert bucket.take() is False


def test_clock_is_read_at_construction() -> None:
    clock = FakeClock(now=50.0)
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.take() is True
    clock.now = 50.5
    assert bucket.take() is False
    clock.now = 51.0
    assert bucket.take() is True


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, 0.5), (1, -3)])
def test_bucket_refuses_bad_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=rate, burst=burst, clock=FakeClock())


# ----------------------------------------------------------------------------- KeyRegistry


def record(key_id: str, *, enabled: bool = True, versions: tuple[int, ...] = (1,)) -> KeyRecord:
    return KeyRecord(key_id=key_id, enabled=enabled, versions=versions,
                     created="2024-05-15T12:00:00Z")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys.json"


@pytest.fixture
def registry(path: Path) -> KeyRegistry:
    return KeyRegistry(path, refresh_seconds=0)


def test_key_record_json_round_trip() -> None:
    rec = record("foo", enabled=False, versions=(1, 2, 5))
    assert rec.current_version == 5
    data = rec.to_json()
    assert data == {"key_id": "foo", "enabled": False, "versions": [1, 2, 5],
                    "created": "2024-05-15T12:00:00Z"}
    assert KeyRecord.from_json(json.loads(json.dumps(data))) == rec


def test_missing_file_means_no_keys(registry: KeyRegistry) -> None:
    assert dict(registry.records()) == {}
    assert registry.get("foo") is None


def test_edit_writes_the_file_and_records_see_it(registry: KeyRegistry, path: Path) -> None:
    with registry.edit() as records:
        records["foo"] = record("foo")
        records["bar"] = record("bar", enabled=False, versions=(1, 2))
    assert json.loads(path.read_text()) == {
        "format": 1,
        "keys": {
            "bar": {"key_id": "bar", "enabled": False, "versions": [1, 2],
                    "created": "2024-05-15T12:00:00Z"},
            "foo": {"key_id": "foo", "enabled": True, "versions": [1],
                    "created": "2024-05-15T12:00:00Z"},
        },
    }
    assert dict(registry.records()) == {"foo": record("foo"),
                                        "bar": record("bar", enabled=False, versions=(1, 2))}
    assert registry.get("bar") == record("bar", enabled=False, versions=(1, 2))


def test_edit_sees_existing_records(registry: KeyRegistry) -> None:
    with registry.edit() as records:
        records["foo"] = record("foo")
    with registry.edit() as records:
        assert records == {"foo": record("foo")}
        records["foo"] = replace(records["foo"], versions=(1, 2))
    assert registry.get("foo") == record("foo", versions=(1, 2))


def test_edit_replaces_the_file_atomically(registry: KeyRegistry, path: Path) -> None:
    with registry.edit() as records:
        records["foo"] = record("foo")
    before = path.read_text()
    inode_before = path.stat().st_ino
    with open(path) as old:  # a reader holding the old file keeps a consistent copy
        with registry.edit() as records:
            records["bar"] = record("bar")
        assert old.read() == before
    assert path.stat().st_ino != inode_before  # a new file was renamed over the old one
    assert set(json.loads(path.read_text())["keys"]) == {"foo", "bar"}
    leftovers = sorted(p.name for p in path.parent.iterdir())
    assert leftovers == ["keys.json", "keys.json.lock"]  # no temporary file left behind


def test_edit_that_raises_changes_nothing(registry: KeyRegistry, path: Path) -> None:
    with registry.edit() as records:
        records["foo"] = record("foo")
    before = path.read_bytes()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), registry.edit() as records:
        records["bar"] = record("bar")
        raise Boom
    assert path.read_bytes() == before
    assert set(registry.records()) == {"foo"}


def test_another_registry_instance_sees_changes(path: Path) -> None:
    """The CLI and the server hold separate KeyRegistry objects on one file."""
    server = KeyRegistry(path, refresh_seconds=0)
    cli = KeyRegistry(path, refresh_seconds=0)
    assert dict(server.records()) == {}
    with cli.edit() as records:
        records["foo"] = record("foo")
    assert server.get("foo") == record("foo")
    cli.set_enabled("foo", False)
    assert server.get("foo") == record("foo", enabled=False)
    with cli.edit() as records:
        del records["foo"]
    assert server.get("foo") is None
    path.unlink()
    assert dict(server.records()) == {}


def test_refresh_interval_caches_records(path: Path) -> None:
    server = KeyRegistry(path, refresh_seconds=3600)
    cli = KeyRegistry(path, refresh_seconds=0)
    assert dict(server.records()) == {}  # first read happens at once
    with cli.edit() as records:
        records["foo"] = record("foo")
    assert server.get("foo") is None  # not re-read within the interval
    assert cli.get("foo") == record("foo")


def test_set_enabled(registry: KeyRegistry) -> None:
    with registry.edit() as records:
        records["foo"] = record("foo", versions=(1, 2))
    returned = registry.set_enabled("foo", False)
    assert returned == record("foo", enabled=False, versions=(1, 2))
    assert registry.get("foo") == returned
    assert registry.set_enabled("foo", True) == record("foo", versions=(1, 2))
    assert registry.get("foo") == record("foo", versions=(1, 2))


def test_set_enabled_on_a_missing_key(registry: KeyRegistry, path: Path) -> None:
    with registry.edit() as records:
        records["foo"] = record("foo")
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="nope"):
        registry.set_enabled("nope", False)
    assert path.read_bytes() == before
    assert dict(registry.records()) == {"foo": record("foo")}


def test_set_enabled_without_a_file(registry: KeyRegistry, path: Path) -> None:
    with pytest.raises(RegistryError):
        registry.set_enabled("foo", True)
    assert not path.exists()


VALID_KEY = {"key_id": "foo", "enabled": True, "versions": [1], "created": "x"}


@pytest.mark.parametrize("content", [
    "",
    "{",
    "not json",
    '{"format": 1}',                                   # no keys
    '{"format": 1, "keys": {"foo": {}}}',              # record without fields
    '{"format": 1, "keys": {"foo": {"key_id": "foo", "enabled": true, "created": "x"}}}',
    '{"format": 1, "keys": {"foo": {"key_id": "foo", "enabled": true, "versions": ["a"], '
    '"created": "x"}}}',
    '{"format": 1, "keys": {"foo": {"key_id": "foo", "enabled": true, "versions": 3, '
    '"created": "x"}}}',
    '{"format": 1, "keys": {"foo": []}}',
])
def test_corrupt_file(registry: KeyRegistry, path: Path, content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(RegistryError):
        registry.records()


def test_corrupt_file_refuses_edits_and_is_left_alone(registry: KeyRegistry,
                                                      path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{ corrupt")
    with pytest.raises(RegistryError), registry.edit() as records:
        records["foo"] = record("foo")  # pragma: no cover - never reached
    assert path.read_text() == "{ corrupt"


def test_non_utf8_file(registry: KeyRegistry, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RegistryError):
        registry.records()


@pytest.mark.parametrize("fmt", [0, 2, "1", None])
def test_unknown_format(registry: KeyRegistry, path: Path, fmt: object) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": fmt, "keys": {"foo": VALID_KEY}}))
    with pytest.raises(RegistryError, match="format"):
        registry.records()


def test_missing_format(registry: KeyRegistry, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"keys": {"foo": VALID_KEY}}))
    with pytest.raises(RegistryError, match="format"):
        registry.records()


def test_registry_recovers_once_the_file_is_fixed(registry: KeyRegistry, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("garbage")
    with pytest.raises(RegistryError):
        registry.records()
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps({"format": 1, "keys": {"foo": VALID_KEY}}))
    os.replace(tmp, path)
    assert registry.get("foo") == KeyRecord("foo", True, (1,), "x")


# ------------------------------------------------ regressions (bugs found by these tests)


@pytest.mark.parametrize("content", ["[]", "null", "42", '{"format": 1, "keys": []}'])
def test_non_object_json_is_a_registry_error(registry: KeyRegistry, path: Path,
                                             content: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(RegistryError):
        registry.records()


def test_string_enabled_flag_is_refused(registry: KeyRegistry, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "keys": {"foo": {**VALID_KEY,
                                                               "enabled": "false"}}}))
    with pytest.raises(RegistryError):
        registry.records()


def test_empty_versions_is_refused(registry: KeyRegistry, path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"format": 1, "keys": {"foo": {**VALID_KEY, "versions": []}}}))
    with pytest.raises(RegistryError):
        registry.records()
