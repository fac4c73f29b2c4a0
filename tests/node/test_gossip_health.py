"""A claim's log line says what our side of gossip looks like (issue 12: at 16 daemons a bootstrap
peer heard nobody for 50 s while holding 15 connections, and claimed a term)."""

from __future__ import annotations

import re
from pathlib import Path

import trio
import trio.testing

from tests.node.conftest import cluster, wait_until


async def test_gossip_health_names_connections_gossip_peers_and_the_last_gossip(
        tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.01
    async with cluster(tmp_path) as c:
        a = await c.start(0, 2, round={"max_rounds": 0})
        assert "last gossip from a peer never" in a._gossip_health()
        b = await c.start(1, 2, round={"max_rounds": 0})
        await wait_until(lambda: b.node_id in a.election.members)
        health = a._gossip_health()
        match = re.fullmatch(r"we hold 1 connection\(s\), 1 gossip peer\(s\) on the topic; "
                             r"last gossip from a peer ([0-9.]+) s ago; 0 message\(s\) not read yet", health)
        assert match is not None, health
        assert float(match.group(1)) < 3.0  # heartbeats every 2 s
        c.scopes[1].cancel()  # b goes silent: the gap grows
        await trio.sleep(10.0)
        match = re.search(r"last gossip from a peer ([0-9.]+) s ago", a._gossip_health())
        assert match is not None and float(match.group(1)) >= 8.0
