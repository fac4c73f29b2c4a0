"""The original design's API, used as its docstrings describe, with real safetensors LoRA deltas."""

from __future__ import annotations

import hashlib

import safetensors.torch
import torch

import fednode
from fednode import FedLearnCoordinator, ParticipantSubmission, RoundID, RoundManifest
from fednode.identity import Identity
from fednode.wire import AggregateAnnounce, RoundFailed, codec

from .helpers import identity

KEYS = ("base_model.model.layer.0.q_proj.lora_A.weight", "base_model.model.layer.0.q_proj.lora_B.weight")


def lora_delta(seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """LoRA factors with values on a 1/1024 grid: every weighted sum below is exact in float32 as
    well as float64, so the only rounding is the final division, and any correct FedAvg
    implementation (whatever its accumulation order or precision) must produce identical bytes."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, 8, generator=g), torch.randn(6, rank, generator=g)
    return {KEYS[0]: torch.round(a * 1024) / 1024, KEYS[1]: torch.round(b * 1024) / 1024}


def as_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors)


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, data: bytes) -> None:
        self.published.append((topic, data))


def test_original_api_fedavg_by_num_samples_equals_a_hand_computed_average() -> None:
    coordinator = FedLearnCoordinator()
    manifest = coordinator.create_round("tiny-model", "demo-community", lora_rank=4)
    assert isinstance(manifest, RoundManifest) and codec.verify(manifest)
    assert manifest.coordinator_node_id == coordinator.node_id and manifest.min_participants == 2
    alice, bob = Identity.generate(), Identity.generate()
    d_alice, d_bob = lora_delta(1), lora_delta(2)
    assert coordinator.submit(ParticipantSubmission(
        round_id=RoundID(manifest.round_id), participant_node_id=alice.node_id, num_samples=30,
        submitted_at=manifest.created_at + 1, participant_sig=b"", delta_bytes=as_bytes(d_alice))) is True
    status = coordinator.round_status(manifest.round_id)
    assert (status["participants"], status["min_required"], status["ready_to_aggregate"]) == (1, 2, False)
    assert coordinator.aggregate(manifest.round_id) is None  # below min_participants
    signed = ParticipantSubmission(RoundID(manifest.round_id), bob.node_id, 10,
                                   delta_bytes=as_bytes(d_bob)).signed(bob, manifest.community_id)
    assert coordinator.submit(signed) is True
    status = coordinator.round_status(manifest.round_id)
    assert status["round_id"] == manifest.round_id and status["base_model_id"] == "tiny-model"
    assert (status["participants"], status["ready_to_aggregate"]) == (2, True)

    merged = coordinator.aggregate(manifest.round_id)
    assert isinstance(merged, bytes)
    expected = {k: ((30 * d_alice[k].double() + 10 * d_bob[k].double()) / 40).float() for k in KEYS}
    got = safetensors.torch.load(merged)
    assert set(got) == set(KEYS)
    for k in KEYS:
        assert torch.equal(got[k], expected[k]), k
        assert not torch.equal(got[k], ((d_alice[k] + d_bob[k]) / 2))  # really weighted
    assert merged == safetensors.torch.save({k: expected[k].contiguous() for k in sorted(expected)})
    assert coordinator.aggregate(manifest.round_id) == merged  # idempotent
    assert coordinator.round_status(manifest.round_id)["merged_sha256"] == hashlib.sha256(merged).hexdigest()


def test_public_names_are_exported_lazily() -> None:
    assert fednode.FedLearnCoordinator is FedLearnCoordinator
    assert {"FedLearnCoordinator", "ParticipantSubmission", "RoundManifest", "RoundID"} <= set(dir(fednode))


def test_keypair_and_bus_publish_signed_manifest_and_aggregate() -> None:
    me, bus, clock = identity(0), RecordingBus(), Clock()
    coordinator = FedLearnCoordinator(keypair=me, bus=bus, clock=clock)
    m = coordinator.create_round("tiny", "demo", min_participants=1, max_participants=2, aggregation="exact",
                                 lora_rank=4)
    p1, p2 = identity(1), identity(2)
    assert coordinator.submit(ParticipantSubmission(RoundID(m.round_id), p1.node_id, 5,
                                                    delta_bytes=as_bytes(lora_delta(3))))
    # the second accepted submission fills the round: it is merged at once, with the manifest's rule
    assert coordinator.submit(ParticipantSubmission(RoundID(m.round_id), p2.node_id, 5,
                                                    delta_bytes=as_bytes(lora_delta(4))))
    assert coordinator.round_status(m.round_id)["state"] == "published"
    topics = {t for t, _ in bus.published}
    messages = [codec.decode(data) for _, data in bus.published]
    assert topics == {"fednode/demo/1"} and all(codec.verify(x) for x in messages)
    assert [type(x).__name__ for x in messages] == ["RoundManifest", "AggregateAnnounce"]
    agg = messages[1]
    assert isinstance(agg, AggregateAnnounce) and agg.aggregation == "exact"
    assert agg.merged_sha256 == hashlib.sha256(coordinator.aggregate(m.round_id) or b"").hexdigest()


def test_duplicate_late_over_max_unknown_and_invalid_submissions() -> None:
    clock = Clock()
    coordinator = FedLearnCoordinator(clock=clock)
    m = coordinator.create_round("tiny", "demo", min_participants=2, max_participants=2,
                                 round_timeout_seconds=60.0)
    rid = RoundID(m.round_id)
    ids = [identity(i) for i in range(1, 6)]
    first = ParticipantSubmission(rid, ids[0].node_id, 7, delta_bytes=as_bytes(lora_delta(1)))
    assert coordinator.submit(first) is True
    assert coordinator.submit(first) is True  # idempotent
    assert coordinator.round_status(m.round_id)["participants"] == 1  # counted once
    assert coordinator.submit(ParticipantSubmission(RoundID("no-such-round"), ids[1].node_id, 7,
                                                    delta_bytes=as_bytes(lora_delta(1)))) is False
    bad_sig = ParticipantSubmission(rid, ids[1].node_id, 7, participant_sig=b"\x01" * 64,
                                    delta_bytes=as_bytes(lora_delta(2)))
    wrong_shape = ParticipantSubmission(rid, ids[1].node_id, 7, delta_bytes=as_bytes(lora_delta(2, rank=3)))
    not_safetensors = ParticipantSubmission(rid, ids[1].node_id, 7, delta_bytes=b"\x00" * 100)
    not_a_peer_id = ParticipantSubmission(rid, "alice", 7, delta_bytes=as_bytes(lora_delta(2)))
    for refused in (bad_sig, wrong_shape, not_safetensors, not_a_peer_id):
        assert coordinator.submit(refused) is False
    assert coordinator.submit(ParticipantSubmission(rid, ids[1].node_id, 3, delta_bytes=as_bytes(lora_delta(2))))
    over = ParticipantSubmission(rid, ids[2].node_id, 7, delta_bytes=as_bytes(lora_delta(3)))
    assert coordinator.submit(over) is False  # over max_participants
    clock.now += 61.0
    late = ParticipantSubmission(rid, ids[3].node_id, 7, delta_bytes=as_bytes(lora_delta(4)))
    assert coordinator.submit(late) is False
    status = coordinator.round_status(m.round_id)
    assert status["participants"] == 2
    reasons = [r["reason"] for r in status["rejected"]]
    assert reasons == ["bad_signature", "invalid_update", "invalid_update", "malformed", "full", "late"]
    assert coordinator.round_status("nope") == {"error": "not_found"}
    assert coordinator.aggregate("nope") is None


def test_a_round_below_min_fails_at_its_deadline_and_says_so() -> None:
    clock, bus = Clock(), RecordingBus()
    coordinator = FedLearnCoordinator(bus=bus, clock=clock)
    m = coordinator.create_round("tiny", "demo", round_timeout_seconds=30.0)
    assert coordinator.submit(ParticipantSubmission(RoundID(m.round_id), identity(1).node_id, 7,
                                                    delta_bytes=as_bytes(lora_delta(1))))
    clock.now += 30.0
    assert coordinator.aggregate(m.round_id) is None
    status = coordinator.round_status(m.round_id)
    assert status["state"] == "failed" and status["ready_to_aggregate"] is False
    failed = codec.decode(bus.published[-1][1])
    assert isinstance(failed, RoundFailed) and "min_participants=2" in failed.reason


async def test_an_async_bus_is_driven_by_the_caller() -> None:
    delivered: list[str] = []

    class AsyncBus:
        def publish(self, topic: str, data: bytes) -> object:
            async def send() -> None:
                delivered.append(topic)
            return send()

    coordinator = FedLearnCoordinator(bus=AsyncBus())
    coordinator.create_round("tiny", "demo")
    assert delivered == []
    await coordinator.drain_bus()
    assert delivered == ["fednode/demo/1"]
