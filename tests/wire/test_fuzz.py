"""Fuzzing decode + validate: 10,500 random, structured-random and mutated byte strings.

Only the package's typed errors (FednodeError) may come out of decode, only verdicts out of the
validator, and nothing but an unmodified valid message is ever ACCEPTed or verifies.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fednode.errors import FednodeError
from fednode.wire import MESSAGE_TYPES, codec
from fednode.wire.messages import Contribution
from fednode.wire.validate import MessageValidator, ValidationPolicy
from fednode.wire.verdict import Verdict

VALID = json.loads((Path(__file__).resolve().parents[2] / "protocols" / "vectors" / "valid.json").read_text("utf-8"))
ORIGINALS = [bytes.fromhex(v["hex"]) for v in VALID["vectors"]]
ORIGINAL_SET = frozenset(ORIGINALS)
NOW = float(VALID["now"])
POLICY = ValidationPolicy(VALID["policy"]["community_id"])
FIELD_NAMES = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
                     | {f.name for f in dataclasses.fields(Contribution)} | {"type"})
_FUZZ: dict[str, Any] = {"deadline": None, "database": None,
                         "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def check_outcome(data: bytes) -> None:
    """The properties every input must satisfy."""
    try:
        message = codec.decode(data)
    except FednodeError:
        message = None
    if message is not None:
        assert codec.encode(message) == data  # whatever decodes is canonical
        if data not in ORIGINAL_SET:
            assert not codec.verify(message), f"a modified message verifies: {data.hex()}"
    checked = MessageValidator(POLICY).check(data, NOW)
    assert checked.validation.verdict in (Verdict.ACCEPT, Verdict.REJECT, Verdict.IGNORE)
    if checked.validation.accepted:
        assert data in ORIGINAL_SET, f"ACCEPTed a modified message: {data.hex()}"
    else:
        assert checked.message is None and checked.validation.reason


@settings(max_examples=4_000, **_FUZZ)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    check_outcome(data)


_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=70) | st.binary(max_size=70)
            | st.sampled_from([*MESSAGE_TYPES, "fedavg", "exact", POLICY.community_id, 1, 1.0, "", "ab" * 32]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), inner, max_size=4),
                       max_leaves=6)


@settings(max_examples=1_500, **_FUZZ)
@given(st.sampled_from(ORIGINALS), st.dictionaries(st.sampled_from(FIELD_NAMES), _values, max_size=6),
       st.lists(st.sampled_from(FIELD_NAMES), max_size=3))
def test_structured_messages(original: bytes, replace: dict[str, Any], drop: list[str]) -> None:
    """Real messages with fields replaced by random msgpack values (of any type) or removed."""
    raw = msgpack.unpackb(original)
    raw.update(replace)
    for name in drop:
        raw.pop(name, None)
    for ordered in (codec._sorted_map(raw), raw):
        try:
            data = msgpack.packb(ordered, use_bin_type=True)
        except (OverflowError, ValueError, TypeError, UnicodeEncodeError):
            return
        check_outcome(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(ORIGINALS)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "splice", "overwrite", "insert", "delete"]))
        n = len(data)
        if n == 0:
            break
        i = draw(st.integers(0, n - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[i:]
        elif kind == "splice":
            other = draw(st.sampled_from(ORIGINALS))
            data = data[:i] + other[draw(st.integers(0, len(other) - 1)):]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[i:i + len(chunk)] = chunk
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=5_000, **_FUZZ)
@given(mutated())
def test_mutated_signed_messages(data: bytes) -> None:
    check_outcome(data)


def test_every_original_is_accepted_and_verifies() -> None:
    for data in ORIGINALS:
        assert MessageValidator(POLICY).check(data, NOW).validation.accepted
        assert codec.verify(codec.decode(data))


def test_every_single_bit_flip_of_a_signed_message_is_refused() -> None:
    """Exhaustive, not sampled: all 8 * len bit flips of one message."""
    original = ORIGINALS[0]
    validator = MessageValidator(POLICY)
    for i in range(len(original) * 8):
        data = bytearray(original)
        data[i // 8] ^= 1 << (i % 8)
        assert not validator.check(bytes(data), NOW).validation.accepted, i
