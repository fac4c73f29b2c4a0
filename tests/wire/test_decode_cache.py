"""The decode cache (issue 12): gossip is decoded and its signature checked once per process, and
no verdict changes for it: every vector gets its recorded verdict with a cold and with a warm cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fednode.identity
from fednode.identity import Identity
from fednode.wire import Heartbeat, codec
from fednode.wire.validate import MessageValidator, ValidationPolicy

VECTOR_DIR = Path(__file__).resolve().parents[2] / "protocols" / "vectors"
STREAM_FILES = ("blob-transfer-v1.json", "sync-v1.json", "peer-exchange-v1.json")
FILES = sorted(p for p in VECTOR_DIR.glob("*.json") if p.name not in STREAM_FILES)
ME = Identity.from_seed(b"\x07" * 32)
NOW = 1_800_000_000.0


def heartbeat(seq: int, *, community: str = "c") -> bytes:
    return codec.encode(codec.sign(Heartbeat(community_id=community, node_id=ME.node_id, term=0, seq=seq,
                                             sent_at=NOW), ME))


def policy_of(doc: dict) -> ValidationPolicy:
    raw = dict(doc["policy"])
    raw["allowlist"] = None if raw["allowlist"] is None else frozenset(raw["allowlist"])
    return ValidationPolicy(**raw)


def verdicts(validator: MessageValidator, doc: dict) -> list[tuple[str, str]]:
    out = []
    for vec in doc["vectors"]:
        checked = validator.check(bytes.fromhex(vec["hex"]), vec.get("now", doc["now"]))
        out.append((checked.validation.verdict.value, checked.validation.reason))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_vectors_get_their_verdicts_from_a_warm_cache(path: Path) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    expected = [(v["expect"]["verdict"], v["expect"]["reason"]) for v in doc["vectors"]]
    cache = codec.DecodeCache()
    assert verdicts(MessageValidator(policy_of(doc), decoder=cache), doc) == expected  # cold: fills it
    before = cache.statistics()
    if path.name == "valid.json":
        assert before.entries == len(doc["vectors"])
    assert verdicts(MessageValidator(policy_of(doc), decoder=cache), doc) == expected  # warm: a second node
    assert cache.statistics().hits >= before.hits + before.entries  # every decodable vector came from the cache
    tiny = codec.DecodeCache(max_entries=1)
    assert verdicts(MessageValidator(policy_of(doc), decoder=tiny), doc) == expected


def test_a_cached_decode_is_the_decode_and_is_done_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = codec.decode

    def counting(data: bytes, **kwargs: int) -> codec.Message:
        calls.append(bytes(data))
        return real(data, **kwargs)

    monkeypatch.setattr(codec, "decode", counting)
    cache = codec.DecodeCache()
    data = heartbeat(1)
    first = cache.decode(data)
    assert first == real(data)
    assert cache.decode(bytearray(data)) is first
    assert cache.decode(data, mid=codec.message_id(data)) is first
    assert calls == [data]
    charge = len(data) + codec.DECODE_CACHE_ENTRY_OVERHEAD
    assert cache.statistics() == codec.DecodeCacheStatistics(entries=1, bytes=charge, hits=2, misses=1)


def test_errors_are_not_cached_and_keep_their_reasons() -> None:
    cache = codec.DecodeCache()
    data = heartbeat(2)
    for _ in range(2):
        with pytest.raises(codec.MessageDecodeError) as err:
            cache.decode(data[:-1])
        assert err.value.reason == "malformed"
    assert cache.statistics().entries == 0
    cache.decode(data)
    # a limit below the message's size refuses it, cached or not
    with pytest.raises(codec.MessageTooLarge) as too_large:
        cache.decode(data, max_bytes=len(data) - 1)
    assert too_large.value.reason == "oversize"
    with pytest.raises(codec.MessageDecodeError) as not_bytes:
        cache.decode("text")  # type: ignore[arg-type]
    assert not_bytes.value.reason == "malformed"


def test_the_cache_is_bounded_by_entries_and_bytes_least_recently_used_first() -> None:
    cache = codec.DecodeCache(max_entries=3)
    msgs = [heartbeat(seq) for seq in range(10, 15)]
    for data in msgs[:3]:
        cache.decode(data)
    cache.decode(msgs[0])  # used again: the newest
    cache.decode(msgs[3])  # evicts msgs[1], the least recently used
    assert cache.statistics().entries == 3
    hits = cache.statistics().hits
    cache.decode(msgs[0])
    assert cache.statistics().hits == hits + 1
    cache.decode(msgs[1])
    assert cache.statistics().misses == 5  # msgs[1] was decoded again
    size = len(msgs[0]) + codec.DECODE_CACHE_ENTRY_OVERHEAD  # an entry's charge: encoded bytes + the object
    by_bytes = codec.DecodeCache(max_bytes=2 * size + 1)
    for data in msgs:
        by_bytes.decode(data)
    assert by_bytes.statistics().entries == 2 and by_bytes.statistics().bytes <= 2 * size + 1
    by_bytes.resize(max_entries=1, max_bytes=10 * size)  # a daemon applies its config's bounds
    assert by_bytes.statistics().entries == 1
    with pytest.raises(ValueError, match="max_bytes=0"):
        by_bytes.resize(max_entries=1, max_bytes=0)
    with pytest.raises(ValueError, match="max_entries=0"):
        codec.DecodeCache(max_entries=0)


def test_a_signature_is_checked_once_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = fednode.identity.verify_signature

    def counting(node_id: str, message: bytes, signature: bytes) -> bool:
        calls.append(node_id)
        return real(node_id, message, signature)

    monkeypatch.setattr(fednode.identity, "verify_signature", counting)
    cache = codec.DecodeCache()
    good = heartbeat(20, community="c")
    sig = codec.decode(good).signature
    bad = bytearray(good)
    bad[good.index(sig)] ^= 1  # a bit of the signature: still decodes, must not verify
    policy = ValidationPolicy(community_id="c")
    for _ in range(3):  # three nodes of one process
        validator = MessageValidator(policy, decoder=cache)
        assert validator.check(good, NOW).validation.accepted
        result = validator.check(bytes(bad), NOW).validation
        assert (result.verdict.value, result.reason) == ("reject", "bad_signature")
    assert len(calls) == 2  # once for the good message, once for the forged one
