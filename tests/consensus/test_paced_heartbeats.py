"""election-v1 rule 14: in a large community a member that is not the coordinator paces its
heartbeats by the number of live members (each node's inbound heartbeat rate stays near
heartbeat_fanin per heartbeat_interval), declares its pace in the heartbeat (`interval_ms`), and
is judged dead only after as many missed heartbeats at that pace; a declared pace is believed up
to max_heartbeat_interval only. The coordinator, and every member while no live coordinator is
known, keeps heartbeat_interval."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.consensus import ElectionConfig, ElectionState, HeartbeatSeen, Tick
from fednode.consensus.election import member_timeout, paced_interval
from fednode.errors import ConfigError
from fednode.wire import Heartbeat, codec

from .helpers import COMMUNITY, EPOCH, identity

IDS = [identity(i) for i in range(20)]
INTERVAL = 1.0
CONFIG = ElectionConfig(heartbeat_interval=INTERVAL, liveness_timeout=2.5 * INTERVAL, heartbeat_fanin=4,
                        max_heartbeat_interval=10.0)
_SEQ = itertools.count(1)


def hb(who: str, now: float, *, term: int = 1, coordinator: str = "", interval: float = 0.0) -> Heartbeat:
    return Heartbeat(community_id=COMMUNITY, node_id=who, term=term, seq=next(_SEQ), sent_at=now,
                     federated_learning=True, coordinator_node_id=coordinator,
                     interval_ms=round(interval * 1000))


def test_the_pace_grows_with_the_community_between_its_bounds() -> None:
    assert paced_interval(2.0, 8, 8, 30.0) == 2.0  # up to fanin members: every interval
    assert paced_interval(2.0, 16, 8, 30.0) == 4.0
    assert paced_interval(2.0, 32, 8, 30.0) == 8.0
    assert paced_interval(2.0, 500, 8, 30.0) == 30.0  # never slower than the bound
    assert paced_interval(2.0, 500, 0, 30.0) == 2.0  # fanin 0: pacing is off


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="heartbeat_fanin"):
        ElectionConfig(heartbeat_fanin=-1)
    with pytest.raises(ConfigError, match="max_heartbeat_interval"):
        ElectionConfig(heartbeat_interval=2.0, liveness_timeout=5.0, max_heartbeat_interval=1.0)


def test_the_interval_field_is_absent_at_the_community_pace() -> None:
    """A heartbeat at heartbeat_interval encodes as before rule 14 (no `interval_ms` key)."""
    plain = codec.to_map(hb(IDS[0].node_id, EPOCH))
    paced = codec.to_map(hb(IDS[0].node_id, EPOCH, interval=4.0))
    assert "interval_ms" not in plain and paced["interval_ms"] == 4000


def test_a_member_is_judged_at_its_declared_pace_up_to_the_bound() -> None:
    me, slow, liar = IDS[0].node_id, IDS[1].node_id, IDS[2].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    state.handle(HeartbeatSeen(hb(slow, EPOCH, interval=4.0), EPOCH))
    state.handle(HeartbeatSeen(hb(liar, EPOCH, interval=3600.0), EPOCH))
    # 2.5 heartbeats at 4 s each: live just before 10 s of silence, dead at it
    assert state.is_live(slow, EPOCH + 9.9) and not state.is_live(slow, EPOCH + 10.0)
    # an hour's pace is believed only up to max_heartbeat_interval (10 s): dead after 25 s
    assert state.is_live(liar, EPOCH + 24.9) and not state.is_live(liar, EPOCH + 25.0)
    assert member_timeout(CONFIG, 0.0, 0.0) == CONFIG.liveness_timeout  # no declaration: the community pace


def _follower_of_a_live_coordinator(n_members: int) -> tuple[ElectionState, str]:
    me, coord = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH + 0.1
    state.handle(HeartbeatSeen(hb(coord, t, coordinator=coord), t))  # its heartbeat is its claim (rule 3)
    for other in IDS[2:n_members]:
        state.handle(HeartbeatSeen(hb(other.node_id, t, coordinator=coord, interval=3.0), t))
    assert state.coordinator == coord
    return state, coord


def test_a_follower_paces_by_the_live_members_and_the_coordinator_does_not() -> None:
    state, coord = _follower_of_a_live_coordinator(16)  # 16 live members, fanin 4: 4 intervals
    assert state.heartbeat_interval(EPOCH + 1.0) == pytest.approx(4.0)
    small, _ = _follower_of_a_live_coordinator(4)
    assert small.heartbeat_interval(EPOCH + 1.0) == INTERVAL
    # the coordinator itself beats every interval, whatever the community's size
    leader = ElectionState(coord, CONFIG, now=EPOCH)
    leader.handle(Tick(EPOCH + CONFIG.effective_startup_grace + 1))  # alone: it is the candidate and claims
    for other in IDS[2:16]:
        leader.handle(HeartbeatSeen(hb(other.node_id, EPOCH + 5, coordinator=coord, interval=3.0), EPOCH + 5))
    assert leader.is_coordinator and len(leader.live_members(EPOCH + 5.5)) == 15
    assert leader.heartbeat_interval(EPOCH + 5.5) == INTERVAL


def test_a_follower_whose_coordinator_falls_silent_beats_at_full_pace() -> None:
    """An election needs every member's voice (rule 13's endorsements, candidates' liveness) at full pace."""
    state, _ = _follower_of_a_live_coordinator(16)
    assert state.heartbeat_interval(EPOCH + 1.0) > INTERVAL
    assert state.heartbeat_interval(EPOCH + 0.1 + CONFIG.liveness_timeout) == INTERVAL


@settings(max_examples=200, deadline=None)
@given(pace=st.floats(min_value=INTERVAL, max_value=10.0),
       jitter=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=20, max_size=20))
def test_a_member_on_time_at_any_declared_pace_is_never_judged_dead(pace: float, jitter: list[float]) -> None:
    """Heartbeats every `pace` seconds, each up to half an interval late: live at every instant."""
    me, member = IDS[0].node_id, IDS[1].node_id
    state = ElectionState(me, CONFIG, now=EPOCH)
    t = EPOCH
    for late in jitter:
        arrival = t + late * pace
        state.handle(HeartbeatSeen(hb(member, arrival, term=0, interval=pace), arrival))
        t += pace
        # just before the next heartbeat (at its latest) arrives
        assert state.is_live(member, t + 0.5 * pace - 1e-6)
