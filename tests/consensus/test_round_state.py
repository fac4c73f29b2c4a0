"""The round state machine: table, verdicts, timers (on trio's virtual clock), snapshots."""

from __future__ import annotations

import json
import math

import pytest
import trio

from fednode.consensus import (
    TRANSITIONS,
    AggregateSeen,
    AggregationDone,
    AggregationFailed,
    CloseSubmissions,
    ContributionRejected,
    CoordinatorChanged,
    InstallAdapter,
    ManifestSeen,
    Phase,
    PublishAggregate,
    PublishFailure,
    QueryOutcome,
    Reannounce,
    Role,
    RoundState,
    StartAggregation,
    SubmissionReceived,
    Superseded,
    SyncAnswered,
    Tick,
    TrainAndSubmit,
)
from fednode.errors import LocalProtocolError
from fednode.wire import AggregateAnnounce, Verdict, codec

from .helpers import EPOCH, announce, identity, manifest

COORD, P1, P2, P3 = (identity(i) for i in range(4))


def started(role_holder=COORD, **kwargs: object) -> RoundState:
    state = RoundState(manifest(COORD, **kwargs), node_id=role_holder.node_id)
    state.handle(ManifestSeen(EPOCH))
    return state


def test_table_covers_every_state_for_both_roles() -> None:
    for role in Role:
        assert set(TRANSITIONS[role]) == set(Phase)
        for row in TRANSITIONS[role].values():
            assert set(row.values()) <= set(Phase)
    # terminal states have no way out
    for role in Role:
        for phase in (Phase.PUBLISHED, Phase.FAILED):
            assert set(TRANSITIONS[role][phase].values()) == {phase}


def test_role_is_data_from_the_manifest_signer() -> None:
    m = manifest(COORD)
    assert RoundState(m, node_id=COORD.node_id).role is Role.COORDINATOR
    assert RoundState(m, node_id=P1.node_id).role is Role.PARTICIPANT


def test_participant_trains_on_manifest_and_installs_the_aggregate() -> None:
    state = RoundState(manifest(COORD), node_id=P1.node_id)
    out = state.handle(ManifestSeen(EPOCH + 1))
    assert state.phase is Phase.COLLECTING and out.effects == (TrainAndSubmit(state.manifest),)
    assert state.handle(ManifestSeen(EPOCH + 2)).effects == ()  # idempotent
    state.handle(SubmissionReceived(announce(P1, at=EPOCH + 3), EPOCH + 3))
    agg = codec.sign(AggregateAnnounce(
        community_id=state.manifest.community_id, round_id="round-1", round_number=1,
        coordinator_node_id=COORD.node_id, term=0, merged_sha256="c" * 64, merged_size=7,
        aggregation="fedavg", contributions=state.contributions(), announced_at=EPOCH + 4), COORD)
    forged = AggregateAnnounce(**{**agg.__dict__, "coordinator_node_id": P2.node_id, "sig": b""})
    assert state.handle(AggregateSeen(forged, EPOCH + 4)).validation.reason == "not_coordinator"
    out = state.handle(AggregateSeen(agg, EPOCH + 4))
    assert state.phase is Phase.PUBLISHED and out.effects == (InstallAdapter("round-1", "c" * 64, 7),)
    assert state.handle(AggregateSeen(agg, EPOCH + 5)).validation.reason == "round_closed"


def test_submission_verdicts_duplicate_late_full_wrong_round_equivocation() -> None:
    state = started(min_participants=1, max_participants=2)
    first = announce(P1, at=EPOCH + 1)
    assert state.handle(SubmissionReceived(first, EPOCH + 1)).validation.verdict is Verdict.ACCEPT
    dup = state.handle(SubmissionReceived(first, EPOCH + 2)).validation
    assert dup.verdict is Verdict.ACCEPT and dup.reason == "duplicate"
    assert state.statistics().accepted == 1 and state.statistics().total_samples == 10  # counted once
    other = state.handle(SubmissionReceived(announce(P1, payload=b"other"), EPOCH + 2)).validation
    assert (other.verdict, other.reason) == (Verdict.REJECT, "equivocation")
    wrong = state.handle(SubmissionReceived(announce(P2, round_id="round-9"), EPOCH + 2)).validation
    assert (wrong.verdict, wrong.reason) == (Verdict.IGNORE, "wrong_round")
    out = state.handle(SubmissionReceived(announce(P2), EPOCH + 3))  # fills the round: aggregate early
    assert state.phase is Phase.AGGREGATING and isinstance(out.effects[0], StartAggregation)
    assert [c.node_id for c in out.effects[0].contributions] == sorted([P1.node_id, P2.node_id])
    full = state.handle(SubmissionReceived(announce(P3), EPOCH + 4)).validation
    assert (full.verdict, full.reason) == (Verdict.IGNORE, "full")
    late = state.handle(SubmissionReceived(announce(P3), EPOCH + 3600)).validation
    assert (late.verdict, late.reason) == (Verdict.IGNORE, "late")
    assert state.handle(SubmissionReceived(first, EPOCH + 3601)).validation.reason == "duplicate"
    assert state.statistics().accepted == 2
    assert {r.reason for r in state.rejections} == {"equivocation", "wrong_round", "full", "late"}


def test_another_members_delta_reannounced_is_rejected_duplicate_delta() -> None:
    """N5: P2 re-announces P1's delta (same address) with 100x the samples; it must not count twice."""
    state = started(min_participants=1, max_participants=3)
    honest = announce(P1, payload=b"p1's update", num_samples=10, at=EPOCH + 1)
    assert state.handle(SubmissionReceived(honest, EPOCH + 1)).validation.accepted
    copy = announce(P2, payload=b"p1's update", num_samples=1000, at=EPOCH + 2)
    v = state.handle(SubmissionReceived(copy, EPOCH + 2)).validation
    assert (v.verdict, v.reason) == (Verdict.REJECT, "duplicate_delta")
    assert P1.node_id in v.detail
    assert state.handle(SubmissionReceived(copy, EPOCH + 3)).validation.reason == "duplicate_delta"  # every time
    assert state.statistics().accepted == 1 and state.statistics().total_samples == 10
    assert [(r.node_id, r.reason, r.delta_sha256) for r in state.rejections] == [
        (P2.node_id, "duplicate_delta", copy.delta_sha256)] * 2
    assert state.handle(SubmissionReceived(announce(P2, at=EPOCH + 4), EPOCH + 4)).validation.accepted  # its own
    assert state.weights() == {P1.node_id: 0.5, P2.node_id: 0.5}
    # The first owner keeps it: P1's re-announce is still an idempotent duplicate.
    assert state.handle(SubmissionReceived(honest, EPOCH + 5)).validation.reason == "duplicate"


def test_submission_at_exactly_the_deadline_is_late() -> None:
    state = started(min_participants=1)
    v = state.handle(SubmissionReceived(announce(P1), EPOCH + 3600.0)).validation
    assert (v.verdict, v.reason) == (Verdict.IGNORE, "late")
    assert state.phase is Phase.FAILED  # the clock moved first: nothing accepted by the deadline


def test_illegal_local_events_raise_local_protocol_error() -> None:
    state = started()
    with pytest.raises(LocalProtocolError):
        state.handle(AggregationDone("a" * 64, 1, EPOCH + 1))
    participant = RoundState(manifest(COORD), node_id=P1.node_id)
    with pytest.raises(LocalProtocolError):
        participant.handle(CloseSubmissions(EPOCH + 1))
    with pytest.raises(LocalProtocolError):  # below min_participants
        state.handle(CloseSubmissions(EPOCH + 1))
    with pytest.raises(LocalProtocolError):
        state.handle(ContributionRejected(P1.node_id, "blob_unavailable", EPOCH + 1))


def test_aggregation_done_publishes_an_aggregate_with_the_accepted_set() -> None:
    state = started()
    for who in (P2, P1):
        state.handle(SubmissionReceived(announce(who, num_samples=3 if who is P1 else 1), EPOCH + 1))
    out = state.handle(CloseSubmissions(EPOCH + 2))
    assert isinstance(out.effects[0], StartAggregation)
    assert state.weights() == {P1.node_id: 0.75, P2.node_id: 0.25}
    out = state.handle(AggregationDone("d" * 64, 99, EPOCH + 3))
    (effect,) = out.effects
    assert isinstance(effect, PublishAggregate) and state.phase is Phase.PUBLISHED
    assert codec.decode(codec.encode(codec.sign(effect.announce, COORD))) == codec.sign(effect.announce, COORD)
    assert {c.node_id: c.num_samples for c in effect.announce.contributions} == {P1.node_id: 3, P2.node_id: 1}


def test_rejected_contribution_replans_or_fails() -> None:
    state = started(min_participants=2, max_participants=3)
    for who in (P1, P2, P3):
        state.handle(SubmissionReceived(announce(who), EPOCH + 1))
    assert state.phase is Phase.AGGREGATING
    out = state.handle(ContributionRejected(P3.node_id, "invalid_update", EPOCH + 2, "norm"))
    assert isinstance(out.effects[0], StartAggregation) and len(out.effects[0].contributions) == 2
    assert state.handle(SubmissionReceived(announce(P3), EPOCH + 3)).validation.reason == "invalid_update"
    out = state.handle(ContributionRejected(P2.node_id, "blob_unavailable", EPOCH + 3))
    assert state.phase is Phase.FAILED and isinstance(out.effects[0], PublishFailure)
    with pytest.raises(LocalProtocolError):
        state.handle(AggregationFailed("x", EPOCH + 4))


def test_new_coordinator_continues_the_round_with_what_it_accepted() -> None:
    state = RoundState(manifest(COORD, min_participants=2), node_id=P1.node_id)
    state.handle(ManifestSeen(EPOCH))
    mine = announce(P1)
    state.handle(SubmissionReceived(mine, EPOCH + 1))
    state.handle(SubmissionReceived(announce(P2), EPOCH + 2))
    assert state.handle(Tick(EPOCH + 3600)).effects == () and state.phase is Phase.AGGREGATING  # waits
    out = state.handle(CoordinatorChanged(1, P1.node_id, EPOCH + 3601))
    # it took the round over: first it asks whether COORD concluded it (tests/consensus/test_outcome.py)
    assert state.role is Role.COORDINATOR and out.effects == (QueryOutcome("round-1"),)
    out = state.handle(SyncAnswered(P2.node_id, frozenset({P1.node_id, P2.node_id}), EPOCH + 3602))
    assert isinstance(out.effects[0], StartAggregation)
    assert len(out.effects[0].contributions) == 2
    other = RoundState(manifest(COORD), node_id=P2.node_id)
    other.handle(ManifestSeen(EPOCH))
    other.handle(SubmissionReceived(announce(P2), EPOCH + 1))
    assert other.handle(CoordinatorChanged(1, P1.node_id, EPOCH + 5)).effects == (Reannounce(announce(P2)),)
    assert other.handle(CoordinatorChanged(0, COORD.node_id, EPOCH + 6)).validation.reason == "stale_term"


def test_snapshot_is_plain_data_and_restores() -> None:
    state = started(min_participants=2)
    state.handle(SubmissionReceived(announce(P1), EPOCH + 1))
    state.handle(SubmissionReceived(announce(P1, payload=b"x"), EPOCH + 1))
    data = json.loads(json.dumps(state.snapshot()))
    back = RoundState.restore(data)
    assert back.snapshot() == state.snapshot()
    assert back.handle(SubmissionReceived(announce(P1), EPOCH + 2)).validation.reason == "duplicate"
    out = back.handle(SubmissionReceived(announce(P2), EPOCH + 2))
    assert back.phase is Phase.COLLECTING and out.effects == ()
    assert isinstance(back.handle(CloseSubmissions(EPOCH + 3)).effects[0], StartAggregation)
    # a coordinator restored mid-aggregation re-plans: the work in flight died with the process
    again = RoundState.restore(back.snapshot())
    assert isinstance(again.handle(Tick(EPOCH + 4)).effects[0], StartAggregation)


async def drive(state: RoundState, origin: float) -> list[tuple[float, object]]:
    """A minimal driver: sleep until the state's timer, feed a Tick, log effects with the virtual time."""
    log: list[tuple[float, object]] = []
    while (when := state.next_timer()) is not None:
        await trio.sleep_until(origin + (when - EPOCH))
        for effect in state.handle(Tick(EPOCH + (trio.current_time() - origin))).effects:
            log.append((trio.current_time() - origin, effect))
    return log


async def test_round_fails_at_exactly_its_deadline_on_the_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    origin = trio.current_time()
    state = started(round_timeout_seconds=3600.0, min_participants=2)
    state.handle(SubmissionReceived(announce(P1), EPOCH + 10))
    log = await drive(state, origin)
    assert state.phase is Phase.FAILED
    ((when, effect),) = log
    assert when == 3600.0 and trio.current_time() - origin == 3600.0
    assert isinstance(effect, PublishFailure) and "min_participants=2" in effect.reason
    assert effect.failure.failed_at == EPOCH + 3600.0


async def test_round_aggregates_at_its_deadline_with_enough(autojump_clock: trio.abc.Clock) -> None:
    origin = trio.current_time()
    state = started(round_timeout_seconds=600.0, min_participants=2)
    async with trio.open_nursery() as nursery:
        async def submit(who: object, delay: float) -> None:
            await trio.sleep(delay)
            state.handle(SubmissionReceived(announce(who), EPOCH + trio.current_time() - origin))  # type: ignore[arg-type]
        nursery.start_soon(submit, P1, 100.0)
        nursery.start_soon(submit, P2, 599.0)
        log = await drive(state, origin)
    ((when, effect),) = log
    assert when == 600.0 and isinstance(effect, StartAggregation) and len(effect.contributions) == 2
    assert not math.isinf(when)


def test_participant_reannounces_with_backoff_until_the_round_closes() -> None:
    # an announcement lost while the mesh re-forms must not cost the participant its round
    state = RoundState(manifest(COORD, min_participants=1), node_id=P1.node_id, reannounce_seconds=5.0)
    state.handle(ManifestSeen(EPOCH))
    mine = announce(P1, at=EPOCH + 1)
    assert state.next_timer() == state.deadline  # nothing to re-send yet
    state.handle(SubmissionReceived(mine, EPOCH + 1))
    sent = []
    now = EPOCH + 1
    while (due := state.next_timer()) is not None:
        assert due <= state.deadline
        now = due
        sent += [(now - EPOCH, e) for e in state.handle(Tick(now)).effects]
    times = [t for t, e in sent if e == Reannounce(mine)]
    assert times[:4] == [6.0, 16.0, 36.0, 76.0]  # gaps 5, 10, 20, 40 s
    assert len(times) == math.floor(math.log2((state.deadline - EPOCH - 1) / 5 + 1))  # log-many, not periodic
    assert state.phase is Phase.AGGREGATING and all(t < state.deadline - EPOCH for t in times)
    # the coordinator counts any number of copies once
    coord = started(min_participants=1)
    assert coord.handle(SubmissionReceived(mine, EPOCH + 1)).validation.verdict is Verdict.ACCEPT
    for t, e in sent:
        assert coord.handle(SubmissionReceived(e.announce, EPOCH + t)).validation.reason in ("duplicate", "late")
    assert len(coord.accepted) == 1


def test_reannounce_off_coordinator_never_and_failover_restarts_the_backoff() -> None:
    off = RoundState(manifest(COORD), node_id=P1.node_id, reannounce_seconds=0)
    off.handle(ManifestSeen(EPOCH))
    off.handle(SubmissionReceived(announce(P1), EPOCH + 1))
    assert off.next_timer() == off.deadline and off.handle(Tick(EPOCH + 100)).effects == ()
    coord = started()
    coord.handle(SubmissionReceived(announce(COORD), EPOCH + 1))
    assert coord.next_timer() == coord.deadline and coord.handle(Tick(EPOCH + 100)).effects == ()
    p = RoundState(manifest(COORD), node_id=P2.node_id, reannounce_seconds=2.0)
    p.handle(ManifestSeen(EPOCH))
    mine = announce(P2)
    p.handle(SubmissionReceived(mine, EPOCH + 1))
    assert p.handle(Tick(EPOCH + 3)).effects == (Reannounce(mine),)  # next in 4 s
    assert p.handle(CoordinatorChanged(1, P1.node_id, EPOCH + 4)).effects == (Reannounce(mine),)
    assert p.next_timer() == EPOCH + 6  # back to the first gap for the new coordinator
    # a restored participant starts again from the first gap when the driver says so
    back = RoundState.restore(json.loads(json.dumps(p.snapshot())), reannounce_seconds=2.0)
    assert back.next_timer() == back.deadline
    back.schedule_reannounce(EPOCH + 10)
    assert back.handle(Tick(EPOCH + 12)).effects == (Reannounce(mine),)


def test_superseded_closes_an_open_round_locally_and_is_harmless_when_finished() -> None:
    for who in (COORD, P1):
        state = started(who)
        out = state.handle(Superseded("r1-t9", EPOCH + 1))
        assert out.effects == () and state.phase is Phase.FAILED  # nothing published: not our round to end
        assert state.failure_reason.startswith("superseded by r1-t9") and state.next_timer() is None
    done = started()
    done.handle(SubmissionReceived(announce(P1), EPOCH + 1))
    done.handle(SubmissionReceived(announce(P2), EPOCH + 1))
    done.handle(CloseSubmissions(EPOCH + 2))
    done.handle(AggregationDone("c" * 64, 7, EPOCH + 3))
    assert done.handle(Superseded("r1-t9", EPOCH + 4)).effects == () and done.phase is Phase.PUBLISHED


def test_a_round_that_fails_before_its_deadline_does_not_blame_the_deadline() -> None:
    """Issue 13: "a round failed with 'deadline passed' 47 s before its deadline". Cause: a round
    closed early (every live member submitted, or max_participants) re-plans when an accepted
    update proves unusable (blob unavailable after the prefetch patience, invalid); with fewer
    than min_participants left it fails at once, and the reason said the deadline had passed."""
    state = started(min_participants=2, max_participants=3, round_timeout_seconds=120.0)
    for who in (P1, P2):
        state.handle(SubmissionReceived(announce(who), EPOCH + 1))
    state.handle(CloseSubmissions(EPOCH + 2))  # the driver's close-early
    deadline = state.deadline
    now = deadline - 47.0
    out = state.handle(ContributionRejected(P2.node_id, "unavailable", now, "no holder served it"))
    assert state.phase is Phase.FAILED
    (failure,) = [e for e in out.effects if isinstance(e, PublishFailure)]
    reason = failure.failure.reason
    assert "deadline passed" not in reason, reason
    assert "unavailable" in reason and "min_participants=2" in reason and "47 s before its deadline" in reason
    at_deadline = started(min_participants=2)
    out = at_deadline.handle(Tick(at_deadline.deadline))
    (failure,) = out.effects
    assert isinstance(failure, PublishFailure)
    assert failure.failure.reason.startswith("deadline passed with 0 accepted")
