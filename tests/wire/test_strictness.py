"""The vectors for the edges where two implementations of envelope-v1 could differ (issue 11) exist,
and each refuses what it claims: the Ed25519 ones carry signatures that a lax verifier (S mod L,
y mod p, small-order points allowed, cofactorless) accepts, so only the stated rule refuses them;
the version-2 ones are refused at step 3 although a plain msgpack parser reads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from fednode.identity import public_key_from_peer_id
from fednode.wire import codec
from fednode.wire.validate import MessageValidator, ValidationPolicy

VECTORS = Path(__file__).resolve().parents[2] / "protocols" / "vectors" / "invalid.json"

# ---- a deliberately lax Ed25519 verifier (RFC 8032 arithmetic, none of the strictness rules) ----
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
Point = tuple[int, int, int, int]


def _recover_x(y: int, sign: int) -> int | None:
    xx = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * SQRT_M1 % P
    if (x * x - xx) % P:
        return None
    return P - x if (x & 1) != sign and x else x


def _decode_lax(data: bytes) -> Point | None:
    y = (int.from_bytes(data, "little") & ((1 << 255) - 1)) % P  # reduces a non-canonical y
    x = _recover_x(y, data[31] >> 7)
    return None if x is None else (x, y, 1, x * y % P)


def _add(a: Point, b: Point) -> Point:
    x1, y1, z1, t1 = a
    x2, y2, z2, t2 = b
    aa, bb = (y1 - x1) * (y2 - x2) % P, (y1 + x1) * (y2 + x2) % P
    cc, dd = t1 * 2 * D * t2 % P, z1 * 2 * z2 % P
    e, f, g, h = bb - aa, dd - cc, dd + cc, bb + aa
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _mul(s: int, point: Point) -> Point:
    out: Point = (0, 1, 1, 0)
    while s:
        if s & 1:
            out = _add(out, point)
        point, s = _add(point, point), s >> 1
    return out


def _same(a: Point, b: Point) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % P == 0 and (a[1] * b[2] - b[1] * a[2]) % P == 0


_BY = 4 * pow(5, P - 2, P) % P
BASE: Point = (_recover_x(_BY, 0) or 0, _BY, 1, (_recover_x(_BY, 0) or 0) * _BY % P)


def lax_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    import hashlib

    a, r = _decode_lax(public_key), _decode_lax(signature[:32])
    if a is None or r is None:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little") % L
    s = int.from_bytes(signature[32:], "little")  # not required to be < L
    return _same(_mul(s, BASE), _add(r, _mul(k, a)))


def vectors() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in json.loads(VECTORS.read_text(encoding="utf-8"))["vectors"]}


def test_the_lax_verifier_accepts_real_signatures() -> None:
    vec = json.loads((VECTORS.parent / "valid.json").read_text(encoding="utf-8"))["vectors"][0]
    message = codec.decode(bytes.fromhex(vec["hex"]))
    key = public_key_from_peer_id(message.signer)
    assert lax_verify(key, codec.signing_bytes(message), message.signature)
    assert not lax_verify(key, codec.signing_bytes(message) + b"x", message.signature)


STRICTNESS = ["bad-signature-s-not-below-l", "bad-signature-small-order-key", "bad-signature-non-canonical-key",
              "bad-signature-small-order-r"]


@pytest.mark.parametrize("name", STRICTNESS)
def test_ed25519_vectors_pass_a_lax_verifier_and_fail_the_rule(name: str) -> None:
    import base58

    vec = vectors()[name]
    assert vec["expect"] == {"verdict": "reject", "reason": "bad_signature"}
    message = codec.decode(bytes.fromhex(vec["hex"]))  # well-formed: only the signature is at fault
    key = base58.b58decode(message.signer)[6:]
    assert lax_verify(key, codec.signing_bytes(message), message.signature), "the vector would not test the rule"
    assert not codec.verify(message)


def test_s_plus_l_vector_has_s_at_least_l() -> None:
    message = codec.decode(bytes.fromhex(vectors()["bad-signature-s-not-below-l"]["hex"]))
    assert int.from_bytes(message.signature[32:], "little") >= L


@pytest.mark.parametrize("name", ["malformed-bin-key-version-2", "malformed-ext-version-2",
                                  "malformed-too-deep-version-2"])
def test_version_2_vectors_parse_as_plain_msgpack_yet_are_rejected(name: str) -> None:
    vec = vectors()[name]
    raw = msgpack.unpackb(bytes.fromhex(vec["hex"]), raw=False, strict_map_key=False)
    assert raw["version"] == 2
    checked = MessageValidator(ValidationPolicy("fednode-test")).check(bytes.fromhex(vec["hex"]), 1_767_225_600.0)
    assert (checked.validation.verdict.value, checked.validation.reason) == ("reject", "malformed")


# Every case issue 11 lists as missing, and the vectors that cover it.
REQUIRED = {
    "ext values": ["malformed-ext-zero-length", "malformed-ext-fixext1", "malformed-ext-timestamp",
                   "malformed-ext-version-2"],
    "invalid UTF-8": ["malformed-invalid-utf8", "malformed-invalid-utf8-key"],
    "bin or int keys": ["malformed-bin-key", "malformed-int-key", "malformed-bin-key-version-2"],
    "nil": ["malformed-nil-value"],
    "NaN / inf / -0.0": ["malformed-nan", "malformed-infinity", "malformed-negative-infinity-timestamp",
                         "malformed-negative-zero", "malformed-deadline-negative-zero"],
    "non-empty wrong-length signature": ["malformed-signature-63-bytes", "malformed-signature-65-bytes"],
    "undecodable signer": ["bad-signature-undecodable-signer"],
    "small-order keys": ["bad-signature-small-order-key", "bad-signature-non-canonical-key",
                         "bad-signature-small-order-r"],
    "S >= L": ["bad-signature-s-not-below-l"],
    "duplicate or empty contributions": ["malformed-duplicate-contribution", "malformed-empty-contributions"],
    "deadline 0": ["non-canonical-deadline-zero", "non-canonical-deadline-int-zero"],
    "nesting depth": ["malformed-nested-too-deep", "malformed-too-deep-version-2",
                      "unsupported-version-deepest-nesting"],
}


@pytest.mark.parametrize("case", sorted(REQUIRED))
def test_every_listed_case_has_vectors(case: str) -> None:
    have = vectors()
    missing = [name for name in REQUIRED[case] if name not in have]
    assert not missing, f"{case}: no vector {missing}"


def test_nesting_limit_is_exact() -> None:
    from fednode.errors import DecodeError

    def message_with(depth: int) -> bytes:
        hb = codec.decode(bytes.fromhex(json.loads((VECTORS.parent / "valid.json").read_text())["vectors"][0]["hex"]))
        raw = codec.to_map(hb) | {"version": 2, "x": None}
        packed = codec._pack(codec._sorted_map(raw))
        return packed.replace(b"\xa1x\xc0", b"\xa1x" + b"\x91" * (depth - 2) + b"\x80")

    for depth, reason in ((codec.MAX_NESTING_DEPTH, "unsupported_version"),
                          (codec.MAX_NESTING_DEPTH + 1, "malformed")):
        with pytest.raises(DecodeError) as info:
            codec.decode(message_with(depth))
        assert getattr(info.value, "reason", None) == reason, depth
