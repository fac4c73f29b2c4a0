"""What fednode does NOT protect, pinned down so protocols/security.md stays true: if one of
these starts failing, a limitation was fixed and the threat model must say so."""

from __future__ import annotations

from fednode.consensus import ClaimSeen, HeartbeatSeen
from fednode.consensus.election import ElectionConfig, ElectionState
from fednode.identity import Identity
from fednode.wire import codec
from fednode.wire.messages import CoordinatorClaim, Heartbeat
from fednode.wire.validate import MessageValidator, ValidationPolicy
from fednode.wire.verdict import Verdict

NOW = 1_800_000_000.0


def heartbeat(identity: Identity, seq: int, sent_at: float = NOW) -> bytes:
    return codec.encode(codec.sign(Heartbeat(community_id="c", node_id=identity.node_id, term=0, seq=seq,
                                             sent_at=sent_at), identity))


def test_replay_after_the_seen_cache_is_flushed_is_accepted_within_the_window() -> None:
    member = Identity.from_seed(b"\x01" * 32)
    v = MessageValidator(ValidationPolicy(community_id="c", seen_cache_size=4))
    old = heartbeat(member, 1)
    assert v.check(old, NOW).validation.accepted
    assert v.check(old, NOW).validation.reason == "duplicate"
    for seq in range(2, 6):  # seen_cache_size distinct, valid messages push it out
        assert v.check(heartbeat(member, seq), NOW).validation.accepted
    replay = v.check(old, NOW + 10)
    assert replay.validation.accepted  # the limitation: a replay inside the window passes validation
    for seq in range(6, 10):
        v.check(heartbeat(member, seq, NOW + 10), NOW + 10)
    stale = v.check(old, NOW + 301)  # outside the replay window it is refused whatever the cache holds
    assert (stale.validation.verdict, stale.validation.reason) == (Verdict.IGNORE, "stale")
    # ... but liveness ignores it (security.md A5): its seq is not above the last one heard.
    election = ElectionState("me", ElectionConfig(), now=NOW)
    for seq in (1, 5):
        hb = codec.decode(heartbeat(member, seq))
        assert isinstance(hb, Heartbeat)
        assert election.handle(HeartbeatSeen(hb, NOW)).validation.accepted
    assert isinstance(replay.message, Heartbeat)
    assert election.handle(HeartbeatSeen(replay.message, NOW + 10)).validation.reason == "stale_seq"
    assert election.members[member.node_id].last_seen == NOW


def test_a_replayed_claim_does_not_renew_its_claimants_liveness() -> None:
    """N8: a replayed CoordinatorClaim that gets past a flushed duplicate cache within the replay
    window is no newer (term, claimed_at) than the claim already heard, so it is no sign of life."""
    coordinator = Identity.from_seed(b"\x04" * 32).node_id
    election = ElectionState("me", ElectionConfig(), now=NOW)
    claim = CoordinatorClaim(community_id="c", node_id=coordinator, term=3, claimed_at=NOW)
    election.handle(ClaimSeen(claim, NOW))
    assert election.coordinator == coordinator
    dead_at = NOW + election.config.liveness_timeout
    replay = election.handle(ClaimSeen(claim, dead_at - 0.1))  # the same claim, replayed
    assert replay.validation.reason == "stale_claim"
    assert election.members[coordinator].last_seen == NOW
    assert coordinator not in election.live_members(dead_at + 0.1)
    # a genuinely newer claim (a later term, or the same term re-claimed later) still counts
    newer = CoordinatorClaim(community_id="c", node_id=coordinator, term=3, claimed_at=NOW + 1)
    assert election.handle(ClaimSeen(newer, dead_at + 0.2)).validation.accepted
    assert election.members[coordinator].last_seen == dead_at + 0.2


def test_open_community_accepts_any_key() -> None:
    stranger = Identity.from_seed(b"\x02" * 32)
    member = Identity.from_seed(b"\x03" * 32)
    assert MessageValidator(ValidationPolicy(community_id="c")).check(heartbeat(stranger, 1), NOW).validation.accepted
    closed = MessageValidator(ValidationPolicy(community_id="c", allowlist=frozenset({member.node_id})))
    assert closed.check(heartbeat(stranger, 1), NOW).validation.reason == "not_member"


def test_member_table_is_bounded_under_a_sybil_swarm() -> None:
    election = ElectionState("me", ElectionConfig(max_members=8), now=NOW)
    verdicts = []
    for i in range(20):
        sybil = Identity.from_seed(i.to_bytes(2, "big") + b"\x07" * 30)
        hb = codec.decode(heartbeat(sybil, 1))
        assert isinstance(hb, Heartbeat)
        verdicts.append(election.handle(HeartbeatSeen(hb, NOW)).validation.reason)
    assert len(election.members) == 8
    assert verdicts.count("member_table_full") == 12
