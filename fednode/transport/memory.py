"""In-process transport: a `MemoryNetwork` hub and transports attached to it.

Gossip follows gossipsub's rules, so code tested here behaves the same over libp2p:
- a message is identified by (publisher, seqno) and handled at most once per node (dedup);
- the topic validator runs before delivery and before forwarding; REJECT and IGNORE stop the
  message at this node and are counted by reason; the publisher's own validator runs too;
- a node relays a topic only while it subscribes to it, and only to linked neighbours that
  subscribe to it and have not handled the message yet (gossipsub v1.2's IDONTWANT, known here
  without the control message); the publisher also receives its own message (as py-libp2p and
  go-libp2p do);
- every queue is bounded: a full neighbour queue or subscription buffer drops the message,
  counts it (`statistics().dropped`) and logs it.

Topology: with `auto_link_degree=k` each new node links to k random existing nodes (seeded), a
connected graph whose flooding cost grows as n*k, not n^2: hundreds of nodes in one process
are fine. `auto_link_degree=0` leaves linking to the test (`link`, `unlink`), e.g. a line
A-B-C. `partition(*groups)` severs links across groups and blocks dialling; `heal()` restores
them. Opening a stream to an unlinked (not blocked) node links the two, as a libp2p dial does, while
both have fewer than `mesh_degree_high` links (gossipsub's D_hi, 12): a libp2p node stays connected to
everyone it dialled but forwards gossip only to its mesh, whose degree gossipsub keeps bounded. Without
the bound, a coordinator that fetched every member's update became every member's neighbour and each
message was flooded over O(n^2) links (a 200-node simulation spent its time forwarding duplicates).
`vanish(peer_id)` simulates a crash: the node's streams reset (PeerUnavailable on both ends),
its tasks stop, and it disappears from every peer set.
"""

from __future__ import annotations

import collections
import itertools
import logging
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from fednode.errors import LocalProtocolError, PeerUnavailable, TransportError
from fednode.identity import Identity
from fednode.transport.base import GossipMessage, StreamHandler, TransportStatistics, Validator
from fednode.transport.memory_stream import DEFAULT_STREAM_BUFFER, MemoryStream, memory_stream_pair
from fednode.transport.subscription import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_SUBSCRIPTION_BUFFER,
    BufferedSubscription,
    GossipCounters,
    run_validators,
)
from fednode.wire.verdict import Validation, Verdict

DEFAULT_AUTO_LINK_DEGREE = 8
DEFAULT_MESH_DEGREE_HIGH = 12  # gossipsub's D_hi: a stream adds a gossip link only below this degree
DEFAULT_INBOUND_QUEUE = 1024  # messages waiting for a node's gossip task (a per-peer send queue)
DEFAULT_SEEN_CACHE_SIZE = 65536  # message ids remembered for dedup, oldest evicted first
# A node's gossip task handles this many queued messages between two trio checkpoints. Queued
# messages are handled in batches from a deque, not one per channel receive: in a 500-node simulation
# the per-message channel receive and its checkpoint were most of the run's CPU (py-spy, issue 12).
INBOUND_BATCH = 64

if TYPE_CHECKING:  # trio-typing's stubs shadow trio's own annotations under mypy
    from trio_typing import TaskStatus

logger = logging.getLogger("fednode.transport.memory")

_MessageId = tuple[str, int]


@dataclass(frozen=True, slots=True)
class MemoryLimits:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    subscription_buffer: int = DEFAULT_SUBSCRIPTION_BUFFER
    inbound_queue: int = DEFAULT_INBOUND_QUEUE
    seen_cache_size: int = DEFAULT_SEEN_CACHE_SIZE
    stream_buffer: int = DEFAULT_STREAM_BUFFER


@dataclass(frozen=True, slots=True)
class _Envelope:
    msg_id: _MessageId
    topic: str
    data: bytes
    forwarder: str


class MemoryNetwork:
    """The hub that in-process transports attach to; owns the link graph."""

    def __init__(self, *, auto_link_degree: int = DEFAULT_AUTO_LINK_DEGREE, seed: int = 0,
                 mesh_degree_high: int = DEFAULT_MESH_DEGREE_HIGH) -> None:
        if auto_link_degree < 0 or mesh_degree_high < 1:
            raise ValueError("auto_link_degree must be >= 0 and mesh_degree_high >= 1")
        self.auto_link_degree = auto_link_degree
        self.mesh_degree_high = mesh_degree_high
        self._random = random.Random(seed)
        self._nodes: dict[str, MemoryTransport] = {}
        self._links: dict[str, set[str]] = {}
        self._blocked: set[frozenset[str]] = set()
        self._severed: set[frozenset[str]] = set()
        # Gossip seqnos come from one counter per network, so a node restarted with the same peer id
        # never reuses a message id its peers remember (libp2p seeds seqnos from the clock for this).
        self._seqnos = itertools.count(1)

    # -- topology -------------------------------------------------------------------------
    def node_ids(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def neighbours(self, peer_id: str) -> frozenset[str]:
        return frozenset(self._links.get(peer_id, ()))

    def link(self, a: str, b: str) -> None:
        """Connect two attached nodes (no-op if already linked); LocalProtocolError if blocked."""
        if a == b:
            raise LocalProtocolError("a node cannot link to itself")
        if a not in self._nodes or b not in self._nodes:
            raise PeerUnavailable(f"cannot link {a} and {b}: not both attached")
        if frozenset((a, b)) in self._blocked:
            raise LocalProtocolError(f"{a} and {b} are partitioned")
        self._links[a].add(b)
        self._links[b].add(a)

    def link_for_stream(self, a: str, b: str) -> None:
        """A stream opened from a to b: link them for gossip too while both are below mesh_degree_high."""
        if b in self._links.get(a, ()):
            return
        if len(self._links.get(a, ())) < self.mesh_degree_high and len(self._links.get(b, ())) < self.mesh_degree_high:
            self.link(a, b)

    def unlink(self, a: str, b: str) -> None:
        self._links.get(a, set()).discard(b)
        self._links.get(b, set()).discard(a)

    def partition(self, *groups: set[str] | frozenset[str]) -> None:
        """Sever and block every link between nodes of different groups until `heal()`."""
        for g1, g2 in itertools.combinations(groups, 2):
            for a in g1:
                for b in g2:
                    pair = frozenset((a, b))
                    self._blocked.add(pair)
                    if b in self._links.get(a, ()):
                        self._severed.add(pair)
                        self.unlink(a, b)

    def heal(self) -> None:
        """Lift all partitions and restore the links they severed (where both ends remain)."""
        self._blocked.clear()
        severed, self._severed = self._severed, set()
        for pair in severed:
            a, b = tuple(pair)
            if a in self._nodes and b in self._nodes:
                self.link(a, b)

    def vanish(self, peer_id: str) -> None:
        """Crash a node: reset its streams, stop its tasks, remove it from the network."""
        node = self._nodes.get(peer_id)
        if node is not None:
            node._halt("peer vanished")

    # -- used by MemoryTransport ----------------------------------------------------------
    def _attach(self, node: MemoryTransport) -> None:
        if node.local_peer_id in self._nodes:
            raise LocalProtocolError(f"{node.local_peer_id} is already attached to this network")
        existing = [p for p in self._nodes if frozenset((p, node.local_peer_id)) not in self._blocked]
        self._nodes[node.local_peer_id] = node
        self._links[node.local_peer_id] = set()
        k = min(self.auto_link_degree, len(existing))
        for other in self._random.sample(existing, k):
            self.link(node.local_peer_id, other)

    def _detach(self, peer_id: str) -> None:
        self._nodes.pop(peer_id, None)
        for other in self._links.pop(peer_id, set()):
            self._links.get(other, set()).discard(peer_id)

    def _node(self, peer_id: str) -> MemoryTransport | None:
        return self._nodes.get(peer_id)

    def _is_blocked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self._blocked


class MemoryTransport:
    """A node's view of a `MemoryNetwork` (implements `fednode.transport.base.Transport`)."""

    def __init__(self, network: MemoryNetwork, peer_id: str, limits: MemoryLimits) -> None:
        self._network = network
        self._peer_id = peer_id
        self.limits = limits
        self._counters = GossipCounters()
        self._subscriptions: dict[str, list[BufferedSubscription]] = collections.defaultdict(list)
        self._handlers: dict[str, StreamHandler] = {}
        self._seen: collections.OrderedDict[_MessageId, None] = collections.OrderedDict()
        self._seqno = network._seqnos
        self._streams: set[MemoryStream] = set()
        self._inbox: collections.deque[_Envelope] = collections.deque()  # at most limits.inbound_queue
        self._inbox_ready = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._scope = trio.CancelScope()
        self._halted: str | None = None

    @property
    def local_peer_id(self) -> str:
        return self._peer_id

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
        envelope = _Envelope((self._peer_id, next(self._seqno)), topic, bytes(data), self._peer_id)
        self._handle(envelope)
        await trio.lowlevel.checkpoint()

    async def subscribe(self, topic: str, validator: Validator | None = None) -> BufferedSubscription:
        self._check_alive()
        sub = BufferedSubscription(
            topic, validator, self.limits.subscription_buffer, self._counters, self._forget_subscription
        )
        self._subscriptions[topic].append(sub)
        await trio.lowlevel.checkpoint()
        return sub

    def _forget_subscription(self, sub: BufferedSubscription) -> None:
        subs = self._subscriptions.get(sub.topic, [])
        if sub in subs:
            subs.remove(sub)
        if not subs:
            self._subscriptions.pop(sub.topic, None)

    def _is_subscribed(self, topic: str) -> bool:
        return bool(self._subscriptions.get(topic))

    def _handle(self, env: _Envelope) -> None:
        if env.forwarder != self._peer_id:
            self._counters.copies_received += 1
        if env.msg_id in self._seen:
            return
        self._seen[env.msg_id] = None
        if len(self._seen) > self.limits.seen_cache_size:
            self._seen.popitem(last=False)
        subs = list(self._subscriptions.get(env.topic, ()))
        is_origin = env.forwarder == self._peer_id
        if not subs and not is_origin:
            return  # we left the topic: gossipsub drops it too
        if len(env.data) > self.limits.max_message_size:
            validation = run_validators([_reject_too_large], env.data, env.forwarder)
        else:
            validators = [s.validator for s in subs if s.validator is not None]
            validation = run_validators(validators, env.data, env.forwarder)
        if validation.verdict is not Verdict.ACCEPT:
            self._counters.count_verdict(validation)
            if validation.verdict is Verdict.REJECT:
                logger.debug("%s rejected a message from %s: %s", self._peer_id, env.forwarder,
                             validation.reason)
            return
        message = GossipMessage(env.topic, env.data, env.forwarder)
        if not is_origin:
            self._counters.delivered_from_peers += 1
        for sub in subs:
            sub.offer(message)
        self._forward(env)

    def _forward(self, env: _Envelope) -> None:
        out = _Envelope(env.msg_id, env.topic, env.data, self._peer_id)
        for other_id in tuple(self._network._links.get(self._peer_id, ())):
            if other_id == env.forwarder or other_id == env.msg_id[0]:
                continue
            other = self._network._node(other_id)
            # A neighbour that handled the message already would drop it as a duplicate: not sending
            # it saves a queue slot and a wake-up per link (most of a flood's cost in one process).
            if (other is None or other._halted is not None or env.msg_id in other._seen
                    or not other._is_subscribed(env.topic)):
                continue
            if len(other._inbox) >= other.limits.inbound_queue:
                self._counters.count_drop("send queue to %s is full", other_id)
                continue
            other._inbox.append(out)
            other._inbox_ready.set()
            self._counters.bytes_sent += len(env.data)
            other._counters.bytes_received += len(env.data)

    async def _process_inbound(self) -> None:
        inbox = self._inbox
        while True:
            if not inbox:
                self._inbox_ready = trio.Event()
                await self._inbox_ready.wait()
            for _ in range(min(len(inbox), INBOUND_BATCH)):
                self._handle(inbox.popleft())
            await trio.lowlevel.checkpoint()

    # -- streams --------------------------------------------------------------------------
    def serve(self, protocol: str, handler: StreamHandler) -> None:
        self._check_alive()
        self._handlers[protocol] = handler

    async def open_stream(self, peer_id: str, protocol: str) -> MemoryStream:
        self._check_alive()
        await trio.lowlevel.checkpoint()
        target = self._network._node(peer_id)
        if target is None or target._halted is not None or target._nursery is None:
            raise PeerUnavailable(f"peer {peer_id} is not reachable")
        if self._network._is_blocked(self._peer_id, peer_id):
            raise PeerUnavailable(f"peer {peer_id} is not reachable (partitioned)")
        handler = target._handlers.get(protocol)
        if handler is None:
            raise PeerUnavailable(f"peer {peer_id} does not serve {protocol}")
        self._network.link_for_stream(self._peer_id, peer_id)
        mine, theirs = memory_stream_pair(
            self._peer_id, peer_id, protocol, self.limits.stream_buffer,
            self._count_stream_bytes, target._count_stream_bytes,
        )
        self._streams.add(mine)
        target._streams.add(theirs)
        target._nursery.start_soon(target._run_handler, handler, theirs)
        return mine

    def _count_stream_bytes(self, sent: int, received: int) -> None:
        self._counters.bytes_sent += sent
        self._counters.bytes_received += received

    async def _run_handler(self, handler: StreamHandler, stream: MemoryStream) -> None:
        try:
            await handler(stream)
        except Exception:  # contained: one stream's failure never reaches the transport's nursery
            self._counters.count_stream_failure(stream.protocol, "internal_error")
            logger.exception("handler of %s from %s failed; resetting the stream",
                             stream.protocol, stream.remote_peer_id)
            stream.reset("the peer's handler failed")
        finally:
            stream.close_nowait()
            self._streams.discard(stream)

    # -- state ----------------------------------------------------------------------------
    def peers(self) -> frozenset[str]:
        if self._halted is not None:
            return frozenset()
        return self._network.neighbours(self._peer_id)

    def topic_peers(self, topic: str) -> frozenset[str]:
        """Connected peers known to subscribe to `topic` (our gossip reaches them directly)."""
        return frozenset(
            p for p in self.peers() if (node := self._network._node(p)) is not None and node._is_subscribed(topic)
        )

    def statistics(self) -> TransportStatistics:
        return self._counters.snapshot(len(self.peers()))

    async def _run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._process_inbound)
                task_status.started()
                await trio.sleep_forever()

    async def abort(self) -> None:
        """Drop off the network at once, as a crashed process does (`MemoryNetwork.vanish`)."""
        self._halt("peer vanished")
        await trio.lowlevel.checkpoint()

    def _halt(self, reason: str) -> None:
        """Leave the network: reset streams, end subscriptions, cancel our tasks."""
        if self._halted is not None:
            return
        self._halted = reason
        self._network._detach(self._peer_id)
        for stream in list(self._streams):
            stream.reset(f"peer {self._peer_id}: {reason}")
        self._streams.clear()
        for subs in list(self._subscriptions.values()):
            for sub in list(subs):
                sub.close()
        self._inbox.clear()
        self._scope.cancel()


def _reject_too_large(data: bytes, received_from: str) -> Validation:
    return Validation(Verdict.REJECT, "too_large", f"{len(data)} bytes")


@asynccontextmanager
async def open_memory_transport(
    network: MemoryNetwork, identity: Identity | str, *, limits: MemoryLimits | None = None
) -> AsyncIterator[MemoryTransport]:
    """Attach a node to `network` for the duration of the block; its id is identity.node_id."""
    peer_id = identity if isinstance(identity, str) else identity.node_id
    transport = MemoryTransport(network, peer_id, limits or MemoryLimits())
    network._attach(transport)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(transport._run)
            try:
                yield transport
            finally:
                transport._halt("closed")
    finally:
        transport._halt("closed")
