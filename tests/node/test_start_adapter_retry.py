"""A member retries fetching the round's start adapter while the round is open (issue 12). Before,
one failed fetch (bench_scale, 32 daemons: the coordinator, busy serving the merged adapter it had
just published, opened no stream within 8 s and no member held it yet) ended the member's training
for the round, and the round, waiting for every member, never closed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from fednode.consensus import CoordinatorChanged
from fednode.errors import TransferError
from fednode.node.trainers import FakeTrainer
from fednode.wire import codec
from fednode.wire.messages import RoundManifest
from tests.node.conftest import clock, cluster, seed_identity, wait_until


async def test_a_failed_start_adapter_fetch_is_retried(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    coordinator = seed_identity(0)
    start = FakeTrainer(5).train(None, round_number=1, steps=1, learning_rate=1e-3, seed=0).delta_bytes
    sha = hashlib.sha256(start).hexdigest()
    async with cluster(tmp_path) as c:
        # fixed mode: this node elects nobody itself; the test plays the coordinator
        node = await c.start(2, 3, coordinator={"mode": "fixed", "fixed_peer_id": coordinator.node_id})
        d = node.driver
        d.on_coordinator_changed(CoordinatorChanged(1, coordinator.node_id, clock()))
        calls: list[str] = []

        async def flaky_fetch(blob: str, size: int | None, holders: list[str]) -> None:
            calls.append(blob)
            if len(calls) < 3:
                raise TransferError(f"blob {blob}: no holder served it")
            node.store.put_bytes(start)

        d._fetch = flaky_fetch  # type: ignore[method-assign]
        m = codec.sign(RoundManifest(
            round_id="r2-t1", base_model_id="fake-model", coordinator_node_id=coordinator.node_id,
            community_id="test", min_participants=1, max_participants=3, round_timeout_seconds=600.0,
            created_at=clock(), term=1, round_number=2, local_steps=3, start_adapter_sha256=sha,
            start_adapter_size=len(start)), coordinator)
        assert d.on_message(m).accepted
        await wait_until(lambda: d.rounds["r2-t1"].own_submission is not None)
        assert calls == [sha, sha, sha]  # two failures, retried with backoff, then fetched
