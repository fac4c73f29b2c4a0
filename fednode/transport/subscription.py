"""Pieces both transports share: bounded subscriptions, counters, and running validators.

A subscription buffer is bounded; when it is full the message is dropped, counted in
`statistics().dropped` and logged (the first drop and then every power of two), never lost
silently. A validator that raises is a REJECT with reason "validator_error", not a crash.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from fednode.transport.base import GossipMessage, TransportStatistics, Validator
from fednode.wire.verdict import ACCEPTED, Validation, Verdict

# Largest pubsub payload we publish or accept. Pubsub is for small control messages; bulk data
# goes over streams (py-libp2p silently drops anything over 1 MiB on its outbound queue).
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024
# Messages buffered per subscription before drops start (py-libp2p's own default is 32).
DEFAULT_SUBSCRIPTION_BUFFER = 1024

logger = logging.getLogger("fednode.transport")


@dataclass(slots=True)
class GossipCounters:
    """Mutable counters behind `Transport.statistics()`."""

    published: int = 0
    delivered: int = 0
    rejected_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    ignored_by_reason: collections.Counter[str] = field(default_factory=collections.Counter)
    dropped: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    # gossip messages neighbours handed us, duplicates included, and those of them we delivered (new
    # and accepted): their ratio is what each message costs in copies (gossipsub's mesh sends every
    # message to a node once per mesh peer that has it before we do)
    copies_received: int = 0
    delivered_from_peers: int = 0
    streams_failed: collections.Counter[str] = field(default_factory=collections.Counter)

    def count_stream_failure(self, protocol: str, reason: str) -> None:
        self.streams_failed[f"{protocol}:{reason}"] += 1

    def count_drop(self, what: str, *args: object) -> None:
        """Count one dropped message and log it (first drop, then every power of two)."""
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:
            logger.warning("dropped a message: " + what + " (%d dropped so far)", *args, self.dropped)

    def count_verdict(self, validation: Validation) -> None:
        if validation.verdict is Verdict.REJECT:
            self.rejected_by_reason[validation.reason] += 1
        elif validation.verdict is Verdict.IGNORE:
            self.ignored_by_reason[validation.reason] += 1

    def snapshot(self, peers: int) -> TransportStatistics:
        return TransportStatistics(
            published=self.published,
            delivered=self.delivered,
            rejected_by_reason=dict(self.rejected_by_reason),
            ignored_by_reason=dict(self.ignored_by_reason),
            dropped=self.dropped,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            copies_received=self.copies_received,
            delivered_from_peers=self.delivered_from_peers,
            peers=peers,
            streams_failed=dict(self.streams_failed),
        )


def run_validators(validators: Iterable[Validator], data: bytes, received_from: str) -> Validation:
    """The first non-ACCEPT verdict wins; a validator that raises is a REJECT."""
    for validator in validators:
        try:
            result = validator(data, received_from)
        except Exception as exc:  # a buggy validator must not take the transport down
            logger.exception("topic validator raised; treating the message as rejected")
            return Validation(Verdict.REJECT, "validator_error", repr(exc))
        if not isinstance(result, Validation):
            return Validation(Verdict.REJECT, "validator_error", f"validator returned {result!r}")
        if not result.accepted:
            return result
    return ACCEPTED


class BufferedSubscription:
    """Messages of one topic in a bounded buffer; iterate with `async for`.

    Iteration ends when the subscription or its transport is closed.
    """

    def __init__(
        self,
        topic: str,
        validator: Validator | None,
        capacity: int,
        counters: GossipCounters,
        on_close: Callable[[BufferedSubscription], None],
    ) -> None:
        if capacity < 1:
            raise ValueError(f"subscription buffer must hold at least 1 message, got {capacity}")
        self.topic = topic
        self.validator = validator
        self._counters = counters
        self._on_close = on_close
        self._send, self._receive = trio.open_memory_channel[GossipMessage](capacity)
        self._closed = False

    def backlog(self) -> int:
        """Messages delivered to this subscription and not read yet."""
        return self._send.statistics().current_buffer_used

    def offer(self, message: GossipMessage) -> bool:
        """Put a message in the buffer without blocking; a full buffer drops and counts it."""
        if self._closed:
            return False
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._counters.count_drop("subscription buffer of topic %r is full", self.topic)
            return False
        self._counters.delivered += 1
        return True

    async def receive(self) -> GossipMessage:
        """The next message; trio.EndOfChannel once the subscription is closed."""
        try:
            return await self._receive.receive()
        except trio.ClosedResourceError:
            raise trio.EndOfChannel from None

    def __aiter__(self) -> BufferedSubscription:
        return self

    async def __anext__(self) -> GossipMessage:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Synchronous close; messages already buffered can still be read."""
        if not self._closed:
            self._closed = True
            self._send.close()
            self._on_close(self)

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
