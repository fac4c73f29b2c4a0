"""Transports: the interface (`base`), the in-process `memory` hub and `libp2p`.

`fednode.transport.libp2p` is not imported here, so code that only needs the memory transport
does not pay for importing libp2p: `from fednode.transport.libp2p import open_libp2p_transport`.
Before any of them imports libp2p, `libp2p_import.install()` leaves py-libp2p's unused features out
of the import (see that module).
"""

from fednode.transport import libp2p_import
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

libp2p_import.install()

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
