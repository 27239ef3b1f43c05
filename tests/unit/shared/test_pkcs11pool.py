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


def _rsa_pair(label: str) -> Any:
    def make(ctx: SessionContext) -> None:
        ctx.session.generate_keypair(KeyType.RSA, 2048, label=label, store=True)
    return make


@pytest.mark.parametrize("mode", MODES)
async def test_a_failed_rsa_check_leaves_no_openssl_error_behind(
        hsm_config: HSMConfig, mode: DispatchMode) -> None:
    """SoftHSM leaves a failed RSA operation on OpenSSL's per-thread error queue; in inline
    mode that is the event loop's thread, whose next TLS read (any client's) then failed."""
    import ctypes
    import ctypes.util

    from pkcs11 import Mechanism, ObjectClass

    libcrypto = ctypes.CDLL(ctypes.util.find_library("crypto"))
    libcrypto.ERR_peek_error.restype = ctypes.c_ulong
    async with PKCS11Pool(replace(hsm_config, mode=mode).pool()) as pool:
        await pool.run(_rsa_pair("rsa"))

        def bad_verify(ctx: SessionContext) -> tuple[bool, int]:
            [public] = ctx.session.get_objects({Attribute.LABEL: "rsa",
                                                Attribute.CLASS: ObjectClass.PUBLIC_KEY})
            ok = public.verify(b"\0" * 32, os.urandom(256), mechanism=Mechanism.RSA_PKCS)
            # What the module left on this thread's queue (cleared after the call returns).
            return ok, libcrypto.ERR_peek_error()

        ok, left_by_module = await pool.run(bad_verify)
        assert not ok
        assert left_by_module != 0  # The hazard is real on this machine's SoftHSM ...
        if mode is DispatchMode.INLINE:
            assert libcrypto.ERR_peek_error() == 0  # ... and gone from the loop's thread.


async def test_slow_calls_and_the_calls_behind_them_leave_the_loop(
        hsm_config: HSMConfig) -> None:
    """Inline mode: a ``slow`` call (key-pair generation) runs on a thread; while it holds
    the module, an ordinary call waits on a thread too; the event loop never blocks."""
    loop_thread = threading.get_ident()
    release, started = threading.Event(), threading.Event()
    where: dict[str, int] = {}
    async with PKCS11Pool(hsm_config.pool()) as pool:
        def slow(ctx: SessionContext) -> None:
            where["slow"] = threading.get_ident()
            started.set()
            assert release.wait(10)

        def quick(ctx: SessionContext) -> int:
            where["quick"] = threading.get_ident()
            return len(ctx.session.generate_random(64))

        slow_task = asyncio.create_task(pool.run(slow, slow=True))
        assert await asyncio.to_thread(started.wait, 10)
        quick_task = asyncio.create_task(pool.run(quick))
        for _ in range(20):  # The loop keeps turning while both wait for the module.
            await asyncio.sleep(0)
        assert not quick_task.done()
        release.set()
        await slow_task
        assert await quick_task == 8
        assert where["slow"] != loop_thread and where["quick"] != loop_thread
        # Uncontended, an ordinary call runs inline again.
        await pool.run(quick)
        assert where["quick"] == loop_thread


async def test_calls_waiting_for_the_module_leave_the_default_executor_free(
        hsm_config: HSMConfig) -> None:
    """Inline calls that find the module busy wait on the pool's own thread: the loop's
    default executor (the software backend's RSA, BYOK unwrapping, audit flushes) is not
    filled with them. With asyncio.to_thread they took every default thread."""
    release, started = threading.Event(), threading.Event()
    async with PKCS11Pool(hsm_config.pool()) as pool:
        def slow(ctx: SessionContext) -> None:
            started.set()
            assert release.wait(30)

        holding = asyncio.create_task(pool.run(slow, slow=True))
        assert await asyncio.to_thread(started.wait, 10)
        waiting = [asyncio.create_task(pool.run(lambda ctx: ctx.session.generate_random(8)))
                   for _ in range(40)]
        await asyncio.sleep(0.05)
        try:
            # Not a timing figure: without the fix this never finishes while the module is
            # held, so the bound only keeps a failing run short.
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 10) == "free"
        finally:
            release.set()
        await holding
        assert all(len(r) == 1 for r in await asyncio.gather(*waiting))


@pytest.mark.parametrize("mode", MODES)
async def test_eviction_closes_sessions_under_the_module_lock(
        hsm_config: HSMConfig, mode: DispatchMode, monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing a session is a call into the module, which must never run beside another
    (SoftHSMv2#688)."""
    import shared.pkcs11pool as pkcs11pool

    async with PKCS11Pool(replace(hsm_config, mode=mode, workers=1).pool()) as pool:
        held: list[bool] = []
        real_close = pkcs11pool._close_quietly

        def close_and_record(session: Any) -> None:
            held.append(pool._module_lock.locked())
            real_close(session)

        monkeypatch.setattr(pkcs11pool, "_close_quietly", close_and_record)
        await pool.run(lambda ctx: ctx.session.close())
        with pytest.raises(HSMUnavailable):
            await pool.run(lambda ctx: ctx.session.generate_random(8))
        assert held and all(held)
        assert len(await pool.run(lambda ctx: ctx.session.generate_random(8))) == 1
