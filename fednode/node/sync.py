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

from fednode.errors import LimitExceeded, PeerUnavailable, RemoteProtocolError
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
    refused_by_reason: dict[str, int] = field(default_factory=dict)  # not_member, bad_request, too_large
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # peer_gone, timeout, internal_error


async def _read_frame(stream: Stream, max_bytes: int) -> bytes:
    header = await _read_exact(stream, 4)
    (length,) = struct.unpack(">I", header)
    if length > max_bytes:
        raise LimitExceeded(f"sync frame of {length} bytes exceeds the limit of {max_bytes}")
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
        self._failed: collections.Counter[str] = collections.Counter()

    def statistics(self) -> SyncStatistics:
        return SyncStatistics(self._served, dict(self._refused), dict(self._failed))

    def _fail(self, reason: str, peer: str, detail: object) -> None:
        self._failed[reason] += 1
        log.info("sync stream from %s: %s (%s)", peer[-8:], reason, detail)

    async def handle(self, stream: Stream) -> None:
        """Serve one stream. A peer that closes early, sends garbage or too much, or stalls costs
        only its stream: each case is counted by reason (refused: not_member, bad_request,
        too_large; failed: peer_gone, timeout, internal_error) and none escapes."""
        peer = stream.remote_peer_id
        if self.allow_peer is not None and not self.allow_peer(peer):
            self._refused["not_member"] += 1
            log.info("sync stream from %s refused: not a member", peer[-8:])
            return  # the transport closes the stream
        try:
            with trio.move_on_after(self.timeout) as scope:
                await self._answer(stream, peer)
            if scope.cancelled_caught:
                self._fail("timeout", peer, f"no complete exchange within {self.timeout} s")
        except PeerUnavailable as exc:
            self._fail("peer_gone", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail("peer_gone", peer, repr(exc))
        except Exception:  # a bug here (or in lookup) must not reach the transport's nursery
            self._failed["internal_error"] += 1
            log.exception("sync stream from %s failed", peer[-8:])

    async def _answer(self, stream: Stream, peer: str) -> None:
        try:
            frame = await _read_frame(stream, MAX_SYNC_REQUEST_BYTES)
        except LimitExceeded as exc:
            self._refused["too_large"] += 1
            log.info("sync stream from %s refused: %s", peer[-8:], exc)
            return
        except RemoteProtocolError:  # ended early, mid-frame
            self._refused["bad_request"] += 1
            return
        try:
            request = msgpack.unpackb(frame, raw=False)
        except Exception:  # msgpack raises ValueError, TypeError (unhashable keys), its own types
            request = None
        round_id = request.get("round_id") if isinstance(request, dict) else None
        if not isinstance(round_id, str) or len(round_id) > 64:
            self._refused["bad_request"] += 1
            return
        messages = self.lookup(round_id)[:MAX_SYNC_MESSAGES]
        await stream.send_all(_frame(msgpack.packb(messages, use_bin_type=True)))
        await stream.send_eof()
        self._served += 1


def serve_sync(transport: Transport, lookup: Lookup, *, allow_peer: PeerPredicate | None = None) -> SyncServer:
    """Serve `lookup` on SYNC_PROTOCOL_ID; streams from peers `allow_peer` refuses are closed unread."""
    server = SyncServer(lookup, allow_peer)
    transport.serve(SYNC_PROTOCOL_ID, server.handle)
    return server


async def request_sync(transport: Transport, peer_id: str, round_id: str,
                       timeout: float = DEFAULT_SYNC_TIMEOUT_SECONDS) -> list[bytes]:
    """The encoded messages `peer_id` holds for `round_id`; PeerUnavailable / RemoteProtocolError on failure."""
    phase = "opening the stream"
    try:
        with trio.fail_after(timeout):
            stream = await transport.open_stream(peer_id, SYNC_PROTOCOL_ID)
            try:
                phase = "waiting for the answer"
                await stream.send_all(_frame(msgpack.packb({"round_id": round_id}, use_bin_type=True)))
                payload = await _read_frame(stream, MAX_SYNC_RESPONSE_BYTES)
            finally:
                await stream.aclose()
    except trio.TooSlowError:  # said, not a bare TooSlowError() in the caller's log
        raise PeerUnavailable(f"sync of {round_id} from {peer_id}: no answer within {timeout:g} s "
                              f"({phase})") from None
    try:
        messages = msgpack.unpackb(payload, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise RemoteProtocolError("sync response is not msgpack") from None
    if not isinstance(messages, list) or not all(isinstance(m, bytes) for m in messages):
        raise RemoteProtocolError("sync response must be an array of bin")
    return messages[:MAX_SYNC_MESSAGES]
