"""Shared fixtures for consensus tests: fixed identities, manifests and announcements."""

from __future__ import annotations

import hashlib

from fednode.identity import Identity
from fednode.wire import RoundManifest, SubmissionAnnounce, codec

EPOCH = 1_700_000_000.0  # wall-clock origin that virtual clocks are mapped onto
COMMUNITY = "test-community"


def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(f"consensus-test-{i}".encode()).digest())


def manifest(coordinator: Identity, *, created_at: float = EPOCH, **kwargs: object) -> RoundManifest:
    fields: dict[str, object] = {"round_id": "round-1", "base_model_id": "tiny", "community_id": COMMUNITY}
    fields.update(kwargs)
    m = RoundManifest(coordinator_node_id=coordinator.node_id, created_at=created_at, **fields)  # type: ignore[arg-type]
    return codec.sign(m, coordinator)


def announce(who: Identity, *, round_id: str = "round-1", num_samples: int = 10, at: float = EPOCH,
             payload: bytes | None = None) -> SubmissionAnnounce:
    """`who`'s submission; by default of a delta of its own (distinct participants, distinct deltas)."""
    if payload is None:
        payload = b"delta of " + who.node_id.encode()
    a = SubmissionAnnounce(round_id=round_id, participant_node_id=who.node_id, num_samples=num_samples,
                           submitted_at=at, community_id=COMMUNITY, delta_sha256=hashlib.sha256(payload).hexdigest(),
                           delta_size=len(payload))
    return codec.sign(a, who)
