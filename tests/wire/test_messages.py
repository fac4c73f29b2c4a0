"""Message constructors refuse every out-of-range field with InvalidMessage naming it; messages
round-trip through the codec; signing and verification."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from fednode.errors import FednodeError, InvalidMessage
from fednode.identity import Identity
from fednode.wire import (
    AggregateAnnounce,
    Contribution,
    CoordinatorClaim,
    Heartbeat,
    Message,
    RoundFailed,
    RoundManifest,
    SubmissionAnnounce,
    codec,
)
from fednode.wire.fields import omitted_when_default

ALICE = Identity.from_seed(b"\x01" * 32)
BOB = Identity.from_seed(b"\x02" * 32)
T = 1_767_225_600.0
SHA = "ab" * 32


def make(cls: type[Message], **kw: Any) -> Message:
    base: dict[type[Message], dict[str, Any]] = {
        Heartbeat: {"community_id": "c1", "node_id": ALICE.node_id, "term": 1, "seq": 0, "sent_at": T},
        CoordinatorClaim: {"community_id": "c1", "node_id": ALICE.node_id, "term": 1, "claimed_at": T},
        RoundManifest: {"round_id": "r1", "base_model_id": "m", "coordinator_node_id": ALICE.node_id,
                        "community_id": "c1", "created_at": T},
        SubmissionAnnounce: {"round_id": "r1", "participant_node_id": ALICE.node_id, "num_samples": 10,
                             "submitted_at": T, "community_id": "c1", "delta_sha256": SHA, "delta_size": 100},
        AggregateAnnounce: {"community_id": "c1", "round_id": "r1", "round_number": 1,
                            "coordinator_node_id": ALICE.node_id, "term": 1, "merged_sha256": SHA,
                            "merged_size": 100, "aggregation": "fedavg", "announced_at": T,
                            "contributions": (Contribution(BOB.node_id, SHA, 5),)},
        RoundFailed: {"community_id": "c1", "round_id": "r1", "round_number": 1,
                      "coordinator_node_id": ALICE.node_id, "term": 1, "reason": "timeout", "failed_at": T},
    }
    return cls(**(base[cls] | kw))


ALL_TYPES: list[type[Message]] = [
    Heartbeat, CoordinatorClaim, RoundManifest, SubmissionAnnounce, AggregateAnnounce, RoundFailed,
]
NON_FINITE = [math.nan, math.inf, -math.inf]

# (class, field, bad value, field named in the error)
BAD_FIELDS: list[tuple[type[Message], str, Any, str]] = [
    (RoundManifest, "min_participants", 21, "min_participants"),  # > max_participants 20
    (RoundManifest, "min_participants", 0, "min_participants"),
    (RoundManifest, "max_participants", 10_001, "max_participants"),
    (RoundManifest, "lora_rank", 0, "lora_rank"),
    (RoundManifest, "lora_rank", -1, "lora_rank"),
    (RoundManifest, "lora_rank", 1025, "lora_rank"),
    (RoundManifest, "lora_rank", 16.0, "lora_rank"),
    (RoundManifest, "lora_rank", True, "lora_rank"),
    (RoundManifest, "lora_alpha", 0.0, "lora_alpha"),
    (RoundManifest, "learning_rate", 0.0, "learning_rate"),
    (RoundManifest, "learning_rate", 11.0, "learning_rate"),
    (RoundManifest, "learning_rate", "2e-4", "learning_rate"),
    (RoundManifest, "round_timeout_seconds", 0.0, "round_timeout_seconds"),
    (RoundManifest, "round_timeout_seconds", 8 * 24 * 3600.0, "round_timeout_seconds"),
    (RoundManifest, "round_id", "", "round_id"),
    (RoundManifest, "round_id", "-starts-with-dash", "round_id"),
    (RoundManifest, "round_id", "has space", "round_id"),
    (RoundManifest, "round_id", "x" * 65, "round_id"),
    (RoundManifest, "base_model_id", "", "base_model_id"),
    (RoundManifest, "base_model_id", "m" * 257, "base_model_id"),
    (RoundManifest, "base_model_id", "\ud800", "base_model_id"),
    (RoundManifest, "community_id", "c/1", "community_id"),
    (RoundManifest, "coordinator_node_id", "not-a-peer-id", "coordinator_node_id"),
    (RoundManifest, "coordinator_node_id", "", "coordinator_node_id"),
    (RoundManifest, "base_model_hash", "AB" * 32, "base_model_hash"),
    (RoundManifest, "base_model_hash", "ab" * 31, "base_model_hash"),
    (RoundManifest, "start_adapter_sha256", SHA, "start_adapter_size"),  # hash without a size
    (RoundManifest, "start_adapter_size", 10, "start_adapter_size"),  # size without a hash
    (RoundManifest, "local_steps", 0, "local_steps"),
    (RoundManifest, "aggregation", "mean", "aggregation"),
    (RoundManifest, "deadline", T + 3601.0, "deadline"),
    (RoundManifest, "deadline", T - 1.0, "deadline"),
    (RoundManifest, "round_number", 0, "round_number"),
    (RoundManifest, "term", -1, "term"),
    (RoundManifest, "created_at", -1.0, "created_at"),
    (RoundManifest, "created_at", 5e9, "created_at"),
    (RoundManifest, "coordinator_sig", b"x" * 63, "coordinator_sig"),
    (RoundManifest, "coordinator_sig", "00" * 64, "coordinator_sig"),
    (RoundManifest, "version", -1, "version"),
    (SubmissionAnnounce, "num_samples", -5, "num_samples"),
    (SubmissionAnnounce, "num_samples", 0, "num_samples"),
    (SubmissionAnnounce, "num_samples", 2**40 + 1, "num_samples"),
    (SubmissionAnnounce, "delta_sha256", "", "delta_sha256"),
    (SubmissionAnnounce, "delta_sha256", "g" * 64, "delta_sha256"),
    (SubmissionAnnounce, "delta_size", 0, "delta_size"),
    (SubmissionAnnounce, "train_loss", -0.5, "train_loss"),
    (SubmissionAnnounce, "train_loss", -0.0, "train_loss"),
    (SubmissionAnnounce, "submitted_at", -0.0, "submitted_at"),
    (SubmissionAnnounce, "participant_node_id", "0OIl" * 13, "participant_node_id"),
    (Heartbeat, "seq", -1, "seq"),
    (Heartbeat, "federated_learning", 1, "federated_learning"),
    (Heartbeat, "coordinator_node_id", "bad id", "coordinator_node_id"),
    (Heartbeat, "latest_merged_sha256", "zz", "latest_merged_sha256"),
    (Heartbeat, "open_round_id", 0, "open_round_id"),
    (Heartbeat, "open_round_id", "bad id", "open_round_id"),
    (CoordinatorClaim, "term", 0, "term"),
    (CoordinatorClaim, "last_round_number", -1, "last_round_number"),
    (AggregateAnnounce, "contributions", (), "contributions"),
    (AggregateAnnounce, "contributions", [Contribution(BOB.node_id, SHA, 5)], "contributions"),
    (AggregateAnnounce, "contributions", (Contribution(BOB.node_id, SHA, 0),), "contributions[0].num_samples"),
    (AggregateAnnounce, "contributions", (Contribution("bad", SHA, 1),), "contributions[0].node_id"),
    (AggregateAnnounce, "contributions", (Contribution(BOB.node_id, "x", 1),), "contributions[0].delta_sha256"),
    (AggregateAnnounce, "contributions", (Contribution(BOB.node_id, SHA, 1),) * 2, "contributions[1]"),
    (AggregateAnnounce, "contributions", ("nope",), "contributions[0]"),
    (AggregateAnnounce, "merged_size", 0, "merged_size"),
    (AggregateAnnounce, "aggregation", "FedAvg", "aggregation"),
    (RoundFailed, "reason", "", "reason"),
    (RoundFailed, "reason", "r" * 201, "reason"),
]
BAD_FIELDS += [(RoundManifest, name, v, name) for name in ("lora_alpha", "learning_rate", "round_timeout_seconds",
                                                          "created_at", "deadline") for v in NON_FINITE]
BAD_FIELDS += [(SubmissionAnnounce, name, v, name) for name in ("train_loss", "submitted_at") for v in NON_FINITE]
BAD_FIELDS += [(cls, cls.TIME_FIELD, math.nan, cls.TIME_FIELD) for cls in ALL_TYPES]


@pytest.mark.parametrize(("cls", "name", "value", "named"), BAD_FIELDS,
                         ids=[f"{c.__name__}.{n}={v!r:.20}" for c, n, v, _ in BAD_FIELDS])
def test_constructor_rejects_bad_field_naming_it(cls: type[Message], name: str, value: Any, named: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        make(cls, **{name: value})
    assert info.value.field == named
    assert named in str(info.value)
    assert isinstance(info.value, FednodeError) and isinstance(info.value, ValueError)


def test_manifest_keeps_the_original_fields_and_defaults() -> None:
    m = make(RoundManifest)
    assert isinstance(m, RoundManifest)
    assert (m.lora_rank, m.lora_alpha, m.learning_rate) == (16, 32.0, 2e-4)
    assert (m.min_participants, m.max_participants, m.round_timeout_seconds) == (2, 20, 3600.0)
    assert m.coordinator_sig == b""
    assert m.deadline == m.created_at + m.round_timeout_seconds  # 0 means "created_at + timeout"
    assert m.aggregation == "fedavg" and m.version == 1


def test_int_for_float_is_coerced_locally_but_encoded_as_float64() -> None:
    m = make(RoundManifest, lora_alpha=32, round_timeout_seconds=60)
    assert isinstance(m, RoundManifest)
    assert isinstance(m.lora_alpha, float) and isinstance(m.round_timeout_seconds, float)
    data = codec.encode(m)
    assert codec.decode(data) == m
    assert b"\xaalora_alpha\xcb@@\x00\x00\x00\x00\x00\x00" in data


def test_messages_are_frozen() -> None:
    m = make(Heartbeat)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.seq = 5  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_round_trip_sign_verify(cls: type[Message]) -> None:
    unsigned = make(cls)
    assert not codec.verify(unsigned)
    signed = codec.sign(unsigned, ALICE)
    assert len(signed.signature) == 64
    data = codec.encode(signed)
    decoded = codec.decode(data)
    assert decoded == signed
    assert codec.encode(decoded) == data
    assert codec.verify(decoded)
    assert codec.signing_bytes(signed) == codec.signing_bytes(unsigned)  # the signature is not signed
    assert codec.signing_bytes(signed).startswith(codec.SIGNING_DOMAIN)
    # any field change invalidates the signature
    tampered = dataclasses.replace(signed, **{signed.TIME_FIELD: signed.timestamp + 1.0})  # type: ignore[type-var]
    assert not codec.verify(tampered)
    # a signature by someone else, pasted on, does not verify
    forged = dataclasses.replace(signed, **{signed.SIG_FIELD: BOB.sign(codec.signing_bytes(signed))})  # type: ignore[type-var]
    assert not codec.verify(forged)


def test_sign_refuses_an_identity_that_is_not_the_author() -> None:
    with pytest.raises(InvalidMessage) as info:
        codec.sign(make(Heartbeat), BOB)
    assert info.value.field == "node_id"


def test_message_id_is_sha256_of_the_encoding() -> None:
    import hashlib

    data = codec.encode(codec.sign(make(Heartbeat), ALICE))
    assert codec.message_id(data) == hashlib.sha256(data).hexdigest()


def test_encoding_keys_are_sorted_and_include_type() -> None:
    import msgpack

    for cls in ALL_TYPES:
        raw = msgpack.unpackb(codec.encode(make(cls)))
        assert raw["type"] == cls.TYPE
        keys = list(raw)
        assert keys == sorted(keys, key=lambda k: k.encode("utf-8"))
        absent = set(omitted_when_default(cls))  # at their default these keys are left out (envelope-v1 rule 1)
        assert set(keys) == {f.name for f in dataclasses.fields(cls)} - absent | {"type"}  # type: ignore[arg-type]
    assert "paused" in msgpack.unpackb(codec.encode(make(Heartbeat, paused=True)))


def test_decode_limit_is_a_typed_error() -> None:
    from fednode.errors import LimitExceeded

    data = codec.encode(codec.sign(make(Heartbeat), ALICE))
    with pytest.raises(LimitExceeded):
        codec.decode(data, max_bytes=len(data) - 1)
    assert codec.decode(data, max_bytes=len(data)).signer == ALICE.node_id
