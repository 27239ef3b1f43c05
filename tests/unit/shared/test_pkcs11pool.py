"""The PKCS#11 pool against a real SoftHSM2 token: dispatch, error mapping, eviction."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType

from ekm_sim.config import HSMConfig
from shared.pkcs11pool import (
    DispatchMode,
    HSMDataInvalid,
    HSMKeyMissing,
    HSMKeyUsageNotPermitted,
    HSMPoolExhausted,
    HSMUnavailable,
    PKCS11Pool,
    SessionContext,
    aes_gcm,
)

MODES = [DispatchMode.INLINE, DispatchMode.THREADS]


def _make_key(label: str, *, encrypt: bool = True, decrypt: bool = True) -> Any:
    def make(ctx: SessionContext) -> None:
        ctx.session.generate_key(KeyType.AES, 256, label=label, id=b"\0\0\0\1", store=True,
                                 template={Attribute.ENCRYPT: encrypt, Attribute.DECRYPT: decrypt,
                                           Attribute.SENSITIVE: True,
                                           Attribute.EXTRACTABLE: False})
    return make


@pytest.mark.parametrize("mode", MODES)
async def test_gcm_round_trip_and_errors(hsm_config: HSMConfig, mode: DispatchMode) -> None:
    async with PKCS11Pool(replace(hsm_config, mode=mode).pool()) as pool:
        await pool.run(_make_key("k"))
        await pool.run(_make_key("enc-only", decrypt=False))
        iv = os.urandom(12)

        def seal(ctx: SessionContext) -> bytes:
            return aes_gcm(ctx.secret_key("k", b"\0\0\0\1"), b"data", iv=iv, aad=b"a",
                           decrypt=False)

        sealed = await pool.run(seal)
        assert len(sealed) == 4 + 16

        def open_(aad: bytes, label: str = "k") -> Any:
            def fn(ctx: SessionContext) -> bytes:
                return aes_gcm(ctx.secret_key(label, b"\0\0\0\1"), sealed, iv=iv, aad=aad,
                               decrypt=True)
            return fn

        assert await pool.run(open_(b"a"), decrypting=True) == b"data"
        with pytest.raises(HSMDataInvalid):
            await pool.run(open_(b"b"), decrypting=True)
        with pytest.raises(HSMKeyUsageNotPermitted):
            await pool.run(open_(b"a", "enc-only"), decrypting=True)
        with pytest.raises(HSMKeyMissing):
            await pool.run(open_(b"a", "absent"), decrypting=True)
        # The session survived all of that.
        assert await pool.run(open_(b"a"), decrypting=True) == b"data"


@pytest.mark.parametrize("mode", MODES)
async def test_a_dead_session_is_evicted_and_replaced(hsm_config: HSMConfig,
                                                      mode: DispatchMode) -> None:
    config = replace(hsm_config, mode=mode, workers=1)
    async with PKCS11Pool(config.pool()) as pool:
        await pool.run(_make_key("k"))
        seen: list[Any] = []

        def kill(ctx: SessionContext) -> None:
            seen.append(ctx.session)
            ctx.session.close()

        def use(ctx: SessionContext) -> int:
            seen.append(ctx.session)
            return len(ctx.session.generate_random(64))

        await pool.run(kill)
        with pytest.raises(HSMUnavailable):
            await pool.run(use)
        assert await pool.run(use) == 8
        assert seen[-1] is not seen[0]


async def test_threads_mode_uses_one_session_per_worker(hsm_config: HSMConfig) -> None:
    async with PKCS11Pool(replace(hsm_config, mode=DispatchMode.THREADS, workers=2).pool()
                          ) as pool:
        by_thread: dict[int, set[int]] = {}

        def record(ctx: SessionContext) -> None:
            by_thread.setdefault(threading.get_ident(), set()).add(id(ctx.session))
            ctx.session.generate_random(128)

        await asyncio.gather(*(pool.run(record) for _ in range(200)))
        assert 1 <= len(by_thread) <= 2
        assert all(len(sessions) == 1 for sessions in by_thread.values())
        assert threading.get_ident() not in by_thread


async def test_pool_exhaustion_is_a_typed_error(hsm_config: HSMConfig) -> None:
    config = replace(hsm_config, mode=DispatchMode.THREADS, workers=1, max_pending=2)
    async with PKCS11Pool(config.pool()) as pool:
        release = threading.Event()

        def block(ctx: SessionContext) -> None:
            release.wait(5)

        first = asyncio.ensure_future(pool.run(block))
        second = asyncio.ensure_future(pool.run(block))
        await asyncio.sleep(0.05)
        with pytest.raises(HSMPoolExhausted):
            await pool.run(block)
        release.set()
        await asyncio.gather(first, second)
        await pool.run(block)  # capacity is back


async def test_wrong_pin_and_missing_token(hsm_config: HSMConfig) -> None:
    with pytest.raises(HSMUnavailable) as caught:
        async with PKCS11Pool(replace(hsm_config, user_pin="wrong-pin-1234").pool()):
            pass
    assert "wrong-pin-1234" not in str(caught.value)
    with pytest.raises(HSMUnavailable, match="no token labelled"):
        async with PKCS11Pool(replace(hsm_config, token_label="no-such-token").pool()):
            pass


async def test_two_pools_on_one_token(hsm_config: HSMConfig) -> None:
    async with PKCS11Pool(hsm_config.pool()) as first, \
            PKCS11Pool(hsm_config.pool()) as second:
        await first.run(_make_key("shared"))

        def exists(ctx: SessionContext) -> bool:
            return ctx.secret_key("shared", b"\0\0\0\1") is not None

        assert await second.run(exists)


async def test_token_info(hsm_config: HSMConfig) -> None:
    async with PKCS11Pool(hsm_config.pool()) as pool:
        info = pool.token_info()
    assert info["label"] == hsm_config.token_label
    assert info["manufacturer"] == "SoftHSM project"
