"""A member paused for a full disk (Heartbeat `paused`, round-v1 r4): a coordinator does not wait
for its update, and the pause changes nothing else. Pure: heartbeats and events in, effects out.

An earlier attempt said "paused" with `federated_learning = false`; it changed who is a candidate,
so members that heard the pause at different times elected different coordinators (a fault run
forked round r7-t2). The election tests below therefore run the same network twice, once with
pauses and once without, and require identical elections at every node.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fednode.consensus import ElectionConfig, ElectionState, HeartbeatSeen, Phase, SubmissionReceived, Tick
from fednode.consensus.round_book import RoundBook, awaited_members, paused_members
from fednode.wire import Heartbeat, codec

from .helpers import COMMUNITY, EPOCH, announce, identity, manifest
from .sim import Simulation

X, Y, ME = identity(0), identity(1), identity(2)  # X coordinates; Y and ME take part
IDS = [identity(i) for i in range(6)]
INTERVAL = 1.0
CONFIG = ElectionConfig(heartbeat_interval=INTERVAL, liveness_timeout=2.5 * INTERVAL)
_SEQ = itertools.count(1)


def beat(who: str, now: float, *, paused: bool = False) -> Heartbeat:
    return Heartbeat(community_id=COMMUNITY, node_id=who, term=0, seq=next(_SEQ), sent_at=now,
                     federated_learning=True, paused=paused)


def coordinator_view(now: float) -> tuple[RoundBook, ElectionState]:
    """X's round book (X coordinates term 1) and election, with Y and ME heard live."""
    election = ElectionState(X.node_id, CONFIG, now=now)
    for who in (Y, ME):
        election.handle(HeartbeatSeen(beat(who.node_id, now), now))
    return RoundBook(X.node_id, coordinator=X.node_id, term=1), election


def open_round(book: RoundBook, number: int, now: float) -> str:
    round_id = f"r{number}-t1"
    book.open(manifest(X, round_id=round_id, term=1, round_number=number, min_participants=2,
                       max_participants=5, round_timeout_seconds=600.0, created_at=now), now)
    return round_id


def submit(book: RoundBook, round_id: str, who: object, now: float) -> None:
    assert book.feed(round_id, SubmissionReceived(announce(who, round_id=round_id, at=now), now)).accepted  # type: ignore[arg-type]


def tick(book: RoundBook, election: ElectionState, now: float) -> None:
    """What the daemon's timer loop does: the close-early rule over the election's live members,
    less those whose latest heartbeat says paused."""
    book.tick(now, election.live_members(now), paused_members=paused_members(election.heard()))


def test_a_paused_member_is_not_awaited_and_is_awaited_again_once_it_resumes() -> None:
    book, election = coordinator_view(EPOCH)
    r1 = open_round(book, 1, EPOCH)
    tick(book, election, EPOCH + 0.1)
    assert book.rounds[r1].is_open
    # ME's heartbeat says paused: X and Y are all the round waits for
    election.handle(HeartbeatSeen(beat(ME.node_id, EPOCH + 0.5, paused=True), EPOCH + 0.5))
    assert paused_members(election.heard()) == {ME.node_id} == election.paused  # the daemon reads the kept set
    assert ME.node_id in election.live_members(EPOCH + 0.5)  # still live: only the close-early rule skips it
    submit(book, r1, X, EPOCH + 1)
    tick(book, election, EPOCH + 1.2)
    assert book.rounds[r1].is_open  # Y has not submitted yet
    # ME resumes: its next heartbeat no longer says paused, so it is waited for again
    election.handle(HeartbeatSeen(beat(ME.node_id, EPOCH + 1.5), EPOCH + 1.5))
    assert paused_members(election.heard()) == frozenset() == election.paused
    submit(book, r1, Y, EPOCH + 1.6)
    tick(book, election, EPOCH + 1.8)
    assert book.rounds[r1].is_open, "a member that resumed was not waited for"
    # paused again (its disk filled up once more): the round closes without it, long before the deadline
    election.handle(HeartbeatSeen(beat(ME.node_id, EPOCH + 2.0, paused=True), EPOCH + 2.0))
    tick(book, election, EPOCH + 2.1)
    assert book.rounds[r1].phase is Phase.AGGREGATING, "a paused member was waited for"
    assert set(book.rounds[r1].accepted) == {X.node_id, Y.node_id}


def test_an_unpaused_member_that_submits_lets_the_round_close() -> None:
    book, election = coordinator_view(EPOCH)
    r1 = open_round(book, 1, EPOCH)
    for who in (X, Y, ME):
        submit(book, r1, who, EPOCH + 1)
    tick(book, election, EPOCH + 1.5)
    assert book.rounds[r1].phase is Phase.AGGREGATING


def test_only_the_latest_heartbeat_counts_and_a_stale_one_changes_nothing() -> None:
    _, election = coordinator_view(EPOCH)
    paused = beat(ME.node_id, EPOCH + 1, paused=True)
    election.handle(HeartbeatSeen(beat(ME.node_id, EPOCH + 2), EPOCH + 2))  # a newer, unpaused one
    assert election.handle(HeartbeatSeen(paused, EPOCH + 2.5)).validation.reason == "stale_seq"
    assert paused_members(election.heard()) == frozenset()


def test_awaited_members_rule() -> None:
    live = [X.node_id, Y.node_id, ME.node_id]
    assert awaited_members(live, (), X.node_id) == set(live)
    assert awaited_members(live, [ME.node_id], X.node_id) == {X.node_id, Y.node_id}
    assert awaited_members(live, [ME.node_id], X.node_id, paused=True) == {Y.node_id}  # the coordinator too
    assert awaited_members([X.node_id], [Y.node_id], X.node_id) == {X.node_id}  # a dead paused member: no matter


def test_the_coordinator_still_needs_min_participants_when_others_are_paused() -> None:
    book, election = coordinator_view(EPOCH)
    r1 = open_round(book, 1, EPOCH)
    for who in (Y, ME):
        election.handle(HeartbeatSeen(beat(who.node_id, EPOCH + 0.5, paused=True), EPOCH + 0.5))
    submit(book, r1, X, EPOCH + 1)
    tick(book, election, EPOCH + 1.5)
    assert book.rounds[r1].is_open  # 1 accepted < min_participants 2: the deadline decides


def test_a_pause_changes_neither_liveness_nor_the_candidate() -> None:
    """One observer hears ME paused, another hears it unpaused: same live set, same candidates."""
    views = []
    for paused in (False, True):
        election = ElectionState(X.node_id, CONFIG, now=EPOCH)
        for t in range(4):
            now = EPOCH + t
            for who in (Y, ME):
                election.handle(HeartbeatSeen(beat(who.node_id, now, paused=paused and who is ME), now))
            election.handle(Tick(now + 0.5))
        now = EPOCH + 4
        views.append((election.live_members(now), [election.candidate(t, now) for t in range(1, 20)],
                      election.term, election.coordinator))
    assert views[0] == views[1]
    assert ME.node_id in views[1][0] and ME.node_id in views[1][1]  # live, and the candidate of some terms


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 5),
    delays=st.lists(st.floats(0.0, 4.0 * INTERVAL, allow_nan=False), min_size=1, max_size=30),
    phases=st.lists(st.floats(0.0, INTERVAL, allow_nan=False), min_size=5, max_size=5),
    crashes=st.lists(st.one_of(st.none(), st.floats(0.0, 15.0 * INTERVAL, allow_nan=False)), min_size=5, max_size=5),
    pauses=st.lists(st.tuples(st.integers(0, 4), st.floats(0.0, 20.0 * INTERVAL, allow_nan=False),
                              st.floats(1.0, 10.0 * INTERVAL, allow_nan=False)), min_size=1, max_size=6),
)
def test_a_paused_member_never_changes_the_election_outcome(
    n: int, delays: list[float], phases: list[float], crashes: list[float | None],
    pauses: list[tuple[int, float, float]],
) -> None:
    """The same network (delays, phases, crashes) run with and without members pausing at random
    times, the coordinator among them: every node holds the same term, coordinator, claims and
    live members at every checkpoint."""
    node_ids = [i.node_id for i in IDS[:n]]
    crash_at = {node: t for node, t in zip(node_ids, crashes, strict=False) if t is not None}
    if len(crash_at) == n:
        del crash_at[node_ids[0]]

    def delay(index: int, sent_at: float) -> float:
        return delays[index % len(delays)]

    def paused(node: str, at: float) -> bool:
        return any(node_ids[i % n] == node and start <= at < start + length for i, start, length in pauses)

    plain = Simulation(node_ids, CONFIG, delay, phases[:n], dict(crash_at))
    pausing = Simulation(node_ids, CONFIG, delay, phases[:n], dict(crash_at), paused=paused)
    for checkpoint in range(1, 31):
        end = checkpoint * INTERVAL
        plain.run_until(end)
        pausing.run_until(end)
        for node in node_ids:
            a, b = plain.nodes[node], pausing.nodes[node]
            assert (a.term, a.coordinator, a.claims) == (b.term, b.coordinator, b.claims), (node, end)
            assert a.live_members(EPOCH + end) == b.live_members(EPOCH + end), (node, end)


def test_heartbeat_paused_reaches_the_member_table_through_the_wire() -> None:
    """Encoded, decoded and fed to the election, `paused` is what the close-early rule reads."""
    who = IDS[1]
    for flag in (True, False):
        hb = codec.sign(Heartbeat(community_id=COMMUNITY, node_id=who.node_id, term=0, seq=next(_SEQ),
                                  sent_at=EPOCH, federated_learning=True, paused=flag), who)
        election = ElectionState(X.node_id, CONFIG, now=EPOCH)
        election.handle(HeartbeatSeen(codec.decode(codec.encode(hb)), EPOCH))
        assert paused_members(election.heard()) == ({who.node_id} if flag else frozenset())
