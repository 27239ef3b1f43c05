"""The hash-chained audit log, on real files: chaining, reopening, tamper detection, flushing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_proxy.core import audit
from kms_proxy.core.audit import (
    GENESIS_PREV,
    MAX_DETAIL_LEN,
    AuditChainBroken,
    AuditEvent,
    AuditLog,
    AuditLogBusy,
    ChainReport,
    Outcome,
    format_time,
    verify_chain,
)

KEY = bytes(range(32))
# Written out here rather than imported, so the tests pin the format independently.
CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
OTHER_KEY = bytes(range(1, 33))


def event(n: int = 0, **overrides: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "time": f"2024-05-01T12:00:{n % 60:02d}.123Z",
        "request_id": f"req-{n}",
        "principal": "acs:ram::1234567890123456:user/张三",
        "account_id": "1234567890123456",
        "action": "Decrypt",
        "key_id": "key-hzz62f1cb66fa42qo3a2x",
        "key_arn": "acs:kms:cn-hangzhou:1234567890123456:key/key-hzz62f1cb66fa42qo3a2x",
        "outcome": "Success",
        "error_code": None,
        "source_ip": "10.0.0.1",
        "details": {"KeyVersionId": f"v-{n}", "Retry": n % 2 == 0, "Count": n, "Alias": None},
    }
    fields.update(overrides)
    return AuditEvent(**fields)


async def write_log(path: Path, count: int, *, chain_key: bytes | None = KEY,
                    start: int = 0) -> None:
    async with AuditLog(path, chain_key=chain_key) as log:
        for n in range(start, start + count):
            log.append(event(n))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def assert_bad(report: ChainReport, first_bad_seq: int, reason_part: str) -> None:
    assert not report.ok
    assert report.first_bad_seq == first_bad_seq
    assert report.reason is not None and reason_part in report.reason
    assert report.events == first_bad_seq - 1


# Writing and the line format.


@pytest.mark.parametrize("chain_key", [KEY, None], ids=["hmac", "sha256"])
async def test_lines_are_chained_canonical_json(tmp_path: Path, chain_key: bytes | None) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 5, chain_key=chain_key)

    raw = lines(path)
    parsed = [json.loads(line) for line in raw]
    assert [e["seq"] for e in parsed] == [1, 2, 3, 4, 5]
    assert parsed[0]["prev"] == GENESIS_PREV
    assert [e["prev"] for e in parsed[1:]] == [e["hash"] for e in parsed[:-1]]
    for line, entry in zip(raw, parsed, strict=True):
        assert line == CANONICAL.encode(entry).encode() + b"\n"
    assert "张三" in raw[0].decode()  # UTF-8, not \\u escapes.
    assert parsed[2]["details"] == {"Alias": None, "Count": 2, "KeyVersionId": "v-2",
                                    "Retry": True}

    report = verify_chain(path, chain_key=chain_key)
    assert report == ChainReport(ok=True, events=5, first_bad_seq=None, reason=None,
                                 last_hash=parsed[-1]["hash"])


async def test_hash_is_hmac_over_the_line_without_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 1)
    entry = entries(path)[0]
    digest = entry.pop("hash")
    body = CANONICAL.encode(entry).encode()
    assert digest == hmac.new(KEY, body, hashlib.sha256).hexdigest()


async def test_empty_log_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path):
        pass
    assert path.read_bytes() == b""
    assert verify_chain(path) == ChainReport(ok=True, events=0, first_bad_seq=None,
                                             reason=None, last_hash=None)


async def test_file_mode_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    old = os.umask(0)
    try:
        await write_log(path, 1)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600


async def test_writes_append_to_existing_content(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 2)
    before = path.read_bytes()
    await write_log(path, 1, start=2)
    assert path.read_bytes().startswith(before)


# Reopening.


async def test_chain_continues_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 3)
    async with AuditLog(path, chain_key=KEY) as log:
        assert log.seq == 3
        log.append(event(3))
        log.append(event(4))
        assert log.seq == 5

    parsed = entries(path)
    assert [e["seq"] for e in parsed] == [1, 2, 3, 4, 5]
    assert parsed[3]["prev"] == parsed[2]["hash"]
    assert verify_chain(path, chain_key=KEY).ok


async def test_reopen_refuses_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 3)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(AuditChainBroken, match="truncated") as info:
        async with AuditLog(path, chain_key=KEY):
            pass
    assert info.value.path == path


async def test_reopen_refuses_garbage_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 2)
    with path.open("ab") as f:
        f.write(b"not json\n")
    with pytest.raises(AuditChainBroken, match="not JSON"):
        async with AuditLog(path, chain_key=KEY):
            pass


async def test_reopen_refuses_another_chain_key(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 2)
    with pytest.raises(AuditChainBroken, match="hash mismatch"):
        async with AuditLog(path, chain_key=OTHER_KEY):
            pass
    with pytest.raises(AuditChainBroken, match="hash mismatch"):
        async with AuditLog(path):
            pass


async def test_reopen_finds_a_last_line_longer_than_the_read_block(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    big = {f"k{i}": "x" * MAX_DETAIL_LEN for i in range(20)}  # A ~20 KB line.
    async with AuditLog(path, chain_key=KEY) as log:
        log.append(event(0))
        log.append(event(1, details=big))
    await write_log(path, 1, start=2)
    assert [e["seq"] for e in entries(path)] == [1, 2, 3]
    assert verify_chain(path, chain_key=KEY).events == 3


async def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path, chain_key=KEY) as log:
        log.append(event(0))
        with pytest.raises(AuditLogBusy):
            async with AuditLog(path, chain_key=KEY):
                pass
    # The lock went with the first writer.
    await write_log(path, 1, start=1)
    assert verify_chain(path, chain_key=KEY).events == 2


# Tampering.


@pytest.fixture
async def five(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    await write_log(path, 5)
    return path


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


def test_detects_an_edited_field(five: Path) -> None:
    raw = lines(five)
    raw[2] = raw[2].replace(b'"outcome":"Success"', b'"outcome":"Failure"')
    rewrite(five, raw)
    assert_bad(verify_chain(five, chain_key=KEY), 3, "hash mismatch")


def test_detects_an_edit_with_the_plain_hash_recomputed_under_a_key(five: Path) -> None:
    # What an attacker can do to a plain SHA-256 chain: edit and recompute the hash.
    entry = entries(five)[4]
    entry["principal"] = "acs:ram::1234567890123456:user/mallory"
    del entry["hash"]
    entry["hash"] = hashlib.sha256(CANONICAL.encode(entry).encode()).hexdigest()
    raw = lines(five)
    raw[4] = CANONICAL.encode(entry).encode() + b"\n"
    rewrite(five, raw)
    assert_bad(verify_chain(five, chain_key=KEY), 5, "hash mismatch")


def test_detects_a_deleted_middle_line(five: Path) -> None:
    raw = lines(five)
    del raw[2]
    rewrite(five, raw)
    assert_bad(verify_chain(five, chain_key=KEY), 3, "seq 4 where 3")


def test_detects_a_deleted_first_line(five: Path) -> None:
    rewrite(five, lines(five)[1:])
    assert_bad(verify_chain(five, chain_key=KEY), 1, "seq 2 where 1")


def test_detects_swapped_lines(five: Path) -> None:
    raw = lines(five)
    raw[1], raw[2] = raw[2], raw[1]
    rewrite(five, raw)
    assert_bad(verify_chain(five, chain_key=KEY), 2, "seq 3 where 2")


def test_detects_a_truncated_last_line(five: Path) -> None:
    five.write_bytes(five.read_bytes()[:-30])
    report = verify_chain(five, chain_key=KEY)
    assert_bad(report, 5, "truncated")
    assert report.last_hash == json.loads(lines(five)[3])["hash"]


def test_detects_a_missing_final_newline(five: Path) -> None:
    five.write_bytes(five.read_bytes()[:-1])
    assert_bad(verify_chain(five, chain_key=KEY), 5, "truncated")


def forge(path: Path, chain_key: bytes | None) -> None:
    """Append a line the way an attacker without the chain key would: the right format, seq
    and prev, and a hash computed as plain SHA-256 or under a guessed key."""
    previous = entries(path)[-1]
    entry = dict(previous, seq=previous["seq"] + 1, prev=previous["hash"],
                 principal="acs:ram::1234567890123456:user/mallory", request_id="forged")
    del entry["hash"]
    entry["hash"] = audit._digest(chain_key, CANONICAL.encode(entry).encode())
    with path.open("ab") as f:
        f.write(CANONICAL.encode(entry).encode() + b"\n")


@pytest.mark.parametrize("forger_key", [None, OTHER_KEY], ids=["plain", "guessed-key"])
def test_detects_a_line_forged_without_the_key(five: Path, forger_key: bytes | None) -> None:
    forge(five, forger_key)
    assert entries(five)[5]["seq"] == 6
    assert_bad(verify_chain(five, chain_key=KEY), 6, "hash mismatch")


async def test_a_plain_chain_accepts_a_well_made_forgery(tmp_path: Path) -> None:
    # Why the chain key matters: without it, whoever can write the file can extend the chain.
    path = tmp_path / "audit.jsonl"
    await write_log(path, 3, chain_key=None)
    forge(path, None)
    assert verify_chain(path).events == 4


def test_detects_the_wrong_key(five: Path) -> None:
    assert_bad(verify_chain(five, chain_key=OTHER_KEY), 1, "hash mismatch")
    assert_bad(verify_chain(five), 1, "hash mismatch")


def test_detects_a_re_encoded_but_equivalent_line(five: Path) -> None:
    raw = lines(five)
    raw[1] = json.dumps(json.loads(raw[1]), sort_keys=True).encode() + b"\n"  # With spaces.
    rewrite(five, raw)
    assert_bad(verify_chain(five, chain_key=KEY), 2, "not canonical")


def test_detects_an_extra_field(five: Path) -> None:
    raw = lines(five)
    entry = json.loads(raw[0])
    entry["note"] = "x"
    raw[0] = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    rewrite(five, raw)
    assert_bad(verify_chain(five, chain_key=KEY), 1, "audit fields")


def test_detects_an_endless_line_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"x" * (audit._MAX_LINE + 10))
    assert_bad(verify_chain(path), 1, "longer than")


def test_verify_raises_for_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        verify_chain(tmp_path / "nope.jsonl")


# Any single-byte change breaks verification.


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[bytes, Path]]:
    path = tmp_path_factory.mktemp("audit") / "pristine.jsonl"
    asyncio.run(write_log(path, 4))
    data = path.read_bytes()
    assert verify_chain(path, chain_key=KEY).ok
    yield data, path.with_name("mutated.jsonl")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_single_byte_change_fails_verification(pristine: tuple[bytes, Path],
                                                   data: st.DataObject) -> None:
    original, target = pristine
    index = data.draw(st.integers(0, len(original) - 1), label="index")
    value = data.draw(st.integers(0, 255).filter(lambda b: b != original[index]), label="value")
    mutated = bytearray(original)
    mutated[index] = value
    target.write_bytes(bytes(mutated))
    assert not verify_chain(target, chain_key=KEY).ok


# Events and their guard-rails.


@pytest.mark.parametrize(("details", "message"), [
    ({"Plaintext": b"secret"}, "type bytes"),
    ({"Ratio": 0.5}, "type float"),
    ({"Nested": {"a": "b"}}, "type dict"),
    ({"List": ["a"]}, "type list"),
    ({"Long": "x" * (MAX_DETAIL_LEN + 1)}, "1025 characters"),
    ({"Huge": 2**63}, "int64"),
    ({1: "x"}, "keys must be str"),
    ({"": "x"}, "keys must be str"),
    ({"k" * 65: "x"}, "keys must be str"),
    ({f"k{i}": i for i in range(33)}, "33 entries"),
])
def test_refuses_forbidden_details(details: dict[Any, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        event(details=details)
    assert "secret" not in str(info.value)  # Refusals never echo the value.


def test_accepts_details_at_the_limits() -> None:
    details = {"Long": "x" * MAX_DETAIL_LEN, "Min": -(2**63), "Max": 2**63 - 1, "No": None,
               "Flag": False}
    assert dict(event(details=details).details) == details


def test_details_are_a_frozen_copy() -> None:
    details: dict[str, Any] = {"KeyVersionId": "v1"}
    ev = event(details=details)
    details["Plaintext"] = b"secret"
    assert dict(ev.details) == {"KeyVersionId": "v1"}
    with pytest.raises(TypeError):
        ev.details["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("when", [
    "2024-05-01T12:00:00Z",
    "2024-05-01T12:00:00.123+00:00",
    "2024-05-01 12:00:00.123Z",
    "2024-05-01T12:00:00.\u0661\u0662\u0663Z",  # Arabic-Indic digits match a bare \d.
])
def test_refuses_badly_formatted_times(when: str) -> None:
    with pytest.raises(ValueError, match="time must be"):
        event(time=when)


def test_refuses_unknown_outcomes() -> None:
    with pytest.raises(ValueError, match="outcome"):
        event(outcome="Maybe")
    assert event(outcome=Outcome.FAILURE, error_code="Forbidden.KeyNotFound").outcome == "Failure"


def test_format_time() -> None:
    cst = timezone(timedelta(hours=8))
    assert format_time(datetime(2024, 5, 1, 20, 0, 0, 123456, tzinfo=cst)) == \
        "2024-05-01T12:00:00.123Z"
    assert format_time(datetime(2024, 5, 1, 12, 0, tzinfo=UTC)) == "2024-05-01T12:00:00.000Z"
    with pytest.raises(ValueError, match="timezone-aware"):
        format_time(datetime(2024, 5, 1))


async def test_now_uses_the_injected_clock(tmp_path: Path) -> None:
    pinned = datetime(2030, 1, 2, 3, 4, 5, 678999, tzinfo=UTC)
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: pinned)
    assert log.now() == "2030-01-02T03:04:05.678Z"
    event(time=log.now())  # The format events require.


def test_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_interval"):
        AuditLog(tmp_path / "a", flush_interval=0)
    with pytest.raises(ValueError, match="32 bytes"):
        AuditLog(tmp_path / "a", chain_key=b"short")


async def test_append_needs_an_open_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(RuntimeError, match="not open"):
        log.append(event())
    async with log:
        log.append(event())
    with pytest.raises(RuntimeError, match="not open"):
        log.append(event())
    with pytest.raises(RuntimeError, match="entered once"):
        async with log:
            pass


async def test_a_refused_append_leaves_no_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path, chain_key=KEY) as log:
        log.append(event(0))
        with pytest.raises(ValueError):  # UTF-8 cannot encode a lone surrogate.
            log.append(event(1, principal="\ud800"))
        log.append(event(2))
    assert [e["seq"] for e in entries(path)] == [1, 2]
    assert verify_chain(path, chain_key=KEY).ok


# Flushing and concurrency.


async def test_flushes_within_the_interval_without_exit(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    interval = 0.05
    async with AuditLog(path, chain_key=KEY, flush_interval=interval) as log:
        log.append(event(0))
        assert path.read_bytes() == b""  # append() only buffers.
        started = time.monotonic()
        while not path.read_bytes():
            assert time.monotonic() - started < 20 * interval, "no flush"
            await asyncio.sleep(interval / 10)
        assert [e["seq"] for e in entries(path)] == [1]
        log.append(event(1))
    assert [e["seq"] for e in entries(path)] == [1, 2]


async def test_explicit_flush_and_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path, chain_key=KEY, flush_interval=60, fsync=True) as log:
        log.append(event(0))
        log.append(event(1))
        await log.flush()
        assert len(entries(path)) == 2
        assert len(synced) == 1  # One write and one fsync for the whole buffer.
        await log.flush()  # Nothing buffered: no write, no fsync.
        assert len(synced) == 1


async def test_no_fsync_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    await write_log(tmp_path / "audit.jsonl", 3)
    assert synced == []


async def test_a_failed_short_write_is_retried_without_duplicates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = 0

    def flaky_write(fd: int, data: Any) -> int:
        # First call: a short write of 100 bytes; second: the disk is full; then healthy.
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, bytes(data[:100]))
        if calls == 2:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", flaky_write)
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path, chain_key=KEY, flush_interval=60) as log:
        for n in range(3):
            log.append(event(n))
        with pytest.raises(OSError, match="No space"):
            await log.flush()
        assert len(path.read_bytes()) == 100
        log.append(event(3))
    assert [e["seq"] for e in entries(path)] == [1, 2, 3, 4]
    assert verify_chain(path, chain_key=KEY).ok


async def test_background_flush_survives_a_write_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    real_write = os.write
    failures = [OSError(5, "Input/output error")]

    def failing_once(fd: int, data: Any) -> int:
        if failures:
            raise failures.pop()
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_once)
    path = tmp_path / "audit.jsonl"
    async with AuditLog(path, chain_key=KEY, flush_interval=0.01) as log:
        log.append(event(0))
        started = time.monotonic()
        while not path.read_bytes():
            assert time.monotonic() - started < 2, "no retry"
            await asyncio.sleep(0.005)
    assert "write failed" in caplog.text
    assert verify_chain(path, chain_key=KEY).events == 1


async def test_many_tasks_produce_one_valid_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    async def worker(log: AuditLog, first: int) -> None:
        for n in range(first, first + 100):
            log.append(event(n))
            if n % 7 == 0:
                await asyncio.sleep(0)  # Interleave with the other tasks and the flusher.

    async with AuditLog(path, chain_key=KEY, flush_interval=0.001) as log:
        async with asyncio.TaskGroup() as group:
            for first in range(0, 10_000, 100):
                group.create_task(worker(log, first))

    parsed = entries(path)
    assert [e["seq"] for e in parsed] == list(range(1, 10_001))
    assert sorted(e["request_id"] for e in parsed) == sorted(f"req-{n}" for n in range(10_000))
    report = verify_chain(path, chain_key=KEY)
    assert report.ok and report.events == 10_000
    assert report.last_hash == parsed[-1]["hash"]
