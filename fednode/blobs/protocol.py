"""Framing of `/fednode/blob/1.0.0` (protocols/blob-transfer-v1.md) over any byte stream.

A frame is `u32be header_len | msgpack map (header) | payload`, where the payload length is the
header's `n` (0 when absent). Headers are bounded by DEFAULT_MAX_HEADER_BYTES and payloads by a
per-call bound, so a peer can never make us buffer more than we chose. `FrameChannel` is the one
interface the fetcher and server speak; it has two implementations: `StreamChannel` (a transport
stream, i.e. the libp2p Noise+Yamux stream) and `LaneChannel` in lane.py (direct TCP + SecretBox).
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgpack
import trio

from fednode.errors import DecodeError, LimitExceeded, PeerUnavailable
from fednode.transport.base import Stream

PROTOCOL_ID = "/fednode/blob/1.0.0"
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_RECEIVE_BLOCK = 256 * 1024  # bytes asked of the stream per receive_some

# message types ("t")
GET_MANIFEST = "get_manifest"
GET_CHUNKS = "get_chunks"
OPEN_LANE = "open_lane"
MANIFEST = "manifest"
CHUNK = "chunk"
DONE = "done"
LANE = "lane"
ERROR = "error"

# error codes
ERR_NOT_FOUND = "not_found"
ERR_BUSY = "busy"
ERR_BAD_REQUEST = "bad_request"
ERR_LANE_UNAVAILABLE = "lane_unavailable"
ERR_INTERNAL = "internal"
ERR_NOT_MEMBER = "not_member"

_U32 = struct.Struct(">I")
Header = dict[str, Any]


def encode_header(header: Header, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> bytes:
    packed: bytes = msgpack.packb(header, use_bin_type=True)
    if len(packed) > max_header_bytes:
        raise LimitExceeded(f"frame header of {len(packed)} bytes > {max_header_bytes}")
    return _U32.pack(len(packed)) + packed


def decode_header(data: bytes) -> Header:
    """Raises DecodeError unless data is one msgpack map with str keys and a str "t"."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise DecodeError(f"frame header is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise DecodeError("frame header must be a map with a string 't'")
    n = obj.get("n", 0)
    if type(n) is not int or n < 0:
        raise DecodeError(f"frame payload length must be a non-negative int, got {n!r:.40}")
    return obj


Opener = Callable[[bytes], bytes]  # turns a received payload into plaintext; pure, thread-safe


def plain_opener(payload: bytes) -> bytes:
    return payload


class FrameChannel(Protocol):
    @property
    def remote_peer_id(self) -> str: ...

    def encode_frame(self, header: Header, payload: bytes = b"") -> bytes:
        """The bytes of one frame, ready for send_raw. Frames must be sent in the order they were
        encoded (the lane's nonces count); may run in a worker thread."""

    async def send_raw(self, frame: bytes) -> None: ...

    async def send_frame(self, header: Header, payload: bytes = b"") -> None: ...

    async def receive_frame(self, max_payload: int) -> tuple[Header, bytes] | None:
        """None at a clean end of stream between frames; DecodeError/LimitExceeded on bad input;
        PeerUnavailable when the stream breaks (also mid-frame)."""

    async def receive_frame_deferred(self, max_payload: int) -> tuple[Header, bytes, Opener] | None:
        """Like receive_frame, but the payload is returned as received, with the function that
        opens it (decryption on the lane), so the caller can do that work off the event loop."""

    async def aclose(self) -> None: ...


class FrameReader:
    """Reassembles frames from `receive_some`; buffers at most one header plus one payload."""

    def __init__(self, receive_some: Callable[[int], Awaitable[bytes]], max_header_bytes: int) -> None:
        self._receive_some = receive_some
        self._max_header = max_header_bytes
        self._buf = bytearray()

    async def _fill(self, n: int, *, at_boundary: bool) -> bool:
        while len(self._buf) < n:
            try:
                data = await self._receive_some(max(DEFAULT_RECEIVE_BLOCK, n - len(self._buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerUnavailable(f"stream broke: {exc!r}") from None
            if not data:
                if at_boundary and not self._buf:
                    return False
                raise PeerUnavailable("stream ended in the middle of a frame")
            self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_exact(self, n: int) -> bytes:
        if len(self._buf) >= n or n <= DEFAULT_RECEIVE_BLOCK:
            await self._fill(n, at_boundary=False)
            return self._take(n)
        # a large payload: collect the pieces and join them once (one copy, not three)
        parts: list[bytes] = [bytes(self._buf)]
        have = len(self._buf)
        self._buf = bytearray()
        while have < n:
            try:
                data = await self._receive_some(n - have)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise PeerUnavailable(f"stream broke: {exc!r}") from None
            if not data:
                raise PeerUnavailable("stream ended in the middle of a frame")
            parts.append(data)
            have += len(data)
        extra = have - n
        if extra:
            last = parts[-1]
            parts[-1] = last[: len(last) - extra]
            self._buf = bytearray(last[len(last) - extra :])
        return b"".join(parts)

    async def read_frame_prefix(self) -> int | None:
        """The next u32be length prefix, or None at a clean end of stream."""
        if not await self._fill(4, at_boundary=True):
            return None
        (value,) = _U32.unpack(self._take(4))
        return int(value)

    async def read_frame(self, max_payload: int) -> tuple[Header, bytes] | None:
        hlen = await self.read_frame_prefix()
        if hlen is None:
            return None
        if hlen > self._max_header:
            raise LimitExceeded(f"frame header of {hlen} bytes > {self._max_header}")
        header = decode_header(await self.read_exact(hlen))
        n = header.get("n", 0)
        if n > max_payload:
            raise LimitExceeded(f"frame payload of {n} bytes > {max_payload} allowed for {header['t']!r:.40}")
        payload = await self.read_exact(n) if n else b""
        return header, payload


class StreamChannel:
    """Frames over a transport `Stream` (libp2p: Noise + Yamux; memory: in-process)."""

    def __init__(self, stream: Stream, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        self.stream = stream
        self._max_header = max_header_bytes
        self._reader = FrameReader(stream.receive_some, max_header_bytes)

    @property
    def remote_peer_id(self) -> str:
        return self.stream.remote_peer_id

    def encode_frame(self, header: Header, payload: bytes = b"") -> bytes:
        if payload:
            header = {**header, "n": len(payload)}
        return encode_header(header, self._max_header) + payload

    async def send_raw(self, frame: bytes) -> None:
        try:
            await self.stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerUnavailable(f"stream broke: {exc!r}") from None

    async def send_frame(self, header: Header, payload: bytes = b"") -> None:
        await self.send_raw(self.encode_frame(header, payload))

    async def receive_frame(self, max_payload: int) -> tuple[Header, bytes] | None:
        return await self._reader.read_frame(max_payload)

    async def receive_frame_deferred(self, max_payload: int) -> tuple[Header, bytes, Opener] | None:
        frame = await self._reader.read_frame(max_payload)
        return None if frame is None else (frame[0], frame[1], plain_opener)

    async def aclose(self) -> None:
        await self.stream.aclose()


def error_header(code: str, message: str) -> Header:
    return {"t": ERROR, "code": code, "msg": message[:200]}
