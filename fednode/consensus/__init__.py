"""Pure consensus layer: the round state machine and the coordinator election.

Sans-IO like the wire layer: no trio, libp2p or torch imports (tests/consensus checks it in a
subprocess). A driver (the daemon's round driver, or `fednode.coordinator`) feeds events that
carry the clock value and performs the effects it gets back:

    state = RoundState(manifest, node_id=me)            # role from the manifest's signer
    out = state.handle(SubmissionReceived(announce, now))
    out.validation                                       # ACCEPT / IGNORE / REJECT with a reason
    for effect in out.effects: ...                       # StartAggregation, PublishFailure, ...
    state.next_timer()                                   # feed Tick(now) then

    election = ElectionState(me, ElectionConfig(), now=now)
    out = election.handle(HeartbeatSeen(hb, now))        # or ClaimSeen / Tick
    # effects: PublishClaim(term), CoordinatorChanged(...) -> pass it to each open RoundState.handle
"""

from fednode.consensus.common import CoordinatorChanged, Effect, Outcome, Tick
from fednode.consensus.election import (
    BeatSoon,
    ClaimSeen,
    ClaimWithheld,
    ElectionConfig,
    ElectionState,
    HeartbeatSeen,
    PublishClaim,
    Quiet,
    SignOfLife,
    TopicReach,
    rank,
)
from fednode.consensus.outcome import OutcomeConflict, SignedOutcome
from fednode.consensus.round_events import (
    AggregateSeen,
    AggregationDone,
    AggregationFailed,
    CloseSubmissions,
    ContributionRejected,
    FailureSeen,
    InstallAdapter,
    ManifestSeen,
    PublishAggregate,
    PublishFailure,
    QueryOutcome,
    Reannounce,
    Resumed,
    StartAggregation,
    SubmissionReceived,
    Superseded,
    SyncAnswered,
    TrainAndSubmit,
)
from fednode.consensus.round_state import TRANSITIONS, Phase, Rejection, Role, RoundState, RoundStatistics, Trigger

__all__ = [
    "TRANSITIONS", "AggregateSeen", "AggregationDone", "AggregationFailed", "BeatSoon", "ClaimSeen", "ClaimWithheld",
    "CloseSubmissions",
    "ContributionRejected", "CoordinatorChanged", "Effect", "ElectionConfig", "ElectionState", "FailureSeen",
    "HeartbeatSeen", "InstallAdapter", "ManifestSeen", "Outcome", "OutcomeConflict", "Phase",
    "PublishAggregate", "PublishClaim", "PublishFailure", "QueryOutcome", "Quiet", "Reannounce", "Rejection", "Resumed",
    "Role",
    "RoundState", "RoundStatistics", "SignOfLife", "SignedOutcome", "StartAggregation", "SubmissionReceived",
    "Superseded", "SyncAnswered", "Tick", "TopicReach", "TrainAndSubmit", "Trigger", "rank",
]
