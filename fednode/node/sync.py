"""`/fednode/sync/1.0.0`: ask a peer for the signed messages of a round you missed.

A node that restarts, or joins while a round is open, learns the open round's id from
heartbeats but never saw its manifest on gossip. It opens a sync stream to the peer whose
heartbeat named the round and sends one msgpack map `{"round_id": str}` (a length-prefixed
frame); the peer answers with one frame: a msgpack array of up to MAX_SYNC_MESSAGES encoded
signed messages it holds for that round (manifest, aggregate or failure), then closes. The
asker validates every message exactly as if it came from gossip (signature, community,
membership); nothing is trusted because of who served it. With an `allow_peer` predicate (the
community allowlist) the server closes a stream from any other peer without reading it, so an
outsider learns nothing of the rounds; the asker sees the stream end early.
"""

from __future__ import annotations

import collections
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import trio

from fednode.errors import PeerUnavailable, RemoteProtocolError
from fednode.transport.base import Stream, Transport

SYNC_PROTOCOL_ID = "/fednode/sync/1.0.0"
MAX_SYNC_REQUEST_BYTES = 1024
MAX_SYNC_MESSAGES = 8
MAX_SYNC_RESPONSE_BYTES = MAX_SYNC_MESSAGES * 64 * 1024 + 1024
DEFAULT_SYNC_TIMEOUT_SECONDS = 10.0

Lookup = Callable[[str], list[bytes]]
PeerPredicate = Callable[[str], bool]  # peer id -> may it sync from us (None: everyone may)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyncStatistics:
    served: int = 0
    refused_by_reason: dict[str, int] = field(default_factory=dict)


async def _read_frame(stream: Stream, max_bytes: int) -> bytes:
    header = await _read_exact(stream, 4)
    (length,) = struct.unpack(">I", header)
    if length > max_bytes:
        raise RemoteProtocolError(f"sync frame of {length} bytes exceeds the limit of {max_bytes}")
    return await _read_exact(stream, length)


async def _read_exact(stream: Stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(min(65536, n - len(buf)))
        if not data:
            raise RemoteProtocolError("sync stream ended early")
        buf += data
    return bytes(buf)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


class SyncServer:
    """Answers `/fednode/sync/1.0.0` streams from `lookup`; `statistics()` counts what it did."""

    def __init__(self, lookup: Lookup, allow_peer: PeerPredicate | None = None,
                 timeout: float = DEFAULT_SYNC_TIMEOUT_SECONDS) -> None:
        self.lookup = lookup
        self.allow_peer = allow_peer
        self.timeout = timeout
        self._served = 0
        self._refused: collections.Counter[str] = collections.Counter()

    def statistics(self) -> SyncStatistics:
        return SyncStatistics(self._served, dict(self._refused))

    async def handle(self, stream: Stream) -> None:
        if self.allow_peer is not None and not self.allow_peer(stream.remote_peer_id):
            self._refused["not_member"] += 1
            log.info("sync stream from %s refused: not a member", stream.remote_peer_id[-8:])
            return  # the transport closes the stream
        with trio.move_on_after(self.timeout):
            try:
                request = msgpack.unpackb(await _read_frame(stream, MAX_SYNC_REQUEST_BYTES), raw=False)
            except (RemoteProtocolError, PeerUnavailable, ValueError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError):
                self._refused["bad_request"] += 1
                return
            round_id = request.get("round_id") if isinstance(request, dict) else None
            if not isinstance(round_id, str) or len(round_id) > 64:
                self._refused["bad_request"] += 1
                return
            messages = self.lookup(round_id)[:MAX_SYNC_MESSAGES]
            try:
                await stream.send_all(_frame(msgpack.packb(messages, use_bin_type=True)))
                await stream.send_eof()
            except PeerUnavailable:
                return
            self._served += 1


def serve_sync(transport: Transport, lookup: Lookup, *, allow_peer: PeerPredicate | None = None) -> SyncServer:
    """Serve `lookup` on SYNC_PROTOCOL_ID; streams from peers `allow_peer` refuses are closed unread."""
    server = SyncServer(lookup, allow_peer)
    transport.serve(SYNC_PROTOCOL_ID, server.handle)
    return server


async def request_sync(transport: Transport, peer_id: str, round_id: str,
                       timeout: float = DEFAULT_SYNC_TIMEOUT_SECONDS) -> list[bytes]:
    """The encoded messages `peer_id` holds for `round_id`; PeerUnavailable / RemoteProtocolError on failure."""
    with trio.fail_after(timeout):
        stream = await transport.open_stream(peer_id, SYNC_PROTOCOL_ID)
        try:
            await stream.send_all(_frame(msgpack.packb({"round_id": round_id}, use_bin_type=True)))
            payload = await _read_frame(stream, MAX_SYNC_RESPONSE_BYTES)
        finally:
            await stream.aclose()
    try:
        messages = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise RemoteProtocolError("sync response is not msgpack") from None
    if not isinstance(messages, list) or not all(isinstance(m, bytes) for m in messages):
        raise RemoteProtocolError("sync response must be an array of bin")
    return messages[:MAX_SYNC_MESSAGES]
