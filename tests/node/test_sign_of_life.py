"""election-v1 rule 16 at the daemon: a round message the round layer accepts keeps its author live,
as a heartbeat would. bench_scale, 32 daemons: a member claimed term 2 ("coordinator last heard 5.0 s
ago") 1.3 s after it had accepted that coordinator's manifest for the next round."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fednode.wire import codec
from fednode.wire.messages import Heartbeat
from tests.node.conftest import clock, cluster, seed_identity
from tests.node.test_contested import manifest


@pytest.mark.parametrize("with_manifest", [True, False])
async def test_an_accepted_manifest_keeps_its_coordinator_live(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                               with_manifest: bool) -> None:
    coordinator = seed_identity(0)
    async with cluster(tmp_path) as c:
        node = await c.start(2, 3)
        hb = codec.sign(Heartbeat(community_id="test", node_id=coordinator.node_id, term=1, seq=1, sent_at=clock(),
                                  federated_learning=True, coordinator_node_id=coordinator.node_id), coordinator)
        assert node.dispatch(hb).accepted
        assert node.election.coordinator == coordinator.node_id
        liveness = node.election.config.liveness_timeout
        await trio.sleep(0.8 * liveness)
        if with_manifest:
            assert node.dispatch(manifest("r1-t1", 1, 0)).accepted
        await trio.sleep(0.8 * liveness)  # past the heartbeat's timeout; inside the manifest's
        assert node.election.is_live(coordinator.node_id, clock()) is with_manifest
