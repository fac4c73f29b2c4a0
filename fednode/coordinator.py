"""FedLearnCoordinator: the original design's in-process API, on top of the pure round state
machine (`fednode.consensus.RoundState`) and the aggregation rules (`fednode.aggregation`).

    coordinator = FedLearnCoordinator()                      # fresh key, no bus
    manifest = coordinator.create_round("minilm", "my-community", min_participants=2)
    coordinator.submit(ParticipantSubmission(manifest.round_id, node_id, num_samples, delta_bytes=...))
    merged = coordinator.aggregate(manifest.round_id)        # safetensors bytes, or None below min
    coordinator.round_status(manifest.round_id)              # dict, {"error": "not_found"} if unknown

The round follows the same rules as over the network: deadline from the manifest, at most
max_participants, a duplicate submission is idempotent (True again, counted once), a late one
is refused. `aggregate()` may be called before the deadline: with >= min_participants accepted
it closes the round and merges what it has (FedAvg weighted by num_samples unless the manifest's
`aggregation` names another rule). When max_participants are accepted the round is merged at
once, inside the `submit()` that filled it.

The bus: any object with `publish(topic: str, data: bytes)`. The coordinator publishes its signed
RoundManifest, AggregateAnnounce and RoundFailed there (canonical bytes, topic
`fednode/<community_id>/1`). If `publish` returns an awaitable (an async bus), the coordinator
cannot await it from these synchronous methods: it queues it, and the caller drives it with
`await coordinator.drain_bus()` (in order). A sync bus needs nothing more.

Submissions: `participant_sig`, when present, must be the participant's Ed25519 signature of the
SubmissionAnnounce that the submission stands for (`ParticipantSubmission.signed()` makes one);
a bad signature is refused. Unsigned submissions are accepted unless `require_signatures=True`
(the daemon's setting). `participant_node_id` must be a libp2p peer id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fednode.consensus import (
    AggregationDone,
    AggregationFailed,
    CloseSubmissions,
    Effect,
    ManifestSeen,
    Phase,
    PublishAggregate,
    PublishFailure,
    RoundState,
    StartAggregation,
    SubmissionReceived,
    Tick,
)
from fednode.errors import FednodeError, InvalidMessage, LocalProtocolError
from fednode.identity import Identity
from fednode.wire import codec
from fednode.wire.messages import Message, RoundID, RoundManifest, SubmissionAnnounce
from fednode.wire.verdict import Validation, Verdict

if TYPE_CHECKING:
    from fednode.aggregation import AdapterLayout

DEFAULT_MAX_ROUNDS = 1024  # rounds held in memory; the oldest finished ones are dropped first
DEFAULT_MAX_DELTA_BYTES = 256 * 1024 * 1024  # = fednode.aggregation.DEFAULT_MAX_DELTA_BYTES
DEFAULT_MAX_UPDATE_NORM = 1.0e3  # = fednode.aggregation.DEFAULT_MAX_UPDATE_NORM
DEFAULT_REQUIRE_SIGNATURES = False


@dataclass
class ParticipantSubmission:
    """One participant's trained LoRA delta (safetensors bytes) for a round."""

    round_id: RoundID
    participant_node_id: str
    num_samples: int
    submitted_at: float = field(default_factory=time.time)
    participant_sig: bytes = b""
    delta_bytes: bytes = b""

    def announce(self, community_id: str) -> SubmissionAnnounce:
        """The wire SubmissionAnnounce this submission stands for (raises InvalidMessage)."""
        return SubmissionAnnounce(
            round_id=self.round_id, participant_node_id=self.participant_node_id, num_samples=self.num_samples,
            submitted_at=float(self.submitted_at), participant_sig=bytes(self.participant_sig),
            community_id=community_id, delta_sha256=hashlib.sha256(self.delta_bytes).hexdigest(),
            delta_size=len(self.delta_bytes),
        )

    def signed(self, identity: Identity, community_id: str) -> ParticipantSubmission:
        """A copy signed by `identity` (who must be participant_node_id)."""
        unsigned = dataclasses.replace(self, participant_sig=b"").announce(community_id)
        return dataclasses.replace(self, participant_sig=codec.sign(unsigned, identity).participant_sig)


class Bus(Protocol):
    def publish(self, topic: str, data: bytes) -> object: ...


@dataclass
class _Round:
    state: RoundState
    deltas: dict[str, bytes] = field(default_factory=dict)
    layout: AdapterLayout | None = None
    merged: bytes | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class FedLearnCoordinator:
    """Coordinates rounds in-process. `keypair`: the coordinator's `Identity` (None = a fresh one);
    `bus`: where signed messages are published (None = nowhere); `clock`: seconds since the epoch."""

    def __init__(self, keypair: Identity | None = None, bus: Bus | None = None, *,
                 clock: Callable[[], float] = time.time,
                 require_signatures: bool = DEFAULT_REQUIRE_SIGNATURES,
                 max_rounds: int = DEFAULT_MAX_ROUNDS,
                 max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES,
                 max_update_norm: float | None = DEFAULT_MAX_UPDATE_NORM) -> None:
        self.keypair = keypair if keypair is not None else Identity.generate()
        self.bus = bus
        self.clock = clock
        self.require_signatures = require_signatures
        self.max_rounds = max_rounds
        self.max_delta_bytes = max_delta_bytes
        self.max_update_norm = max_update_norm
        self._rounds: dict[str, _Round] = {}
        self._round_number = 0
        self._pending: list[Awaitable[object]] = []

    @property
    def node_id(self) -> str:
        return self.keypair.node_id

    # -- the original API ----------------------------------------------------------------------
    def create_round(self, base_model_id: str, community_id: str, **kwargs: Any) -> RoundManifest:
        """Open a round; kwargs are RoundManifest fields (lora_rank, min_participants,
        round_timeout_seconds, aggregation, round_id, ...). Returns the signed manifest."""
        if kwargs.setdefault("coordinator_node_id", self.node_id) != self.node_id:
            raise InvalidMessage("coordinator_node_id", "a coordinator creates rounds under its own node id")
        self._round_number += 1
        kwargs.setdefault("round_id", RoundID(uuid.uuid4().hex))
        kwargs.setdefault("round_number", self._round_number)
        kwargs.setdefault("created_at", self.clock())
        if kwargs["round_id"] in self._rounds:
            raise LocalProtocolError(f"round {kwargs['round_id']} already exists")
        manifest = codec.sign(RoundManifest(base_model_id=base_model_id, community_id=community_id, **kwargs),
                              self.keypair)
        self._make_room()
        entry = _Round(RoundState(manifest, node_id=self.node_id))
        self._rounds[manifest.round_id] = entry
        self._publish(manifest)
        self._run(entry, entry.state.handle(ManifestSeen(self.clock())).effects)
        return manifest

    def submit(self, submission: ParticipantSubmission) -> bool:
        """Offer a participant's delta. False for an unknown round, an invalid or late submission;
        True if accepted (again True, counted once, for a duplicate)."""
        entry = self._rounds.get(submission.round_id)
        if entry is None:
            return False
        state, now = entry.state, self.clock()
        self._tick(entry, now)
        try:
            announce = submission.announce(state.manifest.community_id)
        except (InvalidMessage, TypeError, ValueError) as exc:
            state.record_rejection(str(submission.participant_node_id),
                                   Validation(Verdict.REJECT, "malformed", str(exc)[:200]))
            return False
        refusal = self._check(entry, submission, announce)
        if refusal is not None:
            state.record_rejection(announce.participant_node_id, refusal, announce.delta_sha256)
            return False
        outcome = state.handle(SubmissionReceived(announce, now))
        if outcome.accepted and announce.participant_node_id not in entry.deltas:
            entry.deltas[announce.participant_node_id] = bytes(submission.delta_bytes)
        self._run(entry, outcome.effects)
        return outcome.accepted

    def aggregate(self, round_id: str) -> bytes | None:
        """The merged delta (safetensors bytes), or None: unknown round, fewer than
        min_participants accepted, or the round failed."""
        entry = self._rounds.get(round_id)
        if entry is None:
            return None
        now = self.clock()
        self._tick(entry, now)
        state = entry.state
        if state.is_open and len(state.accepted) >= state.manifest.min_participants:
            self._run(entry, state.handle(CloseSubmissions(now)).effects)
        return entry.merged

    def round_status(self, round_id: str) -> dict[str, Any]:
        entry = self._rounds.get(round_id)
        if entry is None:
            return {"error": "not_found"}
        self._tick(entry, self.clock())
        state, m = entry.state, entry.state.manifest
        n = len(state.accepted)
        return {
            "round_id": m.round_id,
            "base_model_id": m.base_model_id,
            "participants": n,
            "min_required": m.min_participants,
            "ready_to_aggregate": n >= m.min_participants and state.phase is not Phase.FAILED,
            # beyond the original keys:
            "state": state.phase.value,
            "participant_ids": sorted(state.accepted),
            "max_participants": m.max_participants,
            "deadline": m.deadline,
            "aggregation": m.aggregation,
            "weights": state.weights(),
            "merged_sha256": state.merged_sha256,
            "failure_reason": state.failure_reason,
            "rejected": [{"node_id": r.node_id, "reason": r.reason, "detail": r.detail} for r in state.rejections],
        }

    # -- more than the original API --------------------------------------------------------------
    def round_state(self, round_id: str) -> RoundState | None:
        entry = self._rounds.get(round_id)
        return entry.state if entry else None

    async def drain_bus(self) -> None:
        """Await the publications an async bus returned, in order."""
        while self._pending:
            await self._pending.pop(0)

    # -- internals -----------------------------------------------------------------------------
    def _check(self, entry: _Round, submission: ParticipantSubmission,
               announce: SubmissionAnnounce) -> Validation | None:
        if (announce.participant_sig or self.require_signatures) and not codec.verify(announce):
            return Validation(Verdict.REJECT, "bad_signature", announce.participant_node_id)
        if announce.participant_node_id in entry.state.accepted:
            return None  # a duplicate or an equivocation: the state machine judges it
        from fednode.aggregation import AdapterLayout, load_delta, validate_update

        try:
            tensors = load_delta(submission.delta_bytes, max_bytes=self.max_delta_bytes)
            layout = entry.layout or AdapterLayout.from_tensors(tensors)
            validate_update(tensors, layout, max_norm=self.max_update_norm)
        except FednodeError as exc:
            return Validation(Verdict.REJECT, "invalid_update", str(exc)[:200])
        if not tensors:
            return Validation(Verdict.REJECT, "invalid_update", "the delta holds no tensors")
        if entry.layout is None and entry.state.is_open:
            entry.layout = layout
        return None

    def _tick(self, entry: _Round, now: float) -> None:
        self._run(entry, entry.state.handle(Tick(now)).effects)

    def _run(self, entry: _Round, effects: tuple[Effect, ...]) -> None:
        for effect in effects:
            if isinstance(effect, StartAggregation):
                self._run(entry, self._aggregate(entry, effect))
            elif isinstance(effect, PublishAggregate | PublishFailure):
                self._publish(effect.announce if isinstance(effect, PublishAggregate) else effect.failure)

    def _aggregate(self, entry: _Round, start: StartAggregation) -> tuple[Effect, ...]:
        from fednode.aggregation import aggregate, dump_delta

        m = entry.state.manifest
        try:
            result = aggregate([entry.deltas[c.node_id] for c in start.contributions],
                               [float(c.num_samples) for c in start.contributions], start.method,
                               rank=m.lora_rank, alpha=m.lora_alpha)
            merged = dump_delta(result.tensors)
        except FednodeError as exc:
            return entry.state.handle(AggregationFailed(f"aggregation failed: {exc}"[:200], self.clock())).effects
        entry.merged, entry.stats = merged, dict(result.stats)
        digest = hashlib.sha256(merged).hexdigest()
        return entry.state.handle(AggregationDone(digest, len(merged), self.clock())).effects

    def _publish(self, message: Message) -> None:
        if self.bus is None:
            return
        signed = codec.sign(message, self.keypair)
        result = self.bus.publish(codec.topic_for(message.community_id), codec.encode(signed))
        if inspect.isawaitable(result):
            self._pending.append(result)

    def _make_room(self) -> None:
        while len(self._rounds) >= self.max_rounds:
            finished = [rid for rid, e in self._rounds.items() if not e.state.is_open
                        and e.state.phase is not Phase.AGGREGATING]
            if not finished:
                raise LocalProtocolError(f"{len(self._rounds)} rounds open, max_rounds={self.max_rounds}")
            del self._rounds[finished[0]]
