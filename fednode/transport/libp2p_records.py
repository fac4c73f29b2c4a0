"""Verify a peer's signed peer record once, not on every gossip RPC (part of the libp2p adapter).

py-libp2p 0.8.1 attaches the sender's signed peer record (an Envelope) to every pubsub RPC it sends
and, on every RPC it receives, parses it, checks its Ed25519 signature and rewrites the peerstore's
certified address book (`libp2p.pubsub.utils.maybe_consume_signed_record`). Measured on an idle
4-daemon federation (fake task, 1 s heartbeats, cProfile of one daemon over 60 s): ~28 RPCs/s
received, ~2 ms each in that function: about half of the idle daemon's CPU.

A peer sends the same record bytes until its addresses change, so the result for bytes already
verified from that peer is known: this patch remembers, per peer, the last record bytes that
verified and when, and accepts the same bytes again without redoing the work for
`RECORD_REVERIFY_SECONDS` (far below the 7200 s TTL the original gives the addresses, so the
peerstore stays fresh). Different bytes, an unknown peer, or an expired entry go through the
original check. The memo is bounded (`MAX_REMEMBERED_PEERS`; cleared when full).
"""

from __future__ import annotations

import time
from typing import Any

RECORD_REVERIFY_SECONDS = 600.0
MAX_REMEMBERED_PEERS = 10_000

_installed = False


def install_signed_record_memo() -> None:
    """Patch the modules that call `maybe_consume_signed_record` (process-wide, idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    import libp2p.pubsub.floodsub as floodsub
    import libp2p.pubsub.gossipsub as gossipsub
    import libp2p.pubsub.pubsub as pubsub
    import libp2p.pubsub.utils as utils

    original = utils.maybe_consume_signed_record
    verified: dict[Any, tuple[bytes, float]] = {}

    def maybe_consume_signed_record(msg: Any, host: Any, peer_id: Any) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        record = bytes(msg.senderRecord)
        now = time.monotonic()
        known = verified.get(peer_id)
        if known is not None and known[0] == record and now - known[1] < RECORD_REVERIFY_SECONDS:
            return True
        ok = bool(original(msg, host, peer_id))
        if ok:
            if len(verified) >= MAX_REMEMBERED_PEERS:
                verified.clear()
            verified[peer_id] = (record, now)
        else:
            verified.pop(peer_id, None)
        return ok

    for module in (utils, pubsub, gossipsub, floodsub):
        module.maybe_consume_signed_record = maybe_consume_signed_record  # type: ignore[attr-defined]
