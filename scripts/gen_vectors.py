#!/usr/bin/env python3
"""Generate the wire test vectors in protocols/vectors/ deterministically.

    scripts/gen_vectors.py          rewrite the files
    scripts/gen_vectors.py --check  exit 1 unless the files on disk are byte-identical to what it generates

Ed25519 signatures are deterministic, the keys are fixed seeds and every timestamp is a constant,
so the output depends only on the code. Each file is self-contained: the keys (seed, public key,
node id), the validation policy, the `now` to validate at, and the vectors, checked in order by ONE
validator (so a later vector can be a duplicate of an earlier one). Invalid vectors are otherwise
correct messages with exactly one thing wrong; where they carry a signature it is the valid
signature of the intended (canonical) message, so only the recorded defect can cause the verdict.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import nacl.bindings

from fednode.identity import Identity, peer_id_from_public_key
from fednode.wire import codec
from fednode.wire.messages import (
    AggregateAnnounce,
    Contribution,
    CoordinatorClaim,
    Heartbeat,
    Message,
    RoundFailed,
    RoundManifest,
    SubmissionAnnounce,
)
from fednode.wire.validate import ValidationPolicy
from fednode.wire.vector_files import generator_main

VECTOR_DIR = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
KEYS = {name: Identity.from_seed(bytes([i]) * 32) for i, name in enumerate(("alice", "bob", "carol", "mallory"), 1)}
A, B, C, M = (KEYS[n] for n in ("alice", "bob", "carol", "mallory"))
COMMUNITY = "fednode-test"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SHA_BASE = "7f" * 32
SHA_START = "1a" * 32
SHA_DELTA_B = "b0" * 32
SHA_DELTA_C = "c0" * 32
SHA_MERGED = "ee" * 32

Raw = tuple[bytes, bytes]  # (packed key, packed value): lets a vector spell any encoding


def key_table() -> list[dict[str, str]]:
    return [{"name": n, "seed": k.seed.hex(), "public_key": k.public_key.hex(), "node_id": k.node_id}
            for n, k in KEYS.items()]


def policy_json(policy: ValidationPolicy) -> dict[str, Any]:
    out = dataclasses.asdict(policy)
    out["allowlist"] = None if policy.allowlist is None else sorted(policy.allowlist)
    return out


def jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def accept(name: str, message: Message, description: str, now: float | None = None) -> dict[str, Any]:
    data = codec.encode(message)
    vec: dict[str, Any] = {"name": name, "description": description, "hex": data.hex(),
                           "expect": {"verdict": "accept", "reason": "ok"}}
    if now is not None:
        vec["now"] = now
    vec["message_id"] = codec.message_id(data)
    vec["signed_bytes_hex"] = codec.signing_bytes(message).hex()
    vec["fields"] = jsonable(codec.to_map(message))
    return vec


def refuse(name: str, data: bytes, verdict: str, reason: str, description: str,
           now: float | None = None) -> dict[str, Any]:
    vec: dict[str, Any] = {"name": name, "description": description, "hex": data.hex(),
                           "expect": {"verdict": verdict, "reason": reason}}
    if now is not None:
        vec["now"] = now
    return vec


# ---- building blocks -------------------------------------------------------------------------

def heartbeat(who: Identity = A, **kw: Any) -> Heartbeat:
    args: dict[str, Any] = {"community_id": COMMUNITY, "node_id": who.node_id, "term": 1, "seq": 7,
                            "sent_at": NOW - 10.0}
    return codec.sign(Heartbeat(**(args | kw)), who)


def manifest(**kw: Any) -> RoundManifest:
    args: dict[str, Any] = {"round_id": "r-0001", "base_model_id": "sentence-transformers/all-MiniLM-L6-v2",
                            "coordinator_node_id": A.node_id, "community_id": COMMUNITY, "created_at": NOW - 5.0}
    return codec.sign(RoundManifest(**(args | kw)), A)


def submission(**kw: Any) -> SubmissionAnnounce:
    args: dict[str, Any] = {"round_id": "r-0001", "participant_node_id": B.node_id, "num_samples": 512,
                            "submitted_at": NOW - 3.0, "community_id": COMMUNITY, "delta_sha256": SHA_DELTA_B,
                            "delta_size": 602_112, "train_loss": 0.4375}
    return codec.sign(SubmissionAnnounce(**(args | kw)), B)


def pack_map(entries: list[Raw]) -> bytes:
    n = len(entries)
    head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    return head + b"".join(k + v for k, v in entries)


def p(value: Any) -> bytes:
    return codec._pack(value)


def entries_of(mapping: dict[str, Any]) -> list[Raw]:
    return [(p(k), p(v)) for k, v in mapping.items()]


def sorted_packed(mapping: dict[str, Any]) -> bytes:
    return p(codec._sorted_map(mapping))


def resign(mapping: dict[str, Any], sig_field: str, who: Identity) -> dict[str, Any]:
    """Sign an arbitrary map exactly as the protocol signs a message: domain || canonical(map - sig)."""
    unsigned = {k: v for k, v in mapping.items() if k != sig_field}
    out = dict(mapping)
    out[sig_field] = who.sign(codec.SIGNING_DOMAIN + sorted_packed(unsigned))
    return codec._sorted_map(out)


def with_raw(message: Message, key: str, raw_value: bytes) -> bytes:
    """Canonical encoding of `message` with one value's bytes replaced by `raw_value`."""
    return pack_map([(p(k), raw_value if k == key else p(v)) for k, v in codec.to_map(message).items()])


# ---- Ed25519 edge cases (envelope-v1.md, "Signatures": the strictness rules) ----------------------

ED25519_L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
ED25519_P = 2**255 - 19
IDENTITY_POINT = (1).to_bytes(32, "little")  # y = 1, x = 0: the neutral element, order 1
IDENTITY_POINT_NON_CANONICAL = (1 + ED25519_P).to_bytes(32, "little")  # y = 1 + p: the same point, unreduced
SHA256_MULTIHASH_PEER_ID = "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"  # a CIDv0-style id: no key inside


def _scalar(n: int) -> bytes:
    return (n % ED25519_L).to_bytes(32, "little")


def _challenge(r: bytes, a: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r + a + message).digest(), "little") % ED25519_L


def forged_under_small_order_key(mapping: dict[str, Any], signer_field: str, sig_field: str,
                                 public_key: bytes) -> dict[str, Any]:
    """Sign `mapping` under a small-order public key A without any private key: with [k]A the
    neutral element, R = [s]B, S = s satisfies the (cofactorless) verification equation
    [S]B = R + [k]A for every message. A verifier that refuses small-order keys refuses it."""
    out = {**mapping, signer_field: peer_id_from_public_key(public_key)}
    s_value = 0x1234567
    r = nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(_scalar(s_value))
    out[sig_field] = r + _scalar(s_value)
    return codec._sorted_map(out)


def with_small_order_r(mapping: dict[str, Any], sig_field: str, who: Identity) -> dict[str, Any]:
    """A signature by `who` whose R is the neutral element: S = k*a (a = who's secret scalar)
    satisfies [S]B = R + [k]A. A verifier that refuses small-order R refuses it."""
    unsigned = {k: v for k, v in mapping.items() if k != sig_field}
    message = codec.SIGNING_DOMAIN + sorted_packed(unsigned)
    digest = bytearray(hashlib.sha512(who.seed).digest()[:32])
    digest[0] &= 248
    digest[31] &= 127
    digest[31] |= 64
    a = int.from_bytes(digest, "little")
    k = _challenge(IDENTITY_POINT, who.public_key, message)
    return codec._sorted_map({**mapping, sig_field: IDENTITY_POINT + _scalar(k * a)})


def with_s_plus_l(message: Message) -> bytes:
    """The message's valid signature with S replaced by S + L (< 2^253, so it fits 32 bytes):
    the same value mod L, so a verifier that reduces S instead of requiring S < L accepts it."""
    sig = message.signature
    s_value = int.from_bytes(sig[32:], "little") + ED25519_L
    return codec.encode(dataclasses.replace(message, **{message.SIG_FIELD: sig[:32] + s_value.to_bytes(32, "little")}))


def nested(depth: int) -> bytes:
    """`depth` nested containers: depth-1 one-element arrays around an empty map."""
    return b"\x91" * (depth - 1) + b"\x80"


# ---- files ---------------------------------------------------------------------------------

def valid_file() -> dict[str, Any]:
    contributions = (Contribution(B.node_id, SHA_DELTA_B, 512), Contribution(C.node_id, SHA_DELTA_C, 300))
    vectors = [
        accept("heartbeat-minimal", heartbeat(), "Heartbeat with every optional field at its default."),
        accept("heartbeat-full", heartbeat(B, term=2, seq=1234, federated_learning=True,
                                           coordinator_node_id=A.node_id, last_round_number=3,
                                           latest_merged_sha256=SHA_MERGED, open_round_id="r-0004"),
               "Heartbeat of a learning member that follows alice in term 2 and works on round r-0004."),
        accept("heartbeat-paused", heartbeat(C, term=2, seq=1235, federated_learning=True,
                                             coordinator_node_id=A.node_id, last_round_number=3,
                                             open_round_id="r-0004", paused=True),
               "Heartbeat of a learning member that has paused participation (its disk is full): `paused` is "
               "true, the only value for which its key is present (round-v1.md r4, envelope-v1.md r3)."),
        accept("heartbeat-paced", heartbeat(B, term=2, seq=1236, federated_learning=True,
                                            coordinator_node_id=A.node_id, last_round_number=3, interval_ms=6000),
               "Heartbeat of a member of a large community that beats every 6 s, slower than heartbeat_interval "
               "(election-v1.md rule 14): `interval_ms` is present only when it is not 0 (round-v1.md r8, "
               "envelope-v1.md r4)."),
        accept("coordinator-claim", codec.sign(CoordinatorClaim(community_id=COMMUNITY, node_id=A.node_id, term=2,
                                                                claimed_at=NOW - 8.0, last_round_number=3), A),
               "alice claims term 2."),
        accept("round-manifest-original-defaults", manifest(),
               "RoundManifest with only the original design's fields set; every other field at its default "
               "(deadline = created_at + round_timeout_seconds)."),
        accept("round-manifest-full",
               manifest(round_id="r-0004", lora_rank=8, lora_alpha=16.0, learning_rate=5e-4, min_participants=3,
                        max_participants=50, round_timeout_seconds=900.0, term=2, round_number=4,
                        base_model_hash=SHA_BASE, start_adapter_sha256=SHA_START, start_adapter_size=602_112,
                        local_steps=50, aggregation="exact", deadline=NOW + 600.0),
               "RoundManifest with every field set: round 4 of term 2, exact aggregation, starts from an adapter."),
        accept("submission-announce", submission(), "bob's update for r-0001: 512 samples, delta blob by sha256."),
        accept("aggregate-announce",
               codec.sign(AggregateAnnounce(community_id=COMMUNITY, round_id="r-0001", round_number=1,
                                            coordinator_node_id=A.node_id, term=1, merged_sha256=SHA_MERGED,
                                            merged_size=602_112, aggregation="fedavg", contributions=contributions,
                                            announced_at=NOW - 1.0), A),
               "alice's merged adapter for r-0001 from bob's and carol's updates."),
        accept("round-failed",
               codec.sign(RoundFailed(community_id=COMMUNITY, round_id="r-0002", round_number=2,
                                      coordinator_node_id=A.node_id, term=1,
                                      reason="too_few_participants: 1 < min_participants 2", failed_at=NOW - 2.0), A),
               "alice gives round r-0002 up."),
        accept("round-manifest-unicode-text",
               manifest(round_id="r-0005", base_model_id="modèle/ünïcode-✓"),
               "Text fields are UTF-8 msgpack str; limits count Unicode code points, not bytes."),
    ]
    return {"policy": ValidationPolicy(COMMUNITY), "vectors": vectors,
            "description": "One valid, signed message of every type; each must decode, verify, re-encode to the "
                           "identical bytes and get ACCEPT."}


def invalid_file() -> dict[str, Any]:
    hb = heartbeat()
    hb_map = codec.to_map(hb)
    man = manifest()
    man_map = codec.to_map(man)
    sub = submission()
    sub_map = codec.to_map(sub)
    flipped = bytearray(hb.sig)
    flipped[0] ^= 0x01
    claim_by_b = dataclasses.replace(
        CoordinatorClaim(community_id=COMMUNITY, node_id=A.node_id, term=9, claimed_at=NOW - 1.0),
        sig=B.sign(codec.signing_bytes(CoordinatorClaim(community_id=COMMUNITY, node_id=A.node_id, term=9,
                                                        claimed_at=NOW - 1.0))))
    unknown = resign({**{k: v for k, v in hb_map.items() if k != "sig"}, "type": "vote", "sig": b""}, "sig", A)
    bad = [
        ("bad-signature-bit-flip", codec.encode(dataclasses.replace(hb, sig=bytes(flipped))), "reject", "bad_signature",
         "heartbeat-minimal with bit 0 of the signature flipped."),
        ("bad-signature-wrong-key", codec.encode(claim_by_b), "reject", "bad_signature",
         "A claim naming alice as node_id but signed with bob's key."),
        ("bad-signature-unsigned", codec.encode(dataclasses.replace(hb, sig=b"")), "reject", "bad_signature",
         "heartbeat-minimal with an empty signature."),
        ("bad-signature-field-changed-after-signing", codec.encode(dataclasses.replace(hb, seq=8)), "reject",
         "bad_signature", "heartbeat-minimal with seq changed from 7 to 8 after signing."),
        ("unknown-type", sorted_packed(unknown), "reject", "unknown_type",
         "A signed heartbeat map whose type is 'vote'."),
        ("missing-type", sorted_packed({k: v for k, v in hb_map.items() if k != "type"}), "reject", "unknown_type",
         "heartbeat-minimal without its type key."),
        ("unsupported-version", codec.encode(heartbeat(version=2)), "ignore", "unsupported_version",
         "A correctly signed heartbeat with version 2."),
        ("unsupported-version-unknown-type",
         sorted_packed(resign({**unknown, "version": 2}, "sig", A)), "ignore", "unsupported_version",
         "Version is checked before type: a later version's new message type is IGNOREd, not REJECTed."),
        ("wrong-community", codec.encode(heartbeat(community_id="other-community")), "reject", "wrong_community",
         "A correctly signed heartbeat for community 'other-community'."),
        ("malformed-min-gt-max", sorted_packed(resign({**man_map, "min_participants": 5, "max_participants": 4},
                                                      "coordinator_sig", A)), "reject", "malformed",
         "RoundManifest with min_participants 5 > max_participants 4 (signed)."),
        ("malformed-lora-rank-zero", sorted_packed(resign({**man_map, "lora_rank": 0}, "coordinator_sig", A)),
         "reject", "malformed", "RoundManifest with lora_rank 0 (signed)."),
        ("malformed-lora-rank-negative", sorted_packed(resign({**man_map, "lora_rank": -16}, "coordinator_sig", A)),
         "reject", "malformed", "RoundManifest with lora_rank -16 (signed)."),
        ("malformed-negative-num-samples",
         sorted_packed(resign({**sub_map, "num_samples": -5}, "participant_sig", B)), "reject", "malformed",
         "SubmissionAnnounce with num_samples -5 (signed)."),
        ("malformed-missing-field", sorted_packed(resign({k: v for k, v in sub_map.items() if k != "delta_size"},
                                                         "participant_sig", B)), "reject", "malformed",
         "SubmissionAnnounce without delta_size (signed)."),
        ("malformed-extra-field", sorted_packed(resign({**sub_map, "extra": 1}, "participant_sig", B)), "reject",
         "malformed", "SubmissionAnnounce with an extra key 'extra' (signed)."),
        ("malformed-bad-sha256", sorted_packed(resign({**sub_map, "delta_sha256": "B0" * 32}, "participant_sig", B)),
         "reject", "malformed", "SubmissionAnnounce whose delta_sha256 is upper-case hex (signed)."),
        ("malformed-str-for-bin", sorted_packed({**hb_map, "sig": hb.sig.hex()}), "reject", "malformed",
         "heartbeat-minimal with the signature sent as a hex str instead of bin."),
        ("malformed-deadline-after-timeout",
         sorted_packed(resign({**man_map, "deadline": man.created_at + 3601.0}, "coordinator_sig", A)), "reject",
         "malformed", "RoundManifest whose deadline is past created_at + round_timeout_seconds (signed)."),
        ("malformed-not-a-map", p([1, 2, 3]), "reject", "malformed", "A msgpack array, not a map."),
        ("malformed-truncated", codec.encode(hb)[:-1], "reject", "malformed", "heartbeat-minimal minus its last byte."),
        ("malformed-trailing-byte", codec.encode(hb) + b"\xc0", "reject", "malformed",
         "heartbeat-minimal followed by one extra msgpack nil."),
        ("non-canonical-unsorted-keys", pack_map(entries_of(hb_map)[::-1]), "reject", "non_canonical",
         "heartbeat-minimal with its map keys in reverse order."),
        ("non-canonical-int-for-float", with_raw(hb, "sent_at", p(int(hb.sent_at))), "reject", "non_canonical",
         "heartbeat-minimal with sent_at sent as the integer 1767225590 instead of float64."),
        ("non-canonical-float32", with_raw(sub, "train_loss", b"\xca" + struct.pack(">f", sub.train_loss)), "reject",
         "non_canonical", "submission-announce with train_loss (0.4375, exact in float32) sent as float32."),
        ("non-canonical-non-minimal-int", with_raw(hb, "term", b"\xce" + struct.pack(">I", hb.term)), "reject",
         "non_canonical", "heartbeat-minimal with term 1 sent as uint32 (ce 00 00 00 01) instead of fixint."),
        ("non-canonical-non-minimal-str", with_raw(hb, "community_id", b"\xd9" + bytes([len(COMMUNITY)])
                                                   + COMMUNITY.encode()), "reject", "non_canonical",
         "heartbeat-minimal with community_id sent as str8 instead of fixstr."),
        ("non-canonical-duplicate-key", pack_map([*entries_of(hb_map), (p("seq"), p(hb.seq))]), "reject",
         "non_canonical", "heartbeat-minimal with the key 'seq' (same value) a second time at the end."),
        ("non-canonical-paused-false", sorted_packed(resign({**hb_map, "paused": False}, "sig", A)), "reject",
         "non_canonical", "heartbeat-minimal with the key 'paused' present and false (signed as sent): a false "
         "`paused` is spelled by leaving the key out."),
        ("malformed-paused-not-bool", sorted_packed(resign({**hb_map, "paused": 1}, "sig", A)), "reject",
         "malformed", "A heartbeat whose 'paused' is the integer 1 instead of a bool (signed)."),
        ("non-canonical-interval-zero", sorted_packed(resign({**hb_map, "interval_ms": 0}, "sig", A)), "reject",
         "non_canonical", "heartbeat-minimal with the key 'interval_ms' present and 0 (signed as sent): a 0 "
         "`interval_ms` is spelled by leaving the key out."),
        ("malformed-interval-too-large", sorted_packed(resign({**hb_map, "interval_ms": 3_600_001}, "sig", A)),
         "reject", "malformed", "A heartbeat whose 'interval_ms' is 3,600,001, above its bound of one hour (signed)."),
    ]
    bad += strictness_cases(hb, hb_map, man, man_map, sub)
    vectors = [refuse(*args) for args in bad]
    return {"policy": ValidationPolicy(COMMUNITY), "vectors": vectors,
            "description": "Messages with exactly one defect each, and the verdict and reason they must get."}


def strictness_cases(hb: Heartbeat, hb_map: dict[str, Any], man: RoundManifest, man_map: dict[str, Any],
                     sub: SubmissionAnnounce) -> list[tuple[str, bytes, str, str, str]]:
    """The edges where two implementations of the spec could differ (issue 11): msgpack values v1
    forbids, float specials, signature lengths and Ed25519 strictness, contributions, deadline 0,
    nesting depth, and the order of step 3 (parse) before step 6 (version)."""
    hb2 = codec.to_map(heartbeat(version=2))  # a correctly signed version-2 heartbeat
    entries = entries_of(hb_map)
    seq_key = p("seq")
    agg_args: dict[str, Any] = {"community_id": COMMUNITY, "round_id": "r-0001", "round_number": 1,
                                "coordinator_node_id": A.node_id, "term": 1, "merged_sha256": SHA_MERGED,
                                "merged_size": 602_112, "aggregation": "fedavg", "announced_at": NOW - 1.0,
                                "version": 1, "type": "aggregate_announce", "sig": b""}
    one = {"node_id": B.node_id, "delta_sha256": SHA_DELTA_B, "num_samples": 512}
    ext0, ext1, ts32 = b"\xc7\x00\x05", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00"
    return [
        # step 3: values that are not v1 msgpack
        ("malformed-ext-zero-length", with_raw(hb, "coordinator_node_id", ext0), "reject", "malformed",
         "heartbeat-minimal with coordinator_node_id an ext 8 of type 5 and length 0 (c7 00 05)."),
        ("malformed-ext-fixext1", with_raw(hb, "coordinator_node_id", ext1), "reject", "malformed",
         "heartbeat-minimal with coordinator_node_id a fixext 1 (d4 01 00)."),
        ("malformed-ext-timestamp", with_raw(hb, "sent_at", ts32), "reject", "malformed",
         "heartbeat-minimal with sent_at the msgpack timestamp extension (type -1, 32-bit) instead of float64."),
        ("malformed-invalid-utf8", with_raw(hb, "community_id", b"\xa2\xff\xfe"), "reject", "malformed",
         "heartbeat-minimal with community_id a str whose bytes ff fe are not UTF-8."),
        ("malformed-invalid-utf8-key", pack_map([(b"\xa3se\xff" if k == seq_key else k, v) for k, v in entries]),
         "reject", "malformed", "heartbeat-minimal with the key 'seq' spelled as a str holding invalid UTF-8."),
        ("malformed-bin-key", pack_map([(b"\xc4\x03seq" if k == seq_key else k, v) for k, v in entries]), "reject",
         "malformed", "heartbeat-minimal with the key 'seq' sent as bin (c4 03 'seq') instead of str."),
        ("malformed-int-key", pack_map([*entries, (p(1), p(1))]), "reject", "malformed",
         "heartbeat-minimal with an extra entry whose key is the integer 1."),
        ("malformed-nil-value", with_raw(hb, "coordinator_node_id", b"\xc0"), "reject", "malformed",
         "heartbeat-minimal with coordinator_node_id nil instead of the empty str."),
        ("malformed-nested-too-deep", with_raw(hb, "open_round_id", nested(2000)), "reject", "malformed",
         "heartbeat-minimal with open_round_id 2000 nested containers (past any parser's stack)."),
        # step 3 comes before step 6: a version-2 message must still be v1 msgpack to be IGNOREd
        ("malformed-bin-key-version-2",
         pack_map([(b"\xc4\x03seq" if k == seq_key else k, v) for k, v in entries_of(hb2)]), "reject", "malformed",
         "A version-2 heartbeat with a bin key: REJECT malformed (step 3), not IGNORE unsupported_version."),
        ("malformed-ext-version-2", pack_map([*entries_of(hb2)[:-1], (p("x"), ext0), entries_of(hb2)[-1]]),
         "reject", "malformed",
         "A version-2 heartbeat with an extra key 'x' holding a zero-length ext: REJECT malformed (step 3)."),
        ("malformed-too-deep-version-2",
         pack_map([*entries_of(hb2)[:-1], (p("x"), nested(codec.MAX_NESTING_DEPTH)), entries_of(hb2)[-1]]),
         "reject", "malformed", f"A version-2 heartbeat with an extra key 'x' holding {codec.MAX_NESTING_DEPTH} "
         f"nested containers: depth {codec.MAX_NESTING_DEPTH + 1} > MAX_NESTING_DEPTH, REJECT malformed."),
        ("unsupported-version-deepest-nesting",
         pack_map([*entries_of(hb2)[:-1], (p("x"), nested(codec.MAX_NESTING_DEPTH - 1)), entries_of(hb2)[-1]]),
         "ignore", "unsupported_version", f"As above with {codec.MAX_NESTING_DEPTH - 1} nested containers: depth "
         f"exactly MAX_NESTING_DEPTH is v1 msgpack, so the version-2 message is IGNOREd."),
        # step 9: float specials
        ("malformed-nan", with_raw(sub, "train_loss", p(float("nan"))), "reject", "malformed",
         "submission-announce with train_loss NaN (cb 7ff8000000000000)."),
        ("malformed-infinity", with_raw(sub, "train_loss", p(float("inf"))), "reject", "malformed",
         "submission-announce with train_loss +inf."),
        ("malformed-negative-infinity-timestamp", with_raw(hb, "sent_at", p(float("-inf"))), "reject", "malformed",
         "heartbeat-minimal with sent_at -inf."),
        ("malformed-negative-zero", with_raw(sub, "train_loss", p(-0.0)), "reject", "malformed",
         "submission-announce with train_loss -0.0 (cb 8000000000000000): float fields are never negative zero."),
        ("malformed-deadline-negative-zero", with_raw(man, "deadline", p(-0.0)), "reject", "malformed",
         "round-manifest-original-defaults with deadline -0.0: malformed like any float, not read as 'no deadline'."),
        # deadline 0: the local spelling of "the default", never on the wire
        ("non-canonical-deadline-zero", sorted_packed(resign({**man_map, "deadline": 0.0}, "coordinator_sig", A)),
         "reject", "non_canonical", "RoundManifest with deadline 0.0 (signed as sent): read as created_at + "
         "round_timeout_seconds, whose encoding differs."),
        ("non-canonical-deadline-int-zero", sorted_packed(resign({**man_map, "deadline": 0}, "coordinator_sig", A)),
         "reject", "non_canonical", "RoundManifest with deadline the integer 0 (signed as sent)."),
        # contributions
        ("malformed-duplicate-contribution",
         sorted_packed(resign({**agg_args, "contributions": [one, one]}, "sig", A)), "reject", "malformed",
         "AggregateAnnounce naming bob's contribution twice (signed)."),
        ("malformed-empty-contributions", sorted_packed(resign({**agg_args, "contributions": []}, "sig", A)),
         "reject", "malformed", "AggregateAnnounce with no contributions (signed)."),
        ("malformed-contribution-extra-key",
         sorted_packed(resign({**agg_args, "contributions": [{**one, "weight": 1}]}, "sig", A)), "reject",
         "malformed", "AggregateAnnounce whose contribution map has a fourth key (signed)."),
        # signature length is part of the sig type (step 9); empty fails at step 13
        ("malformed-signature-63-bytes", with_raw(hb, "sig", b"\xc4\x3f" + hb.sig[:63]), "reject", "malformed",
         "heartbeat-minimal with its signature cut to 63 bytes: a sig is 64 bytes (or empty)."),
        ("malformed-signature-65-bytes", with_raw(hb, "sig", b"\xc4\x41" + hb.sig + b"\x00"), "reject",
         "malformed", "heartbeat-minimal with a zero byte appended to its signature (65 bytes)."),
        # step 13: signer and Ed25519 strictness
        ("bad-signature-undecodable-signer",
         sorted_packed(resign({**hb_map, "node_id": SHA256_MULTIHASH_PEER_ID}, "sig", A)), "reject", "bad_signature",
         "A heartbeat whose node_id has the peer_id shape but is a sha256 multihash (Qm...), no key inside; "
         "signed with alice's key."),
        ("bad-signature-s-not-below-l", with_s_plus_l(hb), "reject", "bad_signature",
         "heartbeat-minimal with S replaced by S + L: equal mod L, so only the S < L rule refuses it."),
        ("bad-signature-small-order-key",
         sorted_packed(forged_under_small_order_key(hb_map, "node_id", "sig", IDENTITY_POINT)), "reject",
         "bad_signature", "A heartbeat 'signed' under the neutral element as public key (R = [s]B, S = s): passes "
         "the cofactorless equation for any message; only the small-order-key rule refuses it."),
        ("bad-signature-non-canonical-key",
         sorted_packed(forged_under_small_order_key(hb_map, "node_id", "sig", IDENTITY_POINT_NON_CANONICAL)),
         "reject", "bad_signature", "As above with the key encoded y = 1 + p (non-canonical): a verifier that "
         "reduces y mod p sees the neutral element; the rule refuses non-canonical keys."),
        ("bad-signature-small-order-r", sorted_packed(with_small_order_r(hb_map, "sig", A)), "reject",
         "bad_signature", "heartbeat-minimal signed by alice with R the neutral element and S = k*a: passes the "
         "cofactorless equation; only the small-order-R rule refuses it."),
    ]


def replay_file() -> dict[str, Any]:
    policy = ValidationPolicy(COMMUNITY)
    first = heartbeat(C, seq=1, sent_at=NOW - 20.0)
    vectors = [
        accept("fresh", first, "carol's heartbeat, 20 s old."),
        refuse("duplicate", codec.encode(first), "ignore", "duplicate",
               "The same bytes again (same message id): IGNORE, never a second delivery."),
        accept("oldest-accepted", heartbeat(C, seq=2, sent_at=NOW - policy.replay_window_seconds),
               "Exactly replay_window_seconds old: still accepted (age > window is stale)."),
        refuse("stale", codec.encode(heartbeat(C, seq=3, sent_at=NOW - policy.replay_window_seconds - 1.0)),
               "ignore", "stale", "replay_window_seconds + 1 s old."),
        accept("furthest-future-accepted", heartbeat(C, seq=4, sent_at=NOW + policy.max_clock_skew_seconds),
               "Exactly max_clock_skew_seconds ahead: still accepted."),
        refuse("future", codec.encode(heartbeat(C, seq=5, sent_at=NOW + policy.max_clock_skew_seconds + 1.0)),
               "ignore", "future", "max_clock_skew_seconds + 1 s ahead."),
        accept("stale-message-fresh-clock", heartbeat(C, seq=3, sent_at=NOW - policy.replay_window_seconds - 1.0),
               "The stale vector again, validated at a `now` 1 s earlier: accepted (stale messages are not "
               "remembered, so a later delivery within the window is not a duplicate).", now=NOW - 1.0),
    ]
    return {"policy": policy, "vectors": vectors,
            "description": "Replay protection: duplicate message ids and the timestamp window, in order."}


def allowlist_file() -> dict[str, Any]:
    policy = ValidationPolicy(COMMUNITY, allowlist=frozenset({A.node_id, B.node_id}))
    vectors = [
        accept("member", heartbeat(A), "alice is on the allowlist."),
        refuse("not-member", codec.encode(heartbeat(M)), "reject", "not_member",
               "mallory's correctly signed heartbeat; mallory is not on the allowlist."),
        refuse("not-member-before-signature", codec.encode(dataclasses.replace(heartbeat(M), sig=b"\x00" * 64)),
               "reject", "not_member", "Membership is checked before the (costlier) signature."),
    ]
    return {"policy": policy, "vectors": vectors,
            "description": "A community with an allowlist: only listed node ids may sign messages."}


def oversize_file() -> dict[str, Any]:
    policy = ValidationPolicy(COMMUNITY)
    signers = [Identity.from_seed(b"\xff" + i.to_bytes(2, "big") + bytes(29)) for i in range(420)]
    contributions = tuple(Contribution(s.node_id, f"{i:064x}", 100 + i) for i, s in enumerate(signers))
    big = codec.sign(AggregateAnnounce(community_id=COMMUNITY, round_id="r-0009", round_number=9,
                                       coordinator_node_id=A.node_id, term=1, merged_sha256=SHA_MERGED,
                                       merged_size=602_112, aggregation="fedavg", contributions=contributions,
                                       announced_at=NOW - 1.0), A)
    data = codec.encode(big)
    assert len(data) > policy.max_message_bytes
    vectors = [refuse("oversize-aggregate", data, "reject", "oversize",
                      f"A correctly signed AggregateAnnounce with {len(contributions)} contributions, {len(data)} "
                      f"bytes > max_message_bytes {policy.max_message_bytes}; refused before decoding.")]
    return {"policy": policy, "vectors": vectors,
            "description": "A message over max_message_bytes (kept apart: its hex is large)."}


FILES = {"valid.json": valid_file, "invalid.json": invalid_file, "replay.json": replay_file,
         "allowlist.json": allowlist_file, "oversize.json": oversize_file}


def render(build: Any) -> str:
    spec = build()
    doc = {
        "description": spec["description"],
        "spec": "protocols/envelope-v1.md, protocols/round-v1.md",
        "generator": "scripts/gen_vectors.py",
        "how_to_check": "Build one validator with `policy`; for each vector in order, validate bytes.fromhex(hex) at "
                        "time `now` (the vector's own `now` if it has one) and compare verdict and reason. ACCEPT "
                        "vectors must also re-encode to the identical bytes; `signed_bytes_hex` is the exact byte "
                        "string their signature covers, `message_id` = sha256(bytes). In `fields`, bin values "
                        "are shown as hex.",
        "signing_domain_hex": codec.SIGNING_DOMAIN.hex(),
        "keys": key_table(),
        "policy": policy_json(spec["policy"]),
        "now": NOW,
        "vectors": spec["vectors"],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    return generator_main(argv, doc=__doc__, generator="scripts/gen_vectors.py", vector_dir=VECTOR_DIR,
                          renders={name: functools.partial(render, build) for name, build in FILES.items()})

if __name__ == "__main__":
    sys.exit(main())
