"""`/fednode/sync/1.0.0`: ask a peer for the signed messages of a round you missed.

A node that restarts, or joins while a round is open, learns the open round's id from
heartbeats but never saw its manifest on gossip. It opens a sync stream to the peer whose
heartbeat named the round and sends one msgpack map `{"round_id": str}` (a length-prefixed
frame); the peer answers with one frame: a msgpack array of up to MAX_SYNC_MESSAGES encoded
signed messages it holds for that round (manifest, aggregate or failure), then closes. The
asker validates every message exactly as if it came from gossip (signature, community,
membership); nothing is trusted because of who served it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

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


def serve_sync(transport: Transport, lookup: Lookup) -> None:
    async def handle(stream: Stream) -> None:
        with trio.move_on_after(DEFAULT_SYNC_TIMEOUT_SECONDS):
            try:
                request = msgpack.unpackb(await _read_frame(stream, MAX_SYNC_REQUEST_BYTES), raw=False)
            except (RemoteProtocolError, PeerUnavailable, ValueError, msgpack.ExtraData, msgpack.FormatError,
                    msgpack.StackError):
                return
            round_id = request.get("round_id") if isinstance(request, dict) else None
            if not isinstance(round_id, str) or len(round_id) > 64:
                return
            messages = lookup(round_id)[:MAX_SYNC_MESSAGES]
            try:
                await stream.send_all(_frame(msgpack.packb(messages, use_bin_type=True)))
                await stream.send_eof()
            except PeerUnavailable:
                return

    transport.serve(SYNC_PROTOCOL_ID, handle)


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
