"""A soak on the memory transport and trio's virtual clock: many rounds, and every per-round
structure stays bounded (the round book forgets old finished rounds; each round's job goes with it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fednode.consensus.round_book import MAX_ROUNDS_IN_MEMORY
from fednode.node.daemon import Node
from tests.node.conftest import cluster, wait_until

SOAK_ROUNDS = int(os.environ.get("FEDNODE_SOAK_ROUNDS", "1000"))
SHM = Path("/dev/shm")  # state.sqlite fsyncs every change: on a tmpfs the soak measures the node, not the disk


def per_round_sizes(node: Node) -> dict[str, int]:
    d = node.driver
    return {"rounds": len(d.rounds), "jobs": len(d.jobs), "pending_manifests": len(d.book.pending),
            "synced_at": len(d.book.synced_at), "job_entries": max((j.size() for j in d.jobs.values()), default=0),
            "fetch_locks": len(d._fetch_locks), "syncing": len(node._syncing)}


@pytest.mark.timeout(1800)  # ~1-2 min alone; much longer on a loaded machine
async def test_a_thousand_rounds_keep_per_round_structures_bounded(tmp_path: Path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    n = int(os.environ.get("FEDNODE_SOAK_NODES", "1"))
    section = {"max_rounds": SOAK_ROUNDS, "min_participants": n, "max_participants": n, "wait_for_members": n,
               "pause_seconds": 0.0}
    with tempfile.TemporaryDirectory(dir=SHM if SHM.is_dir() else tmp_path) as data:
        await soak(Path(data), n, section)


async def soak(tmp: Path, n: int, section: dict[str, object]) -> None:
    async with cluster(tmp) as c:
        nodes = [await c.start(i, n, round=section, learning={"evaluate": False}) for i in range(n)]
        peak: dict[str, int] = {}

        def done() -> bool:
            for node in nodes:
                for key, value in per_round_sizes(node).items():
                    peak[key] = max(peak.get(key, 0), value)
            return all(node.driver.progress.rounds_completed >= SOAK_ROUNDS for node in nodes)

        await wait_until(done, timeout=SOAK_ROUNDS * 120.0, step=1.0)
        assert all(node.driver.progress.rounds_failed == 0 for node in nodes)
        bound = MAX_ROUNDS_IN_MEMORY + 2  # the finished rounds kept, plus the open one and one being installed
        assert peak["rounds"] <= bound and peak["jobs"] <= bound, peak
        assert peak["job_entries"] <= 2 * n, peak  # prefetch events and errors per participant
        assert peak["pending_manifests"] == 0 and peak["synced_at"] <= bound and peak["fetch_locks"] <= 2 * n, peak
        assert peak["syncing"] <= 4, peak
        for node in nodes:  # every round's job is one the book still holds
            assert set(node.driver.jobs) <= set(node.driver.rounds)
