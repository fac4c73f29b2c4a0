"""Coordinator election, sans-IO (protocols/election-v1.md is the normative text).

Rule, in one paragraph: terms only grow. The coordinator of a term is, among all claims for that
term a node has seen, the claimant with the smallest rank sha256(term_be64 || node_id) — a
function of the *set of claims*, not of anyone's view, so once every claim has reached every live
node they all name the same coordinator for every term (no view has to agree for that). A node
claims term t only when it believes itself the right candidate: its current coordinator is silent
for `liveness_timeout` (or there is none) and it is the live, federated member of smallest rank for
t in its own view. A follower that suspects its coordinator waits `claim_timeout` for a claim for
t; if none comes, it considers t+1 (ranks reshuffle per term, so a live but silent candidate is
skipped). A claim for a higher term is adopted at once. The coordinator's own heartbeat
(coordinator_node_id == node_id) renews its claim, so a node that missed the claim catches up.

Liveness is judged on *reception* time (`now` of the event), never on the sender's timestamp.
A heartbeat counts only if its `seq` is greater than the last one heard from that node: a replayed
(or reordered, older) heartbeat is IGNOREd `stale_seq` and changes nothing, so a member that
replays a crashed coordinator's heartbeats after the duplicate cache flushed cannot keep it
"alive". Daemons start their counter at the wall clock in microseconds, so it keeps growing
across restarts.
With `mode = "fixed"` the coordinator is the configured peer id, term 0, and claims are ignored.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from fednode.consensus.common import CoordinatorChanged, Effect, Outcome, Tick
from fednode.errors import ConfigError
from fednode.wire.messages import MAX_TERM, CoordinatorClaim, Heartbeat
from fednode.wire.verdict import ACCEPTED, Validation, Verdict

DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 2.0
DEFAULT_LIVENESS_TIMEOUT_INTERVALS = 2.5  # a peer silent this many intervals is dead (one lost heartbeat is fine)
DEFAULT_MAX_MEMBERS = 10_000  # member table bound
DEFAULT_TERM_HISTORY = 64  # terms whose best claim is remembered
DEFAULT_MAX_TERM_JUMP = 1_000_000  # a claim further above our term than this is ignored (term exhaustion)


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    mode: str = "elect"  # "elect" | "fixed"
    fixed_node_id: str = ""  # with mode = "fixed"
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL_SECONDS
    liveness_timeout: float = DEFAULT_HEARTBEAT_INTERVAL_SECONDS * DEFAULT_LIVENESS_TIMEOUT_INTERVALS
    claim_timeout: float = 0.0  # 0 = liveness_timeout
    startup_grace: float = -1.0  # wait this long for heartbeats before a first claim; < 0 = liveness_timeout
    max_members: int = DEFAULT_MAX_MEMBERS
    term_history: int = DEFAULT_TERM_HISTORY
    max_term_jump: int = DEFAULT_MAX_TERM_JUMP

    def __post_init__(self) -> None:
        if self.mode not in ("elect", "fixed"):
            raise ConfigError(f"coordinator.mode: expected 'elect' or 'fixed', got {self.mode!r}")
        if self.mode == "fixed" and not self.fixed_node_id:
            raise ConfigError("coordinator.fixed_peer_id is required when coordinator.mode = 'fixed'")
        if not (math.isfinite(self.liveness_timeout) and self.liveness_timeout > self.heartbeat_interval > 0):
            raise ConfigError("coordinator: need liveness_timeout > heartbeat_interval > 0")
        if self.max_members < 1 or self.term_history < 1 or self.max_term_jump < 1:
            raise ConfigError("coordinator: max_members, term_history and max_term_jump must be >= 1")

    @property
    def effective_claim_timeout(self) -> float:
        return self.claim_timeout if self.claim_timeout > 0 else self.liveness_timeout

    @property
    def effective_startup_grace(self) -> float:
        return self.startup_grace if self.startup_grace >= 0 else self.liveness_timeout


# ---- events and effects ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartbeatSeen:
    heartbeat: Heartbeat
    now: float


@dataclass(frozen=True, slots=True)
class ClaimSeen:
    claim: CoordinatorClaim
    now: float


ElectionEvent = HeartbeatSeen | ClaimSeen | Tick


@dataclass(frozen=True, slots=True)
class PublishClaim(Effect):
    """Sign and publish a CoordinatorClaim for `term` (we are its candidate)."""

    term: int




def rank(term: int, node_id: str) -> bytes:
    """Candidate order for `term`: smaller is better. Reshuffles every term."""
    return hashlib.sha256(term.to_bytes(8, "big") + node_id.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Heard:
    """What a member's newest heartbeat said, and when it arrived (the node's one member table:
    liveness, peers to sync from, holders of a merged adapter, `fednode status`)."""

    at: float
    federated_learning: bool
    term: int
    coordinator_node_id: str
    open_round_id: str
    last_round_number: int
    latest_merged_sha256: str

    @classmethod
    def of(cls, hb: Heartbeat, now: float) -> Heard:
        return cls(now, hb.federated_learning, hb.term, hb.coordinator_node_id, hb.open_round_id,
                   hb.last_round_number, hb.latest_merged_sha256)


@dataclass(slots=True)
class _Member:
    last_seen: float
    federated: bool
    seq: int = -1  # the highest heartbeat seq heard (-1: none yet, e.g. known from a claim only)
    claim: tuple[int, float] = (0, -1.0)  # (term, claimed_at) of the newest CoordinatorClaim heard
    heard: Heard | None = None  # its newest heartbeat (None: known from a claim only)


class ElectionState:
    """Who coordinates, as seen from `node_id`. Feed HeartbeatSeen / ClaimSeen / Tick; call
    `handle(Tick(now))` when `next_timer()` is due. Put `term` and `coordinator` into heartbeats."""

    def __init__(self, node_id: str, config: ElectionConfig | None = None, *, now: float,
                 federated: bool = True) -> None:
        self.node_id = node_id
        self.config = config or ElectionConfig()
        self.federated = federated
        self.started_at = now
        self.term = 0
        self.members: dict[str, _Member] = {}
        self.claims: dict[int, str] = {}  # term -> best claimant seen (bounded by term_history)
        self._pending: tuple[int, float] | None = None  # (term we wait a claim for, since)
        self._last_now = now

    @property
    def coordinator(self) -> str | None:
        if self.config.mode == "fixed":
            return self.config.fixed_node_id
        return self.claims.get(self.term)

    @property
    def is_coordinator(self) -> bool:
        return self.coordinator == self.node_id

    def coordinator_of(self, term: int) -> str | None:
        return self.claims.get(term)

    def live_members(self, now: float) -> list[str]:
        """Federated members heard within liveness_timeout, this node included when federated."""
        out = [n for n, m in self.members.items() if m.federated and now - m.last_seen < self.config.liveness_timeout]
        if self.federated and self.node_id not in out:
            out.append(self.node_id)
        return sorted(out)

    def heard(self) -> dict[str, Heard]:
        """Members whose heartbeat we heard, with what it said."""
        return {n: m.heard for n, m in self.members.items() if m.heard is not None}

    def is_stale(self, hb: Heartbeat) -> bool:
        """Whether `hb` is no newer than a heartbeat already heard from its node (a replay)."""
        known = self.members.get(hb.node_id)
        return known is not None and hb.seq <= known.seq

    def candidate(self, term: int, now: float) -> str | None:
        live = self.live_members(now)
        return min(live, key=lambda n: rank(term, n)) if live else None

    def next_timer(self) -> float | None:
        if self.config.mode == "fixed":
            return None
        grace_end = self.started_at + self.config.effective_startup_grace
        times = [grace_end]
        coord = self.coordinator
        if coord is not None and coord != self.node_id and coord in self.members:
            times.append(self.members[coord].last_seen + self.config.liveness_timeout)
        if self._pending is not None:
            times.append(self._pending[1] + self.config.effective_claim_timeout)
            times.extend(m.last_seen + self.config.liveness_timeout for m in self.members.values() if m.federated)
        future = [t for t in times if t > self._last_now]
        return min(future) if future else None

    # -- the one entry point -------------------------------------------------------------------
    def handle(self, event: ElectionEvent) -> Outcome:
        self._last_now = max(self._last_now, event.now)
        effects: list[Effect] = []
        if isinstance(event, HeartbeatSeen):
            validation = self._on_heartbeat(event.heartbeat, event.now, effects)
        elif isinstance(event, ClaimSeen):
            validation = self._on_claim_message(event.claim, event.now, effects)
        else:
            validation = ACCEPTED
        self._on_tick(event.now, effects)
        return Outcome(validation, tuple(effects))

    def _see(self, node_id: str, now: float, federated: bool) -> bool:
        member = self.members.get(node_id)
        if member is None:
            if len(self.members) >= self.config.max_members:
                stale = [n for n, m in self.members.items() if now - m.last_seen >= self.config.liveness_timeout]
                if not stale:
                    return False
                del self.members[min(stale, key=lambda n: self.members[n].last_seen)]
            self.members[node_id] = _Member(now, federated)
        else:
            member.last_seen = max(member.last_seen, now)
            member.federated = federated
        return True

    def _on_heartbeat(self, hb: Heartbeat, now: float, effects: list[Effect]) -> Validation:
        if hb.node_id == self.node_id:
            return Validation(Verdict.IGNORE, "own_message")
        if self.is_stale(hb):
            return Validation(Verdict.IGNORE, "stale_seq", f"seq {hb.seq} <= {self.members[hb.node_id].seq}")
        if not self._see(hb.node_id, now, hb.federated_learning):
            return Validation(Verdict.IGNORE, "member_table_full", f"max_members={self.config.max_members}")
        self.members[hb.node_id].seq = hb.seq
        self.members[hb.node_id].heard = Heard.of(hb, now)
        if hb.term >= 1 and hb.coordinator_node_id == hb.node_id:
            return self._on_claim(hb.term, hb.node_id, now, effects)  # a coordinator's heartbeat renews its claim
        return ACCEPTED

    def _on_claim_message(self, claim: CoordinatorClaim, now: float, effects: list[Effect]) -> Validation:
        """A claim no newer (term, claimed_at) than one already heard from its node is no sign of
        life: a replay that got past a flushed duplicate cache (security.md N8), or a late delivery.
        A late claim for an older term is still recorded for the per-term history."""
        key = (claim.term, claim.claimed_at)
        known = self.members.get(claim.node_id)
        if known is not None and key <= known.claim:
            if claim.term == known.claim[0]:
                return Validation(Verdict.IGNORE, "stale_claim",
                                  f"term {claim.term} claimed_at {claim.claimed_at} is not newer than the last claim")
            return self._on_claim(claim.term, claim.node_id, now, effects, renew=False)
        validation = self._on_claim(claim.term, claim.node_id, now, effects)
        if claim.node_id in self.members:
            self.members[claim.node_id].claim = key
        return validation

    def _on_claim(self, term: int, node_id: str, now: float, effects: list[Effect], *,
                  renew: bool = True) -> Validation:
        """`renew=False`: record the claim without counting it as a sign of life (a known member's old claim)."""
        if self.config.mode == "fixed":
            return Validation(Verdict.IGNORE, "fixed_mode")
        if renew and node_id != self.node_id and not self._see(node_id, now, True):
            return Validation(Verdict.IGNORE, "member_table_full", f"max_members={self.config.max_members}")
        if term > MAX_TERM or (self.term > 0 and term > self.term + self.config.max_term_jump):
            return Validation(Verdict.IGNORE, "term_jump", f"term {term} vs ours {self.term}")
        if term < self.term - self.config.term_history:
            return Validation(Verdict.IGNORE, "stale_term", f"term {term} < {self.term}")
        before_term, before = self.term, self.coordinator
        best = self.claims.get(term)
        if best is None or rank(term, node_id) < rank(term, best):
            self.claims[term] = node_id
        if term > self.term:
            self.term = term
            self._pending = None
            for old in [t for t in self.claims if t < self.term - self.config.term_history]:
                del self.claims[old]
        after = self.coordinator
        if (self.term, after) != (before_term, before) and after is not None:
            effects.append(CoordinatorChanged(self.term, after, now, before or ""))
        if term < before_term:
            return Validation(Verdict.IGNORE, "stale_term", f"term {term} < {before_term} (recorded)")
        return ACCEPTED

    def _on_tick(self, now: float, effects: list[Effect]) -> None:
        if self.config.mode == "fixed" or now < self.started_at + self.config.effective_startup_grace:
            return
        coord = self.coordinator
        if coord == self.node_id:
            return
        if coord is not None and coord in self.members and \
                now - self.members[coord].last_seen < self.config.liveness_timeout:
            self._pending = None
            return
        # No live coordinator: wait for a claim for the next term, moving on a term per claim_timeout.
        if self._pending is None or self._pending[0] <= self.term:
            self._pending = (self.term + 1, now)
        target, since = self._pending
        steps = int((now - since) // self.config.effective_claim_timeout)
        if steps > 0:
            target, since = target + steps, since + steps * self.config.effective_claim_timeout
            self._pending = (target, since)
        if self.federated and self.candidate(target, now) == self.node_id and target <= MAX_TERM:
            effects.append(PublishClaim(target))
            self._on_claim(target, self.node_id, now, effects)

    def heartbeat_fields(self) -> tuple[int, str]:
        """(term, coordinator_node_id) to put into our next Heartbeat."""
        return self.term, self.coordinator or ""
