"""Issue 11 item 6: a heartbeat or claim that gossip delivers long after it was sent (a newly
subscribed peer's catch-up, an IWANT answer) is no sign of life now. A message counts as alive at
min(receipt, its timestamp + max_clock_skew), so clock skew within the allowed bound costs nothing."""

from __future__ import annotations

from fednode.consensus import ClaimSeen, ElectionConfig, ElectionState, HeartbeatSeen
from fednode.wire import CoordinatorClaim, Heartbeat

from .helpers import COMMUNITY, EPOCH, identity

CONFIG = ElectionConfig(heartbeat_interval=1.0, liveness_timeout=2.5, max_clock_skew=30.0)
DEAD, ME = identity(0).node_id, identity(1).node_id


def heartbeat(sent_at: float, *, seq: int = 1, coordinator: str = "", term: int = 0) -> Heartbeat:
    return Heartbeat(community_id=COMMUNITY, node_id=DEAD, term=term, seq=seq, sent_at=sent_at,
                     federated_learning=True, coordinator_node_id=coordinator)


def test_a_two_minute_old_heartbeat_delivered_late_does_not_make_its_sender_live() -> None:
    now = EPOCH + 1000.0
    state = ElectionState(ME, CONFIG, now=now)
    state.handle(HeartbeatSeen(heartbeat(now - 120.0), now))
    assert DEAD not in state.live_members(now)
    assert state.members[DEAD].last_seen == now - 120.0 + CONFIG.max_clock_skew


def test_a_coordinator_heartbeat_replayed_late_does_not_renew_its_claim() -> None:
    now = EPOCH + 1000.0
    state = ElectionState(ME, CONFIG, now=now)
    state.handle(HeartbeatSeen(heartbeat(now - 120.0, term=3, coordinator=DEAD), now))
    assert DEAD not in state.live_members(now)


def test_an_old_claim_delivered_late_is_no_sign_of_life() -> None:
    now = EPOCH + 1000.0
    state = ElectionState(ME, CONFIG, now=now)
    state.handle(ClaimSeen(CoordinatorClaim(community_id=COMMUNITY, node_id=DEAD, term=2, claimed_at=now - 90.0), now))
    assert DEAD not in state.live_members(now)


def test_skew_within_the_allowed_bound_changes_nothing() -> None:
    now = EPOCH + 1000.0
    for sent_at in (now, now - CONFIG.max_clock_skew, now + CONFIG.max_clock_skew):  # behind, on time, ahead
        state = ElectionState(ME, CONFIG, now=now)
        state.handle(HeartbeatSeen(heartbeat(sent_at), now))
        assert state.members[DEAD].last_seen == now and DEAD in state.live_members(now)
