"""One outcome per round (round-v1.md): the pure rule behind the r36 fork of issue 13.

A node that takes a round over does not aggregate (or fail) it until its outcome is settled; an
AggregateAnnounce from an earlier coordinator settles it; two different outcomes for one round
keep the earlier term's and are recorded as a conflict; a refused member no longer keeps the round
open to the deadline.
"""

from __future__ import annotations

import json

from fednode.consensus import (
    AggregateSeen,
    AggregationDone,
    CoordinatorChanged,
    FailureSeen,
    InstallAdapter,
    ManifestSeen,
    Phase,
    PublishAggregate,
    PublishFailure,
    QueryOutcome,
    Resumed,
    Role,
    RoundState,
    StartAggregation,
    SubmissionReceived,
    SyncAnswered,
    Tick,
)
from fednode.consensus.outcome import close_early_due, may_conclude_unpublished
from fednode.identity import Identity
from fednode.wire import AggregateAnnounce, RoundFailed, Verdict, codec
from fednode.wire.messages import Contribution

from .helpers import EPOCH, announce, identity, manifest

A, B, C, D = (identity(i) for i in range(4))  # A coordinates term 1; C takes over in term 2
LIVE = frozenset({B.node_id, C.node_id, D.node_id})  # A is dead


def aggregate(who: Identity, term: int, sha: str, contributions: tuple[Contribution, ...]) -> AggregateAnnounce:
    return codec.sign(AggregateAnnounce(
        community_id="test-community", round_id="round-1", round_number=1, coordinator_node_id=who.node_id,
        term=term, merged_sha256=sha, merged_size=7, aggregation="fedavg", contributions=contributions,
        announced_at=EPOCH + 10), who)


def failure(who: Identity, term: int) -> RoundFailed:
    return codec.sign(RoundFailed(community_id="test-community", round_id="round-1", round_number=1,
                                  coordinator_node_id=who.node_id, term=term, reason="too few",
                                  failed_at=EPOCH + 10), who)


def taken_over(*, min_participants: int = 2, at: float = EPOCH + 100) -> RoundState:
    """C's view of A's round (term 1): C accepted its own and B's update, missed A's announce, and
    the deadline (60 s) passed; then C wins term 2."""
    state = RoundState(manifest(A, term=1, min_participants=min_participants, round_timeout_seconds=60.0),
                       node_id=C.node_id)
    state.handle(ManifestSeen(EPOCH))
    state.handle(SubmissionReceived(announce(C), EPOCH + 1))
    state.handle(SubmissionReceived(announce(B), EPOCH + 2))
    state.handle(Tick(EPOCH + 61))
    assert state.phase is Phase.AGGREGATING and state.role is Role.PARTICIPANT
    out = state.handle(CoordinatorChanged(2, C.node_id, at, previous_node_id=A.node_id))
    assert state.role is Role.COORDINATOR and out.effects == (QueryOutcome("round-1"),)
    return state


def test_taken_over_round_is_not_aggregated_until_settled() -> None:
    state = taken_over()
    assert state.outcome_unknown
    for t in (EPOCH + 200, EPOCH + 10_000):  # however long it waits: a failed sync proves nothing
        assert state.handle(Tick(t)).effects == ()
    assert state.phase is Phase.AGGREGATING and not state.aggregation_started
    # one live member answered "no outcome": D has not answered yet
    out = state.handle(SyncAnswered(B.node_id, LIVE, EPOCH + 10_001))
    assert out.effects == () and state.outcome_unknown
    # answers from a member that is not live (A came back? no: a stranger) do not count for D
    state.handle(SyncAnswered(A.node_id, LIVE, EPOCH + 10_002))
    assert state.outcome_unknown
    # every live member but C answered without an outcome: nobody live holds one, C may decide
    out = state.handle(SyncAnswered(D.node_id, LIVE, EPOCH + 10_003))
    assert not state.outcome_unknown
    (start,) = out.effects
    assert isinstance(start, StartAggregation) and [c.node_id for c in start.contributions] == sorted(
        [B.node_id, C.node_id])


def test_unsettled_round_is_not_failed_either() -> None:
    state = taken_over(min_participants=3)  # too few accepted: it would publish RoundFailed at once
    assert state.handle(Tick(EPOCH + 500)).effects == () and state.phase is Phase.AGGREGATING
    out = state.handle(SyncAnswered(B.node_id, frozenset({B.node_id, C.node_id}), EPOCH + 501))
    assert isinstance(out.effects[0], PublishFailure) and state.phase is Phase.FAILED


def test_open_round_taken_over_closes_on_time_but_waits_for_the_outcome() -> None:
    state = RoundState(manifest(A, term=1, round_timeout_seconds=60.0), node_id=C.node_id)
    state.handle(ManifestSeen(EPOCH))
    state.handle(SubmissionReceived(announce(C), EPOCH + 1))
    state.handle(SubmissionReceived(announce(B), EPOCH + 2))
    state.handle(CoordinatorChanged(2, C.node_id, EPOCH + 5))
    assert not state.close_early_due(LIVE)  # A may have closed it early and published
    assert state.handle(Tick(EPOCH + 61)).effects == ()
    assert state.phase is Phase.AGGREGATING  # collection is over (late submissions are late)...
    v = state.handle(SubmissionReceived(announce(D), EPOCH + 62)).validation
    assert (v.verdict, v.reason) == (Verdict.IGNORE, "late")
    assert not state.aggregation_started  # ...but nothing is concluded


def test_announce_seen_is_adopted_by_the_new_coordinator() -> None:
    state = taken_over()
    theirs = aggregate(A, 1, "a" * 64, (Contribution(A.node_id, "1" * 64, 10), Contribution(B.node_id, "2" * 64, 10)))
    out = state.handle(AggregateSeen(theirs, EPOCH + 101))  # from sync (or late gossip): term 1 < 2
    assert out.accepted and state.phase is Phase.PUBLISHED and not state.outcome_unknown
    assert out.effects == (InstallAdapter("round-1", "a" * 64, 7),)
    assert state.merged_sha256 == "a" * 64
    # nothing more to aggregate, ever
    assert state.handle(Tick(EPOCH + 10_000)).effects == ()
    assert state.handle(SyncAnswered(B.node_id, LIVE, EPOCH + 10_001)).validation.reason == "settled"


def test_failure_seen_is_adopted_by_the_new_coordinator() -> None:
    state = taken_over()
    out = state.handle(FailureSeen(failure(A, 1), EPOCH + 101))
    assert out.accepted and state.phase is Phase.FAILED and out.effects == ()


def test_announce_from_someone_who_did_not_coordinate_that_term_is_ignored() -> None:
    state = taken_over()
    forged = aggregate(B, 1, "b" * 64, (Contribution(B.node_id, "2" * 64, 10),))  # term 1 was A's
    assert state.handle(AggregateSeen(forged, EPOCH + 101)).validation.reason == "not_coordinator"
    early = aggregate(A, 0, "b" * 64, (Contribution(B.node_id, "2" * 64, 10),))  # before the manifest's term
    assert state.handle(AggregateSeen(early, EPOCH + 101)).validation.reason == "not_coordinator"
    assert state.outcome_unknown


def test_participant_accepts_the_outcome_of_a_stepped_down_coordinator() -> None:
    # B missed A's announce, then followed C (term 2): A's term-1 announce, synced later, still
    # settles B's round (it was ignored as not_coordinator before round-v1 r1).
    state = RoundState(manifest(A, term=1), node_id=B.node_id)
    state.handle(ManifestSeen(EPOCH))
    state.handle(CoordinatorChanged(2, C.node_id, EPOCH + 5))
    theirs = aggregate(A, 1, "a" * 64, (Contribution(A.node_id, "1" * 64, 10),))
    assert state.handle(AggregateSeen(theirs, EPOCH + 6)).accepted and state.phase is Phase.PUBLISHED


def test_two_outcomes_keep_the_earlier_term_and_report_the_conflict() -> None:
    state = taken_over()
    # C concluded "not published" (every live member said so), aggregated, published in term 2...
    state.handle(SyncAnswered(B.node_id, LIVE - {D.node_id}, EPOCH + 101))
    out = state.handle(AggregationDone("c" * 64, 7, EPOCH + 102))
    assert isinstance(out.effects[0], PublishAggregate) and state.phase is Phase.PUBLISHED
    # ...then A comes back with the announce it had published in term 1: the earlier term stands
    theirs = aggregate(A, 1, "a" * 64, (Contribution(A.node_id, "1" * 64, 10),))
    out = state.handle(AggregateSeen(theirs, EPOCH + 200))
    assert out.accepted and out.effects == (InstallAdapter("round-1", "a" * 64, 7),)
    assert state.phase is Phase.PUBLISHED and state.merged_sha256 == "a" * 64
    (conflict,) = state.conflicts
    assert (conflict.kept.term, conflict.kept.merged_sha256) == (1, "a" * 64)
    assert (conflict.other.term, conflict.other.merged_sha256) == (2, "c" * 64)
    # seen again: the same conflict, counted once; the record survives a snapshot
    assert state.handle(AggregateSeen(theirs, EPOCH + 201)).validation.reason == "round_closed"
    assert len(state.conflicts) == 1
    back = RoundState.restore(json.loads(json.dumps(state.snapshot())))
    assert back.conflicts == state.conflicts and back.outcome == state.outcome


def test_a_later_terms_different_outcome_is_refused_and_reported() -> None:
    # B installed A's term-1 aggregate; C's term-2 re-aggregation of the same round arrives
    state = RoundState(manifest(A, term=1), node_id=B.node_id)
    state.handle(ManifestSeen(EPOCH))
    ours = aggregate(A, 1, "a" * 64, (Contribution(A.node_id, "1" * 64, 10),))
    state.handle(AggregateSeen(ours, EPOCH + 5))
    state.handle(CoordinatorChanged(2, C.node_id, EPOCH + 6))  # terminal: the round ignores it
    theirs = aggregate(C, 2, "c" * 64, (Contribution(C.node_id, "3" * 64, 10),))
    out = state.handle(AggregateSeen(theirs, EPOCH + 7))
    assert (out.validation.verdict, out.validation.reason) == (Verdict.IGNORE, "outcome_conflict")
    assert out.effects == () and state.merged_sha256 == "a" * 64
    (conflict,) = state.conflicts
    assert conflict.kept.term == 1 and conflict.other.term == 2
    # the same merged bytes in a later term (deterministic re-aggregation) are no conflict
    same = aggregate(C, 2, "a" * 64, (Contribution(A.node_id, "1" * 64, 10),))
    assert state.handle(AggregateSeen(same, EPOCH + 8)).validation.reason == "round_closed"
    assert len(state.conflicts) == 1


def test_failed_versus_published_is_reported_and_the_phase_stays() -> None:
    state = RoundState(manifest(A, term=1), node_id=B.node_id)
    state.handle(ManifestSeen(EPOCH))
    state.handle(CoordinatorChanged(2, C.node_id, EPOCH + 1))
    state.handle(AggregateSeen(aggregate(C, 2, "c" * 64, (Contribution(C.node_id, "3" * 64, 10),)), EPOCH + 2))
    out = state.handle(FailureSeen(failure(A, 1), EPOCH + 3))
    assert out.validation.reason == "outcome_conflict" and state.phase is Phase.PUBLISHED
    assert len(state.conflicts) == 1


def test_close_early_counts_refused_members() -> None:
    live = {A.node_id, B.node_id, C.node_id, D.node_id}
    assert not close_early_due(accepted={A.node_id, B.node_id}, refused=set(), live_members=live, min_participants=2)
    assert close_early_due(accepted={A.node_id, B.node_id, C.node_id}, refused={D.node_id}, live_members=live,
                           min_participants=2)
    assert not close_early_due(accepted={A.node_id}, refused={B.node_id, C.node_id, D.node_id}, live_members=live,
                               min_participants=2)
    # in the machine: D re-announced B's delta under its own name (REJECT duplicate_delta)
    state = RoundState(manifest(A, min_participants=2, max_participants=8), node_id=A.node_id)
    state.handle(ManifestSeen(EPOCH))
    for who in (A, B, C):
        state.handle(SubmissionReceived(announce(who), EPOCH + 1))
    copied = announce(D, payload=b"delta of " + B.node_id.encode())
    assert state.handle(SubmissionReceived(copied, EPOCH + 2)).validation.reason == "duplicate_delta"
    assert state.close_early_due(live)
    assert RoundState.restore(json.loads(json.dumps(state.snapshot()))).refused == {D.node_id}


def test_may_conclude_unpublished_needs_every_live_member_and_at_least_one() -> None:
    me = C.node_id
    assert not may_conclude_unpublished(set(), {me}, me)  # alone: nobody can vouch
    assert not may_conclude_unpublished({B.node_id}, {me, B.node_id, D.node_id}, me)
    assert may_conclude_unpublished({B.node_id, D.node_id}, {me, B.node_id, D.node_id}, me)
    assert may_conclude_unpublished({B.node_id, D.node_id, A.node_id}, {me, B.node_id}, me)


def test_restarted_coordinator_settles_before_it_re_aggregates() -> None:
    # A coordinator restored mid-aggregation (the work died with the process) does not know whether
    # another node took the round over and concluded it while it was down.
    state = RoundState(manifest(A, term=1, min_participants=2, round_timeout_seconds=60.0), node_id=A.node_id)
    state.handle(ManifestSeen(EPOCH))
    state.handle(SubmissionReceived(announce(A), EPOCH + 1))
    state.handle(SubmissionReceived(announce(B), EPOCH + 2))
    assert isinstance(state.handle(Tick(EPOCH + 61)).effects[0], StartAggregation)
    back = RoundState.restore(json.loads(json.dumps(state.snapshot())))
    out = back.handle(Resumed(EPOCH + 500))
    assert out.effects == (QueryOutcome("round-1"),) and back.outcome_unknown
    assert back.handle(Tick(EPOCH + 501)).effects == ()
    # answers do not settle it before the election has named a coordinator since the restart: the
    # members may hear A while none of them receives what A publishes (fault seed 1734665193, s16)
    unconfirmed = RoundState.restore(back.snapshot())
    unconfirmed.handle(Resumed(EPOCH + 500))
    out = unconfirmed.handle(SyncAnswered(B.node_id, frozenset({A.node_id, B.node_id}), EPOCH + 501))
    assert out.validation.reason == "restored_unconfirmed" and unconfirmed.outcome_unknown
    # A wins term 2: a takeover of its own round like any other; now the answers count
    unconfirmed.handle(CoordinatorChanged(2, A.node_id, EPOCH + 502))
    out = unconfirmed.handle(SyncAnswered(B.node_id, frozenset({A.node_id, B.node_id}), EPOCH + 503))
    assert not unconfirmed.outcome_unknown and isinstance(out.effects[0], StartAggregation)
    # C took it over in term 2 and published; A learns of C, then of C's announce
    back.handle(CoordinatorChanged(2, C.node_id, EPOCH + 502))
    assert back.role is Role.PARTICIPANT
    out = back.handle(AggregateSeen(aggregate(C, 2, "c" * 64, (Contribution(C.node_id, "3" * 64, 10),)), EPOCH + 503))
    assert out.accepted and back.phase is Phase.PUBLISHED and out.effects == (InstallAdapter("round-1", "c" * 64, 7),)
    # a participant restored is not in question: it never concludes a round itself
    part = RoundState(manifest(A, term=1), node_id=B.node_id)
    part.handle(ManifestSeen(EPOCH))
    assert part.handle(Resumed(EPOCH + 5)).effects == () and not part.outcome_unknown


def test_answers_do_not_settle_a_taken_over_round_while_a_live_member_follows_a_rival() -> None:
    """Fault seed 1038748767: two claimants of term 9 each heard "no outcome" from the members they
    knew, and both aggregated. Under election-v1 rule 13 an answer counts only while no live member
    follows another coordinator of the term (B's heartbeat names D here); answers given meanwhile
    are not kept, since the member may yet receive the rival's outcome."""
    state = taken_over()
    out = state.handle(SyncAnswered(B.node_id, LIVE, EPOCH + 200, frozenset({B.node_id})))
    assert out.validation.reason == "unendorsed" and out.effects == ()
    out = state.handle(SyncAnswered(D.node_id, LIVE, EPOCH + 201, frozenset({B.node_id})))
    assert out.validation.reason == "unendorsed" and state.outcome_unknown and not state.sync_answered
    state.handle(SyncAnswered(D.node_id, LIVE, EPOCH + 202))  # B now names C: answers count again
    assert state.outcome_unknown  # B's earlier answer was not kept
    out = state.handle(SyncAnswered(B.node_id, LIVE, EPOCH + 203))
    assert not state.outcome_unknown and isinstance(out.effects[0], StartAggregation)


def test_answers_must_be_a_majority_of_the_members_heard_recently() -> None:
    """Fault seed 1038748767, s19: the term-7 coordinator B restarted and concluded round 61, and D
    installed it; neither was reachable yet from C, which won term 8 hearing only A, took the round
    over, heard "none" from A and published a second merged adapter. The four were all heard within
    the rejoin wait, so A's answer and C's own are 2 of 4: not a majority, C keeps asking."""
    me = C.node_id
    recent = {A.node_id, B.node_id, C.node_id, D.node_id}
    assert not may_conclude_unpublished({A.node_id}, {me, A.node_id}, me, recent)
    assert may_conclude_unpublished({A.node_id, D.node_id}, {me, A.node_id, D.node_id}, me, recent)  # 3 of 4
    # members gone quiet for the whole window drop out of `recent`: two of the four left for good
    assert may_conclude_unpublished({A.node_id}, {me, A.node_id}, me, {A.node_id, C.node_id})
    # answers from members not in `recent` do not make a majority of it
    assert not may_conclude_unpublished({A.node_id, "stranger-1", "stranger-2"}, {me, A.node_id}, me, recent)
    state = taken_over()  # A, the round's coordinator in term 1, is dead: heard within the wait, not now
    out = state.handle(SyncAnswered(B.node_id, frozenset({me, B.node_id}), EPOCH + 200, recent=frozenset(recent)))
    assert state.outcome_unknown and out.effects == ()
    out = state.handle(SyncAnswered(D.node_id, frozenset({me, B.node_id, D.node_id}), EPOCH + 201,
                                    recent=frozenset({B.node_id, C.node_id, D.node_id})))
    assert not state.outcome_unknown and isinstance(out.effects[0], StartAggregation)


def test_a_former_coordinator_heard_lately_must_answer_itself() -> None:
    """Fault seed 1038748767, s11 (on round-v1 r7): the term-3 coordinator A restarted, concluded
    round 14 and announced it while its gossip mesh re-formed, so nobody received it. C won term 4
    15 s later and heard "none" from B and D, 3 of the 4 recent members, and concluded the round
    again. A was heard within the rejoin wait: until it answers, or stays silent for the whole wait,
    C keeps asking."""
    me, recent = C.node_id, {A.node_id, B.node_id, C.node_id, D.node_id}
    live = {me, B.node_id, D.node_id}
    assert not may_conclude_unpublished({B.node_id, D.node_id}, live, me, recent, former={A.node_id})
    assert may_conclude_unpublished({A.node_id, B.node_id, D.node_id}, live | {A.node_id}, me, recent,
                                    former={A.node_id})
    assert may_conclude_unpublished({B.node_id, D.node_id}, live, me, recent - {A.node_id}, former={A.node_id})
    assert may_conclude_unpublished({B.node_id, D.node_id}, live, me, recent, former={me})  # ourselves: no
    state = taken_over()
    out = state.handle(SyncAnswered(B.node_id, frozenset(live), EPOCH + 200, recent=frozenset(recent)))
    state.handle(SyncAnswered(D.node_id, frozenset(live), EPOCH + 201, recent=frozenset(recent)))
    assert state.outcome_unknown
    out = state.handle(SyncAnswered(D.node_id, frozenset(live), EPOCH + 260, recent=frozenset(recent - {A.node_id})))
    assert not state.outcome_unknown and isinstance(out.effects[0], StartAggregation)
