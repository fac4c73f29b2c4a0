"""Memory-transport specifics: dedup in a dense mesh, counted drops, partitions, scale."""

from __future__ import annotations

import time

import pytest
import trio

from fednode.errors import LocalProtocolError, PeerUnavailable
from fednode.identity import Identity
from fednode.transport.memory import MemoryLimits, MemoryNetwork, _Envelope, open_memory_transport
from fednode.transport.testing import open_transports

TOPIC = "fednode/test/1"


async def drain(sub: object) -> int:
    count = 0
    with trio.move_on_after(0.5):
        async for _ in sub:  # type: ignore[attr-defined]
            count += 1
    return count


async def test_dedup_in_full_mesh_delivers_each_message_once(autojump_clock: trio.abc.Clock) -> None:
    async with open_transports("memory", 6, "mesh") as nodes:
        subs = [await t.subscribe(TOPIC) for t in nodes]
        for i in range(5):
            await nodes[i].publish(TOPIC, b"m%d" % i)
        counts = [await drain(s) for s in subs]
        assert counts == [5] * 6


async def test_a_neighbour_that_handled_a_message_is_not_sent_it_again(autojump_clock: trio.abc.Clock) -> None:
    """A triangle: the publisher sends to both others; whichever of them handles it first forwards
    it to the third (still queued there), and the third, having handled it, sends nothing back.
    Three transmissions, not four (issue 12: IDONTWANT, known in-process without the message)."""
    payload = b"x" * 100
    async with open_transports("memory", 3, "mesh") as nodes:
        subs = [await t.subscribe(TOPIC) for t in nodes]
        await nodes[0].publish(TOPIC, payload)
        assert [await drain(s) for s in subs] == [1, 1, 1]
        assert sum(t.statistics().bytes_received for t in nodes) == 3 * len(payload)
        assert sum(t.statistics().bytes_sent for t in nodes) == 3 * len(payload)


async def test_full_subscription_buffer_drops_and_counts(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limits = MemoryLimits(subscription_buffer=4)
    async with open_transports("memory", 2, "mesh", limits=limits) as (a, b):
        sub = await b.subscribe(TOPIC)
        for i in range(10):
            await a.publish(TOPIC, b"%d" % i)
        await trio.sleep(0.1)
        assert b.statistics().dropped == 6
        assert b.statistics().delivered == 4
        assert await drain(sub) == 4
        assert "dropped a message" in caplog.text


async def test_oversize_publish_is_refused() -> None:
    async with open_transports("memory", 1, "none", limits=MemoryLimits(max_message_size=10)) as (a,):
        with pytest.raises(LocalProtocolError):
            await a.publish(TOPIC, b"x" * 11)


async def test_partition_and_heal(autojump_clock: trio.abc.Clock) -> None:
    net = MemoryNetwork(auto_link_degree=0)
    async with open_transports("memory", 4, "mesh", network=net) as nodes:
        subs = [await t.subscribe(TOPIC) for t in nodes]
        left = {nodes[0].local_peer_id, nodes[1].local_peer_id}
        right = {nodes[2].local_peer_id, nodes[3].local_peer_id}
        net.partition(left, right)
        await nodes[0].publish(TOPIC, b"split")
        assert [await drain(s) for s in subs] == [1, 1, 0, 0]
        with pytest.raises(PeerUnavailable):
            await nodes[0].open_stream(nodes[2].local_peer_id, "/x")
        net.heal()
        assert nodes[2].local_peer_id in nodes[0].peers()
        await nodes[3].publish(TOPIC, b"healed")
        assert [await drain(s) for s in subs] == [1, 1, 1, 1]


async def test_hundreds_of_nodes_all_receive(autojump_clock: trio.abc.Clock) -> None:
    n, messages = 300, 5
    net = MemoryNetwork(seed=1)
    started = time.perf_counter()
    async with open_transports("memory", n, network=net, topology="none") as nodes:
        subs = [await t.subscribe(TOPIC) for t in nodes]
        for i in range(messages):
            await nodes[i * 37].publish(TOPIC, b"m%d" % i)
        await trio.sleep(1)  # virtual: the clock jumps only once every node is idle
        for sub in subs:
            for _ in range(messages):
                sub._receive.receive_nowait()  # type: ignore[attr-defined]
        assert sum(t.statistics().dropped for t in nodes) == 0
    assert time.perf_counter() - started < 20


async def test_identity_used_as_peer_id() -> None:
    identity = Identity.generate()
    async with open_memory_transport(MemoryNetwork(), identity) as t:
        assert t.local_peer_id == identity.node_id
        assert t.peers() == frozenset()


async def test_streams_add_gossip_links_only_below_the_mesh_degree_bound(autojump_clock: trio.abc.Clock) -> None:
    """A node that opens streams to 8 others (as a coordinator fetching every update) links to them
    for gossip only while both ends have fewer than mesh_degree_high links; the streams all work."""
    net = MemoryNetwork(auto_link_degree=0, mesh_degree_high=3)
    async with open_transports("memory", 9, "none", network=net) as nodes:
        hub, others = nodes[0], nodes[1:]

        async def echo(stream: object) -> None:
            await stream.aclose()  # type: ignore[attr-defined]

        for t in others:
            t.serve("/x", echo)
        for t in others:
            stream = await hub.open_stream(t.local_peer_id, "/x")
            await stream.aclose()
        assert len(hub.peers()) == 3
        net.link(hub.local_peer_id, others[-1].local_peer_id)  # an explicit link is not bounded
        assert len(hub.peers()) == 4


async def test_a_full_neighbour_queue_drops_and_counts(autojump_clock: trio.abc.Clock) -> None:
    """A node's inbound queue (a per-peer send queue in libp2p) holds `inbound_queue` messages; what
    arrives while it is full is dropped and counted by the sender."""
    limits = MemoryLimits(inbound_queue=4)
    async with open_transports("memory", 2, "mesh", limits=limits) as (a, b):
        sub = await b.subscribe(TOPIC)
        for i in range(10):  # no checkpoint in between: b's gossip task cannot drain its queue meanwhile
            a._handle(_Envelope((a.local_peer_id, 1_000_000 + i), TOPIC, b"%d" % i, a.local_peer_id))
        await trio.sleep(0.1)
        assert a.statistics().dropped == 6
        assert await drain(sub) == 4
