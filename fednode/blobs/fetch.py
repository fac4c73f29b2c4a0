"""Fetching side of `/fednode/blob/1.0.0`: verified, resumable, multi-holder.

1. Ask up to `max_sources` holders for the manifest (concurrently). The caller's first choice is
   awaited (up to `manifest_timeout`); the others only until `manifest_grace` after the first
   manifest arrived. Holders are grouped by the manifest they serve; the group of an on-disk
   partial goes first, then the biggest group.
2. Workers (a few streams per holder, each upgraded to the fast lane when possible) take batches
   of missing chunk indices from one shared queue. Receivers only read and hand chunks to the
   spool task, which verifies each against the manifest and writes it to the partial on disk, so
   a reader never stalls on disk (yamux resets a stream whose reader stalls 5 s) and memory is
   bounded by the spool queue. A chunk that fails verification drops its holder for this blob
   and goes back to the queue; a holder that vanishes has its unreceived chunks requeued.
3. When every chunk is verified, the whole blob is hashed against its address. If that fails the
   manifest was forged: its holders are dropped, the partial discarded, the next group tried.
Verified chunks are never fetched twice, in one call or across calls (the partial's bitmap).
"""

from __future__ import annotations

import collections
import contextlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from fednode.blobs.lane import connect_lane, stream_remote_host
from fednode.blobs.manifest import (
    DEFAULT_MAX_BLOB_BYTES,
    BlobManifest,
    ManifestLimits,
    check_hex_digest,
    decode_manifest,
)
from fednode.blobs.protocol import (
    CHUNK,
    DONE,
    ERR_BUSY,
    ERROR,
    GET_CHUNKS,
    GET_MANIFEST,
    LANE,
    MANIFEST,
    OPEN_LANE,
    PROTOCOL_ID,
    FrameChannel,
    Opener,
    StreamChannel,
)
from fednode.blobs.store import BlobStore, PartialBlob
from fednode.errors import (
    BlobIntegrityError,
    BlobMissing,
    DecodeError,
    LimitExceeded,
    PeerUnavailable,
    RemoteProtocolError,
    TransferError,
)
from fednode.transport.base import Stream, Transport

DEFAULT_STREAMS_PER_HOLDER = 2
DEFAULT_CHUNKS_PER_REQUEST = 8
DEFAULT_SPOOL_QUEUE_CHUNKS = 8  # chunks received but not yet on disk: the memory bound
DEFAULT_RECEIVE_TIMEOUT = 30.0  # seconds without a frame from a holder before it is dropped
DEFAULT_MANIFEST_TIMEOUT = 15.0
DEFAULT_BUSY_RETRIES = 4
DEFAULT_BUSY_BACKOFF = 0.25
# Holders asked for one blob: when more are known, the first half in the caller's order (its likeliest:
# the daemon lists a round's coordinator first) and a random draw of the others (a retry draws again).
# Asking every holder made each fetch O(members) streams, O(members^2) per round (blob-transfer-v1 r1).
DEFAULT_MAX_SOURCES = 8
# Once one holder has answered with a manifest, the others (all but the caller's first choice) are
# waited for this long, then given up for this fetch. Waiting for every answer made a fetch as slow as
# its slowest holder: a round's merged adapter is asked of members that may not hold it yet, and a
# member not connected to us is dialled first; at 16 daemons on 2 cores a 1.3 kB adapter took 3-5 s
# to install after its coordinator published it (issue 12).
DEFAULT_MANIFEST_GRACE = 0.5
# Blobs smaller than this are fetched on the stream only: a lane (its own TCP connection, and a
# listener on the holder) pays off for bulk data, not for a 1.3 kB adapter that 31 members fetch from
# one coordinator at once (bench_scale, 32 daemons: 31 lane listeners and connections per round).
DEFAULT_LANE_MIN_BYTES = 256 * 1024

Progress = Callable[[int, int], None]  # (verified bytes, total bytes)


def default_lane_host(stream: Stream) -> str | None:
    return stream_remote_host(stream)


@dataclass(frozen=True, slots=True)
class FetchLimits:
    streams_per_holder: int = DEFAULT_STREAMS_PER_HOLDER
    chunks_per_request: int = DEFAULT_CHUNKS_PER_REQUEST
    spool_queue_chunks: int = DEFAULT_SPOOL_QUEUE_CHUNKS
    receive_timeout: float = DEFAULT_RECEIVE_TIMEOUT
    manifest_timeout: float = DEFAULT_MANIFEST_TIMEOUT
    busy_retries: int = DEFAULT_BUSY_RETRIES
    busy_backoff: float = DEFAULT_BUSY_BACKOFF
    max_sources: int = DEFAULT_MAX_SOURCES
    manifest_grace: float = DEFAULT_MANIFEST_GRACE
    use_lane: bool = True
    lane_min_bytes: int = DEFAULT_LANE_MIN_BYTES


@dataclass(frozen=True, slots=True)
class FetchResult:
    sha256: str
    size: int
    chunks_total: int
    chunks_fetched: int  # verified and written in this call
    chunks_resumed: int  # already verified on disk from an earlier call
    bytes_fetched: int
    chunks_by_peer: dict[str, int] = field(default_factory=dict)
    bad_chunks_by_peer: dict[str, int] = field(default_factory=dict)
    dropped_peers: dict[str, str] = field(default_factory=dict)  # peer -> reason
    lanes_opened: int = 0
    seconds: float = 0.0


_Spooled = tuple[int, bytes, Opener, str]  # chunk index, payload as received, its opener, holder


class _Busy(Exception):
    pass


class _Fetch:
    """The state of one fetch; see the module docstring."""

    def __init__(
        self, transport: Transport, sha256: str, store: BlobStore, limits: FetchLimits,
        lane_host: Callable[[Stream], str | None] | None, progress: Progress | None,
    ) -> None:
        self.transport = transport
        self.sha256 = sha256
        self.store = store
        self.limits = limits
        self.lane_host = lane_host
        self.progress = progress
        self.dropped: dict[str, str] = {}
        self.chunks_by_peer: collections.Counter[str] = collections.Counter()
        self.bad_by_peer: collections.Counter[str] = collections.Counter()
        self.lane_failed: set[str] = set()
        self.lanes = 0
        self.bytes_fetched = 0
        self.oversize: str | None = None
        # per chunk phase
        self.pending: collections.deque[int] = collections.deque()
        self.changed = trio.Event()
        self.offered = trio.Event()  # a holder has answered with a manifest
        self.done = False
        self.scopes: dict[str, trio.CancelScope] = {}

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def drop(self, peer: str, reason: str) -> None:
        self.dropped.setdefault(peer, reason)
        scope = self.scopes.get(peer)
        if scope is not None:
            scope.cancel()
        self.notify()

    # -- channels ---------------------------------------------------------------------------
    async def open_channel(self, peer: str) -> FrameChannel:
        stream = await self.transport.open_stream(peer, PROTOCOL_ID)
        return StreamChannel(stream)

    async def upgrade(self, channel: FrameChannel, peer: str,
                      manifest: BlobManifest) -> tuple[FrameChannel, FrameChannel | None]:
        """(channel to use, stream channel to close afterwards). Falls back to the stream."""
        if (not self.limits.use_lane or self.lane_host is None or peer in self.lane_failed
                or manifest.size < self.limits.lane_min_bytes):
            return channel, None
        if not isinstance(channel, StreamChannel):
            return channel, None
        host = self.lane_host(channel.stream)
        if host is None:
            return channel, None
        key = secrets.token_bytes(32)
        await channel.send_frame({"t": OPEN_LANE, "key": key})
        with trio.fail_after(self.limits.receive_timeout):
            frame = await channel.receive_frame(0)
        if frame is None:
            raise PeerUnavailable("stream ended during lane negotiation")
        header, _ = frame
        if header["t"] == ERROR and header.get("code") == ERR_BUSY:
            # The holder refused this stream (too many of ours): not a verdict on its lane, and
            # the stream is closed now; the worker backs off and tries again.
            raise _Busy("busy")
        if header["t"] == LANE and type(header.get("port")) is int and 0 < header["port"] < 65536:
            try:
                lane = await connect_lane(host, header["port"], key, peer)
            except PeerUnavailable:
                self.lane_failed.add(peer)
                await channel.aclose()  # the holder is waiting on its lane listener: start afresh
                return await self.open_channel(peer), None
            self.lanes += 1
            return lane, channel
        self.lane_failed.add(peer)
        if header["t"] == ERROR:
            return channel, None
        raise RemoteProtocolError(f"unexpected reply {header['t']!r:.40} to {OPEN_LANE}")

    # -- manifests --------------------------------------------------------------------------
    async def get_manifest(
        self, peer: str, mlimits: ManifestLimits, expected_size: int | None,
        out: dict[str, tuple[BlobManifest, FrameChannel]],
    ) -> None:
        channel: FrameChannel | None = None
        try:
            for attempt in range(self.limits.busy_retries + 1):
                with trio.fail_after(self.limits.manifest_timeout):
                    channel = await self.open_channel(peer)
                    await channel.send_frame({"t": GET_MANIFEST, "sha256": self.sha256})
                    frame = await channel.receive_frame(mlimits.max_encoded_bytes)
                if frame is None:
                    raise PeerUnavailable("stream ended before the manifest")
                header, payload = frame
                if header["t"] == ERROR and header.get("code") == ERR_BUSY:
                    await channel.aclose()
                    channel = None
                    await trio.sleep(self.limits.busy_backoff * (attempt + 1))
                    continue
                if header["t"] != MANIFEST:
                    raise RemoteProtocolError(f"no manifest: {header.get('code')!r:.40} {header.get('msg')!r:.80}")
                try:
                    m = decode_manifest(payload, mlimits)
                except LimitExceeded as exc:
                    self.oversize = str(exc)
                    raise
                if m.sha256 != self.sha256:
                    raise RemoteProtocolError("manifest names another blob")
                if expected_size is not None and m.size != expected_size:
                    raise RemoteProtocolError(f"manifest size {m.size} != expected {expected_size}")
                out[peer] = (m, channel)
                channel = None
                self.offered.set()
                return
            raise _Busy("busy")
        except (PeerUnavailable, RemoteProtocolError, trio.TooSlowError, _Busy) as exc:
            self.dropped.setdefault(peer, f"manifest: {exc!r:.200}")
        finally:
            if channel is not None:  # also when the grace ran out (cancelled): close it all the same
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await channel.aclose()

    async def get_manifests(self, peers: list[str], mlimits: ManifestLimits, expected_size: int | None,
                            out: dict[str, tuple[BlobManifest, FrameChannel]]) -> None:
        """Ask `peers` for the manifest: the first until it answers or times out, the others until
        `manifest_grace` after the first manifest has arrived (from anyone)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.get_manifest, peers[0], mlimits, expected_size, out)
            if len(peers) == 1:
                return
            watcher = trio.CancelScope()
            async with trio.open_nursery() as asks:
                for peer in peers[1:]:
                    asks.start_soon(self.get_manifest, peer, mlimits, expected_size, out)
                nursery.start_soon(self._cut_off_after_grace, asks.cancel_scope, watcher)
            watcher.cancel()  # every answer came in time: the cut-off is not needed
            for peer in peers[1:]:
                if peer not in out:
                    self.dropped.setdefault(peer, "manifest: no answer within the grace after the first")

    async def _cut_off_after_grace(self, asks: trio.CancelScope, watcher: trio.CancelScope) -> None:
        with watcher:
            await self.offered.wait()
            await trio.sleep(self.limits.manifest_grace)
            asks.cancel()

    # -- chunks -----------------------------------------------------------------------------
    async def request(self, channel: FrameChannel, peer: str, batch: list[int], manifest: BlobManifest,
                      spool: trio.MemorySendChannel[_Spooled]) -> None:
        in_flight = set(batch)
        try:
            await channel.send_frame({"t": GET_CHUNKS, "sha256": self.sha256, "idx": batch})
            while True:
                with trio.fail_after(self.limits.receive_timeout):
                    frame = await channel.receive_frame_deferred(manifest.chunk_size)
                if frame is None:
                    raise PeerUnavailable("stream ended during a chunk request")
                header, payload, opener = frame
                kind = header["t"]
                if kind == CHUNK:
                    i = header.get("i")
                    if type(i) is not int or i not in in_flight:
                        raise RemoteProtocolError(f"unrequested chunk {i!r:.20}")
                    await spool.send((i, payload, opener, peer))  # if cancelled here, i stays in flight
                    in_flight.discard(i)
                elif kind == DONE:
                    if in_flight:
                        raise RemoteProtocolError(f"done with {len(in_flight)} chunks missing")
                    return
                elif kind == ERROR and header.get("code") == ERR_BUSY:
                    raise _Busy("busy")
                else:
                    raise RemoteProtocolError(f"{kind!r:.20} {header.get('code')!r:.40} {header.get('msg')!r:.80}")
        finally:
            if in_flight:
                self.pending.extend(sorted(in_flight))
                self.notify()

    async def worker(self, peer: str, channel: FrameChannel | None, manifest: BlobManifest,
                     spool: trio.MemorySendChannel[_Spooled]) -> None:
        extra: FrameChannel | None = None
        busy = 0
        try:
            if channel is not None:
                channel, extra = await self.upgrade(channel, peer, manifest)
            while not self.done:
                # `done` and `pending` are only current between awaits: test them and, when
                # there is nothing to do, wait on the event, with no checkpoint in between, or
                # the wakeup of the last chunk can be missed (a fetch that never returns).
                if not self.pending:
                    await self.changed.wait()
                    continue
                try:
                    if channel is None:  # a stream only once there is work for it
                        channel = await self.open_channel(peer)
                        channel, extra = await self.upgrade(channel, peer, manifest)  # may be refused busy
                        continue  # awaited: the blob may be complete or the queue empty by now
                    n = self.limits.chunks_per_request
                    batch = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
                    await self.request(channel, peer, batch, manifest, spool)
                    busy = 0
                except _Busy:
                    busy += 1
                    for ch in (channel, extra):
                        if ch is not None:
                            await ch.aclose()
                    channel = extra = None
                    if busy > self.limits.busy_retries:
                        return  # this extra stream is not welcome; the holder's others go on
                    await trio.sleep(self.limits.busy_backoff * busy)
        except (PeerUnavailable, RemoteProtocolError, trio.TooSlowError) as exc:
            self.drop(peer, f"{type(exc).__name__}: {exc}"[:200])
        finally:
            for ch in (channel, extra):
                if ch is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await ch.aclose()

    async def holder(self, peer: str, channel: FrameChannel, manifest: BlobManifest,
                     spool: trio.MemorySendChannel[_Spooled]) -> None:
        with self.scopes[peer]:
            async with trio.open_nursery() as nursery:
                for k in range(self.limits.streams_per_holder):
                    nursery.start_soon(self.worker, peer, channel if k == 0 else None, manifest, spool)

    async def spool(self, partial: PartialBlob, receive: trio.MemoryReceiveChannel[_Spooled],
                    ) -> None:
        m = partial.manifest
        verified = partial.verified_count()
        async with receive:
            async for i, sealed, opener, peer in receive:
                if partial.has_chunk(i):
                    continue
                try:
                    length = await trio.to_thread.run_sync(self._open_and_write, partial, i, sealed, opener)
                except (BlobIntegrityError, DecodeError):
                    self.bad_by_peer[peer] += 1
                    self.pending.append(i)
                    self.drop(peer, f"bad bytes for chunk {i}")
                    continue
                verified += 1
                self.chunks_by_peer[peer] += 1
                self.bytes_fetched += length
                if self.progress is not None:
                    self.progress(min(verified * m.chunk_size, m.size), m.size)
                if verified == m.num_chunks:
                    self.done = True
                    self.notify()

    @staticmethod
    def _open_and_write(partial: PartialBlob, i: int, sealed: bytes, opener: Opener) -> int:
        data = opener(sealed)
        partial.write_chunk(i, data)
        return len(data)

    async def fetch_chunks(self, partial: PartialBlob, channels: dict[str, FrameChannel]) -> None:
        self.pending = collections.deque(partial.missing())
        self.done = not self.pending
        if self.done:
            return
        send, receive = trio.open_memory_channel[_Spooled](self.limits.spool_queue_chunks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.spool, partial, receive)
            async with send, trio.open_nursery() as holders:
                for peer, channel in channels.items():
                    self.scopes[peer] = trio.CancelScope()
                    holders.start_soon(self.holder, peer, channel, partial.manifest, send)


async def fetch_blob(
    transport: Transport,
    sha256: str,
    holders: list[str],
    store: BlobStore,
    *,
    expected_size: int | None = None,
    max_size: int = DEFAULT_MAX_BLOB_BYTES,
    progress: Progress | None = None,
    limits: FetchLimits = FetchLimits(),
    lane_host: Callable[[Stream], str | None] | None = default_lane_host,
) -> FetchResult:
    """Fetches blob `sha256` into `store` from any of `holders`; see the module docstring.
    Raises TransferError when it cannot (over max size, no holder left); a partial download
    stays on disk and the next call resumes it."""
    started = time.monotonic()
    check_hex_digest(sha256)
    max_size = min(max_size, store.limits.max_blob_bytes)
    if expected_size is not None and expected_size > max_size:
        raise TransferError(f"blob {sha256} of {expected_size} bytes is over max_size {max_size}")
    f = _Fetch(transport, sha256, store, limits, lane_host, progress)
    with contextlib.suppress(BlobMissing):  # present: nothing to fetch (gone since has(): fetch it)
        size = store.size(sha256)
        return FetchResult(sha256, size, 0, 0, 0, 0, seconds=time.monotonic() - started)
    mlimits = ManifestLimits(max_size, store.limits.max_chunks)
    offers: dict[str, tuple[BlobManifest, FrameChannel]] = {}
    peers = [p for p in dict.fromkeys(holders) if p != transport.local_peer_id]
    if len(peers) > limits.max_sources:  # the caller's first guesses, and a random draw of the rest
        first = (limits.max_sources + 1) // 2
        peers = peers[:first] + random.sample(peers[first:], limits.max_sources - first)
    if peers:
        await f.get_manifests(peers, mlimits, expected_size, offers)
    groups: dict[str, list[str]] = {}
    for peer, (m, _) in offers.items():
        groups.setdefault(m.digest(), []).append(peer)
    on_disk = await trio.to_thread.run_sync(store.partial_manifest, sha256)
    order = sorted(groups, key=lambda d: (on_disk is None or d != on_disk.digest(), -len(groups[d])))
    try:
        for digest in order:
            manifest = offers[groups[digest][0]][0]
            channels = {p: offers.pop(p)[1] for p in groups[digest]}
            partial = await trio.to_thread.run_sync(store.open_partial, manifest)
            resumed = partial.verified_count()
            try:
                await f.fetch_chunks(partial, channels)
            except BaseException:  # cancelled or failed: keep what is verified for a resume
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(partial.close)
                raise
            finally:
                for ch in channels.values():  # the first worker of each holder closed its own
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await ch.aclose()
            if partial.missing():
                await trio.to_thread.run_sync(partial.close)
                raise TransferError(
                    f"blob {sha256}: {len(partial.missing())} of {manifest.num_chunks} chunks missing, "
                    f"no holder left (dropped: {f.dropped})"
                )
            try:
                await trio.to_thread.run_sync(partial.complete)
            except BlobIntegrityError:
                for p in groups[digest]:
                    f.dropped[p] = "forged manifest: chunks do not hash to the blob address"
                continue
            return FetchResult(
                sha256, manifest.size, manifest.num_chunks, sum(f.chunks_by_peer.values()), resumed,
                f.bytes_fetched, dict(f.chunks_by_peer), dict(f.bad_by_peer), dict(f.dropped), f.lanes,
                time.monotonic() - started,
            )
    finally:
        for _, ch in offers.values():
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await ch.aclose()
    if f.oversize is not None and not groups:
        raise TransferError(f"blob {sha256} refused: {f.oversize}")
    raise TransferError(f"blob {sha256}: no holder served it (dropped: {f.dropped})")
