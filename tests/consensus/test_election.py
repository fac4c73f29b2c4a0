"""Election: unit rules, failover time on trio's virtual clock, and agreement under any delivery."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fednode.consensus import (
    ClaimSeen,
    ClaimWithheld,
    CoordinatorChanged,
    ElectionConfig,
    ElectionState,
    HeartbeatSeen,
    PublishClaim,
    SignOfLife,
    Tick,
    TopicReach,
    rank,
)
from fednode.errors import ConfigError
from fednode.wire import CoordinatorClaim, Heartbeat, Verdict, codec

from .helpers import COMMUNITY, EPOCH, identity
from .sim import Simulation

IDS = [identity(i) for i in range(8)]
INTERVAL = 1.0
CONFIG = ElectionConfig(heartbeat_interval=INTERVAL, liveness_timeout=2.5 * INTERVAL)


_SEQ = itertools.count(1)  # heartbeats count only with a growing seq: every helper heartbeat is fresh


def hb(who: str, now: float, *, term: int = 0, coordinator: str = "", federated: bool = True,
       seq: int | None = None) -> Heartbeat:
    return Heartbeat(community_id=COMMUNITY, node_id=who, term=term, seq=next(_SEQ) if seq is None else seq,
                     sent_at=now,
                     federated_learning=federated, coordinator_node_id=coordinator)


def claim(who: str, term: int, now: float) -> CoordinatorClaim:
    return CoordinatorClaim(community_id=COMMUNITY, node_id=who, term=term, claimed_at=now)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        ElectionConfig(mode="vote")
    with pytest.raises(ConfigError):
        ElectionConfig(mode="fixed")
    with pytest.raises(ConfigError):
        ElectionConfig(heartbeat_interval=2.0, liveness_timeout=1.0)


def test_fixed_mode_names_the_configured_peer_and_ignores_claims() -> None:
    fixed = IDS[3].node_id
    state = ElectionState(IDS[0].node_id, ElectionConfig(mode="fixed", fixed_node_id=fixed), now=EPOCH)
    assert state.coordinator == fixed and state.next_timer() is None
    out = state.handle(ClaimSeen(claim(IDS[1].node_id, 5, EPOCH), EPOCH))
    assert out.validation.reason == "fixed_mode" and state.coordinator == fixed and state.term == 0


def test_smallest_rank_wins_a_term_and_terms_only_grow() -> None:
    me, a, b = (i.node_id for i in IDS[:3])
    lo, hi = sorted([a, b], key=lambda n: rank(4, n))
    state = ElectionState(me, CONFIG, now=EPOCH)
    out = state.handle(ClaimSeen(claim(hi, 4, EPOCH + 1), EPOCH + 1))
    assert out.effects == (CoordinatorChanged(4, hi, EPOCH + 1, ""),)
    state.handle(ClaimSeen(claim(lo, 4, EPOCH + 1.1), EPOCH + 1.1))
    assert (state.term, state.coordinator) == (4, lo)
    state.handle(ClaimSeen(claim(hi, 4, EPOCH + 1.2), EPOCH + 1.2))  # a worse claim changes nothing
    assert state.coordinator == lo
    stale = state.handle(ClaimSeen(claim(hi, 2, EPOCH + 1.3), EPOCH + 1.3))
    assert stale.validation.reason == "stale_term" and state.term == 4
    assert state.coordinator_of(2) == hi  # recorded for the per-term history
    assert state.members[hi].last_seen == EPOCH + 1.2  # but older than hi's last claim: no sign of life
    jump = state.handle(ClaimSeen(claim(hi, 4 + CONFIG.max_term_jump + 1, EPOCH + 2), EPOCH + 2))
    assert jump.validation.reason == "term_jump" and state.term == 4


def test_a_node_claims_only_when_it_is_the_live_candidate() -> None:
    nodes = [i.node_id for i in IDS[:3]]
    best = min(nodes, key=lambda n: rank(1, n))
    for me in nodes:
        state = ElectionState(me, CONFIG, now=EPOCH)
        for other in nodes:
            if other != me:
                state.handle(HeartbeatSeen(hb(other, EPOCH + 0.5), EPOCH + 0.5))
        assert state.next_timer() == EPOCH + CONFIG.liveness_timeout  # startup grace
        out = state.handle(Tick(EPOCH + CONFIG.liveness_timeout))
        claimed = [e for e in out.effects if isinstance(e, PublishClaim)]
        assert claimed == ([PublishClaim(1)] if me == best else [])


def test_a_coordinator_heartbeat_renews_its_claim_for_late_joiners() -> None:
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    state.handle(HeartbeatSeen(hb(coord, EPOCH, term=7, coordinator=coord), EPOCH))
    assert (state.term, state.coordinator) == (7, coord)
    state.handle(HeartbeatSeen(hb(IDS[2].node_id, EPOCH, term=9, coordinator=coord), EPOCH))  # hearsay: not adopted
    assert state.term == 7


def test_a_replayed_heartbeat_does_not_keep_a_dead_coordinator_alive() -> None:
    """N8: heartbeats of a coordinator that died, replayed later (a flushed duplicate cache lets them
    through validation), are IGNOREd stale_seq: they neither renew its liveness nor its claim."""
    coord, me, other = (i.node_id for i in IDS[:3])
    state = ElectionState(me, CONFIG, now=EPOCH)
    beats = [hb(coord, EPOCH + k, term=3, coordinator=coord, seq=100 + k) for k in range(3)]
    for k, beat in enumerate(beats):
        assert state.handle(HeartbeatSeen(beat, EPOCH + k)).validation.accepted
    state.handle(HeartbeatSeen(hb(other, EPOCH + 2), EPOCH + 2))
    assert (state.term, state.coordinator) == (3, coord)
    dead_at = EPOCH + 2 + CONFIG.liveness_timeout  # its last heartbeat was heard at EPOCH + 2
    for k, beat in enumerate([*beats, beats[-1]]):  # replays (the newest too), while it is still alive
        out = state.handle(HeartbeatSeen(beat, EPOCH + 3 + 0.1 * k))
        assert (out.validation.verdict, out.validation.reason) == (Verdict.IGNORE, "stale_seq")
        assert out.effects == ()
    assert state.members[coord].last_seen == EPOCH + 2 and state.next_timer() == dead_at
    state.handle(HeartbeatSeen(hb(other, dead_at - 0.5), dead_at - 0.5))
    assert coord not in state.live_members(dead_at)  # so a failover starts on time
    state.handle(Tick(dead_at))
    assert state._pending is not None and state._pending[0] == 4
    # a fresh heartbeat (a greater seq, e.g. the coordinator restarted) counts again at once
    assert state.handle(HeartbeatSeen(hb(coord, dead_at + 1, term=3, coordinator=coord, seq=10**15),
                                      dead_at + 1)).validation.accepted
    assert coord in state.live_members(dead_at + 1)


def test_non_federated_members_are_never_candidates() -> None:
    me, other = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH, federated=False)
    state.handle(HeartbeatSeen(hb(other, EPOCH, federated=False), EPOCH))
    assert state.live_members(EPOCH) == []
    assert state.handle(Tick(EPOCH + 100)).effects == ()


# ---- failover on trio's virtual clock ----------------------------------------------------------

LATENCY = 0.05


class TrioNet:
    def __init__(self, nursery: trio.Nursery, origin: float) -> None:
        self.nursery, self.origin = nursery, origin
        self.inboxes: dict[str, trio.MemorySendChannel[bytes]] = {}
        self.dead: set[str] = set()
        self.changes: list[tuple[float, str, int, str]] = []  # (virtual time, node, term, coordinator)
        self.last_heartbeat: dict[str, float] = {}

    def now(self) -> float:
        return EPOCH + trio.current_time() - self.origin

    def publish(self, sender: str, data: bytes) -> None:
        for node, inbox in self.inboxes.items():
            if node != sender:
                self.nursery.start_soon(self._deliver, inbox, data)

    async def _deliver(self, inbox: trio.MemorySendChannel[bytes], data: bytes) -> None:
        await trio.sleep(LATENCY)
        inbox.send_nowait(data)

    async def run_node(self, n: int, cancel: trio.CancelScope) -> None:
        me = IDS[n]
        state = ElectionState(me.node_id, CONFIG, now=self.now())
        send, receive = trio.open_memory_channel[bytes](math.inf)
        self.inboxes[me.node_id] = send

        def apply(effects: tuple[object, ...]) -> None:
            for e in effects:
                if isinstance(e, PublishClaim):
                    c = claim(me.node_id, e.term, self.now())
                    self.publish(me.node_id, codec.encode(codec.sign(c, me)))
                elif isinstance(e, CoordinatorChanged):
                    self.changes.append((trio.current_time() - self.origin, me.node_id, e.term, e.coordinator_node_id))

        async def heartbeats() -> None:
            await trio.sleep(0.137 * n)  # nodes beat out of phase
            seq = 0
            while True:
                seq += 1
                term, coordinator = state.heartbeat_fields()
                beat = hb(me.node_id, self.now(), term=term, coordinator=coordinator)
                beat = Heartbeat(**{**beat.__dict__, "seq": seq})
                self.publish(me.node_id, codec.encode(codec.sign(beat, me)))
                self.last_heartbeat[me.node_id] = trio.current_time() - self.origin
                await trio.sleep(INTERVAL)

        with cancel:
            async with trio.open_nursery() as own:  # dies with the node
                own.start_soon(heartbeats)
                await self._events(state, receive, apply)

    async def _events(self, state: ElectionState, receive: trio.MemoryReceiveChannel[bytes],
                      apply: Callable[[tuple[object, ...]], None]) -> None:
        while True:
            timer = state.next_timer()
            with trio.move_on_at(self.origin + (timer - EPOCH) if timer else math.inf):
                msg = codec.decode(await receive.receive())
                assert codec.verify(msg)
                event = HeartbeatSeen(msg, self.now()) if isinstance(msg, Heartbeat) else ClaimSeen(msg, self.now())  # type: ignore[arg-type]
                apply(state.handle(event).effects)
                continue
            apply(state.handle(Tick(self.now())).effects)

    def views(self) -> dict[str, tuple[int, str]]:
        latest: dict[str, tuple[int, str]] = {}
        for _, node, term, coordinator in self.changes:
            latest[node] = (term, coordinator)
        return {n: v for n, v in latest.items() if n not in self.dead}


async def test_failover_within_three_heartbeat_intervals(autojump_clock: trio.abc.Clock) -> None:
    origin = trio.current_time()
    async with trio.open_nursery() as nursery:
        net = TrioNet(nursery, origin)
        scopes = {i.node_id: trio.CancelScope() for i in IDS[:4]}
        for n in range(4):
            nursery.start_soon(net.run_node, n, scopes[IDS[n].node_id])
        await trio.sleep(10.0)
        (first,) = set(net.views().values())
        assert len(net.views()) == 4 and first[0] >= 1
        coordinator = first[1]
        await trio.sleep(0.3)
        scopes[coordinator].cancel()  # the coordinator dies (its heartbeat task with it)
        net.dead.add(coordinator)
        killed_at = trio.current_time() - origin
        last_beat = net.last_heartbeat[coordinator]
        while True:  # bounded by the virtual-time fail_after below
            await trio.sleep(0.01)
            assert trio.current_time() - origin < killed_at + 30.0, "no failover"
            views = net.views()
            if len(set(views.values())) == 1 and next(iter(views.values()))[1] != coordinator:
                break
        agreed_at = trio.current_time() - origin
        (second,) = set(net.views().values())
        assert second[0] > first[0] and second[1] in scopes and second[1] != coordinator
        assert killed_at < last_beat + INTERVAL  # it really missed its next beat
        # nobody gave up on the coordinator early, and all agreed within 3 intervals of its last beat
        assert agreed_at - last_beat >= CONFIG.liveness_timeout
        assert agreed_at - last_beat <= 3 * INTERVAL, (agreed_at, last_beat)
        print(f"failover: agreed {agreed_at - last_beat:.3f} s after the last heartbeat")
        await trio.sleep(5 * INTERVAL)  # and it stays settled
        assert set(net.views().values()) == {second}
        nursery.cancel_scope.cancel()


# ---- agreement under any delivery order and delay ----------------------------------------------

@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 6),
    delays=st.lists(st.floats(0.0, 6.0 * INTERVAL, allow_nan=False), min_size=1, max_size=40),
    phases=st.lists(st.floats(0.0, INTERVAL, allow_nan=False), min_size=6, max_size=6),
    crashes=st.lists(st.one_of(st.none(), st.floats(0.0, 20.0 * INTERVAL, allow_nan=False)), min_size=6, max_size=6),
)
def test_live_nodes_agree_on_one_coordinator_per_term_once_delivery_settles(
    n: int, delays: list[float], phases: list[float], crashes: list[float | None],
) -> None:
    node_ids = [i.node_id for i in IDS[:n]]
    crash_at = {node: t for node, t in zip(node_ids, crashes, strict=False) if t is not None}
    if len(crash_at) == n:
        del crash_at[node_ids[0]]  # someone stays alive
    chaos_end = 20.0 * INTERVAL

    def delay(index: int, sent_at: float) -> float:
        return delays[index % len(delays)] if sent_at < chaos_end else 0.2 * delays[index % len(delays)] / 6.0

    sim = Simulation(node_ids, CONFIG, delay, phases[:n], crash_at)
    sim.run_until(chaos_end + 30.0 * INTERVAL)
    live = sim.live()
    current = {(s.term, s.coordinator) for s in live}
    assert len(current) == 1, current
    ((term, coordinator),) = current
    assert term >= 1 and coordinator is not None and sim.alive(coordinator)
    for t in range(max(1, term - CONFIG.term_history), term + 1):
        named = {s.coordinator_of(t) for s in live}
        assert len(named) == 1, (t, named)


def test_rank_vectors_in_the_spec() -> None:
    import pathlib
    import re

    spec = (pathlib.Path(__file__).parents[2] / "protocols" / "election-v1.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+)\s+\| `(\w+)` \| `([0-9a-f]{16})` \|$", spec.split("<!-- rank-vectors -->")[1],
                      flags=re.M)
    assert len(rows) == 6
    for term, node_id, prefix in rows:
        assert rank(int(term), node_id).hex()[:16] == prefix
    ids = {identity(i).node_id for i in range(3)}
    assert {node for _, node, _ in rows} == ids
    by_term = {t: min((r for r in rows if r[0] == t), key=lambda r: r[2])[1] for t in ("1", "2")}
    assert by_term == {"1": "12D3KooWP3YuV6tAbk9KeArKrGv1DTvpjkVtraZSV55W9brcZtLY",
                       "2": "12D3KooWL5Tu1NWUnQ3dzF4Dhkvx2Xn4BZYFUnZM3UUjdNUkSaLp"}


# -- late heartbeats (election-v1 r2, rules 10 and 11) ---------------------------------------------


def test_stretched_timeout_counts_missed_heartbeats_at_the_members_own_pace() -> None:
    from fednode.consensus.election import MAX_SLOW_TIMEOUT_FACTOR, SLOW_GAP_RATIO, next_gap, stretched_timeout

    live = CONFIG.liveness_timeout
    assert stretched_timeout(live, INTERVAL, 0.0) == live  # nothing heard yet
    assert stretched_timeout(live, INTERVAL, SLOW_GAP_RATIO * INTERVAL) == live  # jitter is not slowness
    assert stretched_timeout(live, INTERVAL, 3 * INTERVAL) == pytest.approx(3 * live)
    assert stretched_timeout(live, INTERVAL, 100 * INTERVAL) == MAX_SLOW_TIMEOUT_FACTOR * live  # bounded
    assert next_gap(1.0, 3.0) == 3.0  # a longer gap counts at once
    gap = 3.0
    for _ in range(30):  # back on time: the remembered gap decays to the real one
        gap = next_gap(gap, 1.0)
    assert gap == 1.0


def test_a_slow_coordinator_still_heard_costs_no_term() -> None:
    """Its heartbeats arrive every 3 intervals (a busy machine): after the first slow gap it is
    judged at its own pace, so the follower neither suspects it nor claims."""
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH
    state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
    t += 1.0
    state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
    t += 2.4  # one slow gap, still within liveness_timeout
    state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
    for _ in range(10):
        due = state.next_timer()
        assert due is not None and due >= t + 2.4 * CONFIG.liveness_timeout - 1e-9
        for k in range(1, 7):  # ticks while it is silent for 3 intervals
            out = state.handle(Tick(t + 0.5 * k))
            assert not [e for e in out.effects if isinstance(e, PublishClaim)]
            assert coord in state.live_members(t + 0.5 * k)
        t += 3.0
        state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
    assert (state.term, state.coordinator, state._pending) == (1, coord, None)
    # and once it really stops, it is suspected within its stretched timeout (bounded)
    from fednode.consensus.election import MAX_SLOW_TIMEOUT_FACTOR

    dead_from, suspected_at = t, None
    for k in range(1, 100):
        state.handle(Tick(dead_from + 0.5 * k))
        if state._pending is not None or state.term > 1:  # waiting for a claim, or claimed term 2 itself
            suspected_at = dead_from + 0.5 * k
            break
    assert suspected_at is not None and (state.term == 2 or state._pending == (2, suspected_at))
    assert suspected_at - dead_from <= MAX_SLOW_TIMEOUT_FACTOR * CONFIG.liveness_timeout + 0.5


def test_an_on_time_member_keeps_the_plain_timeout() -> None:
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    for k in range(5):
        state.handle(HeartbeatSeen(hb(coord, EPOCH + k, term=1, coordinator=coord), EPOCH + k + 0.05 * (k % 2)))
    last = state.members[coord].last_seen
    assert state.next_timer() == last + CONFIG.liveness_timeout


def test_a_node_back_from_its_own_stall_reads_queued_heartbeats_before_suspecting() -> None:
    """Rule 11: the host promised a tick every 0.5 s; a 4 s gap means this node was not running.
    Its first tick after the stall (the coordinator looks silent for 4 s) suspects nobody; the
    coordinator's heartbeat that was queued meanwhile arrives next and keeps it."""
    config = ElectionConfig(heartbeat_interval=INTERVAL, liveness_timeout=2.5 * INTERVAL, max_tick_gap=0.5)
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, config, now=EPOCH)
    t = EPOCH
    for _ in range(4):
        state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
        state.handle(Tick(t + 0.5))
        t += 1.0
    t -= 1.0
    back = t + 4.0  # stalled from t + 0.5 to t + 4
    out = state.handle(Tick(back))
    assert not [e for e in out.effects if isinstance(e, PublishClaim)] and state._pending is None
    assert state.next_timer() == back + INTERVAL
    state.handle(HeartbeatSeen(hb(coord, back, term=1, coordinator=coord), back + 0.01))
    out = state.handle(Tick(back + INTERVAL))
    assert state._pending is None and (state.term, state.coordinator) == (1, coord)
    # without the queued heartbeat, suspicion starts one interval after the node is back
    state2 = ElectionState(me, config, now=EPOCH)
    t = EPOCH
    for _ in range(4):
        state2.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
        state2.handle(Tick(t + 0.5))
        t += 1.0
    state2.handle(Tick(back))
    assert state2._pending is None and state2.term == 1
    state2.handle(Tick(back + INTERVAL))  # waits for a claim for term 2, or made it (the candidate)
    assert (state2._pending is not None and state2._pending[0] == 2) or state2.term == 2


def test_without_a_tick_promise_a_quiet_gap_is_not_a_stall() -> None:
    """max_tick_gap = 0 (a host that only wakes on next_timer): a long quiet gap says nothing."""
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH, federated=False)  # never claims: _pending shows the suspicion
    state.handle(HeartbeatSeen(hb(coord, EPOCH + 3, term=1, coordinator=coord), EPOCH + 3))
    dead_at = EPOCH + 3 + CONFIG.liveness_timeout
    assert state.next_timer() == dead_at
    state.handle(Tick(dead_at))
    assert state._pending is not None and state._pending[0] == 2


def test_a_restarted_node_keeps_its_term_and_ignores_an_older_terms_claim() -> None:
    """Rule 12 (fault runner seed 2026): a node restarted while the term-4 coordinator is down must
    neither follow a term-1 claim nor claim a term <= 4 itself."""
    me, other = IDS[0].node_id, IDS[1].node_id
    cfg = ElectionConfig(heartbeat_interval=INTERVAL, liveness_timeout=3 * INTERVAL, startup_grace=3 * INTERVAL)
    state = ElectionState(me, cfg, now=EPOCH, known_term=4)
    assert state.term == 4 and state.coordinator is None
    out = state.handle(ClaimSeen(claim(other, 1, EPOCH + 1), EPOCH + 1))
    assert out.validation.reason == "stale_term" and state.coordinator is None and state.term == 4
    claims = [e.term for t in range(2, 60)
              for e in state.handle(Tick(EPOCH + t)).effects if isinstance(e, PublishClaim)]
    assert claims and min(claims) >= 5, claims
    fresh = ElectionState(me, cfg, now=EPOCH)  # without rule 12 the same node follows term 1
    fresh.handle(ClaimSeen(claim(other, 1, EPOCH + 1), EPOCH + 1))
    assert fresh.coordinator == other and fresh.term == 1


def test_the_member_table_keeps_what_each_members_newest_heartbeat_said() -> None:
    """One member table (issue 11): the daemon's view of its peers (status, sync peers, adapter
    holders) is the election's, filled from fresh heartbeats only."""
    a, b, me = (i.node_id for i in IDS[:3])
    state = ElectionState(me, CONFIG, now=EPOCH)
    first = Heartbeat(community_id=COMMUNITY, node_id=a, term=0, seq=10, sent_at=EPOCH, federated_learning=True,
                      last_round_number=4, latest_merged_sha256="ab" * 32, open_round_id="r5-t1")
    state.handle(HeartbeatSeen(first, EPOCH + 1))
    state.handle(ClaimSeen(claim(b, 1, EPOCH + 1), EPOCH + 1))  # known from a claim only: not heard
    heard = state.heard()
    assert set(heard) == {a}
    assert (heard[a].at, heard[a].last_round_number, heard[a].open_round_id) == (EPOCH + 1, 4, "r5-t1")
    assert heard[a].latest_merged_sha256 == "ab" * 32
    state.handle(HeartbeatSeen(first, EPOCH + 2))  # a replay changes nothing
    assert state.heard()[a].at == EPOCH + 1


# ---- rule 13: a coordinator acts only while no live member follows a rival ----------------------------


def test_unendorsed_members_rule() -> None:
    from fednode.consensus.election import Heard, unendorsed_members

    me, a, b, c = (i.node_id for i in IDS[:4])

    def heard(term: int, coordinator: str) -> Heard:
        return Heard(EPOCH, True, term, coordinator, "", 0, "")

    timing = dict(since=EPOCH, wait=2.5)
    live = [me, a, b, c]
    names_me = {n: heard(9, me) for n in (a, b, c)}
    assert unendorsed_members(names_me, live, me, 9, now=EPOCH + 1, **timing) == frozenset()
    # a member that follows a rival claimant of our term, or any coordinator of a later term, stops us for good
    rival = names_me | {a: heard(9, b)}
    assert unendorsed_members(rival, live, me, 9, now=EPOCH + 1, **timing) == {a}
    assert unendorsed_members(rival, live, me, 9, now=EPOCH + 1_000, **timing) == {a}
    later = names_me | {b: heard(10, "")}
    assert unendorsed_members(later, live, me, 9, now=EPOCH + 1_000, **timing) == {b}
    # not yet named us, naming nobody (no heartbeat, no coordinator after a restart): only within `wait`
    slow = {a: heard(8, ""), b: heard(9, ""), c: heard(9, me)}
    assert unendorsed_members(slow, [*live, IDS[5].node_id], me, 9, now=EPOCH + 1, **timing) == {a, b, IDS[5].node_id}
    assert unendorsed_members(slow, [*live, IDS[5].node_id], me, 9, now=EPOCH + 2.5, **timing) == frozenset()
    # still following an older term's coordinator (us included): it has not heard our claim, so it may
    # not receive what we publish either; for as long as it lasts
    old = names_me | {a: heard(8, c), b: heard(8, me)}
    assert unendorsed_members(old, live, me, 9, now=EPOCH + 1_000, **timing) == {a, b}
    # members that are not live do not count, and neither do we
    assert unendorsed_members(rival, [me, b, c], me, 9, now=EPOCH + 1, **timing) == frozenset()


def test_election_state_reports_unendorsed_members_unless_another_node_coordinates() -> None:
    me, a, b = sorted((i.node_id for i in IDS[:3]), key=lambda n: rank(5, n))  # me: the candidate for term 5
    state = ElectionState(me, CONFIG, now=EPOCH - 3, known_term=4)
    state.handle(HeartbeatSeen(hb(a, EPOCH - 1, term=4), EPOCH - 1))
    state.handle(HeartbeatSeen(hb(b, EPOCH - 1, term=4), EPOCH - 1))
    # no coordinator known yet: a round we restored as ours (none here) would wait for them to name us
    assert state.coordinator is None and state.unendorsed(EPOCH - 1) == {a, b}
    out = state.handle(Tick(EPOCH + 0.5))  # past the start-up grace: nobody coordinates, we are the candidate
    assert PublishClaim(5) in out.effects
    assert state.is_coordinator and state.coordinator_since == EPOCH + 0.5
    assert state.unendorsed(EPOCH + 0.6) == {a, b}  # neither has answered our claim yet
    state.handle(HeartbeatSeen(hb(a, EPOCH + 1, term=5, coordinator=me), EPOCH + 1))
    state.handle(HeartbeatSeen(hb(b, EPOCH + 1, term=5, coordinator=a), EPOCH + 1))  # b follows a rival
    assert state.unendorsed(EPOCH + 1) == {b}
    state.handle(HeartbeatSeen(hb(b, EPOCH + 2, term=5, coordinator=me), EPOCH + 2))
    assert state.unendorsed(EPOCH + 2) == frozenset()
    state.handle(ClaimSeen(claim(a, 6, EPOCH + 3), EPOCH + 3))
    assert state.coordinator == a and state.unendorsed(EPOCH + 3) == frozenset()  # a coordinates: nothing of ours
    # restarted in term 5 (rule 12), no coordinator known: a round restored as ours counts from our start
    restarted = ElectionState(me, CONFIG, now=EPOCH + 10, known_term=5)
    restarted.handle(HeartbeatSeen(hb(a, EPOCH + 10.5, term=5, coordinator=me), EPOCH + 10.5))
    restarted.handle(HeartbeatSeen(hb(b, EPOCH + 10.5, term=6, coordinator=a), EPOCH + 10.5))  # a took over
    assert restarted.coordinator is None and restarted.unendorsed(EPOCH + 11) == {b}
    assert restarted.unendorsed(EPOCH + 12.9) == {b}  # past the wait (a names nobody else): b still stops us
    restarted.handle(HeartbeatSeen(hb(b, EPOCH + 12.9, term=5, coordinator=me), EPOCH + 12.9))
    assert restarted.unendorsed(EPOCH + 12.9) == frozenset()
    fixed = ElectionState(me, ElectionConfig(mode="fixed", fixed_node_id=me), now=EPOCH)
    fixed.handle(HeartbeatSeen(hb(a, EPOCH, term=3, coordinator=b), EPOCH))
    assert fixed.unendorsed(EPOCH) == frozenset()


def test_our_own_claim_replayed_after_a_restart_is_not_adopted() -> None:
    """Rule 12: a restarted node starts with no coordinator known. Its previous life's claim,
    replayed by gossip, must not make it coordinator of its old term again: that proves nothing about
    whether the others hear it now (fault seed 1734665193, s16: a restarted coordinator whose gossip
    reached nobody for 30 s concluded its round again)."""
    me, a = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH, known_term=3)
    state.handle(HeartbeatSeen(hb(a, EPOCH + 0.1, term=3, coordinator=me), EPOCH + 0.1))
    out = state.handle(ClaimSeen(claim(me, 3, EPOCH - 30), EPOCH + 0.2))
    assert out.validation.reason == "own_message" and out.effects == ()
    assert state.coordinator is None and state.term == 3


def test_a_restarted_coordinator_with_an_open_round_claims_the_next_term_after_its_grace() -> None:
    """Rule 12: restarted holding an open round as its coordinator (the host sets `reclaim`), a node
    claims the next term at the end of its start-up grace even when another member is the candidate:
    the others' endorsement of the new term is what shows they hear it (rule 13)."""
    me, a, b = sorted((i.node_id for i in IDS[:3]), key=lambda n: rank(4, n), reverse=True)  # me: worst for 4
    state = ElectionState(me, CONFIG, now=EPOCH, known_term=3)
    state.reclaim = True
    for t in (EPOCH + 1, EPOCH + 2):
        for who in (a, b):
            state.handle(HeartbeatSeen(hb(who, t, term=3, coordinator=me), t))  # they still follow our old life
    assert state.candidate(4, EPOCH + 2) != me
    out = state.handle(Tick(EPOCH + CONFIG.liveness_timeout + 0.1))
    assert PublishClaim(4) in out.effects and state.is_coordinator and not state.reclaim
    assert state.unendorsed(EPOCH + 2.7) == {a, b}  # they name term 3: not proof that they hear us
    plain = ElectionState(me, CONFIG, now=EPOCH, known_term=3)  # without reclaim: the candidate's turn
    for who in (a, b):
        plain.handle(HeartbeatSeen(hb(who, EPOCH + 2, term=3, coordinator=me), EPOCH + 2))
    assert PublishClaim(4) not in plain.handle(Tick(EPOCH + CONFIG.liveness_timeout + 0.1)).effects


def test_a_claim_says_in_words_why_its_node_follows_no_live_coordinator() -> None:
    """The daemon logs `PublishClaim.reason` ("claiming term 2: ..."): a run with many terms can be read."""
    me, c = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    state.handle(HeartbeatSeen(hb(c, EPOCH, term=1, coordinator=c), EPOCH))
    state.handle(ClaimSeen(claim(c, 1, EPOCH), EPOCH))
    assert state.coordinator == c
    out = state.handle(Tick(EPOCH + 3.0))
    [published] = [e for e in out.effects if isinstance(e, PublishClaim)]
    assert published == PublishClaim(2)
    assert published.reason == f"coordinator {c[-8:]} of term 1 last heard 3.0 s ago (timeout 2.5 s); live members: 1"
    assert ElectionState(me, CONFIG, now=EPOCH).suspicion(EPOCH) == "no coordinator known for term 0"


# ---- rule 15: a member that has just joined gets its start-up grace --------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 8),
    starts=st.lists(st.floats(0.0, 3.0 * CONFIG.liveness_timeout, allow_nan=False), min_size=8, max_size=8),
    phases=st.lists(st.floats(0.0, INTERVAL, allow_nan=False), min_size=8, max_size=8),
    latency=st.floats(0.0, 0.2 * INTERVAL, allow_nan=False),
)
def test_members_starting_one_by_one_elect_once(n: int, starts: list[float], phases: list[float],
                                                latency: float) -> None:
    """Members that start at different times (a community brought up one daemon after another, over
    up to 3 liveness timeouts) elect one coordinator for term 1: nobody steps to term 2 because term
    1's candidate was still in its own start-up grace (bench_scale, 8 daemons: "claiming term 2")."""
    node_ids = [i.node_id for i in IDS[:n]]
    start_at = dict(zip(node_ids, starts, strict=False))
    sim = Simulation(node_ids, CONFIG, lambda _i, _t: latency, phases[:n], start_at=start_at)
    sim.run_until(max(starts[:n]) + CONFIG.effective_startup_grace + 10 * INTERVAL)
    assert {(s.term, s.coordinator) for s in sim.live()} == {(1, sim.live()[0].coordinator)}
    assert sim.live()[0].coordinator is not None


def test_the_start_up_skip_the_bench_saw_is_gone() -> None:
    """The chain behind bench_scale's "claiming term 2: no coordinator known for term 0" (8 daemons):
    A's grace ends while B, better for term 1, is in its own grace; before B's grace ends C, better
    still, joins, so B waits for C; A's claim_timeout for term 1 ends before C's grace does, and
    before rule 15 A stepped to term 2. Now everyone waits for C, and term 1 is the only term."""
    node_ids = [i.node_id for i in IDS[:3]]
    a, b, c = sorted(node_ids, key=lambda n: rank(1, n), reverse=True)  # c is best for term 1
    lt = CONFIG.liveness_timeout  # = startup_grace = claim_timeout here
    starts = {a: 0.0, b: 0.4 * lt, c: 1.2 * lt}
    sim = Simulation(node_ids, CONFIG, lambda _i, _t: 0.05, [0.1] * 3, start_at=starts)
    sim.run_until(max(starts.values()) + CONFIG.effective_startup_grace + 10 * INTERVAL)
    assert {(s.term, s.coordinator) for s in sim.live()} == {(1, c)}


def test_a_new_candidate_that_never_claims_holds_the_others_for_its_grace_only() -> None:
    """Rule 15 is bounded: a member first heard at t delays a step past the term it is candidate
    for until t + startup_grace + claim_timeout, no longer, if it never claims."""
    me, other = IDS[0].node_id, IDS[1].node_id
    t = 1
    while rank(t, other) > rank(t, me):  # a term the silent member is candidate for
        t += 1
    state = ElectionState(me, CONFIG, now=EPOCH, known_term=t - 1)
    grace, claim_wait = CONFIG.effective_startup_grace, CONFIG.effective_claim_timeout
    first = EPOCH + 1.0  # heard first during our own grace
    now, stepped_at = EPOCH, None
    while stepped_at is None and now < first + grace + claim_wait + 3 * INTERVAL:
        now = round(now + 0.25, 6)
        if now >= first:
            state.handle(HeartbeatSeen(hb(other, now), now))  # live, silent about claims
        state.handle(Tick(now))
        if state.term > t or (state._pending is not None and state._pending[0] > t):
            stepped_at = now  # waits for t + 1 (or already claimed it)
    assert stepped_at is not None, "the hold never ended"
    assert first + grace + claim_wait <= stepped_at <= first + grace + claim_wait + 0.25


@pytest.mark.parametrize("with_sign", [True, False])
def test_a_coordinators_round_message_is_a_sign_of_life(with_sign: bool) -> None:
    """Rule 16 (bench_scale, 32 daemons: a member claimed term 2 with "coordinator last heard 5.0 s
    ago" 1.3 s after it accepted that coordinator's round manifest; the coordinator, serving 31
    fetches, had sent no heartbeat for 5 s). An accepted round message renews its author's liveness
    like a heartbeat; the control (no message) suspects the coordinator at the plain timeout."""
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH + CONFIG.effective_startup_grace
    state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
    assert state.coordinator == coord
    sign_at = t + 0.8 * CONFIG.liveness_timeout
    if with_sign:
        assert state.handle(SignOfLife(coord, sign_at, sign_at)).validation.accepted
    suspected = None
    for k in range(1, 40):
        now = t + 0.25 * k
        state.handle(Tick(now))
        if state._pending is not None or state.term > 1:
            suspected = now
            break
    due = (sign_at if with_sign else t) + CONFIG.liveness_timeout
    assert suspected is not None and due <= suspected <= due + 0.25
    assert state.members[coord].gap == 0.0  # a round message is not a heartbeat: rule 10's gap is untouched


def test_a_sign_of_life_adds_no_member_and_an_old_one_renews_nothing() -> None:
    coord, me, stranger = IDS[0].node_id, IDS[1].node_id, IDS[2].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    out = state.handle(SignOfLife(stranger, EPOCH, EPOCH))
    assert out.validation.verdict is Verdict.IGNORE and stranger not in state.members
    assert state.handle(SignOfLife(me, EPOCH, EPOCH)).validation.verdict is Verdict.IGNORE
    state.handle(HeartbeatSeen(hb(coord, EPOCH, term=1, coordinator=coord), EPOCH))
    later = EPOCH + CONFIG.max_clock_skew + 10 * CONFIG.liveness_timeout
    # a replayed (synced) message signed long ago shows its author alive only at sent_at + skew
    state.handle(SignOfLife(coord, EPOCH + 1.0, later))
    assert state.members[coord].last_seen == EPOCH + 1.0 + CONFIG.max_clock_skew
    assert not state.is_live(coord, later)


@pytest.mark.parametrize("reach", [(0, 2), (0, 0), (1, 2)])
def test_a_node_that_no_topic_peer_hears_does_not_claim(reach: tuple[int, int]) -> None:
    """Rule 17 (bench_scale, 32 daemons): a member 9 s after its start, 2 connections, 0 peers in its
    gossip mesh (both had pruned it), heard the coordinator of term 1 late and claimed term 2 while
    the coordinator was aggregating all 32 updates; everyone followed it, and it heard nobody. A node
    that holds connections but no topic peer withholds its claim, once said, until a peer hears it.
    Controls: alone (no connection at all) it claims, and with one topic peer it claims."""
    coord, me = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH + CONFIG.effective_startup_grace
    state.handle(HeartbeatSeen(hb(coord, t, term=1, coordinator=coord), t))
    peers, connected = reach
    state.handle(TopicReach(peers, connected, t))
    claims, withheld = [], []
    for k in range(1, 80):
        now = t + 0.25 * k
        for effect in state.handle(Tick(now)).effects:
            (claims if isinstance(effect, PublishClaim) else withheld if isinstance(effect, ClaimWithheld)
             else []).append(effect)
    if reach == (0, 2):
        assert claims == [] and state.term == 1
        assert len(withheld) >= 1 and len({w.term for w in withheld}) == len(withheld)  # each term said once
        assert "no peer on the community topic hears us" in withheld[0].reason
        later = t + 0.25 * 80
        effects = [*state.handle(TopicReach(1, 2, later)).effects, *state.handle(Tick(later + 0.25)).effects]
        assert [e for e in effects if isinstance(e, PublishClaim)] and state.coordinator == me
    else:
        assert claims and claims[0].term == 2 and withheld == [] and state.coordinator == me
