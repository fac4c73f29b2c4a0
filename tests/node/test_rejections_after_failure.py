"""A coordinator that rejects several unavailable contributions stops at the one that fails the round.

Seen at 32 daemons: with min_participants = 32, the first rejection failed the round, and feeding the
second one to the failed round raised (`_aggregate failed: ... ContributionRejected is illegal for a
coordinator in state failed`) out of the aggregation task, every round."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from fednode.errors import TransferError
from fednode.node.aggregating import Aggregating
from fednode.wire import SubmissionAnnounce
from tests.node.conftest import cluster, wait_until

N = 3


async def test_the_round_fails_once_and_the_aggregation_ends_quietly(
        tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    autojump_clock.autojump_threshold = 0.01

    def unavailable(self: Aggregating, a: SubmissionAnnounce) -> Callable[[], Awaitable[None]]:
        async def fail() -> None:
            raise TransferError(f"blob {a.delta_sha256}: no holder served it (test)")
        return fail

    monkeypatch.setattr(Aggregating, "_fetch_delta", unavailable)  # every member's update is gone
    caplog.set_level(logging.WARNING)
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, N, round={"max_rounds": 1, "min_participants": N, "max_participants": N})
                 for i in range(N)]
        await wait_until(lambda: any(n.driver.progress.rounds_failed >= 1 for n in nodes))
        await trio.sleep(5.0)
    assert not [r.getMessage() for r in caplog.records if "_aggregate failed" in r.getMessage()]
