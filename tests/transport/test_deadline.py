"""call_by_deadline: a call that ignores its deadline (py-libp2p's shielded reset in new_stream)
does not hang its caller, and such calls are bounded (fednode/transport/deadline.py)."""

from __future__ import annotations

import pytest
import trio

from fednode.transport.deadline import PendingCalls, TooManyPendingCalls, call_by_deadline


async def _stuck_in_shield(release: trio.Event) -> str:
    with trio.CancelScope(shield=True):
        await release.wait()
    return "late"


async def test_a_call_that_ignores_cancellation_does_not_hang_its_caller(autojump_clock: trio.abc.Clock) -> None:
    release = trio.Event()
    pending = PendingCalls()
    released: list[str] = []

    async def note(value: str) -> None:
        released.append(value)

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await call_by_deadline(nursery, pending, lambda: _stuck_in_shield(release), 5.0, release=note)
        assert trio.current_time() - start == pytest.approx(5.0)
        assert (pending.running, pending.lingering, pending.abandoned) == (1, 1, 1)
        release.set()  # py-libp2p lets go: the late result is released, the count drops
    assert released == ["late"]
    assert (pending.running, pending.lingering, pending.abandoned) == (0, 0, 1)


async def test_control_a_plain_fail_after_hangs_on_the_same_call(autojump_clock: trio.abc.Clock) -> None:
    """Why the helper exists: fail_after cannot end a call stuck in a shielded section."""
    release = trio.Event()

    async def let_go_later() -> None:
        await trio.sleep(100)
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(let_go_later)
        start = trio.current_time()
        with trio.move_on_after(5.0):
            await _stuck_in_shield(release)
        assert trio.current_time() - start == pytest.approx(100.0)  # not 5: the deadline was ignored


async def test_results_and_errors_pass_through(autojump_clock: trio.abc.Clock) -> None:
    pending = PendingCalls()

    async def ok() -> int:
        await trio.sleep(1)
        return 7

    async def boom() -> int:
        raise ValueError("no")

    async with trio.open_nursery() as nursery:
        assert await call_by_deadline(nursery, pending, ok, 5.0) == 7
        with pytest.raises(ValueError, match="no"):
            await call_by_deadline(nursery, pending, boom, 5.0)
    assert (pending.running, pending.abandoned) == (0, 0)


async def test_the_callers_own_cancellation_stops_waiting(autojump_clock: trio.abc.Clock) -> None:
    release = trio.Event()
    pending = PendingCalls()
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(2.0) as outer:
            await call_by_deadline(nursery, pending, lambda: _stuck_in_shield(release), 60.0)
        assert outer.cancelled_caught and trio.current_time() == pytest.approx(2.0, abs=0.01)
        assert pending.lingering == 1
        release.set()


async def test_lingering_calls_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    release = trio.Event()
    pending = PendingCalls(limit=3)
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            with pytest.raises(trio.TooSlowError):
                await call_by_deadline(nursery, pending, lambda: _stuck_in_shield(release), 1.0)
        with pytest.raises(TooManyPendingCalls, match="limit is 3"):
            await call_by_deadline(nursery, pending, lambda: _stuck_in_shield(release), 1.0)
        release.set()
        await trio.sleep(0.1)
        async def ok() -> int:
            return 1
        assert await call_by_deadline(nursery, pending, ok, 1.0) == 1  # room again once they let go
