"""A py-libp2p stream behind `fednode.transport.base.Stream` (part of the libp2p adapter).

Error mapping: a reset, a dead connection or any libp2p stream error is `PeerUnavailable`;
a clean remote half-close is b"" from `receive_some`. Note py-libp2p's Yamux resets a stream
whose reader has not read for 5 s (hard-coded): readers must keep draining.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError

from fednode.errors import PeerUnavailable

# What py-libp2p raises from a stream whose peer or connection went away.
PEER_GONE: tuple[type[BaseException], ...] = (
    StreamError,
    MuxedStreamError,
    ConnectionError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class Libp2pStream:
    def __init__(self, stream: INetStream, remote_peer_id: str,
                 on_bytes: Callable[[int, int], None]) -> None:
        self._stream = stream
        self._remote_peer_id = remote_peer_id
        self._on_bytes = on_bytes
        self._closed = False
        self._eof_sent = False
        self._eof_received = False

    @property
    def remote_peer_id(self) -> str:
        return self._remote_peer_id

    @property
    def remote_host(self) -> str | None:
        """The IP address of the other end of the connection (e.g. "127.0.0.1"), or None when
        the connection does not know it or is gone."""
        try:
            addr = self._stream.get_remote_address()
        except Exception:  # py-libp2p raises many types once the connection is closed
            return None
        if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
            return addr[0]
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream already closed")

    async def send_all(self, data: bytes) -> None:
        self._check_open()
        if self._eof_sent:
            raise trio.ClosedResourceError("send_eof was already called")
        try:
            await self._stream.write(bytes(data))
        except PEER_GONE as exc:
            raise PeerUnavailable(f"stream to {self._remote_peer_id} failed: {exc!r}") from exc
        self._on_bytes(len(data), 0)

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        self._check_open()
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._eof_received:
            await trio.lowlevel.checkpoint()
            return b""
        try:
            chunk = await self._stream.read(max_bytes)
        except (StreamEOF, MuxedStreamEOF):
            chunk = b""
        except PEER_GONE as exc:
            raise PeerUnavailable(f"stream from {self._remote_peer_id} failed: {exc!r}") from exc
        if not chunk:
            self._eof_received = True
        self._on_bytes(0, len(chunk))
        return chunk

    async def send_eof(self) -> None:
        self._check_open()
        if self._eof_sent:
            return
        self._eof_sent = True
        try:
            await self._stream.close_write()  # type: ignore[attr-defined]
        except PEER_GONE as exc:
            raise PeerUnavailable(f"stream to {self._remote_peer_id} failed: {exc!r}") from exc

    async def reset(self) -> None:
        self._closed = True
        with contextlib.suppress(*PEER_GONE):
            await self._stream.reset()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with contextlib.suppress(*PEER_GONE):
            await self._stream.close()
