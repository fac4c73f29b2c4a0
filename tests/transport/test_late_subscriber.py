"""Issue 11 item 6 over two real py-libp2p hosts (our host, Noise, Yamux, gossipsub with our
settings, real time): host A publishes signed heartbeats for several seconds, then host B
subscribes late. py-libp2p replays A's recent-message cache to a new subscriber; B must be sent
nothing older than the gossip history window (`gossip_window` of A's heartbeats, and never older
than `DEFAULT_GOSSIP_MAX_AGE_SECONDS`), and B's liveness (the election's own rule) must count what
it was replayed at the time it was sent, not at the time it arrived.

A's router is observed, not changed: each mcache put and heartbeat shift is recorded, so "older
than the window" is counted in A's own heartbeats and the test does not depend on how punctual
the heartbeat is on a loaded machine. The control run swaps in py-libp2p's plain message cache
with a window as long as adaptive gossip's slow heartbeat spans, and shows the harness catches
the old replays that issue 11 measured."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import pytest
import trio
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.mcache import MessageCache
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub

from fednode.consensus import ElectionConfig, ElectionState, HeartbeatSeen
from fednode.identity import Identity
from fednode.transport.libp2p import DEFAULT_HEARTBEAT_INTERVAL, Libp2pTransport
from fednode.transport.libp2p_host import (
    DEFAULT_GOSSIP_MAX_AGE_SECONDS,
    DEFAULT_GOSSIP_WINDOW,
    BoundedMessageCache,
    pending_ttl,
)
from fednode.transport.testing import open_transports, wait_until
from fednode.wire import Heartbeat, codec

COMMUNITY = "late-subscriber"
TOPIC = codec.topic_for(COMMUNITY)
PUBLISH_EVERY = 0.25  # seconds between A's heartbeats
# A publishes for longer than both bounds, so some messages are older than either when B joins.
PUBLISH_FOR = max(DEFAULT_GOSSIP_WINDOW * DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_GOSSIP_MAX_AGE_SECONDS) + 2.0
QUIET_BEFORE_JOIN = 1.0  # A is silent this long before B subscribes: everything B gets is a replay
SETTLE = 1.5  # after the replay, B listens this long more for anything else (IHAVE/IWANT)
# Liveness: a short allowed clock skew so that the rule shows within a few seconds of real time
# (the daemon's default is 30 s; tests/consensus/test_replayed_liveness.py covers that one).
ELECTION = ElectionConfig(heartbeat_interval=1.0, liveness_timeout=2.5, max_clock_skew=0.5)
# py-libp2p checks a message's age, then writes the batch one await at a time: on a loaded machine
# the last write of a batch goes out a little after its check.
SEND_SLACK = 0.5
CONTROL_WINDOW = 12  # heartbeats: 3 heartbeats of adaptive gossip's 30 s would span far more
PY_LIBP2P_PENDING_TTL = 30.0  # GossipSub(pending_messages_ttl=...) default in py-libp2p 0.8.1


@dataclass
class RouterLog:
    """What A's gossipsub router did, in A's heartbeats (`shifts`) and trio time."""

    shifts: int = 0
    shift_times: list[float] = field(default_factory=list)
    put: dict[bytes, tuple[int, float]] = field(default_factory=dict)  # data -> (shifts, time) at put
    replays: list[tuple[int, float]] = field(default_factory=list)  # (shifts, time) when a replay ran
    sent: dict[bytes, tuple[int, float]] = field(default_factory=dict)  # data -> (shifts, time) first sent to B
    replays_done: int = 0  # replays whose every write returned (on a loaded machine that takes a while)

    def window_seconds(self, now: float) -> float:
        """gossip_window heartbeats at the slowest pace A's heartbeat actually ran."""
        times = [*self.shift_times, now]
        return DEFAULT_GOSSIP_WINDOW * max(t1 - t0 for t0, t1 in itertools.pairwise(times))


def observe(router: GossipSub, pubsub: Pubsub, log: RouterLog) -> None:
    """Record A's puts, heartbeat shifts, replays and every message it writes to a peer (the only
    peer is B): the replay, IWANT answers and py-libp2p's "identify-pending" queue all write there."""
    cache = router.mcache
    put, shift, send_recent = cache.put, cache.shift, router.send_recent_messages

    def logged_put(msg: rpc_pb2.Message) -> None:
        log.put.setdefault(bytes(msg.data), (log.shifts, trio.current_time()))
        put(msg)

    def logged_shift() -> None:
        log.shifts += 1
        log.shift_times.append(trio.current_time())
        shift()

    async def logged_send_recent(peer_id, topic):  # type: ignore[no-untyped-def]
        log.replays.append((log.shifts, trio.current_time()))
        await send_recent(peer_id, topic)
        log.replays_done += 1

    write_msg = pubsub.write_msg

    async def logged_write_msg(stream, rpc: rpc_pb2.RPC) -> bool:  # type: ignore[no-untyped-def]
        for msg in rpc.publish:
            log.sent.setdefault(bytes(msg.data), (log.shifts, trio.current_time()))
        return await write_msg(stream, rpc)

    pubsub.write_msg = logged_write_msg  # type: ignore[method-assign]
    cache.put = logged_put  # type: ignore[method-assign]
    cache.shift = logged_shift  # type: ignore[method-assign]
    router.send_recent_messages = logged_send_recent  # type: ignore[method-assign]


@dataclass(frozen=True)
class Received:
    heartbeat: Heartbeat
    at: float  # trio time of receipt at B
    wall: float  # wall time of receipt at B
    a_shifts: int  # A's heartbeat count when B received it


async def late_subscriber_run(*, control: str = "") -> tuple[RouterLog, list[Received], dict[bytes, float]]:
    """control: "" (our settings), "replay" (py-libp2p's count-only cache, long window) or
    "pending" (py-libp2p's 30 s queue for connected peers that have not subscribed yet)."""
    identities = [Identity.generate(), Identity.generate()]
    async with open_transports("libp2p", 2, "line", identities=identities) as (a, b):
        assert isinstance(a, Libp2pTransport)
        router = a._router
        if control == "replay":  # py-libp2p's own cache: a count of heartbeats only, no age bound
            router.mcache = MessageCache(CONTROL_WINDOW, CONTROL_WINDOW)
        elif control == "pending":
            router._pending_messages_ttl = PY_LIBP2P_PENDING_TTL
        else:
            assert router._pending_messages_ttl == pending_ttl(
                DEFAULT_GOSSIP_WINDOW, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_GOSSIP_MAX_AGE_SECONDS)
            assert isinstance(router.mcache, BoundedMessageCache)
            assert router.adaptive_gossip_enabled is False
            assert router.heartbeat_interval == DEFAULT_HEARTBEAT_INTERVAL
        log = RouterLog()
        observe(router, a._pubsub, log)
        await a.subscribe(TOPIC)
        published: dict[bytes, float] = {}  # data -> trio time of publish
        start = trio.current_time()
        seq = 0
        while trio.current_time() - start < PUBLISH_FOR:
            seq += 1
            hb = codec.sign(Heartbeat(community_id=COMMUNITY, node_id=a.local_peer_id, term=0, seq=seq,
                                      sent_at=time.time(), federated_learning=True), identities[0])
            data = codec.encode(hb)
            published[data] = trio.current_time()
            await a.publish(TOPIC, data)
            await trio.sleep(PUBLISH_EVERY)
        await trio.sleep(QUIET_BEFORE_JOIN)

        received: list[Received] = []
        sub = await b.subscribe(TOPIC)

        async def read() -> None:
            async for gossip in sub:
                message = codec.decode(gossip.data)
                assert isinstance(message, Heartbeat) and codec.verify(message)
                received.append(Received(message, trio.current_time(), time.time(), log.shifts))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)

            def replay_delivered() -> bool:
                got = {codec.encode(r.heartbeat) for r in received}
                return log.replays_done >= 1 and bool(received) and set(log.sent) <= got

            await wait_until(replay_delivered, timeout=20.0)
            await trio.sleep(SETTLE)  # anything else (IHAVE/IWANT) would come now
            nursery.cancel_scope.cancel()
        return log, received, published


async def test_a_late_subscriber_over_real_hosts_gets_nothing_older_than_the_gossip_window() -> None:
    log, received, published = await late_subscriber_run()
    assert len(published) >= PUBLISH_FOR / PUBLISH_EVERY / 2
    assert len(log.replays) == 1, "A replayed its cache to B exactly once"
    replay_shifts, replay_at = log.replays[0]
    assert received, "the replay path ran: B was sent A's recent messages"
    got = {codec.encode(r.heartbeat) for r in received}
    assert len(got) == len(received), "no message was delivered twice"
    assert got <= set(published), "A published every message B got"

    # 1. Window, counted in A's own heartbeats when A sent it: a message is in py-libp2p's window while
    #    fewer than gossip_window shifts passed since its put (the replay reads it at most
    #    gossip_window - 1 shifts old; an IWANT answer to IHAVE gossip may go out one shift later).
    for data in got:
        put_shifts, put_at = log.put[data]
        sent_shifts, sent_at = log.sent[data]
        assert sent_shifts - put_shifts <= DEFAULT_GOSSIP_WINDOW, (codec.decode(data), put_shifts, sent_shifts)
        # 2. The same in seconds, and never over the max age (py-libp2p's pending queue and the replay alike)
        age = sent_at - put_at
        assert age <= min(log.window_seconds(sent_at), DEFAULT_GOSSIP_MAX_AGE_SECONDS) + SEND_SLACK, (age, data)
    # ... and it is exactly the replay window: everything in it (and young enough) arrived, nothing older.
    in_window = {d for d, (s, t) in log.put.items()
                 if replay_shifts - s <= DEFAULT_GOSSIP_WINDOW - 1 and replay_at - t <= DEFAULT_GOSSIP_MAX_AGE_SECONDS}
    assert in_window <= got
    older = {d for d, (s, t) in log.put.items()
             if replay_shifts - s > DEFAULT_GOSSIP_WINDOW or replay_at - t > DEFAULT_GOSSIP_MAX_AGE_SECONDS}
    assert len(older) >= 3, "some were older than the window when B joined (the test has teeth)"
    assert not (older & got)
    assert min(r.at - published[codec.encode(r.heartbeat)] for r in received) >= QUIET_BEFORE_JOIN  # no fresh ones

    # 3. Liveness (the election's own rule, as the daemon feeds it): each replayed heartbeat counts at
    #    min(receipt, sent_at + max_clock_skew), so B times A out when an on-time receiver would.
    election = ElectionState(Identity.generate().node_id, ELECTION, now=received[0].wall)
    for r in received:
        election.handle(HeartbeatSeen(r.heartbeat, r.wall))
    last_sent = max(r.heartbeat.sent_at for r in received)
    member = election.members[received[0].heartbeat.node_id]
    assert member.last_seen == pytest.approx(last_sent + ELECTION.max_clock_skew)
    first_receipt = min(r.wall for r in received)
    assert first_receipt > member.last_seen, "every replay arrived later than the skew allows: not counted as fresh"
    dead_at = last_sent + ELECTION.max_clock_skew + ELECTION.liveness_timeout
    assert received[0].heartbeat.node_id not in election.live_members(dead_at)
    # counted at receipt (the bug), A would still be live then
    assert first_receipt + ELECTION.liveness_timeout > dead_at


@pytest.mark.parametrize("control", ["replay", "pending"])
async def test_control_py_libp2p_defaults_send_old_messages_and_the_check_sees_it(control: str) -> None:
    """Either of py-libp2p's paths left as it is (its count-only cache with a long window, which is
    what adaptive gossip's slow heartbeat amounts to; its 30 s queue for not-yet-subscribed peers):
    B is sent messages older than our bound. The checks above would fail on these runs."""
    log, received, _ = await late_subscriber_run(control=control)
    sent = [codec.encode(r.heartbeat) for r in received]
    assert max(log.sent[d][1] - log.put[d][1] for d in sent) > DEFAULT_GOSSIP_MAX_AGE_SECONDS + 1.0
    assert any(log.sent[d][0] - log.put[d][0] > DEFAULT_GOSSIP_WINDOW for d in sent)
