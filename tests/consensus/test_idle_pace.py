"""election-v1 rule 18: a community with nothing to do beats slowly.

A coordinator that knows no round of its own can open for IDLE_LEAD_INTERVALS idle intervals
(`Quiet`) beats at idle_heartbeat_interval and declares it; its followers follow that pace; a member
that joins meanwhile is greeted at once (`BeatSoon`); a node in its start-up grace that hears members
naming a coordinator at a slow pace waits as long as that coordinator could be silent and live."""

from __future__ import annotations

import itertools
import math

import pytest

from fednode.consensus import BeatSoon, ElectionConfig, ElectionState, HeartbeatSeen, PublishClaim, Quiet, Tick
from fednode.consensus.election import IDLE_LEAD_INTERVALS, rank
from fednode.consensus.round_book import History, RoundPolicy, quiet_until
from fednode.errors import ConfigError
from fednode.wire import Heartbeat

from .helpers import COMMUNITY, EPOCH, identity

IDS = [identity(i) for i in range(12)]
BASE = 1.0
IDLE = 10.0
CONFIG = ElectionConfig(heartbeat_interval=BASE, liveness_timeout=2.5 * BASE, heartbeat_fanin=4,
                        max_heartbeat_interval=10.0, idle_heartbeat_interval=IDLE)
_SEQ = itertools.count(1)


def hb(who: str, now: float, *, term: int = 1, coordinator: str = "", interval: float = 0.0) -> Heartbeat:
    return Heartbeat(community_id=COMMUNITY, node_id=who, term=term, seq=next(_SEQ), sent_at=now,
                     federated_learning=True, coordinator_node_id=coordinator, interval_ms=round(interval * 1000))


def _coordinator(config: ElectionConfig = CONFIG) -> tuple[ElectionState, float]:
    """IDS[0] coordinates term 1 (it claimed it, alone), with IDS[1] a live member."""
    me, other = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, config, now=EPOCH)
    t = EPOCH + config.effective_startup_grace + 0.1
    out = state.handle(Tick(t))
    assert [e for e in out.effects if isinstance(e, PublishClaim)] and state.coordinator == me
    state.handle(HeartbeatSeen(hb(other, t, coordinator=me), t))
    return state, t


def test_the_idle_pace_is_taken_between_the_community_pace_and_what_receivers_believe() -> None:
    assert ElectionConfig(heartbeat_interval=2.0, liveness_timeout=5.0, idle_heartbeat_interval=60.0,
                          max_heartbeat_interval=30.0).idle_heartbeat_interval == 30.0
    assert ElectionConfig(heartbeat_interval=2.0, liveness_timeout=5.0,
                          idle_heartbeat_interval=0.5).idle_heartbeat_interval == 2.0
    assert ElectionConfig(idle_heartbeat_interval=0).idle_heartbeat_interval == 0
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ConfigError, match="idle_heartbeat_interval"):
            ElectionConfig(idle_heartbeat_interval=bad)


def test_a_coordinator_beats_at_the_idle_pace_only_while_no_round_can_open_for_a_while() -> None:
    state, t = _coordinator()
    assert state.heartbeat_interval(t) == BASE  # never told: never quiet
    state.handle(Quiet(math.inf, t))  # max_rounds reached
    assert state.heartbeat_interval(t) == IDLE and state.heartbeat_interval(t + 1e6) == IDLE
    lead = IDLE_LEAD_INTERVALS * IDLE
    state.handle(Quiet(t + lead + 5.0, t))  # a pause that ends later
    assert state.heartbeat_interval(t) == IDLE
    assert state.heartbeat_interval(t + 5.0) == IDLE
    assert state.heartbeat_interval(t + 5.1) == BASE  # back at full pace `lead` before a round may open
    state.handle(Quiet(t, t))  # a round may open (or is open)
    assert state.heartbeat_interval(t) == BASE


def test_rule_18_off_keeps_the_coordinator_at_the_community_pace() -> None:
    state, t = _coordinator(ElectionConfig(heartbeat_interval=BASE, liveness_timeout=2.5 * BASE,
                                           idle_heartbeat_interval=0))
    state.handle(Quiet(math.inf, t))
    assert state.heartbeat_interval(t) == BASE


def test_a_member_follows_its_idle_coordinator_and_comes_back_with_it() -> None:
    me, coord = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH + 0.1
    state.handle(HeartbeatSeen(hb(coord, t, coordinator=coord), t))
    assert state.coordinator == coord and state.heartbeat_interval(t) == BASE
    t += 1
    state.handle(HeartbeatSeen(hb(coord, t, coordinator=coord, interval=IDLE), t))  # idle
    assert state.heartbeat_interval(t) == IDLE
    # the idle coordinator is live for 2.5 of its heartbeats: silent 24 s, still followed, no claim
    out = state.handle(Tick(t + 24.9))
    assert state.is_live(coord, t + 24.9) and not out.effects and state.heartbeat_interval(t + 24.9) == IDLE
    t += IDLE
    state.handle(HeartbeatSeen(hb(coord, t, coordinator=coord), t))  # a round may open soon: full pace
    assert state.heartbeat_interval(t) == BASE
    # never slower than our own idle pace, whatever the coordinator declares
    mine = ElectionState(IDS[2].node_id, ElectionConfig(heartbeat_interval=BASE, liveness_timeout=2.5 * BASE,
                                                        max_heartbeat_interval=10.0, idle_heartbeat_interval=4.0),
                         now=EPOCH)
    mine.handle(HeartbeatSeen(hb(coord, t, coordinator=coord, interval=IDLE), t))
    assert mine.heartbeat_interval(t) == 4.0


def test_a_dead_idle_coordinator_is_replaced_after_its_own_liveness_timeout() -> None:
    me, coord = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH + 0.1
    state.handle(HeartbeatSeen(hb(coord, t, coordinator=coord, interval=IDLE), t))
    assert state.is_live(coord, t + 2.5 * IDLE - 0.01)
    assert not state.is_live(coord, t + 2.5 * IDLE)
    state.handle(Tick(t + 2.5 * IDLE))
    assert state.heartbeat_interval(t + 2.5 * IDLE) == BASE  # an election needs every voice at full pace


def test_an_idle_coordinator_greets_a_member_that_joins_at_once() -> None:
    state, t = _coordinator()
    state.handle(Quiet(math.inf, t))
    joiner, known = IDS[2].node_id, IDS[1].node_id
    out = state.handle(HeartbeatSeen(hb(joiner, t + 1), t + 1))
    assert BeatSoon() in out.effects
    out = state.handle(HeartbeatSeen(hb(joiner, t + 2), t + 2))  # once per join
    assert BeatSoon() not in out.effects
    out = state.handle(HeartbeatSeen(hb(known, t + 2, coordinator=IDS[0].node_id, interval=IDLE), t + 2))
    assert BeatSoon() not in out.effects  # a live member's heartbeat is no join
    # back after a silence (it may have restarted): greeted again
    out = state.handle(HeartbeatSeen(hb(joiner, t + 100), t + 100))
    assert BeatSoon() in out.effects
    # a coordinator at the community pace does not need to
    state.handle(Quiet(t + 100, t + 100))
    out = state.handle(HeartbeatSeen(hb(IDS[3].node_id, t + 101), t + 101))
    assert BeatSoon() not in out.effects


def _joiner_that_is_candidate() -> tuple[str, str, str]:
    """(joiner, member, coordinator): the joiner ranks first of {joiner, member} for term 1 (it knows no
    term: hearsay adopts none, rule 3)."""
    for a, b, c in itertools.permutations([i.node_id for i in IDS[:6]], 3):
        if rank(1, a) < rank(1, b):
            return a, b, c
    raise AssertionError("no order found")


@pytest.mark.parametrize("pace", [IDLE, 0.0])
def test_a_joiner_that_hears_members_name_a_slow_coordinator_waits_for_it(pace: float) -> None:
    """The joiner hears a member's heartbeats (naming coordinator C of term 1, at `pace`) but not C's
    own: C beats every `pace`. With pace 0 (the control), the grace is the usual one and the joiner,
    the candidate for term 1, claims it when the grace and a claim timeout have passed."""
    joiner, member, coord = _joiner_that_is_candidate()
    state = ElectionState(joiner, CONFIG, now=EPOCH)
    claims: list[float] = []
    t, next_beat = EPOCH, EPOCH + 0.5
    while t < EPOCH + 2.5 * IDLE + 10 and not claims:
        t += 0.5
        effects = list(state.handle(Tick(t)).effects)
        if t >= next_beat:
            effects += state.handle(HeartbeatSeen(hb(member, t, coordinator=coord, interval=pace), t)).effects
            next_beat += max(pace, BASE)
        claims += [t for e in effects if isinstance(e, PublishClaim)]
    assert claims, "the joiner never claimed"
    if pace:
        assert claims[0] - EPOCH >= 2.5 * IDLE  # C, beating every 10 s, could be live that long
    else:
        assert claims[0] - EPOCH < 2.5 * IDLE / 2


def test_quiet_until_is_when_time_alone_lets_the_next_round_open() -> None:
    now = EPOCH
    done = History(live_federated=3, highest_round_number=2, published=2, last_finished_at=now - 1)
    assert quiet_until(now=now, policy=RoundPolicy(max_rounds=2, pause_seconds=100), history=done) == math.inf
    more = RoundPolicy(max_rounds=3, pause_seconds=100)
    assert quiet_until(now=now, policy=more, history=done) == now + 99  # the pause's end
    assert quiet_until(now=now + 200, policy=more, history=done) == now + 200  # the pause is over
    assert quiet_until(now=now, policy=RoundPolicy(), history=done) == now  # no budget, no pause
    first = History(live_federated=1, highest_round_number=0, published=0, last_finished_at=None)
    assert quiet_until(now=now, policy=more, history=first) == now  # waiting for members is not quiet
