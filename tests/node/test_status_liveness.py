"""A member's "alive" in `fednode status` is the election's own liveness decision (one owner):
election-v1 rule 10 stretches a slow member's timeout, and a heartbeat that arrives late counts at
its send time plus the allowed skew; the status must not judge the same member with a plain
`liveness_timeout` from the receipt time and say otherwise."""

from __future__ import annotations

from pathlib import Path

from fednode.node.daemon import Node
from fednode.node.trainers import FakeTrainer
from fednode.transport.memory import MemoryNetwork, open_memory_transport
from fednode.wire import Heartbeat, codec
from tests.node.conftest import node_config, seed_identity

INTERVAL = 1.0  # heartbeat_interval_seconds; liveness_timeout = 2.5 intervals (the default)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make_node(tmp_path: Path, clock: Clock) -> Node:
    network = MemoryNetwork()
    config = node_config(tmp_path, 0, 3, coordinator={"heartbeat_interval_seconds": INTERVAL})
    return Node(config, seed_identity(0), trainer=FakeTrainer(0), clock=clock, inline_training=True,
                transport_factory=lambda ident: open_memory_transport(network, ident))


def heartbeat(who: int, seq: int, sent_at: float) -> Heartbeat:
    identity = seed_identity(who)
    return codec.sign(Heartbeat(community_id="test", node_id=identity.node_id, term=0, seq=seq, sent_at=sent_at,
                                federated_learning=True), identity)


def agree(node: Node, now: float) -> dict[str, bool]:
    """Each member's status "alive", after checking it equals the election's decision."""
    status = {m.node_id: m.alive for m in node.status().members}
    live = set(node.election.live_members(now))
    assert status == {n: n in live for n in status}, (now, status, live)
    return status


def test_status_alive_follows_the_elections_stretched_timeout(tmp_path: Path) -> None:
    clock = Clock()
    node = make_node(tmp_path, clock)
    slow, punctual = seed_identity(1).node_id, seed_identity(2).node_id
    start = clock.now
    # the slow member's heartbeats arrive every 3 intervals (rule 10 stretches its timeout to
    # 2.5 x 3 = 7.5 s), the punctual one's every interval
    for step in range(10):
        clock.now = start + step * INTERVAL
        node.dispatch(heartbeat(2, step + 1, clock.now))
        if step % 3 == 0:
            node.dispatch(heartbeat(1, step + 1, clock.now))
    last = clock.now  # both were heard at `last` (step 9)
    liveness = node.election.config.liveness_timeout
    clock.now = last + liveness + 0.5  # past the plain timeout, inside the slow member's stretched one
    assert agree(node, clock.now) == {slow: True, punctual: False}
    clock.now = last + 4 * liveness  # past both
    assert agree(node, clock.now) == {slow: False, punctual: False}


def test_status_alive_counts_a_late_heartbeat_at_its_send_time_plus_skew(tmp_path: Path) -> None:
    clock = Clock()
    node = make_node(tmp_path, clock)
    skew, liveness = node.election.config.max_clock_skew, node.election.config.liveness_timeout
    late = seed_identity(1).node_id
    # sent long enough ago that even counted at sent_at + skew it is dead; still inside the replay window
    node.dispatch(heartbeat(1, 1, clock.now - skew - liveness - 1.0))
    assert agree(node, clock.now) == {late: False}
    node.dispatch(heartbeat(1, 2, clock.now))
    assert agree(node, clock.now) == {late: True}
