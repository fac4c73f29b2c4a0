"""The round state machine, as data (h11's `_state.py` manner).

Theory of operation
-------------------
One `RoundState` per round per node. Coordinator and participant run the *same* machine; the
role is a value (`Role.COORDINATOR` / `Role.PARTICIPANT`) that selects a row of `TRANSITIONS`, and
it may change mid-round when the election hands the round to another node (`CoordinatorChanged`).

    MANIFEST_PUBLISHED --ManifestSeen--> COLLECTING --(deadline, >= min | max reached)--> AGGREGATING
            |                               |                                               |
            +------(deadline, < min)--------+----------------> FAILED <--AggregationFailed--+
                                                                                            |
                                                  PUBLISHED <--AggregationDone / AggregateSeen

Every event carries the clock value `now`. Before an event is applied, the machine lets time
pass: if the deadline (from the manifest) has come, or max_participants submissions are
accepted, it fires an internal `Trigger` through the same table. So a submission that arrives
at `now >= deadline` finds the round already closed and is IGNOREd as late, whatever order the
driver feeds ticks in.

Both roles judge submissions with the same rules (so a participant that becomes coordinator
already holds the accepted set): ACCEPT while open and below max_participants; a duplicate is
idempotent (same verdict again, counted once); the same participant announcing a *different*
delta is REJECTed (equivocation; the first stays); a *different* participant announcing a delta
already accepted (same `delta_sha256`) is REJECTed (duplicate_delta; the first owner keeps it, so
nobody doubles an update's weight); late, full, wrong round or community are IGNOREd with a
reason. Participants never declare a round failed on their own view: at the deadline they wait
in AGGREGATING for the coordinator's AggregateAnnounce or RoundFailed.

One outcome per round (outcome.py): a node that becomes coordinator of a round another node
coordinated, or a coordinator restored after a restart (`Resumed`: it does not know what happened
while it was down), sets `outcome_unknown` and asks for the outcome (`QueryOutcome`); until a signed
outcome arrives (adopted) or every live member answered without one (`SyncAnswered`), collection
may end (`Trigger.CLOSED_UNSETTLED`) but it neither aggregates nor fails the round. A second,
different outcome met in a terminal state is recorded in `conflicts`; between two aggregates the
earlier term's stands (the node re-installs it). A terminal state never changes phase.

Messages from the network are legal in every state (they are answered with a verdict); local
events (`AggregationDone`, `AggregationFailed`, `CloseSubmissions`, `ContributionRejected`) in a
state whose row lacks them raise `LocalProtocolError`: the driver has a bug.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fednode.consensus import round_snapshot
from fednode.consensus.common import Effect, Outcome, Tick
from fednode.consensus.outcome import (
    MAX_RECORDED_CONFLICTS,
    PUBLISHED,
    OutcomeConflict,
    SignedOutcome,
    close_early_due,
    earlier,
    legitimate_signer,
    may_conclude_unpublished,
)
from fednode.consensus.round_events import (
    AggregateSeen,
    AggregationDone,
    AggregationFailed,
    CloseSubmissions,
    ContributionRejected,
    CoordinatorChanged,
    FailureSeen,
    InstallAdapter,
    ManifestSeen,
    PublishAggregate,
    PublishFailure,
    QueryOutcome,
    Reannounce,
    Resumed,
    RoundEvent,
    StartAggregation,
    SubmissionReceived,
    Superseded,
    SyncAnswered,
    TrainAndSubmit,
)
from fednode.errors import LocalProtocolError
from fednode.wire import codec
from fednode.wire.messages import (
    AggregateAnnounce,
    Contribution,
    RoundFailed,
    RoundManifest,
    SubmissionAnnounce,
)
from fednode.wire.verdict import ACCEPTED, Validation, Verdict

DEFAULT_MAX_RECORDED_REJECTIONS = 1024  # rejected/ignored submissions kept for the round record
DEFAULT_REANNOUNCE_SECONDS = 5.0  # a participant re-publishes its submission after this, doubling each time


class Role(enum.Enum):
    COORDINATOR = "coordinator"
    PARTICIPANT = "participant"


class Phase(enum.Enum):
    MANIFEST_PUBLISHED = "manifest_published"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    PUBLISHED = "published"
    FAILED = "failed"


class Trigger(enum.Enum):
    """Internal events the machine derives from the clock and its counters."""

    FULL = "full"  # max_participants accepted: aggregate early
    DEADLINE_MET = "deadline_met"  # deadline reached with >= min_participants accepted
    DEADLINE_MISSED = "deadline_missed"  # deadline reached with fewer
    CLOSED_UNSETTLED = "closed_unsettled"  # deadline or full, but a taken-over round's outcome is unknown


TERMINAL = frozenset({Phase.PUBLISHED, Phase.FAILED})
EventKey = type | Trigger
MP, CO, AG, PU, FA = Phase.MANIFEST_PUBLISHED, Phase.COLLECTING, Phase.AGGREGATING, Phase.PUBLISHED, Phase.FAILED

# Remote messages and the clock: legal everywhere; in a terminal state they change nothing.
_ALWAYS: tuple[EventKey, ...] = (Tick, ManifestSeen, SubmissionReceived, AggregateSeen, FailureSeen, SyncAnswered,
                                 CoordinatorChanged, Resumed)


def _row(state: Phase, extra: Mapping[EventKey, Phase]) -> dict[EventKey, Phase]:
    row: dict[EventKey, Phase] = {key: state for key in _ALWAYS}
    row.update(extra)
    return row


TRANSITIONS: dict[Role, dict[Phase, dict[EventKey, Phase]]] = {
    Role.COORDINATOR: {
        # AggregateSeen / FailureSeen move a coordinator only when it adopts an outcome an earlier
        # coordinator of the round published (it took the round over, or it is still aggregating).
        MP: _row(MP, {ManifestSeen: CO, CloseSubmissions: AG, ContributionRejected: MP, Superseded: FA,
                      AggregateSeen: PU, FailureSeen: FA, Trigger.CLOSED_UNSETTLED: AG,
                      Trigger.FULL: AG, Trigger.DEADLINE_MET: AG, Trigger.DEADLINE_MISSED: FA}),
        CO: _row(CO, {CloseSubmissions: AG, ContributionRejected: CO, Superseded: FA,
                      AggregateSeen: PU, FailureSeen: FA, Trigger.CLOSED_UNSETTLED: AG,
                      Trigger.FULL: AG, Trigger.DEADLINE_MET: AG, Trigger.DEADLINE_MISSED: FA}),
        # DEADLINE_MET / MISSED fire here only for a coordinator that inherited the round mid-aggregation
        # (once its outcome is settled).
        AG: _row(AG, {AggregationDone: PU, AggregationFailed: FA, ContributionRejected: AG, Superseded: FA,
                      AggregateSeen: PU, FailureSeen: FA,
                      Trigger.DEADLINE_MET: AG, Trigger.DEADLINE_MISSED: FA}),
        PU: _row(PU, {Superseded: PU}),
        FA: _row(FA, {Superseded: FA}),
    },
    Role.PARTICIPANT: {
        MP: _row(MP, {ManifestSeen: CO, AggregateSeen: PU, FailureSeen: FA, Superseded: FA,
                      Trigger.FULL: AG, Trigger.DEADLINE_MET: AG, Trigger.DEADLINE_MISSED: AG}),
        CO: _row(CO, {AggregateSeen: PU, FailureSeen: FA, Superseded: FA,
                      Trigger.FULL: AG, Trigger.DEADLINE_MET: AG, Trigger.DEADLINE_MISSED: AG}),
        AG: _row(AG, {AggregateSeen: PU, FailureSeen: FA, Superseded: FA}),
        PU: _row(PU, {Superseded: PU}),
        FA: _row(FA, {Superseded: FA}),
    },
}


@dataclass(frozen=True, slots=True)
class RoundStatistics:
    phase: Phase
    role: Role
    accepted: int
    total_samples: int
    rejected_by_reason: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Rejection:
    node_id: str
    reason: str
    detail: str
    delta_sha256: str = ""


class RoundState:
    """One round, sans-IO. Feed `handle(event)`; do what `Outcome.effects` say; call `handle(Tick(now))`
    when `next_timer()` is due. `node_id` is this node; the manifest's signer is the first coordinator."""

    def __init__(self, manifest: RoundManifest, *, node_id: str, role: Role | None = None,
                 max_recorded_rejections: int = DEFAULT_MAX_RECORDED_REJECTIONS,
                 reannounce_seconds: float = DEFAULT_REANNOUNCE_SECONDS) -> None:
        self.manifest = manifest
        self.node_id = node_id
        self.coordinator_node_id = manifest.coordinator_node_id
        self.term = manifest.term
        self.role = role or (Role.COORDINATOR if node_id == manifest.coordinator_node_id else Role.PARTICIPANT)
        self.phase = Phase.MANIFEST_PUBLISHED
        self.max_recorded_rejections = max_recorded_rejections
        self.accepted: dict[str, SubmissionAnnounce] = {}
        self.rejections: list[Rejection] = []
        self.rejected_by_reason: dict[str, int] = {}
        self.excluded: dict[str, Validation] = {}  # accepted, then dropped by ContributionRejected
        self.own_submission: SubmissionAnnounce | None = None
        # Gossip gives no delivery receipt, and an announcement published while the mesh re-forms
        # (a failover) can be lost. So a participant re-publishes its signed submission while the
        # round is open: after reannounce_seconds, then twice that gap, and so on (at most
        # log2(timeout / gap) copies per round); the coordinator counts duplicates once. 0 = only
        # when the coordinator changes.
        self.reannounce_seconds = reannounce_seconds
        self.reannounce_at: float | None = None
        self._reannounce_gap = reannounce_seconds
        self.aggregation_started = False
        self.merged_sha256 = ""
        self.merged_size = 0
        self.failure_reason = ""
        # One outcome per round (outcome.py).
        self.coordinators: dict[int, str] = {manifest.term: manifest.coordinator_node_id}  # term -> coordinator seen
        self.outcome: SignedOutcome | None = None  # the signed outcome this node holds
        self.outcome_unknown = False  # took the round over; a predecessor may have concluded it
        self.sync_answered: set[str] = set()  # members that answered our outcome query with none
        self.resumed_in_term: int | None = None  # restarted as coordinator of this term, not yet confirmed
        self.refused: set[str] = set()  # participants whose submission was REJECTed (close early counts them)
        self.conflicts: list[OutcomeConflict] = []

    # -- queries -------------------------------------------------------------------------------
    @property
    def round_id(self) -> str:
        return self.manifest.round_id

    @property
    def deadline(self) -> float:
        return self.manifest.deadline

    @property
    def is_open(self) -> bool:
        return self.phase in (Phase.MANIFEST_PUBLISHED, Phase.COLLECTING)

    def next_timer(self) -> float | None:
        """When the driver must feed a Tick (None: no timer pending)."""
        if not self.is_open:
            return None
        if self.reannounce_at is not None and self.role is Role.PARTICIPANT:
            return min(self.deadline, self.reannounce_at)
        return self.deadline

    def contributions(self) -> tuple[Contribution, ...]:
        """Accepted submissions, sorted by node id (the aggregation order, fixed so that every
        node computes bit-identical merged adapters)."""
        return tuple(Contribution(a.participant_node_id, a.delta_sha256, a.num_samples)
                     for _, a in sorted(self.accepted.items()))

    def weights(self) -> dict[str, float]:
        total = sum(a.num_samples for a in self.accepted.values())
        return {n: a.num_samples / total for n, a in sorted(self.accepted.items())} if total else {}

    def close_early_due(self, live_members: frozenset[str] | set[str] | list[str]) -> bool:
        """Coordinator: stop collecting now (feed CloseSubmissions)? Every live member accepted or
        refused, min_participants accepted, and the outcome is ours to decide."""
        return (self.role is Role.COORDINATOR and self.is_open and not self.outcome_unknown
                and close_early_due(accepted=self.accepted, refused=self.refused, live_members=live_members,
                                    min_participants=self.manifest.min_participants))

    def statistics(self) -> RoundStatistics:
        return RoundStatistics(self.phase, self.role, len(self.accepted),
                               sum(a.num_samples for a in self.accepted.values()), dict(self.rejected_by_reason))

    # -- the one entry point -------------------------------------------------------------------
    def handle(self, event: RoundEvent) -> Outcome:
        effects: list[Effect] = []
        if not isinstance(event, Resumed):  # a restart is taken in before the clock may conclude anything
            self._advance_clock(event.now, effects)
        validation = self._apply(event, effects)
        self._advance_clock(event.now, effects)  # e.g. the submission that filled the round
        return Outcome(validation, tuple(effects))

    def _transition(self, key: EventKey) -> Phase:
        try:
            return TRANSITIONS[self.role][self.phase][key]
        except KeyError:
            name = key.name if isinstance(key, Trigger) else key.__name__
            raise LocalProtocolError(
                f"round {self.round_id}: {name} is illegal for a {self.role.value} in state {self.phase.value}"
            ) from None

    def _trigger(self, now: float) -> Trigger | None:
        n = len(self.accepted)
        unsettled = self.role is Role.COORDINATOR and self.outcome_unknown
        if self.is_open:
            if n >= self.manifest.max_participants or now >= self.deadline:
                if unsettled:
                    return Trigger.CLOSED_UNSETTLED
                if n >= self.manifest.max_participants:
                    return Trigger.FULL
                return Trigger.DEADLINE_MET if n >= self.manifest.min_participants else Trigger.DEADLINE_MISSED
        elif (self.phase is Phase.AGGREGATING and self.role is Role.COORDINATOR and not self.aggregation_started
              and not unsettled):
            return Trigger.DEADLINE_MET if n >= self.manifest.min_participants else Trigger.DEADLINE_MISSED
        return None

    def _advance_clock(self, now: float, effects: list[Effect]) -> None:
        trigger = self._trigger(now)
        if trigger is None:
            return
        self.phase = self._transition(trigger)
        if trigger is Trigger.CLOSED_UNSETTLED:
            return  # collection is over; aggregate or fail only once the outcome is settled
        if self.role is Role.COORDINATOR:
            if self.phase is Phase.AGGREGATING:
                effects.append(self._start_aggregation())
            elif self.phase is Phase.FAILED:
                effects.append(self._fail(self._too_few_reason(now), now))

    def _too_few_reason(self, now: float) -> str:
        """Why the round fails for too few submissions. Not only the deadline does that: a round
        closed early (max_participants, or every live member submitted) re-plans when an accepted
        update proves unusable, and may then hold fewer than min_participants before its deadline."""
        n, need = len(self.accepted), self.manifest.min_participants
        if now >= self.deadline:
            return f"deadline passed with {n} accepted submissions, fewer than min_participants={need}"
        dropped = ", ".join(sorted({v.reason for v in self.excluded.values()})) or "none"
        return (f"{n} usable submissions after dropping {len(self.excluded)} ({dropped}), fewer than "
                f"min_participants={need}; the round had closed early, {self.deadline - now:.0f} s before its deadline")

    def _start_aggregation(self) -> StartAggregation:
        self.aggregation_started = True
        return StartAggregation(self.round_id, self.manifest.aggregation, self.contributions(),
                                tuple(a for _, a in sorted(self.accepted.items())))

    def _fail(self, reason: str, now: float) -> PublishFailure:
        self.failure_reason = reason[:200]
        failure = RoundFailed(
            community_id=self.manifest.community_id, round_id=self.round_id,
            round_number=self.manifest.round_number, coordinator_node_id=self.node_id, term=self.term,
            reason=self.failure_reason, failed_at=max(0.0, now),
        )
        self.outcome = SignedOutcome.of(failure)
        return PublishFailure(failure)

    def _apply(self, event: RoundEvent, effects: list[Effect]) -> Validation:
        if isinstance(event, Tick):
            self._transition(Tick)
            self._maybe_reannounce(event.now, effects)
            return ACCEPTED
        if isinstance(event, SubmissionReceived):
            self._transition(SubmissionReceived)
            return self._judge(event.announce, event.now)
        if isinstance(event, ManifestSeen):
            return self._on_manifest(event, effects)
        if isinstance(event, AggregateSeen | FailureSeen):
            return self._on_verdict_message(event, effects)
        if isinstance(event, SyncAnswered):
            return self._on_sync_answered(event)
        if isinstance(event, Resumed):
            self._transition(Resumed)
            if self.role is Role.COORDINATOR and self.phase not in TERMINAL:
                self._outcome_in_question(effects)
                self.resumed_in_term = self.term
            return ACCEPTED
        if isinstance(event, CoordinatorChanged):
            return self._on_coordinator_changed(event, effects)
        if isinstance(event, CloseSubmissions):
            if self.outcome_unknown and self.role is Role.COORDINATOR:
                raise LocalProtocolError(f"round {self.round_id}: cannot close a round whose outcome is unknown")
            self.phase = self._transition(CloseSubmissions)
            if self.phase is Phase.AGGREGATING:
                if len(self.accepted) < self.manifest.min_participants:
                    raise LocalProtocolError(f"round {self.round_id}: cannot close with {len(self.accepted)} "
                                             f"accepted, fewer than min_participants")
                effects.append(self._start_aggregation())
            return ACCEPTED
        if isinstance(event, ContributionRejected):
            return self._on_contribution_rejected(event, effects)
        if isinstance(event, AggregationDone):
            self.phase = self._transition(AggregationDone)
            self.merged_sha256, self.merged_size = event.merged_sha256, event.merged_size
            self.outcome = SignedOutcome(PUBLISHED, self.term, self.node_id, event.merged_sha256)
            effects.append(PublishAggregate(AggregateAnnounce(
                community_id=self.manifest.community_id, round_id=self.round_id,
                round_number=self.manifest.round_number, coordinator_node_id=self.node_id, term=self.term,
                merged_sha256=event.merged_sha256, merged_size=event.merged_size,
                aggregation=self.manifest.aggregation, contributions=self.contributions(),
                announced_at=max(0.0, event.now),
            )))
            return ACCEPTED
        if isinstance(event, AggregationFailed):
            self.phase = self._transition(AggregationFailed)
            effects.append(self._fail(event.reason, event.now))
            return ACCEPTED
        if isinstance(event, Superseded):
            before = self.phase
            self.phase = self._transition(Superseded)
            if before is not self.phase:
                self.failure_reason = f"superseded by {event.by_round_id[:64]} (same round number, later term)"
            return ACCEPTED
        raise LocalProtocolError(f"round {self.round_id}: unknown event {type(event).__name__}")

    # -- submissions ---------------------------------------------------------------------------
    def _judge(self, a: SubmissionAnnounce, now: float) -> Validation:
        m = self.manifest
        if a.round_id != m.round_id:
            return self._refuse(a, Validation(Verdict.IGNORE, "wrong_round", a.round_id[:64]))
        if a.community_id != m.community_id:
            return self._refuse(a, Validation(Verdict.IGNORE, "wrong_community", a.community_id[:64]))
        if a.participant_node_id in self.excluded:
            return self.excluded[a.participant_node_id]
        known = self.accepted.get(a.participant_node_id)
        if known is not None:
            if (known.delta_sha256, known.delta_size, known.num_samples) == (a.delta_sha256, a.delta_size,
                                                                              a.num_samples):
                return Validation(Verdict.ACCEPT, "duplicate", "already accepted; counted once")
            return self._refuse(a, Validation(Verdict.REJECT, "equivocation",
                                              f"second, different delta; keeping {known.delta_sha256}"))
        owner = self._delta_owner(a.delta_sha256)
        if owner is not None:  # someone else's update re-announced: it would count twice (N5)
            return self._refuse(a, Validation(Verdict.REJECT, "duplicate_delta",
                                              f"delta already accepted from {owner[:64]}"))
        if not self.is_open:  # closed by the clock, by max_participants, or by CloseSubmissions
            if now >= self.deadline:
                v = Validation(Verdict.IGNORE, "late", f"arrived {now - self.deadline:.3f} s after the deadline")
            elif len(self.accepted) >= m.max_participants:
                v = Validation(Verdict.IGNORE, "full", f"max_participants={m.max_participants} already accepted")
            else:
                v = Validation(Verdict.IGNORE, "closed", f"round is {self.phase.value}")
            return self._refuse(a, v)
        self.accepted[a.participant_node_id] = a
        if a.participant_node_id == self.node_id:
            self.own_submission = a
            self.schedule_reannounce(now)
        return ACCEPTED

    def schedule_reannounce(self, now: float) -> None:
        """Start (or restart, after a restore) the re-announce backoff for our own submission."""
        if self.reannounce_seconds > 0 and self.own_submission is not None:
            self._reannounce_gap = self.reannounce_seconds
            self.reannounce_at = now + self._reannounce_gap

    def _maybe_reannounce(self, now: float, effects: list[Effect]) -> None:
        if (self.reannounce_at is None or now < self.reannounce_at or self.own_submission is None
                or self.role is not Role.PARTICIPANT or not self.is_open):
            return
        effects.append(Reannounce(self.own_submission))
        self._reannounce_gap *= 2
        self.reannounce_at = now + self._reannounce_gap

    def _delta_owner(self, delta_sha256: str) -> str | None:
        """The participant whose accepted submission is this delta (a scan: at most max_participants)."""
        return next((n for n, a in self.accepted.items() if a.delta_sha256 == delta_sha256), None)

    def _refuse(self, a: SubmissionAnnounce, v: Validation) -> Validation:
        return self.record_rejection(a.participant_node_id, v, a.delta_sha256)

    def record_rejection(self, node_id: str, v: Validation, delta_sha256: str = "") -> Validation:
        """Record a submission the driver refused before it reached the machine (bad blob, bad
        signature) in the round record; counted per reason, bounded by max_recorded_rejections.
        A REJECTed participant counts as answered for closing the round early."""
        if v.verdict is Verdict.REJECT and len(self.refused) < self.max_recorded_rejections:
            self.refused.add(node_id)
        self.rejected_by_reason[v.reason] = self.rejected_by_reason.get(v.reason, 0) + 1
        if len(self.rejections) < self.max_recorded_rejections:
            self.rejections.append(Rejection(node_id[:64], v.reason, v.detail, delta_sha256))
        return v

    def _on_contribution_rejected(self, event: ContributionRejected, effects: list[Effect]) -> Validation:
        self.phase = self._transition(ContributionRejected)
        a = self.accepted.pop(event.node_id, None)
        if a is None:
            raise LocalProtocolError(f"round {self.round_id}: {event.node_id} has no accepted submission")
        v = self._refuse(a, Validation(Verdict.REJECT, event.reason, event.detail))
        self.excluded[event.node_id] = v
        if self.phase is Phase.AGGREGATING and self.role is Role.COORDINATOR:
            self.aggregation_started = False  # re-plan with what is left: aggregate again or fail
        return ACCEPTED

    # -- messages from the coordinator ---------------------------------------------------------
    def _on_manifest(self, event: ManifestSeen, effects: list[Effect]) -> Validation:
        if event.manifest is not None and codec.encode(event.manifest) != codec.encode(self.manifest):
            return Validation(Verdict.IGNORE, "wrong_round", "a different manifest")
        before = self.phase
        self.phase = self._transition(ManifestSeen)
        if before is Phase.MANIFEST_PUBLISHED and self.phase is Phase.COLLECTING and self.role is Role.PARTICIPANT:
            effects.append(TrainAndSubmit(self.manifest))
        return ACCEPTED

    def _on_verdict_message(self, event: AggregateSeen | FailureSeen, effects: list[Effect]) -> Validation:
        msg = event.announce if isinstance(event, AggregateSeen) else event.failure
        if msg.round_id != self.round_id:
            return Validation(Verdict.IGNORE, "wrong_round", msg.round_id[:64])
        if not legitimate_signer(term=msg.term, signer=msg.coordinator_node_id, manifest_term=self.manifest.term,
                                 current_term=self.term, current_coordinator=self.coordinator_node_id,
                                 known_coordinators=self.coordinators, concluded=self.phase in TERMINAL):
            return Validation(Verdict.IGNORE, "not_coordinator", f"{msg.coordinator_node_id} term {msg.term}")
        seen = SignedOutcome.of(msg)
        if self.phase in TERMINAL:
            return self._on_second_outcome(seen, event, effects)
        self.phase = self._transition(type(event))
        self.outcome, self.outcome_unknown = seen, False
        if isinstance(event, AggregateSeen):
            self.merged_sha256, self.merged_size = event.announce.merged_sha256, event.announce.merged_size
            effects.append(InstallAdapter(self.round_id, self.merged_sha256, self.merged_size))
        else:
            self.failure_reason = event.failure.reason
        return ACCEPTED

    def _on_second_outcome(self, seen: SignedOutcome, event: AggregateSeen | FailureSeen,
                           effects: list[Effect]) -> Validation:
        """A signed outcome for a round we already hold one for. The same result is a duplicate; a
        different one is a conflict: recorded once, and the earlier one stands. Only between two
        aggregates does that change what this node holds (it installs the earlier one); a terminal
        phase never changes (no node un-installs an adapter or revives a failed round)."""
        held = self.outcome
        if held is None or held.same_result(seen):
            return Validation(Verdict.IGNORE, "round_closed", f"round is {self.phase.value}")
        kept = earlier(held, seen)
        if kept is seen and not (isinstance(event, AggregateSeen) and self.phase is Phase.PUBLISHED):
            kept = held  # a different kind: keep the terminal phase, still report the conflict
        conflict = OutcomeConflict(kept=kept, other=held if kept is seen else seen)
        if conflict not in self.conflicts and len(self.conflicts) < MAX_RECORDED_CONFLICTS:
            self.conflicts.append(conflict)
        if kept is seen and isinstance(event, AggregateSeen):
            self.outcome = seen
            self.merged_sha256, self.merged_size = event.announce.merged_sha256, event.announce.merged_size
            effects.append(InstallAdapter(self.round_id, self.merged_sha256, self.merged_size))
            return ACCEPTED
        return Validation(Verdict.IGNORE, "outcome_conflict",
                          f"{seen.kind} {seen.merged_sha256[:16]} term {seen.term}; keeping {kept.kind} "
                          f"{kept.merged_sha256[:16]} term {kept.term}")

    def _outcome_in_question(self, effects: list[Effect]) -> None:
        self.outcome_unknown, self.sync_answered = True, set()
        effects.append(QueryOutcome(self.round_id))

    def _on_sync_answered(self, event: SyncAnswered) -> Validation:
        if not self.outcome_unknown or self.role is not Role.COORDINATOR:
            return Validation(Verdict.IGNORE, "settled", "the round's outcome is not in question")
        if self.resumed_in_term is not None:
            # Restored as this round's coordinator, and no election since: the members that answer
            # may hear us while none of them receives what we publish (a restarted node's gossip mesh
            # can take 30 s to re-form: fault seed 1734665193, s16). The round is ours to conclude
            # only once the election names us again (in a later term, a takeover like any other).
            return Validation(Verdict.IGNORE, "restored_unconfirmed",
                              f"restarted as coordinator of term {self.resumed_in_term}; waiting for the election")
        if event.unendorsed:
            return Validation(Verdict.IGNORE, "unendorsed",
                              f"{len(event.unendorsed)} live member(s) follow another coordinator of the term")
        if len(self.sync_answered) < self.max_recorded_rejections:
            self.sync_answered.add(event.node_id)
        if may_conclude_unpublished(self.sync_answered, event.live_members, self.node_id, event.recent,
                                    former=self.coordinators.values()):
            self.outcome_unknown = False  # nobody live holds an outcome: ours to decide (the clock runs next)
        return ACCEPTED

    def _on_coordinator_changed(self, event: CoordinatorChanged, effects: list[Effect]) -> Validation:
        self._transition(CoordinatorChanged)
        if event.term < self.term:
            return Validation(Verdict.IGNORE, "stale_term", f"term {event.term} < {self.term}")
        if self.phase in TERMINAL:
            return Validation(Verdict.IGNORE, "round_closed", f"round is {self.phase.value}")
        self.resumed_in_term = None  # the election has spoken since our restart: answers count again
        self.term, self.coordinator_node_id = event.term, event.coordinator_node_id
        if event.term in self.coordinators or len(self.coordinators) < self.max_recorded_rejections:
            self.coordinators[event.term] = event.coordinator_node_id
        new_role = Role.COORDINATOR if event.coordinator_node_id == self.node_id else Role.PARTICIPANT
        if new_role is not self.role:
            self.role = new_role
            self.aggregation_started = False
            if new_role is Role.COORDINATOR:  # taken over: a predecessor may have concluded the round
                self._outcome_in_question(effects)
        if self.role is Role.PARTICIPANT and self.own_submission is not None:
            effects.append(Reannounce(self.own_submission))
            self.schedule_reannounce(event.now)  # and again with backoff: the new mesh may still be forming
        return ACCEPTED

    # -- persistence (round_snapshot.py) -------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-able): signed messages as hex of their canonical bytes."""
        return round_snapshot.snapshot(self)

    @classmethod
    def restore(cls, data: Mapping[str, Any], *,
                max_recorded_rejections: int = DEFAULT_MAX_RECORDED_REJECTIONS,
                reannounce_seconds: float = DEFAULT_REANNOUNCE_SECONDS) -> RoundState:
        """Inverse of snapshot(). A restored coordinator that was AGGREGATING re-plans the aggregation
        on its next event (the work in flight died with the process)."""
        return round_snapshot.restore(cls, data, max_recorded_rejections=max_recorded_rejections,
                                      reannounce_seconds=reannounce_seconds)
