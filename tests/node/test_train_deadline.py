"""A participant hands the round's deadline to its trainer (on the wall clock the worker thread
reads), so training can stop early and still submit before the round closes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fednode.node.trainers import FakeTrainer, TrainOutput
from tests.node.conftest import cluster, wait_until

ROUND_TIMEOUT = 60.0  # tests/node/conftest.py's round_timeout_seconds


async def test_the_round_deadline_reaches_the_trainer(tmp_path: Path, autojump_clock: trio.testing.MockClock,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    autojump_clock.autojump_threshold = 0.01
    seen: list[float] = []
    original = FakeTrainer.train

    def recording(self: FakeTrainer, *args: Any, **kwargs: Any) -> TrainOutput:
        seen.append(kwargs["deadline"] - time.time())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FakeTrainer, "train", recording)
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, 2, round={"max_rounds": 1}) for i in range(2)]
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= 1 for n in nodes))
    assert len(seen) >= 2  # both participants trained round 1
    assert all(0.0 < left <= ROUND_TIMEOUT + 1.0 for left in seen), seen
    assert max(seen) > ROUND_TIMEOUT / 2, seen  # measured from the manifest, not a fixed small budget
