"""Serving side of `/fednode/blob/1.0.0`: answers manifest and chunk requests from the store.

Each inbound stream is one handler task. A peer gets at most `max_streams_per_peer` concurrent
streams (more are answered `busy` and closed); every frame we send has a deadline
(`send_timeout`), so a reader that stalls loses its stream instead of holding a task and a
chunk buffer; an idle stream is closed after `idle_timeout`. Optionally a stream upgrades to
the fast lane (lane.py) and its requests are then served there. With an `allow_peer` predicate
(the community allowlist), a stream from any other peer is answered `not_member` and closed
before it takes a slot or touches the store.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from fednode.blobs.lane import open_lane_listener, stream_remote_host
from fednode.blobs.manifest import BlobManifest, check_hex_digest
from fednode.blobs.protocol import (
    CHUNK,
    DONE,
    ERR_BAD_REQUEST,
    ERR_BUSY,
    ERR_LANE_UNAVAILABLE,
    ERR_NOT_FOUND,
    ERR_NOT_MEMBER,
    GET_CHUNKS,
    GET_MANIFEST,
    LANE,
    MANIFEST,
    OPEN_LANE,
    PROTOCOL_ID,
    FrameChannel,
    StreamChannel,
    error_header,
)
from fednode.blobs.store import BlobStore
from fednode.errors import BlobIntegrityError, DecodeError, PeerUnavailable, RemoteProtocolError
from fednode.transport.base import Stream, Transport

if TYPE_CHECKING:  # trio-typing's stubs shadow trio's own annotations under mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS_PER_PEER = 4
DEFAULT_MAX_CHUNKS_PER_REQUEST = 64
DEFAULT_SEND_TIMEOUT = 20.0  # seconds one frame may take to leave; a stalled reader loses the stream
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds a stream may wait for its next request
DEFAULT_READAHEAD_CHUNKS = 2  # chunks read and sealed ahead of the socket, per stream

PeerPredicate = Callable[[str], bool]  # peer id -> may it use this protocol (None: everyone may)


def default_lane_bind_host(stream: Stream) -> str | None:
    """Where to listen for a lane: the loopback address a local peer reached us on, else the
    wildcard of the peer's address family (the lane authenticates with its one-time key)."""
    host = stream_remote_host(stream)
    if host is None:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_loopback:
        return host
    return "::" if ip.version == 6 else "0.0.0.0"


@dataclass(frozen=True, slots=True)
class ServeLimits:
    max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER
    max_chunks_per_request: int = DEFAULT_MAX_CHUNKS_PER_REQUEST
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    readahead: int = DEFAULT_READAHEAD_CHUNKS


@dataclass(frozen=True, slots=True)
class ServeStatistics:
    streams: int = 0
    active_streams: int = 0
    lanes: int = 0
    bytes_served: int = 0
    chunks_served: int = 0
    manifests_served: int = 0
    rejected_busy_by_peer: dict[str, int] = field(default_factory=dict)
    # send_timeout, idle_timeout, peer_gone, protocol_error (undecodable), bad_request, internal_error
    aborted_by_reason: dict[str, int] = field(default_factory=dict)
    refused_by_reason: dict[str, int] = field(default_factory=dict)  # streams refused at the door


class BlobServer:
    def __init__(
        self,
        store: BlobStore,
        limits: ServeLimits = ServeLimits(),
        lane_bind_host: Callable[[Stream], str | None] | None = default_lane_bind_host,
        allow_peer: PeerPredicate | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self._allow_peer = allow_peer
        self._lane_bind_host = lane_bind_host
        self._active: Counter[str] = Counter()
        self._manifests: dict[str, BlobManifest] = {}
        self._streams = 0
        self._lanes = 0
        self._bytes = 0
        self._chunks = 0
        self._manifests_served = 0
        self._busy: Counter[str] = Counter()
        self._aborted: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()

    def statistics(self) -> ServeStatistics:
        return ServeStatistics(
            self._streams, sum(self._active.values()), self._lanes, self._bytes, self._chunks,
            self._manifests_served, dict(self._busy), dict(self._aborted), dict(self._refused),
        )

    async def handle(self, stream: Stream) -> None:
        peer = stream.remote_peer_id
        channel = StreamChannel(stream)
        if self._allow_peer is not None and not self._allow_peer(peer):
            # Counted by reason only: a per-peer table would grow with every key an outsider makes.
            self._refused["not_member"] += 1
            log.info("blob stream from %s refused: not a member", peer[-8:])
            await self._refuse(channel, ERR_NOT_MEMBER, "not a member of this community")
            return
        if self._active[peer] >= self.limits.max_streams_per_peer:
            self._busy[peer] += 1
            await self._refuse(channel, ERR_BUSY, "too many concurrent streams")
            return
        self._active[peer] += 1
        self._streams += 1
        try:
            await self._serve_channel(channel, stream)
        except trio.TooSlowError:
            self._aborted["send_timeout"] += 1
            log.info("blob stream to %s aborted: send timeout", peer)
        except PeerUnavailable:
            self._aborted["peer_gone"] += 1
        except RemoteProtocolError as exc:  # garbage, an oversize frame, a lane frame that fails its MAC
            self._aborted["protocol_error"] += 1
            log.info("blob stream from %s: protocol error: %s", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._aborted["peer_gone"] += 1
            log.info("blob stream from %s broke: %r", peer, exc)
        except Exception:  # contained here, whatever it is: one stream never takes the node down
            self._aborted["internal_error"] += 1
            log.exception("blob stream from %s failed", peer)
        finally:
            self._active[peer] -= 1
            if not self._active[peer]:
                del self._active[peer]

    async def _refuse(self, channel: FrameChannel, code: str, message: str) -> None:
        """Answer the first request with an error and end the stream (every request gets a
        response, so the requester never races the close)."""
        with trio.move_on_after(self.limits.send_timeout), contextlib.suppress(RemoteProtocolError, PeerUnavailable):
            if await channel.receive_frame(0) is not None:
                await channel.send_frame(error_header(code, message))

    async def _send(self, channel: FrameChannel, header: dict[str, object], payload: bytes = b"") -> None:
        with trio.fail_after(self.limits.send_timeout):
            await channel.send_frame(header, payload)

    async def _manifest(self, sha256: str) -> BlobManifest | None:
        m = self._manifests.get(sha256)
        if m is not None and self.store.has(sha256):
            return m
        if not self.store.has(sha256):
            return None
        try:
            m = await trio.to_thread.run_sync(self.store.manifest, sha256)
        except (BlobIntegrityError, KeyError, FileNotFoundError):
            return None
        if len(self._manifests) > 64:
            self._manifests.clear()
        self._manifests[sha256] = m
        return m

    async def _serve_channel(self, channel: FrameChannel, stream: Stream | None) -> None:
        while True:
            frame = None
            with trio.move_on_after(self.limits.idle_timeout) as idle:
                frame = await channel.receive_frame(0)
            if idle.cancelled_caught:
                self._aborted["idle_timeout"] += 1
                return
            if frame is None:
                return
            header, _ = frame
            kind = header["t"]
            sha = header.get("sha256")
            try:
                if kind in (GET_MANIFEST, GET_CHUNKS):
                    check_hex_digest(sha)  # type: ignore[arg-type]
            except DecodeError as exc:
                self._aborted["bad_request"] += 1
                await self._send(channel, error_header(ERR_BAD_REQUEST, str(exc)))
                return
            if kind == GET_MANIFEST:
                m = await self._manifest(sha)  # type: ignore[arg-type]
                if m is None:
                    await self._send(channel, error_header(ERR_NOT_FOUND, "blob not held here"))
                    continue
                await self._send(channel, {"t": MANIFEST}, m.encode())
                self._manifests_served += 1
            elif kind == GET_CHUNKS:
                if not await self._serve_chunks(channel, sha, header.get("idx")):  # type: ignore[arg-type]
                    return
            elif kind == OPEN_LANE and stream is not None:
                lane = await self._open_lane(channel, stream, header.get("key"))
                if lane is not None:
                    self._lanes += 1
                    try:
                        await self._serve_channel(lane, None)
                    finally:
                        await lane.aclose()
                    return
            else:
                self._aborted["bad_request"] += 1
                await self._send(channel, error_header(ERR_BAD_REQUEST, f"unknown request {kind!r:.40}"))
                return

    async def _serve_chunks(self, channel: FrameChannel, sha: str, idx: object) -> bool:
        m = await self._manifest(sha)
        if m is None:
            await self._send(channel, error_header(ERR_NOT_FOUND, "blob not held here"))
            return True
        if (
            not isinstance(idx, list)
            or not 0 < len(idx) <= self.limits.max_chunks_per_request
            or not all(type(i) is int and 0 <= i < m.num_chunks for i in idx)
        ):
            self._aborted["bad_request"] += 1
            await self._send(channel, error_header(ERR_BAD_REQUEST, "bad chunk index list"))
            return False
        # Reading, verifying and sealing run in a worker thread, `readahead` frames ahead of the
        # sends, so disk, hashing, encryption and the socket overlap (and use a second core).
        send, receive = trio.open_memory_channel[tuple[int, bytes]](self.limits.readahead)
        failed: list[str] = []

        def prepare(i: int) -> bytes:
            return channel.encode_frame({"t": CHUNK, "i": i}, self.store.read_chunk(m, i))

        async def produce() -> None:
            async with send:
                for i in idx:
                    try:
                        frame = await trio.to_thread.run_sync(prepare, i)
                    except (BlobIntegrityError, FileNotFoundError) as exc:
                        failed.append(str(exc))
                        return
                    await send.send((m.chunk_range(i)[1], frame))

        error: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            try:
                async with receive:
                    async for length, frame in receive:
                        with trio.fail_after(self.limits.send_timeout):
                            await channel.send_raw(frame)
                        self._chunks += 1
                        self._bytes += length
            except (trio.TooSlowError, PeerUnavailable) as exc:
                error = exc  # re-raised below, outside the nursery (no ExceptionGroup)
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        if failed:
            self._manifests.pop(sha, None)
            await self._send(channel, error_header(ERR_NOT_FOUND, "blob no longer held here"))
            return False
        await self._send(channel, {"t": DONE})
        return True

    async def _open_lane(self, channel: FrameChannel, stream: Stream, key: object) -> FrameChannel | None:
        host = self._lane_bind_host(stream) if self._lane_bind_host is not None else None
        if host is None or not isinstance(key, bytes) or len(key) != 32:
            await self._send(channel, error_header(ERR_LANE_UNAVAILABLE, "no lane here"))
            return None
        try:
            listener = await open_lane_listener(host, key, stream.remote_peer_id)
        except OSError as exc:
            await self._send(channel, error_header(ERR_LANE_UNAVAILABLE, f"cannot listen: {exc}"))
            return None
        await self._send(channel, {"t": LANE, "port": listener.port})
        return await listener.accept()


async def serve_blobs(
    transport: Transport,
    store: BlobStore,
    *,
    limits: ServeLimits = ServeLimits(),
    lane_bind_host: Callable[[Stream], str | None] | None = default_lane_bind_host,
    allow_peer: PeerPredicate | None = None,
    task_status: TaskStatus[BlobServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves `store` on PROTOCOL_ID until cancelled; `nursery.start` returns the BlobServer
    (for `statistics()`). Handlers run in the transport's nursery. `allow_peer`: streams from
    peers it refuses are answered `not_member` (e.g. the community allowlist)."""
    server = BlobServer(store, limits, lane_bind_host, allow_peer)
    transport.serve(PROTOCOL_ID, server.handle)
    task_status.started(server)
    await trio.sleep_forever()

