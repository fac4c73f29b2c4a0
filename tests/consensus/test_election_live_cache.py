"""ElectionState.live_members is kept between calls (issue 12): on random sequences of heartbeats,
claims, ticks and queries (times at, just before and just after members' timeouts, and back in time)
it answers exactly what the direct computation over the member table answers."""

from __future__ import annotations

import copy
import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.consensus import ClaimSeen, ElectionConfig, ElectionState, HeartbeatSeen, Tick
from fednode.consensus.election import LIVE_CACHE_MARGIN_ULPS
from fednode.wire import CoordinatorClaim, Heartbeat

from .helpers import COMMUNITY, EPOCH, identity

IDS = [identity(i).node_id for i in range(6)]
ME = IDS[0]
_SEQ = itertools.count(1)


def uncached_live_members(state: ElectionState, now: float) -> list[str]:
    """The computation live_members did on every call before issue 12."""
    out = [n for n, m in state.members.items() if m.federated and now - m.last_seen < state.timeout_of(m)]
    if state.federated and state.node_id not in out:
        out.append(state.node_id)
    return sorted(out)


def probe_times(state: ElectionState, now: float) -> list[float]:
    """`now`, a moment ago, and every member's timeout instant with its neighbouring floats."""
    times = [now, now - 0.3, now + 0.7]
    for m in state.members.values():
        edge = m.last_seen + state.timeout_of(m)
        times += [edge, math.nextafter(edge, -math.inf), math.nextafter(edge, math.inf),
                  edge - LIVE_CACHE_MARGIN_ULPS * math.ulp(edge), edge + 1e-9]
    return times


def check(state: ElectionState, now: float) -> None:
    """The state itself is asked at `now` only, as a daemon asks (time moves forward, so a view cached
    before the last event is what answers); copies (sharing the member table, each with its own
    cached view) are asked at the probe times, in time order and out of it."""
    assert state.live_members(now) == uncached_live_members(state, now), now
    forward, shuffled = copy.copy(state), copy.copy(state)
    for t in sorted(probe_times(state, now)):
        assert forward.live_members(t) == uncached_live_members(state, t), t
    for t in probe_times(state, now):
        assert shuffled.live_members(t) == uncached_live_members(state, t), t


DELAYS = st.sampled_from([0.0, 0.05, 0.5, 1.0, 1.5, 2.5, 3.7, 6.0, 10.0]) | st.floats(0.0, 12.0)
STEP = st.one_of(
    st.tuples(st.just("hb"), st.integers(0, len(IDS) - 1), DELAYS, st.booleans(), st.sampled_from([0.0, 0.2, 40.0])),
    st.tuples(st.just("claim"), st.integers(0, len(IDS) - 1), DELAYS, st.integers(1, 4), st.sampled_from([0.0, 40.0])),
    st.tuples(st.just("tick"), DELAYS),
    st.tuples(st.just("query"), st.floats(-3.0, 12.0)),
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(STEP, max_size=40), federated=st.booleans(), max_members=st.integers(2, 8),
       liveness=st.sampled_from([2.5, 3.0, 1.1]))
def test_cached_live_members_equal_the_direct_computation(steps: list[tuple], federated: bool,
                                                          max_members: int, liveness: float) -> None:
    config = ElectionConfig(heartbeat_interval=1.0, liveness_timeout=liveness, max_members=max_members,
                            max_clock_skew=30.0, max_tick_gap=1.0)
    state = ElectionState(ME, config, now=EPOCH, federated=federated)
    now = EPOCH
    for step in steps:
        kind = step[0]
        if kind == "hb":
            _, who, delay, fed, lag = step
            now += delay
            state.handle(HeartbeatSeen(Heartbeat(community_id=COMMUNITY, node_id=IDS[who], term=0, seq=next(_SEQ),
                                                 sent_at=now - lag, federated_learning=fed), now))
        elif kind == "claim":
            _, who, delay, term, lag = step
            now += delay
            state.handle(ClaimSeen(CoordinatorClaim(community_id=COMMUNITY, node_id=IDS[who], term=term,
                                                    claimed_at=now - lag), now))
        elif kind == "tick":
            now += step[1]
            state.handle(Tick(now))
        else:
            t = now + step[1]
            assert copy.copy(state).live_members(t) == uncached_live_members(state, t)
        check(state, now)


def test_a_live_members_heartbeat_keeps_the_cached_view() -> None:
    """The point of the cache: heartbeats of members already live do not make the next call rebuild it."""
    config = ElectionConfig(heartbeat_interval=1.0, liveness_timeout=2.5)
    state = ElectionState(ME, config, now=EPOCH)
    for i, who in enumerate(IDS[1:]):
        state.handle(HeartbeatSeen(Heartbeat(community_id=COMMUNITY, node_id=who, term=0, seq=next(_SEQ),
                                             sent_at=EPOCH + i * 0.1, federated_learning=True), EPOCH + i * 0.1))
    everyone = sorted(IDS)
    assert state.live_members(EPOCH + 1.0) == everyone
    view = state._live
    for i, who in enumerate(IDS[1:]):  # a second round of heartbeats, one interval later
        at = EPOCH + 1.0 + i * 0.1
        state.handle(HeartbeatSeen(Heartbeat(community_id=COMMUNITY, node_id=who, term=0, seq=next(_SEQ),
                                             sent_at=at, federated_learning=True), at))
        assert state.live_members(at) == everyone
    assert state._live is not None and state._live.since == view.since  # not rebuilt
    # time passes: every member's timeout runs out, and the answer follows
    assert state.live_members(EPOCH + 1.0 + 0.4 + 2.5) == [ME]
    # a member that stops being federated leaves the answer at once
    state.handle(HeartbeatSeen(Heartbeat(community_id=COMMUNITY, node_id=IDS[1], term=0, seq=next(_SEQ),
                                         sent_at=EPOCH + 5.0, federated_learning=True), EPOCH + 5.0))
    assert state.live_members(EPOCH + 5.0) == sorted([ME, IDS[1]])
    state.handle(HeartbeatSeen(Heartbeat(community_id=COMMUNITY, node_id=IDS[1], term=0, seq=next(_SEQ),
                                         sent_at=EPOCH + 5.5, federated_learning=False), EPOCH + 5.5))
    assert state.live_members(EPOCH + 5.5) == [ME]


def test_a_slow_member_that_speeds_up_expires_at_its_shorter_timeout() -> None:
    """A heartbeat can shorten a live member's timeout (its remembered gap decays, rule 10): the kept
    view must end at the new timeout, not the one it was built with."""
    config = ElectionConfig(heartbeat_interval=1.0, liveness_timeout=2.5)
    state = ElectionState(ME, config, now=EPOCH)
    slow = IDS[1]

    def beat(at: float) -> None:
        state.handle(HeartbeatSeen(Heartbeat(community_id=COMMUNITY, node_id=slow, term=0, seq=next(_SEQ),
                                             sent_at=at, federated_learning=True), at))

    beat(EPOCH)
    beat(EPOCH + 4.0)  # a 4 s gap: its timeout stretches to 10 s
    assert state.timeout_of(state.members[slow]) == 10.0
    assert state.live_members(EPOCH + 4.0) == sorted([ME, slow])  # kept until EPOCH + 14
    beat(EPOCH + 4.05)  # on time again: the gap decays to 3.6 s, the timeout to 9 s
    expiry = state.members[slow].last_seen + state.timeout_of(state.members[slow])
    assert expiry < EPOCH + 14.0
    assert state.live_members(EPOCH + 4.05) == sorted([ME, slow])
    assert state.live_members(expiry - 0.01) == sorted([ME, slow])
    assert state.live_members(expiry) == [ME] == uncached_live_members(state, expiry)
