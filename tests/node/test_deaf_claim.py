"""election-v1 rule 17 at the daemon: a node that holds a connection but reaches no peer on its
community's topic does not claim (bench_scale, 32 daemons: a member whose 2 peers had both pruned it
from their meshes claimed term 2 mid-round, everyone followed it, and it heard nobody)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.node.conftest import cluster


@pytest.mark.parametrize("linked", [True, False])
@pytest.mark.usefixtures("inline_threads")  # no real-time waits: the link is made inside node 0's start-up grace
async def test_a_node_linked_only_outside_its_topic_does_not_claim(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                                   linked: bool) -> None:
    """(Under load in CI, without inline_threads, the stranger's start took worker-thread time, the
    virtual clock jumped past node 0's start-up grace, and node 0, still alone, claimed term 1.)"""
    async with cluster(tmp_path, auto_link_degree=0) as c:
        node = await c.start(0, 2)
        stranger = await c.start(1, 2, community={"id": "another-community"})
        if linked:  # a connection, but not to anyone on node 0's topic
            c.network.link(node.node_id, stranger.node_id)
            assert node.election.term == 0  # still in its start-up grace: it has claimed nothing yet
        await trio.sleep(10 * node.election.config.liveness_timeout)
        assert node.transport is not None and bool(node.transport.peers()) is linked
        if linked:
            assert node.election.term == 0 and node.election.coordinator is None
        else:  # control: alone, with no connection at all, it claims term 1 as before rule 17
            assert node.election.term == 1 and node.election.coordinator == node.node_id
