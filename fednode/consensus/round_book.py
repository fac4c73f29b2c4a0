"""The round book: round policy over all of a node's rounds, sans-IO.

One `RoundState` decides one round. The book decides between rounds, and it is the only place
outside the election that knows who coordinates and in which term:

* a received manifest is adopted, held until its coordinator is elected, or ignored (finished,
  superseded by an open round of a later term, another base model);
* adopting round n from term t supersedes our open round n from an earlier term (two coordinators
  opened round n around a contested election: the community follows the later term's);
* a coordinator change is passed to every open round, and re-offers the manifests held for it;
* a coordinator closes a round early once every member it waits for has been accepted or refused
  (`awaited_members`: not a member whose heartbeat says it paused participation, nor itself while
  paused for a full disk; a pause changes nothing else, least of all the election);
* a coordinator opens the next round when none is open, the settle delay after winning its term
  has passed, and the round policy (budget, pause, quorum) allows it;
* a peer's heartbeat naming a round we do not know, or saying it is past one of our open rounds,
  asks for a sync of that round (at most once per `sync_retry_seconds` for the latter).

Every entry point returns a `BookOutcome`: a verdict and effects tagged with the round they are
for. The driver performs them in order: `SaveRound` (snapshot changed), `ConflictsFound`,
`RecordFailure` (a superseded round), then the round's own effects (round_events.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from fednode.consensus.common import CoordinatorChanged, Effect, Tick
from fednode.consensus.election import Heard
from fednode.consensus.round_events import (
    CloseSubmissions,
    InstallAdapter,
    ManifestSeen,
    Resumed,
    RoundEvent,
    Superseded,
    TrainAndSubmit,
)
from fednode.consensus.round_state import DEFAULT_REANNOUNCE_SECONDS, TERMINAL, Phase, Role, RoundState
from fednode.wire.messages import RoundManifest, SubmissionAnnounce
from fednode.wire.verdict import ACCEPTED, Validation, Verdict

MAX_ROUNDS_IN_MEMORY = 16  # finished rounds kept in memory (all of them stay in state.sqlite)
MAX_PENDING_MANIFESTS = 8  # manifests from a coordinator we have not yet seen elected
DEFAULT_SYNC_RETRY_SECONDS = 5.0  # ask again for the outcome of a round we are behind on at most this often


# ---- effects the book adds to the rounds' own ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaveRound(Effect):
    """The round's persisted view changed: save its snapshot (`new`: first save, with the manifest)."""

    new: bool = False


@dataclass(frozen=True, slots=True)
class ConflictsFound(Effect):
    """`count` more conflicting signed outcomes met for the round (outcome.py): report them."""

    count: int


@dataclass(frozen=True, slots=True)
class RecordFailure(Effect):
    """Record the round as failed (nothing is published): it was superseded, or (`resumed`) it
    had failed before a restart that came before the record was written."""

    resumed: bool = False


@dataclass(frozen=True, slots=True)
class ResubmitOwn(Effect):
    """After a restart: publish our own submission again (it may have died with the old process
    before it left); the round's re-announce timer is already set."""

    announce: SubmissionAnnounce


@dataclass(frozen=True, slots=True)
class RepublishAndInstall(Effect):
    """After a restart, as the coordinator of a round it published: announce the outcome again
    (the signed one it saved, else sign it anew from the round) and install the merged adapter."""


@dataclass(frozen=True, slots=True)
class OpenRound(Effect):
    """Open round `round_number` in `term`: build, sign and publish its manifest, then `open()` it."""

    round_id: str
    round_number: int
    term: int


@dataclass(frozen=True, slots=True)
class SyncFrom(Effect):
    """Ask a peer for the signed messages of a round. `past`: the round is one of ours that the
    peer has finished (ask a peer whose heartbeat says it is past it); else the heartbeat's sender."""

    past: bool = False


Step = tuple[str, Effect]  # (round id, effect)


@dataclass(frozen=True, slots=True)
class BookOutcome:
    validation: Validation = ACCEPTED
    steps: tuple[Step, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.validation.accepted


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """When a coordinator opens the next round ([round] and [coordinator] settings)."""

    max_rounds: int = 0  # published rounds, then stop (0: no limit)
    pause_seconds: float = 0.0  # after the last round finished
    quorum: int = 1  # live federated members needed (wait_for_members, else min_participants)
    settle_seconds: float = 0.0  # after winning a term: a rival's later claim arrives within it
    rejoin_wait_seconds: float = 0.0  # after a restart: wait this long at most to hear the last round's members


@dataclass(frozen=True, slots=True)
class History:
    """What state.sqlite and the node's work say, for the next-round rule."""

    live_federated: int
    highest_round_number: int  # of every round ever recorded, or that a live member says it finished (0: none)
    published: int  # rounds finished with a merged adapter
    last_finished_at: float | None  # when the latest finished round was recorded
    unrecorded_published: bool = False  # a published round whose adapter is not installed yet
    busy: bool = False  # installing, aggregating, paused, or no trainer: the next start adapter is not ready
    unheard: int = 0  # members of our latest published round not heard since a restart (`rejoin_unheard`)
    unendorsed: int = 0  # live members whose latest heartbeat names another coordinator (election-v1 rule 13)


def next_round_due(*, now: float, policy: RoundPolicy, history: History, coordinator_since: float,
                   force: bool = False) -> bool:
    """The coordinator may open the next round now (no round open, checked by the caller). `force`
    (an operator's `fednode start-round`) skips the settle delay, budget, pause and quorum, never
    the endorsement (election-v1 rule 13: a rival claimant of our term may be the one they follow)."""
    if history.busy or history.unrecorded_published or history.unendorsed:
        return False
    if force:
        return True
    if now < coordinator_since + policy.settle_seconds:
        return False
    if history.unheard:  # after a restart: they may have published rounds we do not know of
        return False
    if policy.max_rounds and history.published >= policy.max_rounds:
        return False
    if history.last_finished_at is not None and now - history.last_finished_at < policy.pause_seconds:
        return False
    return history.live_federated >= policy.quorum


def quiet_until(*, now: float, policy: RoundPolicy, history: History) -> float:
    """election-v1 rule 18's input: the earliest time at which the next round may open by the rules
    that time alone ends: never (inf) once `max_rounds` rounds are published, the end of the pause
    after the last finished round, else `now` (the other conditions may hold any moment)."""
    if policy.max_rounds and history.published >= policy.max_rounds:
        return math.inf
    if history.last_finished_at is not None and policy.pause_seconds > 0:
        return max(now, history.last_finished_at + policy.pause_seconds)
    return now


def rejoin_unheard(known: Set[str], heard: Set[str], *, now: float, started_at: float,
                   wait_seconds: float) -> frozenset[str]:
    """Members of our latest published round (`known`, from state.sqlite) not heard since this
    process started, while `now` is within `wait_seconds` of the start (round-v1 r5, "After a
    restart"); empty after that.

    A restarted node knows only what it stored. Members it has not heard yet may have published
    rounds while it was down (as coordinators elected meanwhile): until it hears their heartbeats
    (their `last_round_number`) it would number its next round from its own records, and it would
    take "no live member holds an outcome" from the few members it hears. Found by the fault runner
    (issue 13): a coordinator SIGKILLed and restarted, reachable at first from one other node only,
    won the term back and opened rounds 29 and 30 that the term's first coordinator had published."""
    if now >= started_at + wait_seconds:
        return frozenset()
    return frozenset(known) - frozenset(heard)


def may_serve_soon(node_id: str, live: Set[str], *, now: float, started_at: float, liveness_timeout: float) -> bool:
    """Whether a participant whose update we could not fetch is worth asking again: it is live, or
    we started too recently (within a liveness timeout) to have heard its heartbeats yet. A dead
    participant's update is given up (its contribution is rejected `unavailable`)."""
    return now - started_at < liveness_timeout or node_id in live


def paused_members(heard: Mapping[str, Heard]) -> frozenset[str]:
    """Members whose latest heartbeat (the election's member table) says they paused participation."""
    return frozenset(node_id for node_id, h in heard.items() if h.paused)


def awaited_members(live_members: Iterable[str], paused_members: Iterable[str], me: str, *,
                    paused: bool = False) -> frozenset[str]:
    """The members whose update a coordinator waits for before it closes a round early (round-v1
    r4): the live federated members, less every member whose latest heartbeat says `paused`, and
    less itself while it is paused for a full disk (`paused`). A paused member sends no update, so
    waiting for it would hold the round until its deadline. Only this rule reads a pause: liveness,
    candidates, the quorum and outcome settling count a paused member like any other."""
    awaited = frozenset(live_members) - frozenset(paused_members)
    return awaited - {me} if paused else awaited


def resume_effects(state: RoundState, now: float) -> list[Effect]:
    """The work a restart re-issues for one restored round (after `Resumed` was fed):

    * collecting, and we have not submitted: train and submit;
    * we submitted and the round is still open: publish our submission again (and re-announce later);
    * published (not yet recorded, or it would not be restored): the coordinator announces again
      and installs, a participant installs;
    * failed (not yet recorded): record the failure.
    """
    if state.phase is Phase.COLLECTING and state.own_submission is None:
        return [TrainAndSubmit(state.manifest)]
    if state.own_submission is not None and state.is_open:
        state.schedule_reannounce(now)
        return [ResubmitOwn(state.own_submission)]
    if state.phase is Phase.PUBLISHED and state.merged_sha256:
        if state.role is Role.COORDINATOR:
            return [RepublishAndInstall()]
        return [InstallAdapter(state.round_id, state.merged_sha256, state.merged_size)]
    if state.phase is Phase.FAILED:
        return [RecordFailure(resumed=True)]
    return []


@dataclass(frozen=True)
class PausedWork:
    """What the node's I/O side knows of one round when its disk has room again."""

    deferred_training: bool  # the round opened while we were paused: we never trained for it
    aggregating: bool  # an aggregation task of ours is running for it
    recorded: bool  # its round record is in state.sqlite


def resume_after_pause_effects(state: RoundState, work: PausedWork) -> list[Effect]:
    """The work a full disk stopped, to redo once writes succeed again (the driver first saves the
    snapshots and outcomes it could not save, then feeds each round a `Tick`):

    * still open, and we deferred training for it: train and submit;
    * ours to aggregate, and no aggregation of ours is running (the one that hit the full disk
      ended): re-plan it: the next `Tick` issues `StartAggregation` again;
    * published, not yet recorded: install the merged adapter (and record it);
    * failed, not yet recorded: record the failure.
    """
    if state.is_open and work.deferred_training:
        return [TrainAndSubmit(state.manifest)]
    if state.phase is Phase.AGGREGATING and state.role is Role.COORDINATOR and not work.aggregating:
        state.aggregation_started = False
        return []
    if state.phase is Phase.PUBLISHED and state.merged_sha256 and not work.recorded:
        return [InstallAdapter(state.round_id, state.merged_sha256, state.merged_size)]
    if state.phase is Phase.FAILED and not work.recorded:
        return [RecordFailure(resumed=True)]
    return []


def supersedes(new: RoundManifest, old: RoundManifest) -> bool:
    """Round n opened in term t loses to round n opened in a later term (what the manifests say:
    an open round's own term moves on at a failover, its manifest's does not)."""
    return new.round_number == old.round_number and new.term > old.term


def persisted_view(state: RoundState) -> tuple[Any, ...]:
    """What must reach state.sqlite when it changes. A participant's view of the accepted set is
    left out (persisting it per submission is quadratic in the round size): after a restart or
    a failover, participants re-announce, and the coordinator's signed aggregate is the record."""
    counts = (len(state.accepted), len(state.rejections)) if state.role is Role.COORDINATOR else ()
    return (state.phase, state.term, state.role, state.own_submission is not None, state.outcome_unknown,
            state.merged_sha256, len(state.conflicts), *counts)


@dataclass
class RoundBook:
    """All of a node's rounds in memory, and the coordinator and term it follows."""

    me: str
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    coordinator: str = ""
    term: int = 0
    base_model_hash: str = ""  # "" accepts any manifest's
    reannounce_seconds: float = DEFAULT_REANNOUNCE_SECONDS
    max_in_memory: int = MAX_ROUNDS_IN_MEMORY
    max_pending: int = MAX_PENDING_MANIFESTS
    sync_retry_seconds: float = DEFAULT_SYNC_RETRY_SECONDS
    coordinator_since: float = -math.inf
    rounds: dict[str, RoundState] = field(default_factory=dict)
    pending: dict[str, RoundManifest] = field(default_factory=dict)
    synced_at: dict[str, float] = field(default_factory=dict)  # open round id -> when we last asked for it

    # -- queries -------------------------------------------------------------------------------
    def open_round(self) -> RoundState | None:
        opened = [r for r in self.rounds.values() if r.phase not in TERMINAL]
        return max(opened, key=lambda r: (r.manifest.round_number, r.term)) if opened else None

    def latest(self) -> RoundState | None:
        return max(self.rounds.values(), key=lambda r: (r.manifest.round_number, r.term), default=None)

    def unsettled(self, round_id: str) -> bool:
        """A round we took over whose outcome is still in question (outcome.py)."""
        state = self.rounds.get(round_id)
        return state is not None and state.outcome_unknown and state.role is Role.COORDINATOR

    def concluding(self, round_id: str) -> bool:
        """Still ours to aggregate: an earlier coordinator's outcome may have arrived meanwhile (it
        stands), or the election may have handed the round to another node."""
        state = self.rounds.get(round_id)
        return state is not None and state.phase is Phase.AGGREGATING and state.role is Role.COORDINATOR

    def next_timer(self, now: float) -> float | None:
        timers = [t for r in self.rounds.values() if (t := r.next_timer()) is not None]
        if self.coordinator == self.me and self.coordinator_since + self.policy.settle_seconds > now:
            timers.append(self.coordinator_since + self.policy.settle_seconds)  # may open a round then
        return min(timers) if timers else None

    # -- one round ----------------------------------------------------------------------------
    def feed(self, round_id: str, event: RoundEvent) -> BookOutcome:
        state = self.rounds[round_id]
        before, conflicts = persisted_view(state), len(state.conflicts)
        outcome = state.handle(event)
        steps: list[Step] = []
        if persisted_view(state) != before:
            steps.append((round_id, SaveRound()))
        if len(state.conflicts) > conflicts:
            steps.append((round_id, ConflictsFound(len(state.conflicts) - conflicts)))
        steps.extend((round_id, e) for e in outcome.effects)
        return BookOutcome(outcome.validation, tuple(steps))

    def add(self, state: RoundState) -> None:
        """A round restored from state.sqlite."""
        self.rounds[state.round_id] = state

    def forget_old(self, pinned: Set[str] = frozenset()) -> list[str]:
        """Drop the oldest finished rounds beyond `max_in_memory` (not those in `pinned`: still
        being installed). Returns the round ids dropped."""
        finished = sorted((r for r in self.rounds.values() if r.phase in TERMINAL),
                          key=lambda r: (r.manifest.round_number, r.term))
        dropped = [r.round_id for r in finished[: max(0, len(finished) - self.max_in_memory)]
                   if r.round_id not in pinned]
        for round_id in dropped:
            del self.rounds[round_id]
            self.synced_at.pop(round_id, None)
        return dropped

    def forget(self, round_ids: Set[str]) -> list[str]:
        """Drop these rounds (retention collected them from disk), open or pending ones included.
        Returns the round ids that were held."""
        held = sorted(rid for rid in round_ids if rid in self.rounds or rid in self.pending)
        for round_id in round_ids:
            self.rounds.pop(round_id, None)
            self.pending.pop(round_id, None)
            self.synced_at.pop(round_id, None)
        return held

    # -- inputs ----------------------------------------------------------------------------------
    def manifest(self, manifest: RoundManifest, now: float, *, finished: bool = False,
                 highest_published: int = 0) -> BookOutcome:
        """A validated manifest from the network. `finished`: state.sqlite records the round;
        `highest_published`: the highest round number we installed a merged adapter for. A new
        round numbered at or below it is IGNOREd (`stale_round_number`): that number already has
        its one merged adapter (a coordinator that missed it, e.g. restarted and re-elected, would
        otherwise publish a second one under another round id)."""
        if manifest.round_id in self.rounds:
            return self.feed(manifest.round_id, ManifestSeen(now, manifest))
        if finished:
            return BookOutcome(Validation(Verdict.IGNORE, "round_finished", manifest.round_id))
        if manifest.round_number <= highest_published:
            return BookOutcome(Validation(Verdict.IGNORE, "stale_round_number",
                                          f"round {manifest.round_number} ({manifest.round_id}): round "
                                          f"{highest_published} is published already"))
        if manifest.coordinator_node_id != self.coordinator or manifest.term < self.term:
            if len(self.pending) < self.max_pending or manifest.round_id in self.pending:
                self.pending[manifest.round_id] = manifest
            return BookOutcome(Validation(Verdict.IGNORE, "not_coordinator",
                                          f"{manifest.coordinator_node_id} term {manifest.term}; "
                                          f"following {self.coordinator}"))
        current = self.open_round()
        if current is not None and (current.manifest.round_number, current.manifest.term) >= (
                manifest.round_number, manifest.term):
            return BookOutcome(Validation(Verdict.IGNORE, "superseded", manifest.round_id))
        return self.open(manifest, now)

    def open(self, manifest: RoundManifest, now: float) -> BookOutcome:
        """Adopt a round (ours, just signed, or a received one the rules above let through), and
        supersede our open rounds of the same number from an earlier term."""
        if self.base_model_hash and manifest.base_model_hash and manifest.base_model_hash != self.base_model_hash:
            return BookOutcome(Validation(
                Verdict.IGNORE, "base_model_mismatch",
                f"base model hash {manifest.base_model_hash[:16]}... differs from ours "
                f"{self.base_model_hash[:16]}...; refusing round {manifest.round_id}"))
        state = RoundState(manifest, node_id=self.me, reannounce_seconds=self.reannounce_seconds)
        if state.coordinator_node_id != self.coordinator and self.coordinator:
            state.handle(CoordinatorChanged(self.term, self.coordinator, now))
        self.rounds[manifest.round_id] = state
        steps: list[Step] = [(manifest.round_id, SaveRound(new=True))]
        fed = self.feed(manifest.round_id, ManifestSeen(now, manifest))
        steps.extend(fed.steps)
        if state.role is Role.COORDINATOR:  # the coordinator holds data too: it trains like everyone
            steps.append((manifest.round_id, TrainAndSubmit(manifest)))
        for old in list(self.rounds.values()):
            if old.round_id != manifest.round_id and old.phase not in TERMINAL and supersedes(manifest, old.manifest):
                steps.extend(self.feed(old.round_id, Superseded(manifest.round_id, now)).steps)
                steps.append((old.round_id, RecordFailure()))
        return BookOutcome(fed.validation, tuple(steps))

    def coordinator_changed(self, change: CoordinatorChanged) -> BookOutcome:
        if change.coordinator_node_id == self.me and self.coordinator != self.me:
            self.coordinator_since = change.now
        self.coordinator, self.term = change.coordinator_node_id, change.term
        steps: list[Step] = []
        for state in list(self.rounds.values()):
            if state.phase not in TERMINAL:
                steps.extend(self.feed(state.round_id, change).steps)
        for round_id, manifest in list(self.pending.items()):
            if manifest.coordinator_node_id == self.coordinator:
                del self.pending[round_id]
                if round_id not in self.rounds:
                    steps.extend(self.manifest(manifest, change.now).steps)
        return BookOutcome(ACCEPTED, tuple(steps))

    def tick(self, now: float, live_members: Iterable[str], *, paused: bool = False,
             paused_members: Iterable[str] = ()) -> BookOutcome:
        """Time passed: every round's clock, and the close-early rule for the rounds we coordinate.
        `live_members`: the live federated members; `paused_members`: those whose latest heartbeat
        says they paused participation; `paused`: we are paused for a full disk. Neither kind of
        pause is waited for (`awaited_members`)."""
        live = awaited_members(live_members, paused_members, self.me, paused=paused)
        steps: list[Step] = []
        for state in list(self.rounds.values()):
            if state.phase not in TERMINAL or state.role is Role.COORDINATOR:
                steps.extend(self.feed(state.round_id, Tick(now)).steps)
            if state.close_early_due(live):
                steps.extend(self.feed(state.round_id, CloseSubmissions(now)).steps)
        return BookOutcome(ACCEPTED, tuple(steps))

    def resume(self, now: float) -> BookOutcome:
        """After a restart (every round restored from state.sqlite): what the old process left
        undone, round by round: `Resumed` (a coordinator first settles what happened while it was
        down), then the work to re-issue (`resume_effects`), then the round's clock."""
        steps: list[Step] = []
        for state in list(self.rounds.values()):
            steps.extend(self.feed(state.round_id, Resumed(now)).steps)
            steps.extend((state.round_id, e) for e in resume_effects(state, now))
            steps.extend(self.feed(state.round_id, Tick(now)).steps)
        return BookOutcome(ACCEPTED, tuple(steps))

    def may_open_next(self) -> bool:
        """The next-round rule's first condition (cheap, no history needed): we coordinate and no
        round is open."""
        return self.coordinator == self.me and self.open_round() is None

    def next_round(self, now: float, history: History, *, force: bool = False) -> OpenRound | None:
        """The next round to open, if we coordinate and the rules allow it now."""
        if not self.may_open_next():
            return None
        if not next_round_due(now=now, policy=self.policy, history=history,
                              coordinator_since=self.coordinator_since, force=force):
            return None
        number = history.highest_round_number + 1
        return OpenRound(f"r{number}-t{self.term}", number, self.term)

    def heartbeat(self, *, open_round_id: str, open_round_finished: bool, last_round_number: int,
                  now: float) -> BookOutcome:
        """A peer's heartbeat: the round it has open, and the last round it finished."""
        steps: list[Step] = []
        if open_round_id and open_round_id not in self.rounds and not open_round_finished:
            steps.append((open_round_id, SyncFrom()))
        if last_round_number:
            # Our round that this peer is already past: we missed its outcome (down, partitioned).
            # The peer holds the signed AggregateAnnounce / RoundFailed; without it we would wait forever.
            for state in self.rounds.values():
                if state.phase in TERMINAL or state.manifest.round_number > last_round_number:
                    continue
                if now - self.synced_at.get(state.round_id, -math.inf) >= self.sync_retry_seconds:
                    self.synced_at[state.round_id] = now
                    steps.append((state.round_id, SyncFrom(past=True)))
        return BookOutcome(ACCEPTED, tuple(steps))
