"""The round book's rules as pure functions: supersede, close early, next round, sync-from.
No sqlite, no network, no trio: events in, effects out."""

from __future__ import annotations

import dataclasses

from fednode.consensus import (
    CloseSubmissions,
    CoordinatorChanged,
    InstallAdapter,
    ManifestSeen,
    Phase,
    RoundState,
    StartAggregation,
    SubmissionReceived,
    Tick,
    TrainAndSubmit,
)
from fednode.consensus.round_book import (
    History,
    OpenRound,
    PausedWork,
    RecordFailure,
    RepublishAndInstall,
    ResubmitOwn,
    RoundBook,
    RoundPolicy,
    SaveRound,
    SyncFrom,
    may_serve_soon,
    next_round_due,
    rejoin_unheard,
    resume_after_pause_effects,
    resume_effects,
    supersedes,
)
from tests.consensus.helpers import EPOCH, announce, identity, manifest

X, Y, ME = identity(0), identity(1), identity(2)


def effects(outcome: object) -> list[tuple[str, type]]:
    return [(rid, type(e)) for rid, e in outcome.steps]  # type: ignore[attr-defined]


def test_contested_round_from_an_earlier_term_is_superseded() -> None:
    book = RoundBook(ME.node_id)
    book.coordinator_changed(CoordinatorChanged(1, X.node_id, EPOCH))
    early = manifest(X, round_id="r1-t1", term=1, round_number=1)
    assert book.manifest(early, EPOCH).accepted
    assert book.open_round() is book.rounds["r1-t1"]
    # y won term 2 (it had opened round 1 too): x's round continues under y...
    book.coordinator_changed(CoordinatorChanged(2, Y.node_id, EPOCH + 1))
    assert book.rounds["r1-t1"].term == 2 and book.rounds["r1-t1"].is_open
    # ...until y's own manifest for round 1 arrives: the later term's round wins
    out = book.manifest(manifest(Y, round_id="r1-t2", term=2, round_number=1), EPOCH + 2)
    assert out.accepted
    assert ("r1-t2", SaveRound) in effects(out) and ("r1-t1", RecordFailure) in effects(out)
    assert book.rounds["r1-t1"].phase is Phase.FAILED
    assert book.rounds["r1-t1"].failure_reason.startswith("superseded by r1-t2")
    assert book.open_round() is book.rounds["r1-t2"]
    # the older manifest, seen again, changes nothing
    book.manifest(early, EPOCH + 3)
    assert book.rounds["r1-t1"].phase is Phase.FAILED and book.open_round() is book.rounds["r1-t2"]
    # and a round n from an earlier term arriving late is ignored outright
    late = manifest(Y, round_id="r1-t0", term=1, round_number=1)
    assert book.manifest(late, EPOCH + 4).validation.reason == "not_coordinator"


def test_supersedes_compares_the_manifests_terms() -> None:
    a = manifest(X, round_id="a", term=1, round_number=3)
    assert supersedes(manifest(Y, round_id="b", term=2, round_number=3), a)
    assert not supersedes(manifest(Y, round_id="b", term=2, round_number=4), a)
    assert not supersedes(manifest(Y, round_id="b", term=1, round_number=3), a)


def test_manifest_of_an_unelected_coordinator_waits_until_it_is_elected() -> None:
    book = RoundBook(ME.node_id, max_pending=2)
    m = manifest(X, round_id="r1-t1", term=1, round_number=1)
    assert book.manifest(m, EPOCH).validation.reason == "not_coordinator"
    for i in range(5):  # the held manifests are bounded
        book.manifest(manifest(Y, round_id=f"junk-{i}", term=1, round_number=1), EPOCH)
    assert len(book.pending) == 2 and "r1-t1" in book.pending
    out = book.coordinator_changed(CoordinatorChanged(1, X.node_id, EPOCH + 1))
    assert "r1-t1" in book.rounds and "r1-t1" not in book.pending
    assert ("r1-t1", TrainAndSubmit) in effects(out)  # a participant trains for the adopted round


def test_finished_or_foreign_base_model_rounds_are_not_adopted() -> None:
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=1, base_model_hash="a" * 64)
    m = manifest(X, round_id="r1-t1", term=1, round_number=1)
    assert book.manifest(m, EPOCH, finished=True).validation.reason == "round_finished"
    other = manifest(X, round_id="r2-t1", term=1, round_number=2, base_model_hash="b" * 64)
    assert book.manifest(other, EPOCH).validation.reason == "base_model_mismatch"
    assert book.rounds == {}


def test_coordinator_closes_early_once_every_live_member_is_accepted() -> None:
    book = RoundBook(X.node_id, coordinator=X.node_id, term=1)
    m = manifest(X, round_id="r1-t1", term=1, round_number=1, min_participants=2, max_participants=5,
                 round_timeout_seconds=60.0)
    book.open(m, EPOCH)
    for who in (X, Y):
        assert book.feed("r1-t1", SubmissionReceived(announce(who, round_id="r1-t1"), EPOCH + 1)).accepted
    book.tick(EPOCH + 2, [X.node_id, Y.node_id, ME.node_id])  # ME is live and has not submitted
    assert book.rounds["r1-t1"].is_open
    book.tick(EPOCH + 3, [X.node_id, Y.node_id])  # every live member accepted: close now
    assert book.rounds["r1-t1"].phase is Phase.AGGREGATING


def test_a_paused_coordinator_does_not_wait_for_its_own_update() -> None:
    """Issue 13: a coordinator paused for a full disk trains nothing; once the other live members
    are accepted it closes early (a paused participant drops out of the live set by its heartbeat)."""
    book = RoundBook(ME.node_id, coordinator=ME.node_id, term=1)
    m = manifest(ME, round_id="r1-t1", term=1, round_number=1, min_participants=2, max_participants=5,
                 round_timeout_seconds=60.0)
    book.open(m, EPOCH)
    for who in (X, Y):
        assert book.feed("r1-t1", SubmissionReceived(announce(who, round_id="r1-t1"), EPOCH + 1)).accepted
    book.tick(EPOCH + 2, [X.node_id, Y.node_id, ME.node_id])  # not paused: it waits for its own update
    assert book.rounds["r1-t1"].is_open
    book.tick(EPOCH + 3, [X.node_id, Y.node_id, ME.node_id], paused=True)
    assert book.rounds["r1-t1"].phase is Phase.AGGREGATING


def test_participant_never_closes_early() -> None:
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=1)
    book.manifest(manifest(X, round_id="r1-t1", term=1, round_number=1, min_participants=1), EPOCH)
    book.feed("r1-t1", SubmissionReceived(announce(ME, round_id="r1-t1"), EPOCH + 1))
    book.tick(EPOCH + 2, [ME.node_id])
    assert book.rounds["r1-t1"].is_open


def test_next_round_rule() -> None:
    policy = RoundPolicy(max_rounds=3, pause_seconds=10.0, quorum=2, settle_seconds=1.0)
    ready = History(live_federated=2, highest_round_number=1, published=1, last_finished_at=100.0)

    def due(now: float = 200.0, since: float = 150.0, force: bool = False, **changes: object) -> bool:
        history = dataclasses.replace(ready, **changes)  # type: ignore[arg-type]
        return next_round_due(now=now, policy=policy, history=history, coordinator_since=since, force=force)

    assert due()
    assert not due(now=150.5)  # settling after winning the term
    assert not due(now=109.0, since=0.0) and due(now=110.0, since=0.0)  # the pause after the last round
    assert not due(live_federated=1)  # quorum
    assert not due(published=3)  # budget spent
    assert due(published=3, live_federated=0, force=True)  # an operator's start-round
    assert not due(busy=True, force=True)  # installing, aggregating, paused: the start adapter is not ready
    assert not due(unrecorded_published=True, force=True)


def test_book_opens_the_next_round_only_as_coordinator_with_none_open() -> None:
    book = RoundBook(X.node_id, policy=RoundPolicy(settle_seconds=1.0))
    history = History(live_federated=1, highest_round_number=4, published=4, last_finished_at=None)
    assert book.next_round(EPOCH, history) is None  # nobody elected
    book.coordinator_changed(CoordinatorChanged(7, X.node_id, EPOCH))
    assert book.next_round(EPOCH + 0.5, history) is None  # the settle delay
    assert book.next_timer(EPOCH + 0.5) == EPOCH + 1.0
    plan = book.next_round(EPOCH + 1.0, history)
    assert plan == OpenRound("r5-t7", 5, 7)
    book.open(manifest(X, round_id=plan.round_id, term=7, round_number=5), EPOCH + 1.0)
    assert book.next_round(EPOCH + 2.0, history) is None  # one is open


def test_heartbeats_ask_for_unknown_and_missed_rounds_with_backoff() -> None:
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=1, sync_retry_seconds=5.0)
    book.manifest(manifest(X, round_id="r1-t1", term=1, round_number=1), EPOCH)
    out = book.heartbeat(open_round_id="r2-t1", open_round_finished=False, last_round_number=1, now=EPOCH)
    assert [(rid, e) for rid, e in out.steps] == [("r2-t1", SyncFrom()), ("r1-t1", SyncFrom(past=True))]
    again = book.heartbeat(open_round_id="", open_round_finished=False, last_round_number=1, now=EPOCH + 1)
    assert again.steps == ()  # asked a moment ago
    later = book.heartbeat(open_round_id="", open_round_finished=False, last_round_number=1, now=EPOCH + 5)
    assert later.steps == (("r1-t1", SyncFrom(past=True)),)
    done = book.heartbeat(open_round_id="r0", open_round_finished=True, last_round_number=0, now=EPOCH + 9)
    assert done.steps == ()


def test_finished_rounds_beyond_the_bound_are_forgotten() -> None:
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=1, max_in_memory=3)
    for n in range(1, 11):
        rid = f"r{n}-t1"
        book.add(RoundState(manifest(X, round_id=rid, term=1, round_number=n), node_id=ME.node_id))
        book.rounds[rid].phase = Phase.FAILED
        book.forget_old(pinned={"r1-t1"})
    assert sorted(book.rounds) == ["r1-t1", "r10-t1", "r8-t1", "r9-t1"]


def test_rounds_collected_by_retention_are_forgotten_with_their_pending_manifests_and_sync_times() -> None:
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=1)
    book.manifest(manifest(X, round_id="r1-t1", term=1, round_number=1), EPOCH)
    book.manifest(manifest(Y, round_id="r2-t2", term=2, round_number=2), EPOCH)  # held: Y is not elected
    book.heartbeat(open_round_id="", open_round_finished=False, last_round_number=1, now=EPOCH)
    assert "r1-t1" in book.rounds and "r2-t2" in book.pending and "r1-t1" in book.synced_at
    assert book.forget({"r1-t1", "r2-t2", "r9-t9"}) == ["r1-t1", "r2-t2"]  # r9-t9: never held
    assert (book.rounds, book.pending, book.synced_at) == ({}, {}, {})


# -- after a restart: what to re-issue (issue 11: the decision is here, node/recovery.py performs it) --
def _restored(me: object, coordinator: object, **kw: object) -> RoundState:
    m = manifest(coordinator, round_id="r1-t1", term=1, round_number=1, min_participants=2,  # type: ignore[arg-type]
                 round_timeout_seconds=60.0)
    state = RoundState(m, node_id=me.node_id, **kw)  # type: ignore[attr-defined]
    state.handle(ManifestSeen(EPOCH, m))
    return state


def test_resume_trains_when_collecting_without_our_submission() -> None:
    state = _restored(ME, X)
    assert resume_effects(state, EPOCH + 1) == [TrainAndSubmit(state.manifest)]


def test_resume_publishes_our_submission_again_and_sets_the_reannounce_timer() -> None:
    state = _restored(ME, X)
    mine = announce(ME, round_id="r1-t1")
    state.handle(SubmissionReceived(mine, EPOCH + 1))
    assert state.own_submission == mine
    state.reannounce_at = None
    assert resume_effects(state, EPOCH + 2) == [ResubmitOwn(mine)]
    assert state.reannounce_at is not None and state.reannounce_at > EPOCH + 2


def test_resume_of_a_published_round_installs_and_a_coordinator_announces_again() -> None:
    for me, want in ((ME, InstallAdapter("r1-t1", "a" * 64, 7)), (X, RepublishAndInstall())):
        state = _restored(me, X)
        state.phase, state.merged_sha256, state.merged_size = Phase.PUBLISHED, "a" * 64, 7
        assert resume_effects(state, EPOCH + 1) == [want], me


def test_resume_records_an_unrecorded_failure_and_leaves_other_rounds_alone() -> None:
    state = _restored(ME, X)
    state.phase = Phase.FAILED
    assert resume_effects(state, EPOCH + 1) == [RecordFailure(resumed=True)]
    state = _restored(ME, X)
    state.phase = Phase.AGGREGATING
    assert resume_effects(state, EPOCH + 1) == []


def test_book_resume_feeds_resumed_then_the_work_then_the_clock() -> None:
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=1)
    state = _restored(ME, X)
    book.add(state)
    out = book.resume(EPOCH + 1)
    assert ("r1-t1", TrainAndSubmit) in effects(out)
    assert [e for _, e in out.steps if isinstance(e, TrainAndSubmit)] == [TrainAndSubmit(state.manifest)]


def test_a_round_number_already_published_is_not_run_again() -> None:
    """Fault seed 2026 s22: the term-3 coordinator was killed, term 4 published round 56, the old
    coordinator came back, won term 5 without having seen round 56 and opened r56-t5; members that
    had installed r56-t4 ran it too: two merged adapters for round 56. Now they IGNORE it."""
    book = RoundBook(ME.node_id, coordinator=X.node_id, term=5)
    late = manifest(X, round_id="r56-t5", term=5, round_number=56)
    out = book.manifest(late, EPOCH, highest_published=56)
    assert out.validation.reason == "stale_round_number" and "r56-t5" not in book.rounds
    nxt = manifest(X, round_id="r57-t5", term=5, round_number=57)
    assert book.manifest(nxt, EPOCH, highest_published=56).accepted and "r57-t5" in book.rounds



# -- the disk has room again: what the pause stopped -------------------------------------------------
def _work(*, deferred: bool = False, aggregating: bool = False, recorded: bool = False) -> PausedWork:
    return PausedWork(deferred_training=deferred, aggregating=aggregating, recorded=recorded)


def test_after_a_pause_an_open_round_we_deferred_is_trained_and_no_other() -> None:
    state = _restored(ME, X)
    assert resume_after_pause_effects(state, _work(deferred=True)) == [TrainAndSubmit(state.manifest)]
    assert resume_after_pause_effects(state, _work()) == []  # we trained before the pause
    state.phase = Phase.AGGREGATING  # closed meanwhile: too late to train
    assert resume_after_pause_effects(state, _work(deferred=True)) == []


def test_after_a_pause_our_aggregation_that_hit_the_full_disk_is_planned_again_on_the_next_tick() -> None:
    state = _restored(X, X)
    for who in (ME, Y):
        state.handle(SubmissionReceived(announce(who, round_id="r1-t1"), EPOCH + 1))
    first = state.handle(CloseSubmissions(EPOCH + 2)).effects
    assert state.phase is Phase.AGGREGATING and isinstance(first[0], StartAggregation)
    assert state.handle(Tick(EPOCH + 3)).effects == ()  # planned once while it runs
    assert resume_after_pause_effects(state, _work(aggregating=True)) == []  # still running: leave it
    assert state.handle(Tick(EPOCH + 4)).effects == ()
    assert resume_after_pause_effects(state, _work(aggregating=False)) == []
    again = state.handle(Tick(EPOCH + 5)).effects
    assert len(again) == 1 and isinstance(again[0], StartAggregation) and again[0].contributions == \
        first[0].contributions
    participant = _restored(ME, X)
    participant.phase = Phase.AGGREGATING
    resume_after_pause_effects(participant, _work())
    assert participant.handle(Tick(EPOCH + 5)).effects == ()  # not ours to aggregate


def test_after_a_pause_unrecorded_outcomes_are_installed_or_recorded_once() -> None:
    state = _restored(ME, X)
    state.phase, state.merged_sha256, state.merged_size = Phase.PUBLISHED, "a" * 64, 7
    assert resume_after_pause_effects(state, _work()) == [InstallAdapter("r1-t1", "a" * 64, 7)]
    assert resume_after_pause_effects(state, _work(recorded=True)) == []
    failed = _restored(ME, X)
    failed.phase = Phase.FAILED
    assert resume_after_pause_effects(failed, _work()) == [RecordFailure(resumed=True)]
    assert resume_after_pause_effects(failed, _work(recorded=True)) == []


# -- after a restart: hear the last round's members before numbering a round (round-v1 r5) ----------
def test_a_restarted_node_waits_to_hear_its_last_rounds_members_then_not_beyond_the_bound() -> None:
    known = {X.node_id, Y.node_id}
    wait = dict(started_at=EPOCH, wait_seconds=30.0)
    assert rejoin_unheard(known, set(), now=EPOCH + 1, **wait) == known
    assert rejoin_unheard(known, {Y.node_id, "someone-else"}, now=EPOCH + 1, **wait) == {X.node_id}
    assert rejoin_unheard(known, known, now=EPOCH + 1, **wait) == frozenset()
    assert rejoin_unheard(known, set(), now=EPOCH + 30, **wait) == frozenset()  # a dead member is not awaited forever
    assert rejoin_unheard(set(), set(), now=EPOCH + 1, **wait) == frozenset()  # a first start knows nobody


def test_no_round_is_opened_while_a_member_of_the_last_round_is_unheard_after_a_restart() -> None:
    policy = RoundPolicy(quorum=2)
    history = History(live_federated=2, highest_round_number=28, published=28, last_finished_at=EPOCH)
    book = RoundBook(ME.node_id, policy=policy, coordinator=ME.node_id, term=4)
    assert book.next_round(EPOCH + 5, dataclasses.replace(history, unheard=2)) is None
    # once heard, its heartbeat's last_round_number (30 here) numbers the round above what it published
    plan = book.next_round(EPOCH + 6, dataclasses.replace(history, highest_round_number=30))
    assert plan is not None and plan.round_number == 31
    assert book.next_round(EPOCH + 5, dataclasses.replace(history, unheard=1), force=True) is not None  # operator


def test_an_unreachable_participant_is_asked_again_only_while_live_or_while_we_just_started() -> None:
    timing = dict(started_at=EPOCH, liveness_timeout=5.0)
    assert may_serve_soon(X.node_id, {X.node_id}, now=EPOCH + 100, **timing)  # live: it restarts, it dials back
    assert not may_serve_soon(X.node_id, {Y.node_id}, now=EPOCH + 100, **timing)  # dead: give its update up
    assert may_serve_soon(X.node_id, set(), now=EPOCH + 4, **timing)  # we just started: not heard yet


def test_no_round_is_opened_while_a_live_member_follows_another_coordinator_not_even_by_an_operator() -> None:
    # election-v1 rule 13: a rival claimant of our term may be opening the same round number
    history = History(live_federated=3, highest_round_number=50, published=50, last_finished_at=EPOCH)
    book = RoundBook(ME.node_id, policy=RoundPolicy(quorum=2), coordinator=ME.node_id, term=9)
    blocked = dataclasses.replace(history, unendorsed=1)
    assert book.next_round(EPOCH + 5, blocked) is None
    assert book.next_round(EPOCH + 5, blocked, force=True) is None
    plan = book.next_round(EPOCH + 5, history)
    assert plan is not None and plan.round_id == "r51-t9"
