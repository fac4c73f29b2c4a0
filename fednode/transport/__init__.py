"""Transports: the interface (`base`), the in-process `memory` hub and `libp2p`.

`fednode.transport.libp2p` is not imported here, so code that only needs the memory transport
does not pay for importing libp2p: `from fednode.transport.libp2p import open_libp2p_transport`.
"""

from fednode.transport.base import (
    GossipMessage,
    Stream,
    StreamHandler,
    Subscription,
    Transport,
    TransportStatistics,
    Validator,
)
from fednode.transport.memory import MemoryLimits, MemoryNetwork, MemoryTransport, open_memory_transport

__all__ = [
    "GossipMessage",
    "MemoryLimits",
    "MemoryNetwork",
    "MemoryTransport",
    "Stream",
    "StreamHandler",
    "Subscription",
    "Transport",
    "TransportStatistics",
    "Validator",
    "open_memory_transport",
]
