"""The libp2p transport: gossipsub for control messages, libp2p streams for bulk data.

The host key is the node's identity key, so `local_peer_id == identity.node_id`. Noise only,
Yamux only, gossipsub (meshsub 1.2/1.1/1.0) with a 1 s heartbeat and strict signing. Every
message is checked by our topic validator before delivery and forwarding (REJECT/IGNORE are
counted by reason in `statistics()`), and every place py-libp2p would drop a message is
counted and logged (see `libp2p_host`). Discovery and reconnection: `libp2p_discovery`.
Only this module and its `libp2p_*` siblings import libp2p.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from fednode.errors import LocalProtocolError, PeerUnavailable, TransportError
from fednode.identity import Identity
from fednode.transport.base import GossipMessage, StreamHandler, TransportStatistics, Validator
from fednode.transport.deadline import DEFAULT_MAX_PENDING_CALLS, PendingCalls, TooManyPendingCalls, call_by_deadline
from fednode.transport.libp2p_discovery import (
    PEER_EXCHANGE_PROTOCOL,
    DiscoveryState,
    find_addresses,
    forget_addresses,
    maintain_links,
    make_peer_exchange_handler,
    parse_bootstrap,
)
from fednode.transport.libp2p_host import (
    DEFAULT_GOSSIP_LAZY_DEGREE,
    install_drop_counters,
    make_gossipsub,
    make_host,
    make_pubsub,
    protocol,
    replace_delivery,
    restore_log_propagation,
    stop_pubsub_threads,
)
from fednode.transport.libp2p_stream import Libp2pStream
from fednode.transport.subscription import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_SUBSCRIPTION_BUFFER,
    BufferedSubscription,
    GossipCounters,
    run_validators,
)
from fednode.wire.verdict import Validation, Verdict

DEFAULT_LISTEN_ADDRS = ("/ip4/0.0.0.0/tcp/0",)
DEFAULT_HEARTBEAT_INTERVAL = 1  # seconds (py-libp2p: 120; it takes an int)
# gossipsub's D / D_lo / D_hi (go-libp2p and the spec's examples: 6 / 4 / 12). A node receives each
# message once per mesh peer that has it first, and grafts are symmetric, so meshes sit near D_hi:
# at 16 daemons an idle member received every heartbeat ~12 times, and each copy costs a read, a
# decrypt and a parse. 4 / 3 / 6 cut idle CPU by about a third at 16 daemons (bench_scale; issue 12).
DEFAULT_MESH_DEGREE = 4
DEFAULT_MESH_DEGREE_LOW = 3
DEFAULT_MESH_DEGREE_HIGH = 6
DEFAULT_OUTBOUND_QUEUE_SIZE = 1024  # RPCs per peer (py-libp2p: 32)
DEFAULT_MAX_MESSAGES_PER_TOPIC_PER_SECOND = 500.0  # per forwarding peer (py-libp2p: 10)
DEFAULT_SEEN_TTL = 120  # seconds a message id is remembered for dedup
DEFAULT_DIAL_TIMEOUT = 10.0
# Opening a stream on a connection we already hold: a SYN and a multistream round trip, milliseconds
# on a live link. A link that takes this long is taken for dead and closed (see open_stream).
DEFAULT_STREAM_OPEN_TIMEOUT = 8.0
DEFAULT_RECONNECT_BACKOFF_MIN = 1.0
DEFAULT_RECONNECT_BACKOFF_MAX = 60.0
DEFAULT_MAINTENANCE_INTERVAL = 2.0
DEFAULT_TARGET_PEERS = 8
DEFAULT_MAX_EXCHANGED_PEERS = 32
DEFAULT_SHUTDOWN_TIMEOUT = 2.0

logger = logging.getLogger("fednode.transport.libp2p")

# The neighbour whose RPC pubsub is processing in this task (push_msg -> notify_subscriptions).
_forwarder: contextvars.ContextVar[ID | None] = contextvars.ContextVar("fednode_forwarder", default=None)


@dataclass(frozen=True, slots=True)
class Libp2pLimits:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    subscription_buffer: int = DEFAULT_SUBSCRIPTION_BUFFER
    outbound_queue_size: int = DEFAULT_OUTBOUND_QUEUE_SIZE
    max_messages_per_topic_per_second: float = DEFAULT_MAX_MESSAGES_PER_TOPIC_PER_SECOND
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    mesh_degree: int = DEFAULT_MESH_DEGREE
    mesh_degree_low: int = DEFAULT_MESH_DEGREE_LOW
    mesh_degree_high: int = DEFAULT_MESH_DEGREE_HIGH
    gossip_lazy_degree: int = DEFAULT_GOSSIP_LAZY_DEGREE
    seen_ttl: int = DEFAULT_SEEN_TTL
    dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    stream_open_timeout: float = DEFAULT_STREAM_OPEN_TIMEOUT
    reconnect_backoff_min: float = DEFAULT_RECONNECT_BACKOFF_MIN
    reconnect_backoff_max: float = DEFAULT_RECONNECT_BACKOFF_MAX
    maintenance_interval: float = DEFAULT_MAINTENANCE_INTERVAL
    target_peers: int = DEFAULT_TARGET_PEERS
    peer_exchange: bool = True
    max_exchanged_peers: int = DEFAULT_MAX_EXCHANGED_PEERS
    max_pending_stream_opens: int = DEFAULT_MAX_PENDING_CALLS


class Libp2pTransport:
    """Implements `fednode.transport.base.Transport` over a py-libp2p host."""

    def __init__(self, host: IHost, pubsub: Pubsub, router: GossipSub, limits: Libp2pLimits) -> None:
        self._host = host
        self._pubsub = pubsub
        self._router = router
        self.limits = limits
        self._peer_id = host.get_id().to_base58()
        self._counters = GossipCounters()
        self._subscriptions: dict[str, list[BufferedSubscription]] = collections.defaultdict(list)
        self._nursery: trio.Nursery | None = None
        self._pending_opens = PendingCalls(limit=limits.max_pending_stream_opens)
        self.discovery = DiscoveryState([])  # link upkeep's state (replaced when the transport opens)
        self._halted: str | None = None
        install_drop_counters(pubsub, router, self._counters, outbound_queue_size=limits.outbound_queue_size)
        replace_delivery(pubsub, self._deliver)
        push_msg = pubsub.push_msg

        local_id = host.get_id()

        async def push_msg_with_forwarder(msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
            if msg_forwarder != local_id:
                self._counters.copies_received += 1
            token = _forwarder.set(msg_forwarder)
            try:
                await push_msg(msg_forwarder, msg)
            finally:
                _forwarder.reset(token)

        pubsub.push_msg = push_msg_with_forwarder  # type: ignore[method-assign]

    @property
    def local_peer_id(self) -> str:
        return self._peer_id

    def listen_addrs(self) -> list[str]:
        """Dialable multiaddrs of this node, each ending in /p2p/<peer id>."""
        return [f"{a}/p2p/{self._peer_id}" if "/p2p/" not in str(a) else str(a) for a in self._host.get_addrs()]

    def _check_alive(self) -> None:
        if self._halted is not None:
            raise TransportError(f"transport is closed ({self._halted})")

    # -- gossip ---------------------------------------------------------------------------
    async def publish(self, topic: str, data: bytes) -> None:
        self._check_alive()
        if len(data) > self.limits.max_message_size:
            raise LocalProtocolError(
                f"message of {len(data)} bytes exceeds max_message_size={self.limits.max_message_size}"
            )
        self._counters.published += 1
        await self._pubsub.publish(topic, bytes(data))

    async def subscribe(self, topic: str, validator: Validator | None = None) -> BufferedSubscription:
        self._check_alive()
        sub = BufferedSubscription(
            topic, validator, self.limits.subscription_buffer, self._counters, self._forget_subscription
        )
        first = not self._subscriptions.get(topic)
        self._subscriptions[topic].append(sub)
        if first:
            self._pubsub.set_topic_validator(topic, self._make_topic_validator(topic), is_async_validator=False)
            await self._pubsub.subscribe(topic)
        return sub

    def _make_topic_validator(self, topic: str):  # type: ignore[no-untyped-def]
        def validate(msg_forwarder: ID, msg: rpc_pb2.Message) -> bool:
            forwarder = msg_forwarder.to_base58()
            if len(msg.data) > self.limits.max_message_size:
                validation = Validation(Verdict.REJECT, "too_large", f"{len(msg.data)} bytes")
            else:
                subs = self._subscriptions.get(topic, ())
                validation = run_validators(
                    [s.validator for s in subs if s.validator is not None], msg.data, forwarder)
            if not validation.accepted:
                self._counters.count_verdict(validation)
                logger.debug("%s: %s message from %s: %s", self._peer_id, validation.verdict.value,
                             forwarder, validation.reason)
            return validation.accepted

        return validate

    def _forget_subscription(self, sub: BufferedSubscription) -> None:
        subs = self._subscriptions.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subscriptions.pop(sub.topic, None)
            if self._nursery is not None and self._halted is None:
                self._nursery.start_soon(self._leave_topic, sub.topic)

    async def _leave_topic(self, topic: str) -> None:
        if not self._subscriptions.get(topic):
            self._pubsub.remove_topic_validator(topic)
            await self._pubsub.unsubscribe(topic)

    def _deliver(self, msg: rpc_pb2.Message) -> None:
        forwarder = _forwarder.get()
        received_from = forwarder.to_base58() if forwarder is not None else self._peer_id
        if received_from != self._peer_id:
            self._counters.delivered_from_peers += 1
        for topic in msg.topicIDs:
            message = GossipMessage(topic, msg.data, received_from)
            if received_from != self._peer_id:
                self._counters.bytes_received += len(msg.data)
            for sub in list(self._subscriptions.get(topic, ())):
                sub.offer(message)

    def topic_peers(self, topic: str) -> frozenset[str]:
        if topic in self._router.mesh:
            candidates = set(self._router.mesh[topic])
        else:
            candidates = set(self._pubsub.peer_topics.get(topic, ()))
        connected = self._host.get_network().connections
        return frozenset(p.to_base58() for p in candidates if p in connected)

    def describe_gossip(self, topic: str) -> str:
        """gossipsub's side of `topic` in words, for a log line when a node hears nobody: pubsub peers
        out of connected ones, mesh peers, peers we back off from, and the longest outbound queue
        (a queue nobody drains grows). It is how the deaf hub of issue 12 was found: "0 in the mesh,
        15 backed off" (now answered by libp2p_host.gossip_to_backed_off_peers)."""
        connected = self._host.get_network().connections
        pubsub_peers = set(self._pubsub.peers)
        mesh = self._router.mesh.get(topic, set())
        backoff = self._router.back_off.get(topic, {})
        queues = [len(q._queue) for q in self._pubsub.peer_queues.values()]
        return (f"gossipsub: {len(pubsub_peers)} pubsub peer(s) of {len(connected)} connected, "
                f"{len(mesh)} in the mesh, {len(backoff)} backed off, longest outbound queue {max(queues, default=0)}")

    # -- streams --------------------------------------------------------------------------
    def serve(self, protocol_id: str, handler: StreamHandler) -> None:
        self._check_alive()

        async def handle(stream: INetStream) -> None:
            remote = stream.muxed_conn.peer_id.to_base58()
            wrapped = Libp2pStream(stream, remote, self._count_stream_bytes)
            try:
                await handler(wrapped)
            except Exception:  # contained: one escaping a py-libp2p stream handler tears down the host
                self._counters.count_stream_failure(protocol_id, "internal_error")
                logger.exception("handler of %s from %s failed; resetting the stream", protocol_id, remote)
                await wrapped.reset()
            finally:
                with trio.CancelScope(shield=True):
                    await wrapped.aclose()

        self._host.set_stream_handler(protocol(protocol_id), handle)

    async def open_stream(self, peer_id: str, protocol_id: str) -> Libp2pStream:
        self._check_alive()
        try:
            target = ID.from_base58(peer_id)
        except Exception as exc:
            raise PeerUnavailable(f"not a peer id: {peer_id!r}") from exc
        held = list(self._host.get_network().connections.get(target) or ())
        timeout = self.limits.stream_open_timeout if held else self.limits.dial_timeout
        if not held and not await find_addresses(self._host, self.discovery, target,
                                                 max_peers=self.limits.max_exchanged_peers, timeout=timeout):
            raise PeerUnavailable(f"cannot open {protocol_id} to {peer_id}: not connected, and no address for it "
                                  f"(none of our connected peers named it)")
        if self._nursery is None:
            raise PeerUnavailable(f"cannot open {protocol_id} to {peer_id}: the transport is not running")
        try:
            # not `fail_after` around new_stream: py-libp2p can ignore it (fednode/transport/deadline.py)
            stream = await call_by_deadline(self._nursery, self._pending_opens,
                                            lambda: self._host.new_stream(target, [protocol(protocol_id)]),
                                            timeout, release=_reset_quietly)
        except TooManyPendingCalls as exc:
            self._counters.count_stream_failure(protocol_id, "too_many_pending_opens")
            raise PeerUnavailable(f"cannot open {protocol_id} to {peer_id}: {exc}") from exc
        except trio.TooSlowError as exc:
            if held:
                await self._drop_stale_connections(target, held, protocol_id)
            else:
                self._forget_if_unreachable(target)
            raise PeerUnavailable(f"opening {protocol_id} to {peer_id} timed out after {timeout:g} s "
                                  f"({len(held)} connection(s) held{', closed to redial' if held else ''})") from exc
        except Exception as exc:  # py-libp2p raises many unrelated types for "could not"
            if not held:
                self._forget_if_unreachable(target)
            raise PeerUnavailable(f"cannot open {protocol_id} to {peer_id}: {exc!r}") from exc
        return Libp2pStream(stream, peer_id, self._count_stream_bytes)

    def _forget_if_unreachable(self, target: ID) -> None:
        """A dial to `target` failed and we still hold no connection to it: the addresses we had
        (learned by peer exchange, or its last connection's) may be stale (a daemon restarted on
        another port). Forget them, so that the next stream asks our neighbours again
        (find_addresses) instead of redialling the same dead address until its peerstore TTL ends."""
        if self._host.get_network().connections.get(target):
            return
        forget_addresses(self._host, self.discovery, target)

    async def _drop_stale_connections(self, target: ID, held: list[Any], protocol_id: str) -> None:
        """A stream that cannot be opened on a connection we hold means the connection is dead
        without py-libp2p noticing (issue 13: a peer restarted under the same peer id, or a
        half-closed link, kept every new stream hanging for minutes while gossip flowed on another
        connection; the swarm prefers the connection with the most streams, i.e. the stale one).
        Close those connections: the next stream, or our upkeep, dials afresh."""
        self._counters.count_stream_failure(protocol_id, "stale_connection")
        network: Any = self._host.get_network()
        semaphore = getattr(network, "_stream_semaphore", None)
        muxers = [getattr(c, "muxed_conn", None) for c in held]
        backlog = [(getattr(getattr(m, "stream_backlog_semaphore", None), "value", None),
                    len(getattr(m, "streams", ()))) for m in muxers]
        logger.info("a %s stream to %s did not open within %.1f s on %d held connection(s); closing them to redial "
                    "(swarm stream slots free: %s; per connection (yamux slots free, streams): %s)",
                    protocol_id, target, self.limits.stream_open_timeout, len(held),
                    getattr(semaphore, "value", None), backlog)
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + DEFAULT_SHUTDOWN_TIMEOUT
            for conn in held:
                try:
                    await conn.close()
                except Exception as exc:
                    logger.debug("closing a stale connection to %s: %r", target, exc)

    def _count_stream_bytes(self, sent: int, received: int) -> None:
        self._counters.bytes_sent += sent
        self._counters.bytes_received += received

    # -- state ----------------------------------------------------------------------------
    def peers(self) -> frozenset[str]:
        if self._halted is not None:
            return frozenset()
        return frozenset(p.to_base58() for p, conns in self._host.get_network().connections.items() if conns)

    def statistics(self) -> TransportStatistics:
        return self._counters.snapshot(len(self.peers()))

    async def abort(self) -> None:
        """Drop off the network at once, as a crashed process does (a testing aid)."""
        self._halt("aborted")
        with trio.CancelScope(shield=True):
            try:
                await self._host.get_network().close()
            except Exception as exc:
                logger.debug("closing the network on abort: %r", exc)

    def _halt(self, reason: str) -> None:
        if self._halted is not None:
            return
        self._halted = reason
        for subs in list(self._subscriptions.values()):
            for sub in list(subs):
                sub.close()


async def _reset_quietly(stream: INetStream) -> None:
    """A stream that opened after its caller stopped waiting: nobody will use it."""
    await stream.reset()


async def _close_network(host: IHost) -> None:
    """Close connections and listeners before the host stops. py-libp2p's swarm does it in a
    `finally` that runs already cancelled, so its awaits fail: dialled sockets leak (a
    ResourceWarning each) and TCP listener system tasks outlive the host."""
    network: Any = host.get_network()
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + DEFAULT_SHUTDOWN_TIMEOUT
        for peer_id in list(network.connections):
            try:
                await network.close_peer(peer_id)
            except Exception as exc:
                logger.debug("closing connection to %s: %r", peer_id, exc)
        for listener in list(getattr(network, "listeners", {}).values()):
            try:
                await listener.close()
            except Exception as exc:
                logger.debug("closing listener: %r", exc)


@asynccontextmanager
async def open_libp2p_transport(
    identity: Identity,
    *,
    listen_addrs: Sequence[str] = DEFAULT_LISTEN_ADDRS,
    bootstrap: Sequence[str] = (),
    limits: Libp2pLimits | None = None,
) -> AsyncIterator[Libp2pTransport]:
    """Start a host that listens on `listen_addrs` and dials `bootstrap` (concurrently, before
    the block starts); stop it, its services and its threads on exit."""
    limits = limits or Libp2pLimits()
    bootstrap_infos = parse_bootstrap(list(bootstrap))
    restore_log_propagation()
    host = make_host(identity)
    router = make_gossipsub(
        degree=limits.mesh_degree, degree_low=limits.mesh_degree_low, degree_high=limits.mesh_degree_high,
        heartbeat_interval=limits.heartbeat_interval, lazy_degree=limits.gossip_lazy_degree,
        max_messages_per_topic_per_second=limits.max_messages_per_topic_per_second,
    )
    pubsub = make_pubsub(host, router, max_rpc_size=4 * limits.max_message_size + 65536,
                         seen_ttl=limits.seen_ttl)
    transport = Libp2pTransport(host, pubsub, router, limits)
    host.set_stream_handler(PEER_EXCHANGE_PROTOCOL, make_peer_exchange_handler(
        host, limits.max_exchanged_peers,
        on_failure=functools.partial(transport._counters.count_stream_failure, str(PEER_EXCHANGE_PROTOCOL))))
    try:
        async with (
            host.run(listen_addrs=[Multiaddr(a) for a in listen_addrs]),
            background_trio_service(pubsub),
            background_trio_service(router),
        ):
            await pubsub.wait_until_ready()
            async with trio.open_nursery() as nursery:
                transport._nursery = nursery
                transport.discovery = DiscoveryState(bootstrap_infos)
                transport.discovery.runner = functools.partial(call_by_deadline, nursery, transport._pending_opens)
                await nursery.start(lambda task_status: maintain_links(
                    host, transport.discovery,
                    interval=limits.maintenance_interval, dial_timeout=limits.dial_timeout,
                    backoff_min=limits.reconnect_backoff_min, backoff_max=limits.reconnect_backoff_max,
                    target_peers=limits.target_peers, peer_exchange=limits.peer_exchange,
                    max_peers=limits.max_exchanged_peers, task_status=task_status))
                try:
                    yield transport
                finally:
                    transport._halt("closed")
                    nursery.cancel_scope.cancel()
                    await _close_network(host)
    finally:
        transport._halt("closed")
        stop_pubsub_threads(pubsub)
