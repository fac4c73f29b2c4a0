"""Verify a peer's signed peer record once, and build our own once, not on every gossip RPC (part of
the libp2p adapter).

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

The sending side (`install_sender_record_memo`): for every RPC it sends, py-libp2p's
`env_to_send_in_RPC` lists the host's listen addresses (a getsockname and a multiaddr parse per
listener) and re-serialises the cached record: 6 % of an idle daemon's CPU at 8 daemons (py-spy,
issue 12). The bytes only change when the listen addresses do, so they are kept per host and
rebuilt at most every `SENDER_RECORD_REFRESH_SECONDS`.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

RECORD_REVERIFY_SECONDS = 600.0
MAX_REMEMBERED_PEERS = 10_000
SENDER_RECORD_REFRESH_SECONDS = 10.0  # a changed listen address reaches RPCs within this long

_installed = False
_sender_installed = False


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


def install_sender_record_memo() -> None:
    """Patch the pubsub modules' `env_to_send_in_RPC` to reuse a host's record bytes for up to
    SENDER_RECORD_REFRESH_SECONDS (process-wide, idempotent; one memo entry per live host)."""
    global _sender_installed
    if _sender_installed:
        return
    _sender_installed = True
    import libp2p.peer.peerstore as peerstore
    import libp2p.pubsub.floodsub as floodsub
    import libp2p.pubsub.gossipsub as gossipsub
    import libp2p.pubsub.pubsub as pubsub

    original = peerstore.env_to_send_in_RPC
    made: weakref.WeakKeyDictionary[Any, tuple[bytes, float]] = weakref.WeakKeyDictionary()

    def env_to_send_in_RPC(host: Any) -> tuple[bytes, bool]:
        now = time.monotonic()
        known = made.get(host)
        if known is not None and now - known[1] < SENDER_RECORD_REFRESH_SECONDS:
            return known[0], False
        envelope, created = original(host)
        made[host] = (envelope, now)
        return envelope, created

    for module in (pubsub, gossipsub, floodsub):
        module.env_to_send_in_RPC = env_to_send_in_RPC  # type: ignore[attr-defined]
