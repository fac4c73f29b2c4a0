"""Building and wiring a py-libp2p 0.8.1 host, pubsub and gossipsub the way fednode needs them.

Part of the libp2p adapter (only `libp2p*.py` modules import libp2p). What this fixes about
py-libp2p's defaults, each measured on 0.8.1:
- security: Noise only; the default list also offers plaintext, TLS and secio.
- muxer: Yamux only (Mplex is ~5x slower).
- heartbeat 1 s instead of 120 s, so meshes form and heal quickly; adaptive gossip off, because
  it raises the heartbeat to 30-60 s once its "network health" score drops, which a community of
  fewer than `degree` peers always does after ~30 s (the score counts mesh size / degree).
- a newly subscribed peer is replayed only messages younger than `max_age` seconds
  (`BoundedMessageCache`), on top of py-libp2p's count of heartbeats: with a slow heartbeat the
  count alone let a new subscriber be sent minutes of old messages.
- messages published while a connected peer is not (yet) subscribed are queued for it only as
  long as a replay would offer them (`pending_ttl`): py-libp2p queues every publish for every
  connected, unsubscribed peer (100 per peer, 30 s) and sends the lot when it subscribes, a second
  path by which a late subscriber was sent old messages (found by tests/transport/test_late_subscriber).
- the gossipsub message id stays libp2p's default, from || seqno (envelope-v1.md says why).
- drops are counted, never silent: the per-peer outbound RPC queue (32 by default, drops logged
  at DEBUG on a non-propagating logger) is raised and its rejects are counted; the spam filter
  (10 msg/s per peer and topic, also on our own publishes, which then are delivered locally
  but not forwarded) is raised and its rejects are counted; delivery to our subscriptions
  bypasses pubsub's 32-slot channels (`notify_subscriptions` is replaced by ours).
- the swarm's AutoConnector (dials every known peer while below 50 connections) is disabled.
- the swarm's 60 s negative dial cache is disabled (our upkeep paces redials with its own backoff).
- the `libp2p` logger is made to propagate again (importing libp2p turns that off).
- Yamux's read loop no longer waits on the socket to answer a SYN or PING, which deadlocked a
  connection carrying bulk data both ways (see `libp2p_yamux`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from libp2p import create_yamux_muxer_option, new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.mcache import MessageCache, default_msg_id_fn
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import RpcQueue
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from fednode.identity import Identity
from fednode.transport.libp2p_records import install_sender_record_memo, install_signed_record_memo
from fednode.transport.libp2p_tasks import index_running_tasks
from fednode.transport.libp2p_yamux import install_yamux_nonblocking_reader, use_go_yamux_window_updates
from fednode.transport.subscription import GossipCounters

logger = logging.getLogger("fednode.transport.libp2p")

DEFAULT_GOSSIP_WINDOW = 3  # heartbeats of history offered in IHAVE and replayed to a new subscriber
DEFAULT_GOSSIP_HISTORY = 5  # heartbeats a message stays answerable by IWANT
DEFAULT_GOSSIP_MAX_AGE_SECONDS = 5.0  # and never older than this, whatever the heartbeat
# gossipsub v1.2: IDONTWANT only for messages of at least this many bytes (go-libp2p's
# IDontWantMessageThreshold default, 1 KiB). py-libp2p 0.8.1 sends one to every mesh peer for every
# message; for a ~300-byte heartbeat the IDONTWANT costs as much as the message it saves.
IDONTWANT_MESSAGE_THRESHOLD_BYTES = 1024
# gossipsub's IHAVE fan-out per heartbeat: max(D_lazy, GOSSIP_FACTOR x peers outside the mesh), as
# go-libp2p computes it. py-libp2p 0.8.1 hard-codes D_lazy = 6 (when adaptive gossip is off); 3 goes
# with the smaller mesh (libp2p.DEFAULT_MESH_DEGREE).
DEFAULT_GOSSIP_LAZY_DEGREE = 3
GOSSIP_FACTOR = 0.25


def pending_ttl(gossip_window: int, heartbeat_interval: float, gossip_max_age: float) -> float:
    """How long a message published before a peer subscribed may still be sent to it when it does:
    no longer than the replay to a new subscriber would offer it (the gossip window in seconds,
    never over the max age)."""
    return min(gossip_max_age, gossip_window * heartbeat_interval)


class BoundedMessageCache(MessageCache):
    """py-libp2p's message cache (ids from || seqno, history shifted once per heartbeat) that
    replays to a newly subscribed peer only messages put at most `max_age` seconds ago.

    py-libp2p sends a new subscriber every message of the gossip window (`window(topic)`, the
    last `gossip_window` heartbeats); at a 30 s heartbeat that was minutes of old messages, which
    the receiver took for news. IHAVE gossip and IWANT answers keep the count-based window:
    they repair peers that missed a message, which is what they are for."""

    def __init__(self, window_size: int, history_size: int, max_age: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(window_size, history_size)
        self.max_age = max_age
        self.clock = clock
        self._put_at: dict[bytes, float] = {}
        self._bound_next_window = False

    def put(self, msg: rpc_pb2.Message) -> None:
        mid = default_msg_id_fn(msg)
        if mid not in self.msgs:
            self._put_at[mid] = self.clock()
        super().put(msg)

    def replay_window(self, topic: str) -> list[bytes]:
        """The ids a newly subscribed peer may be sent: the window, without anything older than max_age."""
        now = self.clock()
        return [mid for mid in super().window(topic) if now - self._put_at.get(mid, -math.inf) <= self.max_age]

    def window(self, topic: str) -> list[bytes]:
        if self._bound_next_window:  # set by bound_replays' wrapper for the replay's own call
            self._bound_next_window = False
            return self.replay_window(topic)
        return super().window(topic)

    def shift(self) -> None:
        dropped = self.history[-1]
        super().shift()
        for entry in dropped:
            if entry.mid not in self.msgs:
                self._put_at.pop(entry.mid, None)


def bound_replays(router: GossipSub, cache: BoundedMessageCache) -> None:
    """Make the router's replay to a new subscriber use `cache.replay_window`.
    `GossipSub.send_recent_messages` reads `self.mcache.window(topic)` before its first await,
    so the one-shot flag is consumed by that call and by no other task's."""
    router.mcache = cache
    send_recent = router.send_recent_messages

    async def send_recent_bounded(peer_id: ID, topic: str) -> None:
        cache._bound_next_window = True
        try:
            await send_recent(peer_id, topic)
        finally:
            cache._bound_next_window = False

    router.send_recent_messages = send_recent_bounded  # type: ignore[method-assign]


def back_off_pruned_peers(router: GossipSub) -> None:
    """Make the router's heartbeat back off from the peers it prunes, as gossipsub v1.1 says both
    sides do ("both the pruned and the pruning peer add a backoff period from each other").

    py-libp2p 0.8.1 adds the backoff only on the pruned side (`handle_prune`). The pruning side
    grafts the same peer again as soon as its own mesh falls below D_lo; the pruned side, which
    received the PRUNE less than 10 s before, calls that a "GRAFT flood", answers PRUNE and both back
    off for 60 s. With 32 daemons (issue 12) the hubs' over-full meshes churned that way until late
    members were left with no mesh peer and heard no heartbeat for 15 s: 12 election terms."""
    mesh_heartbeat = router.mesh_heartbeat

    def mesh_heartbeat_with_backoff() -> tuple[Any, Any]:
        to_graft, to_prune = mesh_heartbeat()
        for peer, topics in to_prune.items():
            for topic in topics:
                router._add_back_off(peer, topic, False)
        return to_graft, to_prune

    router.mesh_heartbeat = mesh_heartbeat_with_backoff  # type: ignore[method-assign]


def gossip_to_lazy_degree(router: GossipSub, lazy_degree: int) -> None:
    """IHAVE goes to max(`lazy_degree`, GOSSIP_FACTOR x non-mesh peers) peers each heartbeat, instead
    of py-libp2p's fixed D_lazy = 6. Every idle heartbeat second each node sends that many IHAVEs
    (the window always holds heartbeats): with a mesh of 4, IHAVE was about half of an idle node's
    frames at 32 daemons. IHAVE only repairs what the mesh failed to deliver."""
    if router.adaptive_gossip_enabled:
        raise RuntimeError("gossip_to_lazy_degree assumes py-libp2p's adaptive gossip is off")

    def gossip_peers_count(topic: str, total_peers: int) -> int:
        return max(lazy_degree, int(total_peers * GOSSIP_FACTOR))

    router._get_adaptive_gossip_peers_count = gossip_peers_count  # type: ignore[method-assign]


def gossip_to_backed_off_peers(router: GossipSub) -> None:
    """Let IHAVE go to peers we back off from, as go-libp2p's emitGossip does: backoff is about the
    mesh (whom we GRAFT), not about gossip.

    py-libp2p 0.8.1 picks IHAVE targets with its backoff filter on. A hub that every member grafted
    at start-up prunes most of them (both sides back off for 60 s), and the members it kept prune it
    later when their own meshes fill: its mesh empties with every peer backed off, and then neither
    mesh nor IHAVE reaches it. At 16 daemons a bootstrap peer logged "15 pubsub peer(s) of 15
    connected, 0 in the mesh, 15 backed off", heard no heartbeat for 20 s and claimed a term (issue
    12). `_handle_topic_heartbeat` asks `_get_adaptive_gossip_peers_count` for the IHAVE count right
    before it selects the IHAVE targets, in one synchronous stretch, so a one-shot flag set by the
    first turns the filter off for that selection and for no other (mesh grafting keeps it)."""
    count, select = router._get_adaptive_gossip_peers_count, router._get_in_topic_gossipsub_peers_from_minus
    ihave_selection = [False]

    def gossip_count(topic: str, total_peers: int) -> int:
        ihave_selection[0] = True
        return count(topic, total_peers)

    def select_peers(topic: str, num_to_select: int, minus: Any, backoff_check: bool = False) -> list[ID]:
        if ihave_selection[0]:
            ihave_selection[0] = False
            backoff_check = False
        return select(topic, num_to_select, minus, backoff_check)

    router._get_adaptive_gossip_peers_count = gossip_count  # type: ignore[method-assign]
    router._get_in_topic_gossipsub_peers_from_minus = select_peers  # type: ignore[method-assign]


def skip_small_idontwant(router: GossipSub, threshold: int = IDONTWANT_MESSAGE_THRESHOLD_BYTES) -> None:
    """Make the router send IDONTWANT only for messages of at least `threshold` bytes.
    `GossipSub.publish` calls `self._emit_idontwant_for_message` at its first await, so a one-shot
    flag set by the publish wrapper is consumed by that call and by no other task's."""
    publish, emit = router.publish, router._emit_idontwant_for_message
    small = [False]

    async def publish_gated(msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        small[0] = len(pubsub_msg.data) < threshold
        try:
            await publish(msg_forwarder, pubsub_msg)
        finally:
            small[0] = False

    async def emit_gated(msg_id: bytes, topic_ids: Any) -> None:
        if small[0]:
            small[0] = False
            return
        await emit(msg_id, topic_ids)

    router.publish = publish_gated  # type: ignore[method-assign]
    router._emit_idontwant_for_message = emit_gated  # type: ignore[method-assign]


def key_pair_from_identity(identity: Identity) -> KeyPair:
    """The node's Ed25519 key as a libp2p key pair: the same seed, so the same peer id."""
    key_pair = create_new_key_pair(identity.seed)
    peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
    if peer_id != identity.node_id:  # a mismatch would break every signature check
        raise RuntimeError(f"libp2p peer id {peer_id} != node id {identity.node_id}")
    return key_pair


def make_host(identity: Identity) -> IHost:
    install_yamux_nonblocking_reader()
    use_go_yamux_window_updates()  # idle CPU: no WINDOW_UPDATE frame per gossip message read
    install_signed_record_memo()  # idle CPU: a peer's record is verified once, not per RPC
    install_sender_record_memo()  # idle CPU: our own record is built once, not per RPC
    index_running_tasks()  # round CPU: run_task (once per gossip message) finds its parent by a map
    key_pair = key_pair_from_identity(identity)
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt=create_yamux_muxer_option(),
        enable_mDNS=False,
        enable_upnp=False,
    )
    # The swarm's AutoConnector dials every peer in the peerstore while below 50 connections:
    # it would turn a line into a mesh and dial peers nobody asked for. Our own upkeep
    # (libp2p_discovery.maintain_links) decides whom to dial.
    auto_connector: Any = getattr(host.get_network(), "auto_connector", None)
    if auto_connector is not None:
        async def no_auto_connect() -> None:
            return None

        auto_connector.maybe_connect = no_auto_connect
    disable_negative_dial_cache(host)
    return host


def disable_negative_dial_cache(host: IHost) -> None:
    """py-libp2p 0.8.1's swarm refuses for 60 s to dial a peer whose last dial failed ('recently
    failed all addresses (negative cache)'), and `new_stream` dials through it. A peer that was
    down for a few seconds (a restarted daemon, the same peer id) was thus unreachable, by our
    redials and by every stream, for a minute after it came back (issue 13). Our own upkeep
    (libp2p_discovery) already paces redials with a per-peer backoff, so the cache is turned off."""
    cache: Any = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is None:
        return
    if not hasattr(cache, "is_blocked"):
        raise RuntimeError("py-libp2p's negative peer cache changed shape; see disable_negative_dial_cache")
    cache.is_blocked = lambda peer_id: False


def make_gossipsub(
    *,
    degree: int,
    degree_low: int,
    degree_high: int,
    heartbeat_interval: int,
    max_messages_per_topic_per_second: float,
    gossip_window: int = DEFAULT_GOSSIP_WINDOW,
    gossip_history: int = DEFAULT_GOSSIP_HISTORY,
    gossip_max_age: float = DEFAULT_GOSSIP_MAX_AGE_SECONDS,
    lazy_degree: int = DEFAULT_GOSSIP_LAZY_DEGREE,
    clock: Callable[[], float] = time.monotonic,
) -> GossipSub:
    router = GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
        degree=degree,
        degree_low=degree_low,
        degree_high=degree_high,
        heartbeat_initial_delay=0.1,
        heartbeat_interval=heartbeat_interval,
        gossip_window=gossip_window,
        gossip_history=gossip_history,
        # Adaptive gossip (py-libp2p's "v2.0"/"v1.4" features) would move the heartbeat to 30-60 s
        # and the mesh degree bounds with a health score that small communities always fail.
        adaptive_gossip_enabled=False,
        max_messages_per_topic_per_second=max_messages_per_topic_per_second,
        # PX peer records are optional in 0.8.1 and only sent on PRUNE: we run our own exchange.
        do_px=False,
        # Loopback tests run every peer from one IP: IP-diversity checks would starve the mesh.
        eclipse_protection_enabled=False,
        # The "identify-pending" queue: what a connected peer is sent when its subscription arrives.
        pending_messages_ttl=pending_ttl(gossip_window, heartbeat_interval, gossip_max_age),
    )
    bound_replays(router, BoundedMessageCache(gossip_window, gossip_history, gossip_max_age, clock))
    skip_small_idontwant(router)  # idle CPU: no IDONTWANT per heartbeat (go-libp2p's threshold)
    gossip_to_lazy_degree(router, lazy_degree)  # idle CPU: IHAVE to fewer peers outside the mesh
    back_off_pruned_peers(router)  # mesh churn at 32 daemons: the gossipsub v1.1 rule py-libp2p misses
    gossip_to_backed_off_peers(router)  # deaf hubs at 16 daemons: IHAVE ignores backoff, as in go-libp2p
    return router


def make_pubsub(host: IHost, router: GossipSub, *, max_rpc_size: int, seen_ttl: int) -> Pubsub:
    # strict signing: interop with js-libp2p needs it (see DESIGN.md), our envelopes sign too
    return Pubsub(host, router, strict_signing=True, max_inbound_rpc_size=max_rpc_size, seen_ttl=seen_ttl)


class _CountingQueues(dict[ID, RpcQueue]):
    """pubsub.peer_queues replacement: each new per-peer queue gets our size limit, a rejected push
    (queue full or closed) is counted and logged instead of vanishing, and the data of the gossip
    messages queued for sending counts in `bytes_sent` (before, only stream bytes did)."""

    def __init__(self, counters: GossipCounters, max_size: int) -> None:
        super().__init__()
        self._counters = counters
        self._max_size = max_size

    def __setitem__(self, peer_id: ID, queue: RpcQueue) -> None:
        queue._queue.max_size = self._max_size
        push = queue.push
        counters = self._counters

        def counting_push(rpc: rpc_pb2.RPC, priority: bool = False) -> bool:
            ok = push(rpc, priority)
            if ok:  # gossip sent: the messages' data, as bytes_received counts it (not RPC framing)
                counters.bytes_sent += sum(len(m.data) for m in rpc.publish)
            elif not queue.closed:
                counters.count_drop("outbound queue to %s is full (%d messages)", peer_id, len(rpc.publish))
            return ok

        queue.push = counting_push  # type: ignore[method-assign]
        super().__setitem__(peer_id, queue)


def install_drop_counters(pubsub: Pubsub, router: GossipSub, counters: GossipCounters,
                          *, outbound_queue_size: int) -> None:
    pubsub.peer_queues = _CountingQueues(counters, outbound_queue_size)
    check_spam = router._check_spam_protection

    def counting_check_spam(peer_id: ID, msg: rpc_pb2.Message) -> bool:
        ok = check_spam(peer_id, msg)
        if not ok:
            counters.count_drop("spam limit hit for %s on %s (not forwarded)", peer_id, list(msg.topicIDs))
        return ok

    router._check_spam_protection = counting_check_spam  # type: ignore[method-assign]


def replace_delivery(pubsub: Pubsub, deliver: Callable[[rpc_pb2.Message], None]) -> None:
    """Route validated, deduplicated messages to `deliver` instead of pubsub's 32-slot channels."""
    pubsub.notify_subscriptions = deliver  # type: ignore[method-assign,assignment]


def stop_pubsub_threads(pubsub: Pubsub) -> None:
    """Each Pubsub's seen-message cache runs a sweeper thread that nothing else stops."""
    seen: Any = pubsub.seen_messages
    stop = getattr(seen, "stop", None)
    if callable(stop):
        stop()


# py-libp2p logs every failed dial at ERROR before raising; the dialler (libp2p_discovery.dial)
# catches the error and says itself what happens next (a retry with backoff), so these records
# are demoted to DEBUG. A bootstrap peer that is not up yet is normal, not an error.
_EXPECTED_DIAL_ERRORS = ("Failed to open TCP stream", "Unexpected error opening TCP stream")
_TCP_LOGGER = "libp2p.transport.tcp.tcp"


def _demote_expected_dial_errors(record: logging.LogRecord) -> bool:
    if isinstance(record.msg, str) and record.msg.startswith(_EXPECTED_DIAL_ERRORS):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(_TCP_LOGGER).isEnabledFor(logging.DEBUG)
    return True


# A peer that connects while our host is stopping: py-libp2p's swarm cannot start the connection's
# task any more and logs "[ADDCONN_FAIL] ... LifecycleError('Cannot schedule task after service has
# stopped')" at WARNING with the whole traceback in the message. Nothing failed: we are shutting down
# and drop the connection. Seen once in ./scripts/test (a SIGTERM while the other node redialled); the
# record becomes one INFO line, without the traceback.
_SWARM_LOGGER = "libp2p.network.swarm"
_STOPPING = "Cannot schedule task after service has stopped"


def _quiet_connection_during_stop(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    if (isinstance(record.msg, str) and record.msg.startswith("[ADDCONN_FAIL]") and len(args) >= 2
            and _STOPPING in repr(args[1])):
        record.msg, record.args = "a connection from %s arrived while the host was stopping: dropped", (args[0],)
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(_SWARM_LOGGER).isEnabledFor(logging.INFO)
    return True


def restore_log_propagation() -> None:
    """Make the `libp2p` logger propagate again, demote its expected dial errors, and shorten the
    record of a connection that arrives while the host stops."""
    logging.getLogger("libp2p").propagate = True
    tcp_logger = logging.getLogger(_TCP_LOGGER)
    if _demote_expected_dial_errors not in tcp_logger.filters:
        tcp_logger.addFilter(_demote_expected_dial_errors)
    swarm_logger = logging.getLogger(_SWARM_LOGGER)
    if _quiet_connection_during_stop not in swarm_logger.filters:
        swarm_logger.addFilter(_quiet_connection_during_stop)


def protocol(name: str) -> TProtocol:
    return TProtocol(name)
