"""Events fed to a `RoundState` and the effects it returns (see round_state.py).

Events from the network (`ManifestSeen`, `SubmissionReceived`, `AggregateSeen`, `FailureSeen`)
must already have passed `fednode.wire.validate` (signature, community, replay window). Local
events (`CloseSubmissions`, `ContributionRejected`, `AggregationDone`, `AggregationFailed`, `Superseded`)
report what the driver did. `CoordinatorChanged` comes from the election. Every event carries
`now`, the driver's clock value.

Effects carry *unsigned* messages where a message is due: the driver signs them with the node's
identity (`fednode.wire.codec.sign`) and publishes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from fednode.consensus.common import CoordinatorChanged, Effect, Tick
from fednode.wire.messages import (
    AggregateAnnounce,
    Contribution,
    RoundFailed,
    RoundManifest,
    SubmissionAnnounce,
)

# ---- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestSeen:
    """The round's manifest was published (coordinator) or received (participant). `manifest`
    None means "the one this state was built from"; a different one is IGNOREd."""

    now: float
    manifest: RoundManifest | None = None


@dataclass(frozen=True, slots=True)
class SubmissionReceived:
    """A (validated) SubmissionAnnounce, ours or a peer's. Judged by the round's rules."""

    announce: SubmissionAnnounce
    now: float


@dataclass(frozen=True, slots=True)
class AggregateSeen:
    announce: AggregateAnnounce
    now: float


@dataclass(frozen=True, slots=True)
class FailureSeen:
    failure: RoundFailed
    now: float


@dataclass(frozen=True, slots=True)
class SyncAnswered:
    """A member answered our outcome query (`QueryOutcome`) for this round, and its answer held no
    AggregateAnnounce or RoundFailed for it (an answer that holds one is fed as AggregateSeen /
    FailureSeen). `live_members` is the driver's current view of the live federated members."""

    node_id: str
    live_members: frozenset[str]
    now: float
    # live members whose latest heartbeat does not name us coordinator of our term (election-v1
    # rule 13): while any remain, an answer proves nothing (a rival claimant may be concluding the round)
    unendorsed: frozenset[str] = frozenset()
    # federated members heard within the rejoin wait (round-v1 r7): the answers must be a majority of them
    recent: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Resumed:
    """Local: this node restarted and restored the round from its snapshot. A coordinator does not
    know what happened while it was down (another node may have taken the round over and concluded
    it), so it settles the outcome first, as after a takeover."""

    now: float


@dataclass(frozen=True, slots=True)
class CloseSubmissions:
    """Coordinator only: stop collecting now and aggregate (needs >= min_participants accepted)."""

    now: float


@dataclass(frozen=True, slots=True)
class ContributionRejected:
    """The driver found an accepted submission unusable (blob unavailable, fails update
    validation). It is dropped and recorded; during AGGREGATING the coordinator re-plans."""

    node_id: str
    reason: str
    now: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AggregationDone:
    merged_sha256: str
    merged_size: int
    now: float


@dataclass(frozen=True, slots=True)
class AggregationFailed:
    reason: str
    now: float


@dataclass(frozen=True, slots=True)
class Superseded:
    """Local: a manifest for the same round number from a later term was adopted (two coordinators
    opened round n around a contested election). This round can never finish: close it as failed
    here, publishing nothing (the other round's coordinator speaks for round n)."""

    by_round_id: str
    now: float


RoundEvent = (
    Tick | ManifestSeen | SubmissionReceived | AggregateSeen | FailureSeen | SyncAnswered | CoordinatorChanged
    | Resumed | CloseSubmissions | ContributionRejected | AggregationDone | AggregationFailed | Superseded
)

# ---- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainAndSubmit(Effect):
    """Participant: train on local data from the manifest's start adapter, then publish a
    SubmissionAnnounce and feed it back as SubmissionReceived."""

    manifest: RoundManifest


@dataclass(frozen=True, slots=True)
class StartAggregation(Effect):
    """Coordinator: fetch the blobs of `announces` (sorted by node id), validate, aggregate with
    `method`, weights = num_samples; then feed AggregationDone (or ContributionRejected / AggregationFailed)."""

    round_id: str
    method: str
    contributions: tuple[Contribution, ...]
    announces: tuple[SubmissionAnnounce, ...]


@dataclass(frozen=True, slots=True)
class PublishAggregate(Effect):
    """Coordinator: sign and publish this AggregateAnnounce; serve the merged blob."""

    announce: AggregateAnnounce


@dataclass(frozen=True, slots=True)
class PublishFailure(Effect):
    """Coordinator: sign and publish this RoundFailed."""

    failure: RoundFailed

    @property
    def reason(self) -> str:
        return self.failure.reason


@dataclass(frozen=True, slots=True)
class InstallAdapter(Effect):
    """Participant: fetch the merged blob (from any holder), verify its sha256, install it."""

    round_id: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Reannounce(Effect):
    """Participant: the coordinator changed while the round is open; publish our (already signed)
    SubmissionAnnounce again so the new coordinator holds it even if it missed the first copy."""

    announce: SubmissionAnnounce


@dataclass(frozen=True, slots=True)
class QueryOutcome(Effect):
    """Coordinator that took the round over: ask live members (and holders) for the round's signed
    outcome, again and again, until the round is settled (`RoundState.outcome_unknown` is False).
    Feed each answer's messages as AggregateSeen / FailureSeen, or SyncAnswered when it held none."""

    round_id: str
