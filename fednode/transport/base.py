"""The transport interface every network implementation provides.

Two implementations: `memory` (in-process, for tests and simulations with hundreds of nodes)
and `libp2p` (the only module that imports libp2p). Both are opened as async context
managers, so every background task they run lives in a nursery the caller's scope owns:

    async with open_memory_transport(network, identity) as transport: ...

Control messages go over pubsub (small, signed, validated before delivery and before
forwarding); bulk data goes over streams of a named protocol. As in py-libp2p and go-libp2p,
a node's own publish is also delivered to its own subscriptions (received_from = its own id).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fednode.wire.verdict import Validation

# A topic validator sees the raw bytes and the peer that handed them to us (not
# necessarily the author). It must be fast and pure: it runs before delivery and
# before forwarding, and a REJECT stops the message at this node.
Validator = Callable[[bytes, str], Validation]


@dataclass(frozen=True, slots=True)
class GossipMessage:
    topic: str
    data: bytes
    received_from: str  # peer id of the neighbour that delivered it (our own id for our own publish)


@runtime_checkable
class Stream(Protocol):
    """A reliable, ordered byte stream to one peer."""

    @property
    def remote_peer_id(self) -> str: ...

    async def send_all(self, data: bytes) -> None:
        """Send all bytes; raises PeerUnavailable if the peer vanished."""

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Up to max_bytes; b"" at clean end of stream; PeerUnavailable on reset."""

    async def send_eof(self) -> None:
        """Half-close: the peer's receive_some returns b"" after the data already sent."""

    async def aclose(self) -> None: ...


StreamHandler = Callable[[Stream], Awaitable[None]]


class Subscription(Protocol):
    """Messages of one topic, in arrival order. Iterate with `async for`."""

    topic: str

    def __aiter__(self) -> AsyncIterator[GossipMessage]: ...

    async def receive(self) -> GossipMessage:
        """The next message; trio.EndOfChannel once the subscription or transport is closed."""

    async def aclose(self) -> None: ...

    def backlog(self) -> int:
        """Messages delivered to this subscription and not read yet."""


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    """A frozen snapshot of counters (trio's `statistics()` convention)."""

    published: int = 0
    delivered: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    ignored_by_reason: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # messages lost to a full queue/buffer: always counted and logged
    bytes_sent: int = 0
    bytes_received: int = 0
    # gossip messages from neighbours, duplicates included, and the new, accepted ones among them
    # (copies_received / delivered_from_peers: the copies each message costs a node)
    copies_received: int = 0
    delivered_from_peers: int = 0
    peers: int = 0
    # inbound streams that ended in an error, keyed "<protocol>:<reason>" (e.g. a peer-exchange
    # asker that closed early, or "internal_error": a handler that raised, caught by the transport)
    streams_failed: dict[str, int] = field(default_factory=dict)


class Transport(Protocol):
    @property
    def local_peer_id(self) -> str: ...

    async def publish(self, topic: str, data: bytes) -> None: ...

    async def subscribe(self, topic: str, validator: Validator | None = None) -> Subscription: ...

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Raises PeerUnavailable when the peer cannot be reached or does not serve protocol."""

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        """Each inbound stream of `protocol` runs handler(stream) in the transport's nursery;
        the transport closes the stream when the handler returns."""

    def peers(self) -> frozenset[str]:
        """Peer ids currently connected."""

    def topic_peers(self, topic: str) -> frozenset[str]:
        """Connected peers known to subscribe to `topic` (gossip from us reaches them directly);
        e.g. wait for it to be non-empty before the first publish of a freshly started node."""

    def statistics(self) -> TransportStatistics: ...
