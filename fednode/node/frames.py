"""One length-prefixed frame each way: the framing of `/fednode/sync/1.0.0` and `/fednode/submit/1.0.0`.

    frame = length (4 bytes, unsigned big-endian) || payload (length bytes)
"""

from __future__ import annotations

import struct

from fednode.errors import LimitExceeded, RemoteProtocolError
from fednode.transport.base import Stream


async def read_frame(stream: Stream, max_bytes: int, what: str) -> bytes:
    """One frame's payload. LimitExceeded if its length is over `max_bytes` (nothing more is read),
    RemoteProtocolError if the stream ends first; `what` names the protocol in the message."""
    header = await _read_exact(stream, 4, what)
    (length,) = struct.unpack(">I", header)
    if length > max_bytes:
        raise LimitExceeded(f"{what} frame of {length} bytes exceeds the limit of {max_bytes}")
    return await _read_exact(stream, length, what)


async def _read_exact(stream: Stream, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(min(65536, n - len(buf)))
        if not data:
            raise RemoteProtocolError(f"{what} stream ended early")
        buf += data
    return bytes(buf)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload
