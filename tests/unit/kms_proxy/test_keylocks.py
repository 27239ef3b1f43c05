"""core.keylocks: one change at a time per key, re-entrant within a task, no leftovers."""

from __future__ import annotations

import asyncio

from kms_proxy.core.keylocks import KeyLocks


async def test_changes_to_one_key_run_one_at_a_time_and_others_do_not_wait() -> None:
    locks = KeyLocks()
    order: list[str] = []

    async def change(key_id: str, name: str, pause: float) -> None:
        async with locks.hold(key_id):
            order.append(f"{name} in")
            await asyncio.sleep(pause)
            order.append(f"{name} out")

    await asyncio.gather(change("k1", "a", 0.05), change("k1", "b", 0),
                         change("k2", "c", 0))
    assert order.index("a out") < order.index("b in")
    assert order.index("c out") < order.index("a out")  # another key is not held up
    assert len(locks) == 0


async def test_the_holder_may_take_its_lock_again() -> None:
    locks = KeyLocks()
    async with locks.hold("k"), locks.hold("k"):
        assert len(locks) == 1
    assert len(locks) == 0


async def test_an_error_or_a_cancelled_waiter_releases_the_lock() -> None:
    locks = KeyLocks()
    try:
        async with locks.hold("k"):
            raise ValueError("boom")
    except ValueError:
        pass
    assert len(locks) == 0
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            entered.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("k"):
            raise AssertionError("a cancelled waiter must not get the lock")

    held = asyncio.create_task(holder())
    await entered.wait()
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    release.set()
    await held
    assert len(locks) == 0
    async with locks.hold("k"):
        pass
