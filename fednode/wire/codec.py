"""Canonical msgpack encoding and Ed25519 signing of wire messages (protocols/envelope-v1.md).

Canonical form: one msgpack map whose keys are the message's field names plus "type" (a field
declared `omit_default` only while it differs from its default), sorted by their UTF-8 bytes;
nested maps likewise; integers in their shortest encoding, floats always float64, text as str,
signatures as bin. A decoder re-encodes what it parsed and rejects input that is not
byte-identical, so every message has exactly one encoding.

Signed bytes: SIGNING_DOMAIN || canonical(message without its signature field).
Message id: sha256(encoded message), lowercase hex.

Decoding and signature checks are pure functions of the bytes, so they are done once per process:
`decode_cached` keeps the messages it decoded by message id (a bounded LRU shared by the topic
validator and the gossip reader, and by every node of an in-process simulation), and `verify`
remembers its answer on the (frozen) message.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from typing import Any, TypeVar

import msgpack

from fednode.errors import DecodeError, InvalidMessage, LimitExceeded
from fednode.identity import Identity
from fednode.wire.fields import omitted_when_default
from fednode.wire.messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AggregateAnnounce,
    Contribution,
    Message,
)

SIGNING_DOMAIN = b"fednode/v1/signed-message\x00"
TOPIC_FORMAT = "fednode/{community_id}/1"  # one gossipsub topic per community; 1 = envelope major version
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024  # control messages only; bulk data goes over blob streams
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
# Containers (maps, arrays) nest at most this deep, the top-level map being level 1. v1 needs 3
# (message, contributions, one contribution); the rest is room for later versions, whose messages
# must still parse (step 3) for a v1 node to IGNORE them as unsupported_version instead of REJECT.
MAX_NESTING_DEPTH = 16
# The shared decode cache (it changes no verdict, only how often one is computed; config keys
# network.decode_cache_entries / decode_cache_bytes). A message is validated and then read within
# milliseconds, so a thousand entries cover a community's recent gossip many times over. An entry is
# charged its encoded length plus DECODE_CACHE_ENTRY_OVERHEAD (the decoded object: ~1.2 KiB measured for
# a heartbeat with tracemalloc), so the byte bound caps the heap the cache holds, whatever a flood sends.
DECODE_CACHE_MAX_ENTRIES = 1024
DECODE_CACHE_MAX_BYTES = 4 * 1024 * 1024
DECODE_CACHE_ENTRY_OVERHEAD = 1024

M = TypeVar("M", bound=Message)


class MessageDecodeError(DecodeError):
    """Bytes are not a valid canonical message. `reason` is the verdict reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class MessageTooLarge(MessageDecodeError, LimitExceeded):
    pass


def _sorted_map(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: mapping[k] for k in sorted(mapping, key=lambda key: key.encode("utf-8"))}


def _field_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_field_value(v) for v in value]
    if isinstance(value, Contribution):
        return _sorted_map(dataclasses.asdict(value))
    return value


def to_map(message: Message, *, include_sig: bool = True) -> dict[str, Any]:
    omitted = omitted_when_default(type(message))  # absent while at their default (rule 1)
    fields = {f.name: _field_value(getattr(message, f.name)) for f in dataclasses.fields(message)  # type: ignore[arg-type]
              if f.name not in omitted or getattr(message, f.name) != omitted[f.name]}
    if not include_sig:
        del fields[message.SIG_FIELD]
    fields["type"] = message.TYPE
    return _sorted_map(fields)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, use_single_float=False, strict_types=True)


def encode(message: Message) -> bytes:
    # Messages are frozen, so their canonical bytes can be computed once and kept on the instance
    # (not a dataclass field: equality, replace() and to_map() never see it).
    cached: bytes | None = message.__dict__.get("_encoded")
    if cached is None:
        cached = _pack(to_map(message))
        object.__setattr__(message, "_encoded", cached)
    return cached


def signing_bytes(message: Message) -> bytes:
    return SIGNING_DOMAIN + _pack(to_map(message, include_sig=False))


def topic_for(community_id: str) -> str:
    """The gossipsub topic of a community's envelopes (envelope-v1.md, "Transport")."""
    return TOPIC_FORMAT.format(community_id=community_id)


def message_id(encoded: bytes) -> str:
    return hashlib.sha256(encoded).hexdigest()


def sign(message: M, identity: Identity) -> M:
    """Return a copy of `message` signed by `identity`, which must be its named author."""
    if message.signer != identity.node_id:
        raise InvalidMessage(message.SIGNER_FIELD, f"{message.signer} is not the signing identity {identity.node_id}")
    unsigned = dataclasses.replace(message, **{message.SIG_FIELD: b""})  # type: ignore[type-var]
    return dataclasses.replace(unsigned, **{message.SIG_FIELD: identity.sign(signing_bytes(unsigned))})  # type: ignore[type-var]


def verify(message: Message) -> bool:
    # The answer is a function of the frozen message's fields: kept on the instance like its bytes,
    # so a message shared through the decode cache is checked once per process.
    cached: bool | None = message.__dict__.get("_verified")
    if cached is None:
        from fednode.identity import verify_signature

        cached = len(message.signature) == 64 and verify_signature(
            message.signer, signing_bytes(message), message.signature)
        object.__setattr__(message, "_verified", cached)
    return cached


class _NotCanonicalValue(ValueError):
    """Raised from inside the msgpack parser (step 3): a map key that is not str, or an ext value."""


def _str_keys_only(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if not isinstance(key, str):  # strict_map_key still lets bin keys through
            raise _NotCanonicalValue(f"map keys must be str, got {type(key).__name__}")
    return dict(pairs)


def _no_ext(code: int, data: bytes) -> Any:
    # max_ext_len=0 still lets a zero-length ext through as ExtType(code, b"")
    raise _NotCanonicalValue(f"ext type {code} is not allowed")


def _depth(value: Any) -> int:
    """Nesting depth of containers in a parsed value (a scalar is 0), iteratively: the parser
    already bounds it (msgpack's stack), this only measures."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in item if isinstance(child, dict | list))
    return deepest


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Parse canonical bytes into a message; MessageDecodeError (a DecodeError) otherwise.
    Does not check the signature: see validate.py."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageDecodeError("malformed", "expected bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise MessageTooLarge("oversize", f"{len(data)} bytes exceeds max_message_bytes={max_bytes}")
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, max_str_len=max_bytes,
            max_bin_len=max_bytes, max_array_len=max_bytes, max_map_len=max_bytes, max_ext_len=0,
            object_pairs_hook=_str_keys_only, ext_hook=_no_ext,
        )
    except _NotCanonicalValue as exc:
        raise MessageDecodeError("malformed", f"not a v1 msgpack value: {exc}") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            RecursionError, UnicodeDecodeError) as exc:
        raise MessageDecodeError("malformed", f"not a single msgpack value: {exc.__class__.__name__}") from None
    if _depth(raw) > MAX_NESTING_DEPTH:
        raise MessageDecodeError("malformed", f"containers nest deeper than MAX_NESTING_DEPTH={MAX_NESTING_DEPTH}")
    if not isinstance(raw, dict):
        raise MessageDecodeError("malformed", "top level must be a map")
    # Version before type: a later version may add message types, and its senders must not be
    # penalised (REJECT) by nodes that only know this one; they are IGNOREd instead.
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise MessageDecodeError("malformed", "version must be an integer")
    if version not in SUPPORTED_VERSIONS:
        raise MessageDecodeError("unsupported_version", f"version {str(version)[:20]} is not supported")
    type_name = raw.pop("type", None)
    if not isinstance(type_name, str) or type_name not in MESSAGE_TYPES:
        raise MessageDecodeError("unknown_type", f"unknown message type {str(type_name)[:40]!r}")
    cls = MESSAGE_TYPES[type_name]
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = names - omitted_when_default(cls).keys()  # the others may be absent: their default
    if not required <= set(raw) <= names:
        missing, extra = sorted(required - set(raw)), sorted(str(k) for k in set(raw) - names)
        raise MessageDecodeError("malformed", f"{type_name}: missing fields {missing}, unknown fields {extra[:8]}")
    if cls is AggregateAnnounce:
        raw["contributions"] = _decode_contributions(raw["contributions"])
    try:
        message = cls(**raw)
    except InvalidMessage as exc:
        raise MessageDecodeError("malformed", f"{type_name}.{exc}") from None
    except TypeError as exc:  # a field value of a type the checks could not even look at
        raise MessageDecodeError("malformed", f"{type_name}: {exc}") from None
    if encode(message) != data:
        raise MessageDecodeError("non_canonical", f"{type_name} is not in canonical encoding")
    return message


def _decode_contributions(value: Any) -> tuple[Contribution, ...]:
    if not isinstance(value, list):
        raise MessageDecodeError("malformed", "contributions must be an array")
    out = []
    want = {f.name for f in dataclasses.fields(Contribution)}
    for item in value:
        if not isinstance(item, dict) or set(item) != want:
            raise MessageDecodeError("malformed", f"each contribution must be a map with keys {sorted(want)}")
        out.append(Contribution(**item))
    return tuple(out)


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeCacheStatistics:
    entries: int
    bytes: int
    hits: int
    misses: int


class DecodeCache:
    """Messages decoded from bytes, by message id (sha256 of the bytes): a bounded LRU of at most
    `max_entries` entries and `max_bytes` bytes (each entry charged its encoded length plus
    DECODE_CACHE_ENTRY_OVERHEAD for the decoded object). Only successful decodes are kept:
    bytes that fail to decode raise the same MessageDecodeError every time, from `decode` itself.
    Thread-safe (a transport may run validators off trio's thread)."""

    def __init__(self, max_entries: int = DECODE_CACHE_MAX_ENTRIES, max_bytes: int = DECODE_CACHE_MAX_BYTES) -> None:
        self._check(max_entries, max_bytes)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[str, tuple[Message, int]] = collections.OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def decode(self, data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, mid: str | None = None) -> Message:
        """`decode(data, max_bytes=max_bytes)`, from the cache when these bytes were decoded before.
        `mid`: `message_id(data)` when the caller has it already. Under `max_bytes`, what bytes decode
        to does not depend on `max_bytes` (every parser limit is at least the input's length)."""
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) > max_bytes:
            return decode(data, max_bytes=max_bytes)  # the error, with its reason
        data = bytes(data)
        key = mid if mid is not None else message_id(data)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[0]
            self._misses += 1
        message = decode(data, max_bytes=max_bytes)
        with self._lock:
            if key not in self._entries:
                cost = len(data) + DECODE_CACHE_ENTRY_OVERHEAD
                self._entries[key] = (message, cost)
                self._bytes += cost
                self._evict()
        return message

    @staticmethod
    def _check(max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"DecodeCache: max_entries={max_entries} and max_bytes={max_bytes} must be >= 1")

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, size) = self._entries.popitem(last=False)
            self._bytes -= size

    def resize(self, max_entries: int, max_bytes: int) -> None:
        """New bounds (a daemon applies its config's); evicts the oldest entries beyond them."""
        self._check(max_entries, max_bytes)
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def statistics(self) -> DecodeCacheStatistics:
        with self._lock:
            return DecodeCacheStatistics(len(self._entries), self._bytes, self._hits, self._misses)


SHARED_DECODE_CACHE = DecodeCache()


def decode_cached(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, mid: str | None = None) -> Message:
    """`decode`, through the process's shared DecodeCache: what the topic validator decoded, the
    gossip reader gets without decoding it again."""
    return SHARED_DECODE_CACHE.decode(data, max_bytes=max_bytes, mid=mid)
