"""Retention (issue 12): old rounds' rows, records, adapter dirs and blobs are collected after
`node.keep_rounds` rounds; blobs still referenced stay; rounds_completed still counts every round."""

from __future__ import annotations

import json
from pathlib import Path

from fednode.node.retention import COLLECTED_META_KEY
from tests.node.conftest import cluster, wait_until

KEEP = 3
ROUNDS = 12


async def test_old_rounds_are_collected_and_disk_stays_bounded(tmp_path: Path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    n = 3
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, n, node={"keep_rounds": KEEP}, round={"max_rounds": ROUNDS}) for i in range(n)]
        sizes: list[int] = []

        def done() -> bool:
            blobs = [len(node.store.list_blobs()) for node in nodes]
            sizes.append(max(blobs))
            return all(node.driver.progress.rounds_completed >= ROUNDS for node in nodes)

        await wait_until(done)
        for node in nodes:
            data = node.config.data_dir
            numbers = sorted(r.round_number for r in node.db.rounds())
            assert numbers == list(range(ROUNDS - KEEP + 1, ROUNDS + 1)), numbers  # the newest K rounds
            assert sorted(p.name for p in (data / "rounds").glob("round-*.json")) == sorted(
                f"round-{k}.json" for k in numbers)
            adapters = sorted(p.name for p in (data / "adapters").iterdir() if p.name.startswith("round-"))
            assert adapters == sorted(f"round-{k}" for k in numbers)
            assert (data / "adapters" / "latest").resolve().name == f"round-{ROUNDS}"
            assert node.db.get_meta(COLLECTED_META_KEY) == str(ROUNDS - KEEP)
            assert node.driver.progress.rounds_completed == ROUNDS  # collected rounds still count
            # every blob a kept round needs is still here: its merged adapter and this node's own update
            # (a participant never holds the others' deltas; the coordinator fetched them)
            merged = {row.merged_sha256 for row in node.db.rounds() if row.merged_sha256}
            own = {row[0] for row in node.db._conn.execute("SELECT delta_sha256 FROM own_updates")}
            assert len(own) >= KEEP - 1 and merged | own <= set(node.store.list_blobs())
            # ... and nothing an old round named alone is: at most (K + 1) x (n deltas + 1 merged)
            assert len(node.store.list_blobs()) <= (KEEP + 1) * (n + 1)  # + the next round's
            latest = json.loads((data / "rounds" / f"round-{ROUNDS}.json").read_text())
            assert node.store.has(latest["merged_sha256"])
            assert len(node.driver.rounds) <= KEEP + 2  # in-memory round states are dropped too
            assert set(node.driver.jobs) <= set(node.driver.rounds)  # ... with their RoundJobs
            assert not set(node.driver.book.pending) & {r.round_id for r in node.db.rounds()}
        assert max(sizes[len(sizes) // 2:]) <= (KEEP + 1) * (n + 1)  # flat in the second half of the run


async def test_keep_rounds_zero_keeps_everything(tmp_path: Path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    n = 2
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, n, node={"keep_rounds": 0}, round={"max_rounds": 5}) for i in range(n)]
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 5 for node in nodes))
        for node in nodes:
            assert sorted(r.round_number for r in node.db.rounds()) == [1, 2, 3, 4, 5]
            assert node.db.get_meta(COLLECTED_META_KEY) == ""
