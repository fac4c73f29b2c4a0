"""Gossip settings that hold (issue 11 item 6), shown on py-libp2p's own router on a virtual clock:
the heartbeat stays at its configured value for ten minutes of a small community (with py-libp2p's
adaptive gossip it moves to 30-60 s, which the control test shows), and a peer that subscribes
late is replayed no message older than the gossip max age."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2

from fednode.identity import Identity
from fednode.transport.libp2p import DEFAULT_HEARTBEAT_INTERVAL
from fednode.transport.libp2p_host import (
    DEFAULT_GOSSIP_LAZY_DEGREE,
    DEFAULT_GOSSIP_MAX_AGE_SECONDS,
    BoundedMessageCache,
    make_gossipsub,
    make_host,
    make_pubsub,
    stop_pubsub_threads,
)

TOPIC = "fednode/test/1"
TEN_MINUTES = 600.0


def router_for_test(**kw: Any) -> GossipSub:
    return make_gossipsub(degree=6, degree_low=4, degree_high=12, heartbeat_interval=DEFAULT_HEARTBEAT_INTERVAL,
                          max_messages_per_topic_per_second=500.0, **kw)


async def run_heartbeats(router: GossipSub, seconds: float, monkeypatch: pytest.MonkeyPatch) -> tuple[set[int], int]:
    """Run the router's real heartbeat loop for `seconds` of virtual time in a community of one
    (subscribed, mesh empty): the intervals it slept, and how many heartbeats ran."""
    start_wall = time.time()
    monkeypatch.setattr(gossipsub_module, "time", SimpleNamespace(time=lambda: start_wall + trio.current_time()))
    router.last_health_update = int(start_wall + trio.current_time())
    host = make_host(Identity.generate())
    pubsub = make_pubsub(host, router, max_rpc_size=1 << 20, seen_ttl=120)
    try:
        router.mesh[TOPIC] = set()
        pubsub.peer_topics[TOPIC] = set()
        intervals: set[int] = set()
        beats = 0
        shift = router.mcache.shift

        def counting_shift() -> None:
            nonlocal beats
            beats += 1
            intervals.add(router.heartbeat_interval)
            shift()

        router.mcache.shift = counting_shift  # type: ignore[method-assign]
        with trio.move_on_after(seconds):
            await router.heartbeat()
        intervals.add(router.heartbeat_interval)
        return intervals, beats
    finally:
        stop_pubsub_threads(pubsub)


async def test_gossip_heartbeat_stays_at_its_configured_value_for_ten_minutes(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    router = router_for_test()
    assert router.adaptive_gossip_enabled is False
    intervals, beats = await run_heartbeats(router, TEN_MINUTES, monkeypatch)
    assert intervals == {DEFAULT_HEARTBEAT_INTERVAL}
    assert beats >= TEN_MINUTES / DEFAULT_HEARTBEAT_INTERVAL - 2  # one heartbeat a second, all ten minutes
    assert trio.current_time() >= TEN_MINUTES


async def test_control_adaptive_gossip_would_move_the_heartbeat(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loop with py-libp2p's default (adaptive on): the heartbeat leaves 1 s within a
    minute. This is what the test above guards against; it shows the harness can fail."""
    router = router_for_test()
    router.adaptive_gossip_enabled = True
    intervals, beats = await run_heartbeats(router, TEN_MINUTES, monkeypatch)
    assert max(intervals) >= 30
    assert beats < TEN_MINUTES / 10


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def message(seqno: int) -> rpc_pb2.Message:
    return rpc_pb2.Message(from_id=b"\x00\x24" + bytes(36), seqno=seqno.to_bytes(8, "big"), data=b"m%d" % seqno,
                           topicIDs=[TOPIC])


async def replayed_to_new_subscriber(router: GossipSub) -> list[bytes]:
    sent: list[bytes] = []
    peer = ID(b"\x00\x24" + b"\x01" * 36)

    async def write_msg(stream: object, rpc: rpc_pb2.RPC) -> bool:
        sent.extend(m.data for m in rpc.publish)
        return True

    router.pubsub = SimpleNamespace(peers={peer: object()}, write_msg=write_msg)  # type: ignore[assignment]
    await router.send_recent_messages(peer, TOPIC)
    return sent


async def test_a_late_subscriber_is_not_sent_messages_older_than_the_gossip_max_age() -> None:
    clock = FakeClock()
    router = router_for_test(clock=clock)
    # Put times as a slow heartbeat (adaptive gossip's 30 s) spreads them over its three-heartbeat window.
    now = clock.now
    ages = (120.0, 60.0, DEFAULT_GOSSIP_MAX_AGE_SECONDS + 1.0, DEFAULT_GOSSIP_MAX_AGE_SECONDS, 1.0)
    for seqno, age in enumerate(ages):
        clock.now = now - age
        router.mcache.put(message(seqno))
    clock.now = now
    cache = router.mcache
    assert isinstance(cache, BoundedMessageCache)
    assert len(cache.window(TOPIC)) == 5, "all five are inside py-libp2p's count-based window"
    sent = await replayed_to_new_subscriber(router)
    assert sent == [b"m3", b"m4"]  # exactly max_age old is still sent; max_age + 1 s is not
    # IHAVE gossip and IWANT answers keep the whole window (they repair peers that missed a message)
    assert len(cache.window(TOPIC)) == 5
    assert all(cache.get(mid) is not None for mid in cache.window(TOPIC))


async def test_replay_bound_follows_the_clock_and_history_still_shifts() -> None:
    clock = FakeClock()
    router = router_for_test(clock=clock)
    router.mcache.put(message(1))
    assert await replayed_to_new_subscriber(router) == [b"m1"]
    clock.now += DEFAULT_GOSSIP_MAX_AGE_SECONDS + 0.5
    assert await replayed_to_new_subscriber(router) == []
    cache = router.mcache
    assert isinstance(cache, BoundedMessageCache)
    for _ in range(len(cache.history)):
        cache.shift()
    assert not cache.msgs and not cache._put_at


class _Router:
    """GossipSub.publish's shape: its first await is the IDONTWANT emission."""

    def __init__(self) -> None:
        self.emitted: list[bytes] = []

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        await self._emit_idontwant_for_message(pubsub_msg.seqno, pubsub_msg.topicIDs)

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Any) -> None:
        self.emitted.append(msg_id)


async def test_idontwant_only_for_messages_of_a_kilobyte_or_more() -> None:
    from fednode.transport.libp2p_host import IDONTWANT_MESSAGE_THRESHOLD_BYTES, skip_small_idontwant

    router = _Router()
    skip_small_idontwant(router)  # type: ignore[arg-type]
    for seqno, size in ((b"1", 300), (b"2", IDONTWANT_MESSAGE_THRESHOLD_BYTES), (b"3", 1023), (b"4", 65536)):
        await router.publish(ID(b"x"), rpc_pb2.Message(data=b"d" * size, seqno=seqno, topicIDs=["t"]))
    assert router.emitted == [b"2", b"4"]


def test_py_libp2p_publish_still_emits_idontwant_at_its_first_await() -> None:
    """skip_small_idontwant's one-shot flag relies on it (a py-libp2p upgrade must keep it true)."""
    import inspect

    source = inspect.getsource(GossipSub.publish)
    first_await = source[source.index("await "):].split("\n", 1)[0]
    assert "self._emit_idontwant_for_message(" in first_await, first_await


def _over_full_mesh(router: GossipSub, n: int) -> list[ID]:
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12

    peers = [ID(Identity.from_seed(bytes([i]) * 32).node_id.encode()) for i in range(n)]
    router.pubsub = SimpleNamespace(peer_topics={TOPIC: set(peers)})  # type: ignore[assignment]
    router.peer_protocol = dict.fromkeys(peers, PROTOCOL_ID_V12)
    router.mesh[TOPIC] = set(peers)
    return peers


def test_a_heartbeat_backs_off_from_the_peers_it_prunes_and_does_not_graft_them_again() -> None:
    """gossipsub v1.1: the pruning side backs off too. py-libp2p 0.8.1 did not, re-grafted a pruned peer
    as soon as its mesh fell below D_lo, and the pruned peer (within 10 s of the PRUNE) called it a
    "GRAFT flood": at 32 daemons the meshes churned until late members heard nobody (issue 12)."""
    router = router_for_test()
    peers = _over_full_mesh(router, 14)  # > D_hi = 12: prune down to D = 6
    _, to_prune = router.mesh_heartbeat()
    pruned = set(to_prune)
    assert len(pruned) == 8 and all(router._check_back_off(p, TOPIC) for p in pruned)
    # all but one kept peer go away: below D_lo, the heartbeat grafts, but none of the pruned peers
    stays = next(p for p in peers if p not in pruned)
    router.mesh[TOPIC] = set()
    router.pubsub.peer_topics[TOPIC] = pruned | {stays}  # type: ignore[union-attr]
    to_graft, _ = router.mesh_heartbeat()
    assert set(to_graft) == {stays}


def test_control_py_libp2p_alone_grafts_the_peers_it_just_pruned() -> None:
    """The same heartbeat on py-libp2p's own router (what the test above guards against)."""
    router = GossipSub(protocols=[], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
                       adaptive_gossip_enabled=False)
    _over_full_mesh(router, 14)
    _, to_prune = router.mesh_heartbeat()
    pruned = set(to_prune)
    assert len(pruned) == 8 and not any(router._check_back_off(p, TOPIC) for p in pruned)
    router.mesh[TOPIC].clear()
    router.pubsub.peer_topics[TOPIC] = set(pruned)  # type: ignore[union-attr]
    to_graft, _ = router.mesh_heartbeat()
    assert set(to_graft) & pruned


def _gossip_targets(router: GossipSub) -> int:
    """Peers sent IHAVE by one gossip heartbeat: 14 subscribed peers, a mesh of 4, one message in the
    window (an idle community always has heartbeats there)."""
    peers = _gossip_setup(router)
    router.mesh[TOPIC] = set(peers[:4])
    assert router.mcache.window(TOPIC)
    return len(router.gossip_heartbeat())


def test_gossip_goes_to_the_configured_lazy_degree() -> None:
    """IHAVE goes to max(D_lazy, 1/4 of the 10 non-mesh peers) = max(2, 2) peers per heartbeat; it was
    about half of an idle node's frames at 32 daemons with py-libp2p's fixed 6."""
    assert _gossip_targets(router_for_test(lazy_degree=2)) == 2
    # the default, 3 (go-libp2p's D_lazy is 6), is above 1/4 of the 10 non-mesh peers
    assert DEFAULT_GOSSIP_LAZY_DEGREE == 3 and _gossip_targets(router_for_test()) == 3


def test_control_py_libp2p_gossips_to_six_peers() -> None:
    router = GossipSub(protocols=[], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
                       adaptive_gossip_enabled=False)
    assert _gossip_targets(router) == 6


def _deaf_hub(router: GossipSub) -> int:
    """Peers sent IHAVE by a hub whose mesh is empty and which backs off from all 14 of its peers
    (what the claim line of a deaf bootstrap peer showed at 16 daemons), one message in its window."""
    peers = _gossip_setup(router)
    router.mesh[TOPIC] = set()
    for peer in peers:
        router._add_back_off(peer, TOPIC, False)
    return len(router.gossip_heartbeat())


def _gossip_setup(router: GossipSub) -> list[ID]:
    """14 subscribed peers, all in the mesh, and one message in the gossip window."""
    peers = _over_full_mesh(router, 14)
    router.mcache.put(rpc_pb2.Message(from_id=peers[0].to_bytes(), seqno=b"\x01" * 8, data=b"hb",
                                      topicIDs=[TOPIC]))
    return peers


def test_ihave_reaches_peers_we_back_off_from() -> None:
    """Backoff keeps a peer out of our mesh, not out of our gossip (go-libp2p's emitGossip): a hub with
    no mesh peer and every peer backed off still sends IHAVE to D_lazy of them, and they to it, so
    it hears every message within a heartbeat or two instead of after the 60 s backoff (issue 12)."""
    assert _deaf_hub(router_for_test()) == max(DEFAULT_GOSSIP_LAZY_DEGREE, 14 // 4) == 3
    router = router_for_test()
    _deaf_hub(router)
    to_graft, _ = router.mesh_heartbeat()  # the mesh still respects the backoff
    assert not to_graft


def test_control_py_libp2p_sends_no_ihave_to_backed_off_peers() -> None:
    router = GossipSub(protocols=[], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
                       adaptive_gossip_enabled=False)
    assert _deaf_hub(router) == 0
