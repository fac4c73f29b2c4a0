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

import struct

import nacl.bindings
import nacl.exceptions
import trio

from fednode.blobs.protocol import DEFAULT_MAX_HEADER_BYTES, FrameReader, Header, decode_header, encode_header
from fednode.errors import DecodeError, LimitExceeded, PeerUnavailable

KEY_BYTES = nacl.bindings.crypto_secretbox_KEYBYTES
MAC_BYTES = nacl.bindings.crypto_secretbox_MACBYTES
DEFAULT_LANE_ACCEPT_TIMEOUT = 10.0
DEFAULT_LANE_CONNECT_TIMEOUT = 5.0
HELLO = "lane_hello"
DIALER, LISTENER = 0, 1
_U32 = struct.Struct(">I")


def stream_remote_host(stream: object) -> str | None:
    """The IP of the peer at the other end of a transport stream, when the transport knows it:
    a `remote_host` attribute, or py-libp2p's `get_remote_address()` on the wrapped stream."""
    host = getattr(stream, "remote_host", None)
    if isinstance(host, str):
        return host
    inner = getattr(stream, "_stream", None)
    get = getattr(inner, "get_remote_address", None)
    if get is None:
        return None
    try:
        addr = get()
    except Exception:  # a closed connection: no lane, the stream path still works
        return None
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str):
        return addr[0]
    return None


def _nonce(direction: int, counter: int) -> bytes:
    return bytes([direction]) + bytes(15) + counter.to_bytes(8, "big")


class LaneChannel:
    """A FrameChannel over TCP; each frame is `u32be len | SecretBox(u32be hlen | header | payload)`."""

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

    async def send_frame(self, header: Header, payload: bytes = b"") -> None:
        if payload:
            header = {**header, "n": len(payload)}
        plain = encode_header(header, self._max_header) + payload
        sealed = nacl.bindings.crypto_secretbox(plain, _nonce(self._send_dir, self._send_ctr), self._key)
        self._send_ctr += 1
        try:
            await self._sock.send_all(_U32.pack(len(sealed)) + sealed)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise PeerUnavailable(f"lane broke: {exc!r}") from None

    async def receive_frame(self, max_payload: int) -> tuple[Header, bytes] | None:
        try:
            head = await self._reader.read_frame_prefix()
        except OSError as exc:
            raise PeerUnavailable(f"lane broke: {exc!r}") from None
        if head is None:
            return None
        limit = 4 + self._max_header + max_payload + MAC_BYTES + 32  # +32: msgpack "n" field slack
        if head > limit:
            raise LimitExceeded(f"lane frame of {head} bytes > {limit}")
        sealed = await self._reader.read_exact(head)
        try:
            plain = nacl.bindings.crypto_secretbox_open(sealed, _nonce(self._recv_dir, self._recv_ctr), self._key)
        except nacl.exceptions.CryptoError:
            raise DecodeError("lane frame fails authentication") from None
        self._recv_ctr += 1
        (hlen,) = _U32.unpack_from(plain)
        if hlen > self._max_header or 4 + hlen > len(plain):
            raise DecodeError("lane frame header length is inconsistent")
        header = decode_header(plain[4 : 4 + hlen])
        payload = plain[4 + hlen :]
        if header.get("n", 0) != len(payload):
            raise DecodeError("lane frame payload length does not match its header")
        if len(payload) > max_payload:
            raise LimitExceeded(f"lane payload of {len(payload)} bytes > {max_payload}")
        return header, payload

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
    await lane.send_frame({"t": HELLO})
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
