"""`/fednode/submit/1.0.0` (round-v1 r10): a participant hands its signed SubmissionAnnounce to the
round's coordinator, and gets the coordinator's verdict back.

Before r10 every submission went on gossip, so each of N members received and forwarded all N
submissions of every round: at 32 daemons on 2 cores those copies were most of a member's CPU per
round (0.4 s of it; 0.09 s at 4 daemons). Only the coordinator needs a submission. The sender opens
one stream to the coordinator, sends one frame (the signed envelope exactly as it would go on
gossip), and reads one frame back: a msgpack map `{"verdict": "accept" | "ignore" | "reject",
"reason": str, "coordinator": bool}`. The server judges the envelope exactly as a gossip message
(envelope-v1 checks, then the round rules) and says whether it coordinates the round in its own
view. A sender whose stream fails, or whose server does not coordinate the round, publishes the
same envelope on gossip (the pre-r10 path, which every coordinator still accepts).

Bounded: one request frame of at most `max_request_bytes` (the config's gossip message limit), a
whole exchange within `timeout`, at most `max_streams_per_peer` exchanges per peer and
`max_streams` in all at a time (more are closed unread: that sender falls back to gossip), and
an `allow_peer` predicate (the community allowlist) whose refusals are closed unread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
import trio

from fednode.errors import LimitExceeded, PeerUnavailable, RemoteProtocolError
from fednode.node.frames import frame, read_frame
from fednode.transport.base import Stream, Transport
from fednode.wire.verdict import Verdict

SUBMIT_PROTOCOL_ID = "/fednode/submit/1.0.0"
MAX_SUBMIT_RESPONSE_BYTES = 1024
MAX_SUBMIT_REASON_CHARS = 64
DEFAULT_SUBMIT_TIMEOUT_SECONDS = 10.0
DEFAULT_SUBMIT_STREAMS_PER_PEER = 2  # a participant has one submission per round: 2 covers a re-announce
DEFAULT_MAX_SUBMIT_STREAMS = 64  # exchanges in progress in all (config: round.max_submit_streams)

log = logging.getLogger(__name__)

PeerPredicate = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class SubmitReceipt:
    verdict: Verdict
    reason: str
    coordinator: bool  # the server coordinates the submission's round in its own view

    @property
    def delivered(self) -> bool:
        """The coordinator holds the submission (accepted now, or already: a duplicate)."""
        return self.coordinator and (self.verdict is Verdict.ACCEPT or self.reason == "duplicate")

    def encode(self) -> bytes:
        return msgpack.packb({"verdict": self.verdict.value, "reason": self.reason[:MAX_SUBMIT_REASON_CHARS],
                              "coordinator": self.coordinator}, use_bin_type=True)

    @classmethod
    def decode(cls, payload: bytes) -> SubmitReceipt:
        try:
            m = msgpack.unpackb(payload, raw=False)
        except Exception:  # msgpack raises ValueError, TypeError, its own types
            raise RemoteProtocolError("submit receipt is not msgpack") from None
        if (not isinstance(m, dict) or set(m) != {"verdict", "reason", "coordinator"}
                or m["verdict"] not in {v.value for v in Verdict} or not isinstance(m["reason"], str)
                or len(m["reason"]) > MAX_SUBMIT_REASON_CHARS or not isinstance(m["coordinator"], bool)):
            raise RemoteProtocolError("submit receipt must be a map of verdict, reason (<= 64 chars), coordinator")
        return cls(Verdict(m["verdict"]), m["reason"], m["coordinator"])


Judge = Callable[[bytes, str], SubmitReceipt]  # (signed envelope, sending peer) -> receipt


@dataclass(frozen=True, slots=True)
class SubmitStatistics:
    answered_by_verdict: dict[str, int] = field(default_factory=dict)
    refused_by_reason: dict[str, int] = field(default_factory=dict)  # not_member, busy, too_large, bad_request
    failed_by_reason: dict[str, int] = field(default_factory=dict)  # peer_gone, timeout, internal_error


class SubmitServer:
    def __init__(self, judge: Judge, *, max_request_bytes: int, allow_peer: PeerPredicate | None = None,
                 timeout: float = DEFAULT_SUBMIT_TIMEOUT_SECONDS,
                 max_streams_per_peer: int = DEFAULT_SUBMIT_STREAMS_PER_PEER,
                 max_streams: int = DEFAULT_MAX_SUBMIT_STREAMS) -> None:
        self.judge = judge
        self.max_request_bytes = max_request_bytes
        self.allow_peer = allow_peer
        self.timeout = timeout
        self.max_streams_per_peer = max_streams_per_peer
        self.max_streams = max_streams
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._answered: collections.Counter[str] = collections.Counter()
        self._refused: collections.Counter[str] = collections.Counter()
        self._failed: collections.Counter[str] = collections.Counter()

    def statistics(self) -> SubmitStatistics:
        return SubmitStatistics(dict(self._answered), dict(self._refused), dict(self._failed))

    def _refuse(self, reason: str, peer: str, detail: object = "") -> None:
        self._refused[reason] += 1
        log.info("submit stream from %s refused: %s %s", peer[-8:], reason, detail)

    async def handle(self, stream: Stream) -> None:
        """Serve one stream; whatever the peer does costs only its stream (counted by reason)."""
        peer = stream.remote_peer_id
        if self.allow_peer is not None and not self.allow_peer(peer):
            self._refuse("not_member", peer)
            return  # the transport closes the stream
        if self._in_flight[peer] >= self.max_streams_per_peer or self._in_flight.total() >= self.max_streams:
            self._refuse("busy", peer, f"({self._in_flight[peer]} from it, {self._in_flight.total()} in all)")
            return
        self._in_flight[peer] += 1
        try:
            with trio.move_on_after(self.timeout) as scope:
                await self._answer(stream, peer)
            if scope.cancelled_caught:
                self._failed["timeout"] += 1
        except (PeerUnavailable, trio.BrokenResourceError, trio.ClosedResourceError):
            self._failed["peer_gone"] += 1
        except Exception:  # a bug here (or in the judge) must not reach the transport's nursery
            self._failed["internal_error"] += 1
            log.exception("submit stream from %s failed", peer[-8:])
        finally:
            self._in_flight[peer] -= 1
            if self._in_flight[peer] <= 0:
                del self._in_flight[peer]

    async def _answer(self, stream: Stream, peer: str) -> None:
        try:
            data = await read_frame(stream, self.max_request_bytes, "submit")
        except LimitExceeded as exc:
            self._refuse("too_large", peer, exc)
            return
        except RemoteProtocolError:  # ended early, mid-frame
            self._refuse("bad_request", peer)
            return
        receipt = self.judge(data, peer)
        await stream.send_all(frame(receipt.encode()))
        await stream.send_eof()
        self._answered[receipt.verdict.value] += 1


async def submit_direct(transport: Transport, peer_id: str, envelope: bytes,
                        timeout: float = DEFAULT_SUBMIT_TIMEOUT_SECONDS) -> SubmitReceipt:
    """Hand `envelope` to `peer_id`; its receipt. PeerUnavailable / RemoteProtocolError on failure."""
    phase = "opening the stream"
    try:
        with trio.fail_after(timeout):
            stream = await transport.open_stream(peer_id, SUBMIT_PROTOCOL_ID)
            try:
                phase = "waiting for the receipt"
                await stream.send_all(frame(envelope))
                payload = await read_frame(stream, MAX_SUBMIT_RESPONSE_BYTES, "submit")
            finally:
                await stream.aclose()
    except trio.TooSlowError:
        raise PeerUnavailable(f"submit to {peer_id}: no receipt within {timeout:g} s ({phase})") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerUnavailable(f"submit to {peer_id}: stream broke ({phase}): {exc!r}") from None
    return SubmitReceipt.decode(payload)
