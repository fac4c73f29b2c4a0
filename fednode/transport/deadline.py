"""Calls into py-libp2p that must end by a deadline even when py-libp2p ignores it (part of the
libp2p adapter).

py-libp2p 0.8.1 `BasicHost.new_stream` resets a stream that failed to open in a *shielded* cancel
scope with no deadline (`net_stream.reset()` in its `finally`); on a connection that is wedged or
being closed under it, that reset can wait forever, and `trio.fail_after` around the call cannot
end it. At 32 daemons a new coordinator's outcome query (sync-v1) hung that way for 4.5 minutes
after its stream open timed out on a connection that was closed to redial, and the round stalled
with it (issue 12, bench_scale n32).

`call_by_deadline` runs the call in a task of a long-lived nursery and stops *waiting* for it at
the deadline: the task is cancelled, and if it is stuck in a shielded section it lingers until
py-libp2p lets go (closing the network at shutdown does). Lingering calls are counted and bounded:
past `limit` of them, new calls are refused at once instead of piling up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import outcome
import trio

T = TypeVar("T")

DEFAULT_MAX_PENDING_CALLS = 256  # calls running or lingering past their deadline, per transport
LATE_CLEANUP_TIMEOUT = 2.0  # seconds given to release what a call produced after we stopped waiting


class TooManyPendingCalls(Exception):
    """`limit` calls are still running (most of them past their deadline): refused without trying."""


@dataclass
class PendingCalls:
    limit: int = DEFAULT_MAX_PENDING_CALLS
    running: int = 0  # started and not yet returned (waited for or not)
    abandoned: int = 0  # total: calls whose caller stopped waiting before they returned
    lingering: int = 0  # abandoned and still running now


async def call_by_deadline(nursery: trio.Nursery, pending: PendingCalls, call: Callable[[], Awaitable[T]],
                           timeout: float, *, release: Callable[[T], Awaitable[object]] | None = None) -> T:
    """`await call()`, run in a task of `nursery`; raise trio.TooSlowError after `timeout` seconds
    (or re-raise our own cancellation) without waiting for that task to end. A result the call
    produces after we stopped waiting is passed to `release` (e.g. a stream to reset), bounded by
    LATE_CLEANUP_TIMEOUT. TooManyPendingCalls when `pending.limit` calls are still running."""
    if pending.running >= pending.limit:
        raise TooManyPendingCalls(f"{pending.running} calls still running ({pending.lingering} of them past their "
                                  f"deadline); the limit is {pending.limit}")
    done = trio.Event()
    scope = trio.CancelScope()
    box: list[outcome.Outcome[T]] = []
    abandoned = False

    async def run() -> None:
        pending.running += 1
        try:
            with scope:
                box.append(await outcome.acapture(call))
        finally:
            pending.running -= 1
            if abandoned:
                pending.lingering -= 1
            done.set()
        if abandoned and box and isinstance(box[0], outcome.Value) and release is not None:
            with trio.move_on_after(LATE_CLEANUP_TIMEOUT), contextlib.suppress(Exception):
                await release(box[0].value)

    def abandon() -> None:  # stop the call, don't wait for it
        nonlocal abandoned
        if not done.is_set():
            abandoned = True
            pending.abandoned += 1
            pending.lingering += 1
            scope.cancel()

    nursery.start_soon(run)
    try:
        with trio.move_on_after(timeout):
            await done.wait()
    except BaseException:  # we were cancelled
        abandon()
        raise
    if not done.is_set():
        abandon()
        raise trio.TooSlowError
    result = box[0]
    if isinstance(result, outcome.Error) and isinstance(result.error, trio.Cancelled):
        # the nursery is shutting down, not us: say so without raising another scope's Cancelled
        raise trio.ClosedResourceError("the call was cancelled: its nursery is closing")
    return result.unwrap()
