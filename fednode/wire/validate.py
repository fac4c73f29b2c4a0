"""Verdicts for messages from the network (gossipsub's ACCEPT / REJECT / IGNORE).

Order of checks, cheapest and most specific first: size, duplicate id, decode, community,
membership, signature, timestamp window. Only ACCEPTed ids are remembered, so a forged copy
can't poison the duplicate cache. The reasons are stable strings, counted by the daemon.

Decoding goes through a codec.DecodeCache (by default the process's shared one) and `codec.verify`
remembers its answer on the message, so the gossip reader does not decode again what was validated,
and nodes sharing a process decode and verify each message once. Verdicts do not depend on it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from fednode.wire import codec
from fednode.wire.messages import Message
from fednode.wire.verdict import Validation, Verdict

DEFAULT_REPLAY_WINDOW_SECONDS = 300.0  # how old a message may be
DEFAULT_MAX_CLOCK_SKEW_SECONDS = 30.0  # how far in the future a message may be
DEFAULT_SEEN_CACHE_SIZE = 65_536  # ids remembered for duplicate detection

# Reason strings (protocols/envelope-v1.md, "Verdicts").
REJECT_REASONS = ("oversize", "malformed", "non_canonical", "unknown_type", "wrong_community",
                  "not_member", "bad_signature")
IGNORE_REASONS = ("duplicate", "stale", "future", "unsupported_version")


@dataclass(frozen=True, slots=True)
class ValidationPolicy:
    community_id: str
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    replay_window_seconds: float = DEFAULT_REPLAY_WINDOW_SECONDS
    max_clock_skew_seconds: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    allowlist: frozenset[str] | None = None  # None: any signer; else only these node ids
    seen_cache_size: int = DEFAULT_SEEN_CACHE_SIZE


@dataclass(frozen=True, slots=True)
class Checked:
    validation: Validation
    message: Message | None = None
    message_id: str = ""


def _reject(reason: str, detail: str = "") -> Checked:
    return Checked(Validation(Verdict.REJECT, reason, detail))


def _ignore(reason: str, detail: str = "") -> Checked:
    return Checked(Validation(Verdict.IGNORE, reason, detail))


class MessageValidator:
    """Stateful only in its bounded duplicate cache; the clock is passed in."""

    def __init__(self, policy: ValidationPolicy, *, decoder: codec.DecodeCache | None = None) -> None:
        self.policy = policy
        self.decoder = decoder if decoder is not None else codec.SHARED_DECODE_CACHE
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()

    def check(self, data: bytes, now: float, *, check_window: bool = True) -> Checked:
        policy = self.policy
        if len(data) > policy.max_message_bytes:
            return _reject("oversize", f"{len(data)} bytes > max_message_bytes={policy.max_message_bytes}")
        mid = codec.message_id(bytes(data))
        if mid in self._seen:
            return _ignore("duplicate", mid)
        try:
            message = self.decoder.decode(data, max_bytes=policy.max_message_bytes, mid=mid)
        except codec.MessageDecodeError as exc:
            if exc.reason == "unsupported_version":
                return _ignore(exc.reason, exc.detail)
            return _reject(exc.reason, exc.detail)
        if message.community_id != policy.community_id:
            return _reject("wrong_community", message.community_id)
        if policy.allowlist is not None and message.signer not in policy.allowlist:
            return _reject("not_member", message.signer)
        if not codec.verify(message):
            return _reject("bad_signature", f"{message.TYPE} from {message.signer}")
        if check_window:
            age = now - message.timestamp
            if age > policy.replay_window_seconds:
                return _ignore("stale", f"{age:.1f} s old > replay_window_seconds={policy.replay_window_seconds}")
            if -age > policy.max_clock_skew_seconds:
                return _ignore("future", f"{-age:.1f} s ahead > max_clock_skew_seconds={policy.max_clock_skew_seconds}")
        self._remember(mid)
        return Checked(Validation(Verdict.ACCEPT), message, mid)

    def _remember(self, mid: str) -> None:
        self._seen[mid] = None
        while len(self._seen) > self.policy.seen_cache_size:
            self._seen.popitem(last=False)
