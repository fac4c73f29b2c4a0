"""50 nodes, 5 rounds, fake trainer, sparse memory network, virtual clock: everyone agrees on each
round's merged adapter, and it is the num_samples-weighted FedAvg of the accepted updates."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import fednode.state
from tests.node.checks import check_fedavg, check_round_agreement
from tests.node.conftest import cluster, wait_until

N_NODES = 50
N_ROUNDS = 5
LINK_DEGREE = 3  # each joining node links to 3 earlier ones: a sparse, connected graph
WALL_BUDGET_SECONDS = 180.0  # ~30 s alone, ~45 s on the shared 2-core box: only a gross-regression guard


class _NoSyncConnection(sqlite3.Connection):
    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.strip().upper().startswith("PRAGMA SYNCHRONOUS"):
            sql = "PRAGMA synchronous=OFF"
        return super().execute(sql, *args)


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """50 nodes share one disk here: thousands of fsyncs would dominate the wall time. Durability
    is not what this test checks (test_crash.py does, with fsync on)."""
    real_connect = sqlite3.connect

    class Sqlite3Shim:
        def __getattr__(self, name: str) -> Any:
            return getattr(sqlite3, name)

        @staticmethod
        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            return real_connect(*args, factory=_NoSyncConnection, **kwargs)

    monkeypatch.setattr(fednode.state, "sqlite3", Sqlite3Shim())
    monkeypatch.setattr(os, "fsync", lambda fd: None)


async def test_fifty_nodes_five_rounds(tmp_path: Path, autojump_clock, no_fsync) -> None:  # type: ignore[no-untyped-def]
    wall = time.monotonic()
    # Let worker threads (blob store, fsync-free I/O) finish before the virtual clock jumps: with a
    # zero threshold, a few ms of real I/O became tens of virtual seconds and made submissions late.
    autojump_clock.autojump_threshold = 0.05
    sections: dict[str, dict[str, Any]] = {
        "round": {"max_rounds": N_ROUNDS, "min_participants": 2, "max_participants": N_NODES,
                  "wait_for_members": N_NODES, "round_timeout_seconds": 120.0},
        "learning": {"evaluate": False}}
    async with cluster(tmp_path, auto_link_degree=LINK_DEGREE) as c:
        nodes = [await c.start(i, N_NODES, **sections) for i in range(N_NODES)]
        t0 = trio.current_time()
        degrees = [len(c.network.neighbours(node.node_id)) for node in nodes]
        assert max(degrees) < N_NODES // 2, "the topology should be sparse"
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= N_ROUNDS for node in nodes),
                         timeout=3600.0)
        virtual = trio.current_time() - t0
        index_of = {node.node_id: i for i, node in enumerate(nodes)}
        start: bytes | None = None
        for number in range(1, N_ROUNDS + 1):
            record = check_round_agreement(nodes, number)
            assert len(record["accepted"]) == N_NODES, (number, len(record["accepted"]))
            merged = nodes[0].store.read(record["merged_sha256"])
            check_fedavg(record, merged, start, index_of)
            start = merged
        assert all(node.driver.progress.rounds_completed == N_ROUNDS for node in nodes)
        # 5 rounds that close early once all 50 have submitted: far below one round timeout each
        assert virtual < N_ROUNDS * 120.0, virtual
    assert time.monotonic() - wall < WALL_BUDGET_SECONDS
