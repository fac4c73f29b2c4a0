"""Which submission records are fsynced: the coordinator's verdicts and a member's own submission
(kept through a power loss), not a member's copy of others' submissions (kept through a crash of the
process; it learns them again from its peers). At 32 daemons on one disk, one fsync per member per
submission (32 x 32 a round) was most of a round's time (py-spy: StateDB.add_submission's commit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fednode.state import StateDB
from tests.node.conftest import cluster, wait_until

N = 3


async def test_only_a_members_copy_of_others_submissions_skips_the_fsync(
        tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    autojump_clock.autojump_threshold = 0.01
    calls: list[tuple[Path, str, bool]] = []
    add = StateDB.add_submission

    def spy(self: StateDB, **kw: Any) -> bool:
        calls.append((self.path, kw["node_id"], kw.get("durable", True)))
        return add(self, **kw)

    monkeypatch.setattr(StateDB, "add_submission", spy)
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, N, round={"max_rounds": 1}) for i in range(N)]
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= 1 for n in nodes))
        coordinator = nodes[0].driver.coordinator
        by_path = {n.db.path: n for n in nodes}
        seen = {(by_path[p].node_id, who, durable) for p, who, durable in calls}
        for node in nodes:
            mine = {(who, durable) for me, who, durable in seen if me == node.node_id}
            assert mine, f"{node.node_id} recorded no submission"
            for who, durable in mine:
                assert durable == (node.node_id == coordinator or who == node.node_id), (node.node_id, who, durable)
        assert any(not durable for _, _, durable in seen)  # members did skip some fsyncs
