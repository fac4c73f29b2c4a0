"""In-process byte streams with the semantics of a libp2p stream.

Each direction is a bounded byte buffer (a writer blocks when it is full: back-pressure, never
an unbounded buffer). `send_eof` half-closes; `reset` (a vanished peer) makes every pending and
later operation on either end raise `PeerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from fednode.errors import PeerUnavailable

DEFAULT_STREAM_BUFFER = 256 * 1024


class _Pipe:
    """One direction of a stream."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"stream buffer must hold at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.buffer = bytearray()
        self.eof = False  # the writer half-closed
        self.reader_closed = False
        self.reset_reason: str | None = None
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()

    def wake_all(self) -> None:
        self._readable.unpark_all()
        self._writable.unpark_all()

    def reset(self, reason: str) -> None:
        if self.reset_reason is None:
            self.reset_reason = reason
        self.wake_all()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while True:
            if self.reset_reason is not None:
                raise PeerUnavailable(self.reset_reason)
            if self.reader_closed:
                raise PeerUnavailable("the peer closed the stream")
            space = self.capacity - len(self.buffer)
            if space > 0 and view:
                self.buffer += view[:space]
                view = view[space:]
                self._readable.unpark_all()
            if not view:
                await trio.lowlevel.checkpoint()
                return
            await self._writable.park()

    async def read(self, max_bytes: int) -> bytes:
        while True:
            if self.reset_reason is not None:
                raise PeerUnavailable(self.reset_reason)
            if self.buffer:
                chunk = bytes(self.buffer[:max_bytes])
                del self.buffer[:max_bytes]
                self._writable.unpark_all()
                await trio.lowlevel.checkpoint()
                return chunk
            if self.eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._readable.park()


class MemoryStream:
    """One end of an in-process stream (implements `fednode.transport.base.Stream`)."""

    def __init__(
        self,
        remote_peer_id: str,
        protocol: str,
        outgoing: _Pipe,
        incoming: _Pipe,
        on_bytes: Callable[[int, int], None],
    ) -> None:
        self._remote_peer_id = remote_peer_id
        self.protocol = protocol
        self._out = outgoing
        self._in = incoming
        self._on_bytes = on_bytes  # (sent, received) accounting hook
        self._closed = False

    @property
    def remote_peer_id(self) -> str:
        return self._remote_peer_id

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream already closed")

    async def send_all(self, data: bytes) -> None:
        self._check_open()
        if self._out.eof:
            raise trio.ClosedResourceError("send_eof was already called")
        await self._out.write(data)
        self._on_bytes(len(data), 0)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        self._check_open()
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        chunk = await self._in.read(max_bytes)
        self._on_bytes(0, len(chunk))
        return chunk

    async def send_eof(self) -> None:
        self._check_open()
        if self._out.reset_reason is not None:
            raise PeerUnavailable(self._out.reset_reason)
        self._out.eof = True
        self._out.wake_all()
        await trio.lowlevel.checkpoint()

    def reset(self, reason: str = "stream reset") -> None:
        """Abort both directions; the peer's next operation raises PeerUnavailable."""
        self._out.reset(reason)
        self._in.reset(reason)

    def close_nowait(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.eof = True
        self._in.reader_closed = True
        self._in.buffer.clear()
        self._out.wake_all()
        self._in.wake_all()

    async def aclose(self) -> None:
        self.close_nowait()
        await trio.lowlevel.checkpoint()


def memory_stream_pair(
    a_peer_id: str,
    b_peer_id: str,
    protocol: str,
    capacity: int,
    on_bytes_a: Callable[[int, int], None],
    on_bytes_b: Callable[[int, int], None],
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends: the first is held by a (remote = b), the second by b."""
    a_to_b, b_to_a = _Pipe(capacity), _Pipe(capacity)
    end_a = MemoryStream(b_peer_id, protocol, a_to_b, b_to_a, on_bytes_a)
    end_b = MemoryStream(a_peer_id, protocol, b_to_a, a_to_b, on_bytes_b)
    return end_a, end_b
