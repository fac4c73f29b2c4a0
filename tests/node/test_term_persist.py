"""election-v1 rule 12 at the daemon: a member's reported term survives our restart. The member
table is no longer written to state.sqlite (one member table: the election's), so the daemon stores
a heartbeat's higher term itself."""

from __future__ import annotations

from pathlib import Path

from fednode.wire.messages import Heartbeat
from tests.node.conftest import EPOCH, cluster, seed_identity


async def test_a_members_reported_term_survives_a_restart(tmp_path: Path) -> None:
    async with cluster(tmp_path) as c:
        node = c.make(0, 3)
        assert node.db.highest_term() == 0 and node.election.term == 0
        member, its_coordinator = seed_identity(1).node_id, seed_identity(2).node_id
        hb = Heartbeat(community_id="test", node_id=member, term=7, seq=1, sent_at=EPOCH, federated_learning=True,
                       coordinator_node_id=its_coordinator)
        assert node.dispatch(hb).accepted
        assert node.db.highest_term() == 7  # stored at once, not on a timer
        again = c.make(0, 3)  # the same data dir: a restart
        assert again.election.term == 7
