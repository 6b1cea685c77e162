"""`spending._started`: a coroutine run at once up to its first wait, then as a task."""

from __future__ import annotations

import asyncio

import pytest

from extproc.policies.budget.spending import _started


async def test_a_call_that_never_waits_is_done_at_once() -> None:
    ran: list[str] = []

    async def work() -> None:
        ran.append("ran")

    future = _started(work())
    assert future.done()
    assert future.result() is None
    assert ran == ["ran"]


async def test_a_refusal_that_never_waits_is_in_the_future() -> None:
    async def work() -> None:
        raise ValueError("refused")

    future = _started(work())
    assert future.done()
    with pytest.raises(ValueError, match="refused"):
        future.result()


async def test_a_call_that_waits_goes_on_as_a_task() -> None:
    gate: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    seen: list[object] = []

    async def work() -> None:
        seen.append(await gate)
        await asyncio.sleep(0)
        seen.append("after")
        raise KeyError("late")

    future = _started(work())
    assert not future.done()
    gate.set_result(7)
    with pytest.raises(KeyError):
        await asyncio.wait_for(future, 5)
    assert seen == [7, "after"]


async def test_a_cancelled_task_cancels_the_call() -> None:
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleaned: list[str] = []

    async def work() -> None:
        try:
            await gate
        finally:
            cleaned.append("finally")

    future = _started(work())
    await asyncio.sleep(0)
    future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert cleaned == ["finally"]
    assert gate.cancelled()
