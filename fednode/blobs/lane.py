"""The fast lane: a direct TCP connection negotiated inside a blob stream.

py-libp2p's Noise + Yamux path moves 35-40 MB/s on this hardware, almost all of it Python
per-frame overhead. The lane moves the same frames over a plain TCP socket, each one sealed
with XSalsa20-Poly1305 (pynacl SecretBox) under a one-time key that the fetcher sent over the
Noise-secured stream. Nonces are a direction byte and a counter, never reused under one key.
Chunks are still checked against the manifest's chunk hashes and the blob against its address:
the lane adds confidentiality and integrity against on-path attackers, not trust in the holder.
Whenever the lane cannot be opened the fetcher keeps using the libp2p stream.
"""

from __future__ import annotations

import functools
import struct

import nacl.bindings
import nacl.exceptions
import trio

from fednode.blobs.protocol import (
    DEFAULT_MAX_HEADER_BYTES,
    FrameReader,
    Header,
    Opener,
    decode_header,
    encode_header,
    plain_opener,
)
from fednode.errors import DecodeError, LimitExceeded, PeerUnavailable

KEY_BYTES = nacl.bindings.crypto_secretbox_KEYBYTES
MAC_BYTES = nacl.bindings.crypto_secretbox_MACBYTES
DEFAULT_LANE_ACCEPT_TIMEOUT = 10.0
DEFAULT_LANE_CONNECT_TIMEOUT = 5.0
HELLO = "lane_hello"
DIALER, LISTENER = 0, 1
_U32 = struct.Struct(">I")


def stream_remote_host(stream: object) -> str | None:
    """The IP of the peer at the other end of a transport stream, when the transport knows it
    (its `remote_host` property, e.g. `Libp2pStream.remote_host`); None otherwise."""
    host = getattr(stream, "remote_host", None)
    return host if isinstance(host, str) else None


def _nonce(direction: int, counter: int) -> bytes:
    return bytes([direction]) + bytes(15) + counter.to_bytes(8, "big")


def _open(sealed: bytes, nonce: bytes, key: bytes) -> bytes:
    try:
        plain: bytes = nacl.bindings.crypto_secretbox_open_easy(sealed, nonce, key)
    except nacl.exceptions.CryptoError:
        raise DecodeError("lane frame fails authentication") from None
    return plain


class LaneChannel:
    """A FrameChannel over TCP. A frame is `u32be hlen | SecretBox(header) | SecretBox(payload)`,
    where hlen is the sealed header's length and the header's `n` the sealed payload's length
    (absent when there is no payload). Header and payload have consecutive nonces, so the
    payload can be opened later, in a worker thread."""

    def __init__(
        self, sock: trio.SocketStream, key: bytes, role: int, remote_peer_id: str,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if len(key) != KEY_BYTES:
            raise DecodeError("lane key must be 32 bytes")
        self._sock = sock
        self._key = key
        self._send_dir = role
        self._recv_dir = 1 - role
        self._send_ctr = 0
        self._recv_ctr = 0
        self._max_header = max_header_bytes
        self._peer = remote_peer_id
        self._reader = FrameReader(sock.receive_some, max_header_bytes)

    @property
    def remote_peer_id(self) -> str:
        return self._peer

    def _seal(self, data: bytes) -> bytes:
        sealed: bytes = nacl.bindings.crypto_secretbox_easy(data, _nonce(self._send_dir, self._send_ctr), self._key)
        self._send_ctr += 1
        return sealed

    def encode_frame(self, header: Header, payload: bytes = b"") -> bytes:
        sealed_payload = b""
        ctr = self._send_ctr
        if payload:
            # the payload takes the nonce after the header's
            self._send_ctr += 1
            sealed_payload = self._seal(payload)
            self._send_ctr = ctr
            header = {**header, "n": len(sealed_payload)}
        packed = encode_header(header, self._max_header)[4:]
        sealed_header = self._seal(packed)
        if payload:
            self._send_ctr += 1
        return _U32.pack(len(sealed_header)) + sealed_header + sealed_payload

    async def send_raw(self, frame: bytes) -> None:
        try:
            await self._sock.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"lane broke: {exc!r}") from None

    async def send_frame(self, header: Header, payload: bytes = b"") -> None:
        await self.send_raw(self.encode_frame(header, payload))

    async def receive_frame_deferred(self, max_payload: int) -> tuple[Header, bytes, Opener] | None:
        try:
            hlen = await self._reader.read_frame_prefix()
        except OSError as exc:
            raise PeerUnavailable(f"lane broke: {exc!r}") from None
        if hlen is None:
            return None
        if hlen > self._max_header + MAC_BYTES:
            raise LimitExceeded(f"lane frame header of {hlen} bytes > {self._max_header + MAC_BYTES}")
        sealed = await self._reader.read_exact(hlen)
        key, ctr = self._key, self._recv_ctr
        header = decode_header(_open(sealed, _nonce(self._recv_dir, ctr), key))
        self._recv_ctr += 1
        n = header.get("n", 0)
        if not n:
            return header, b"", plain_opener
        if n > max_payload + MAC_BYTES or n < MAC_BYTES:
            raise LimitExceeded(f"lane payload of {n} bytes > {max_payload + MAC_BYTES}")
        payload = await self._reader.read_exact(n)
        nonce = _nonce(self._recv_dir, self._recv_ctr)
        self._recv_ctr += 1
        return header, payload, functools.partial(_open, nonce=nonce, key=key)

    async def receive_frame(self, max_payload: int) -> tuple[Header, bytes] | None:
        frame = await self.receive_frame_deferred(max_payload)
        if frame is None:
            return None
        header, payload, opener = frame
        return header, opener(payload)

    async def aclose(self) -> None:
        await self._sock.aclose()


async def connect_lane(
    host: str, port: int, key: bytes, remote_peer_id: str, timeout: float = DEFAULT_LANE_CONNECT_TIMEOUT
) -> LaneChannel:
    """Dials the holder's lane and proves knowledge of the key; raises PeerUnavailable."""
    try:
        with trio.fail_after(timeout):
            sock = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerUnavailable(f"lane {host}:{port} unreachable: {exc!r}") from None
    lane = LaneChannel(sock, key, DIALER, remote_peer_id)
    try:
        await lane.send_frame({"t": HELLO})
    except BaseException:  # incl. cancellation: never leave the socket to the garbage collector
        await trio.aclose_forcefully(sock)
        raise
    return lane


class LaneListener:
    """One-shot listener: accepts the first connection that proves the key, within a timeout."""

    def __init__(self, listener: trio.SocketListener, key: bytes, remote_peer_id: str) -> None:
        self._listener = listener
        self._key = key
        self._peer = remote_peer_id

    @property
    def port(self) -> int:
        port: int = self._listener.socket.getsockname()[1]
        return port

    async def accept(self, timeout: float = DEFAULT_LANE_ACCEPT_TIMEOUT) -> LaneChannel | None:
        try:
            with trio.move_on_after(timeout):
                while True:
                    sock = await self._listener.accept()
                    lane = LaneChannel(sock, self._key, LISTENER, self._peer)
                    try:
                        with trio.fail_after(timeout):
                            frame = await lane.receive_frame(0)
                    except (DecodeError, LimitExceeded, PeerUnavailable, trio.TooSlowError):
                        await sock.aclose()  # a stranger on the port: ignore it, keep waiting
                        continue
                    except BaseException:  # cancelled while the dialer proves the key
                        await trio.aclose_forcefully(sock)
                        raise
                    if frame is not None and frame[0].get("t") == HELLO:
                        return lane
                    await sock.aclose()
            return None
        finally:
            await self._listener.aclose()


async def open_lane_listener(bind_host: str, key: bytes, remote_peer_id: str) -> LaneListener:
    listeners = await trio.open_tcp_listeners(0, host=bind_host)
    for extra in listeners[1:]:
        await extra.aclose()
    return LaneListener(listeners[0], key, remote_peer_id)
