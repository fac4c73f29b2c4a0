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

Late heartbeats (r2): a member's timeout stretches with the gaps its heartbeats actually arrive at
(a slow member is not a dead one), and a node that was itself not running (no event for longer than a
heartbeat interval: a CPU stall, a suspended laptop) suspects nobody until it has been running for a
heartbeat interval again, so the heartbeats queued meanwhile are read before anyone is judged.

Joiners (r6, rule 15): while the candidate for the term a node waits for was first heard less than
startup_grace ago, it may still be in its own start-up grace, so the wait for its claim counts from
the end of that grace: daemons started one after another elect term 1, not term 2.

Round messages (r7, rule 16): a round message the round layer accepted (`SignOfLife`) renews its
signer's last_seen like a heartbeat, at min(receipt, timestamp + skew), and nothing else: a
coordinator busy serving a merged adapter to every member (32 daemons, 2 cores: no heartbeat for
5 s) is still alive by its next manifest. A replay is no sign: the round layer does not accept a
message twice, and an old one counts at its timestamp plus the skew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fednode.consensus.common import CoordinatorChanged, Effect, Outcome, Tick
from fednode.errors import ConfigError
from fednode.wire.messages import MAX_TERM, CoordinatorClaim, Heartbeat
from fednode.wire.validate import DEFAULT_MAX_CLOCK_SKEW_SECONDS
from fednode.wire.verdict import ACCEPTED, Validation, Verdict

DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 2.0
DEFAULT_LIVENESS_TIMEOUT_INTERVALS = 2.5  # a peer silent this many intervals is dead (one lost heartbeat is fine)
DEFAULT_MAX_MEMBERS = 10_000  # member table bound
DEFAULT_TERM_HISTORY = 64  # terms whose best claim is remembered
DEFAULT_MAX_TERM_JUMP = 1_000_000  # a claim further above our term than this is ignored (term exhaustion)
# Late heartbeats (election-v1 r2, rules 10 and 11): a member that is merely slow must not cost a term.
SLOW_GAP_RATIO = 1.5  # a member whose recent heartbeat gaps exceed this many intervals is "slow"
GAP_DECAY = 0.9  # the remembered gap relaxes by this factor per heartbeat once the member is on time again
MAX_SLOW_TIMEOUT_FACTOR = 4.0  # a slow member's timeout is at most this many liveness_timeouts
STALL_TICKS = 2.0  # no event for this many promised tick gaps (and a heartbeat interval) = we were stalled
# live_members() is asked on every timer wake and per submission; it is kept until the member table
# changes or the first live member's timeout passes. Its validity ends this many ulps before that
# timeout, so float rounding of `now - last_seen` can never make the kept answer differ (issue 12).
LIVE_CACHE_MARGIN_ULPS = 8
# Paced heartbeats (election-v1 r5, rule 14): every heartbeat is flooded to every member, so a member's
# inbound rate grows with the community. A member that is not the coordinator beats every
# heartbeat_interval x live_members / heartbeat_fanin (never faster than heartbeat_interval, never
# slower than max_heartbeat_interval), which holds each node's inbound heartbeat rate near
# fanin / heartbeat_interval; the coordinator, and everyone while no coordinator is known, keep
# heartbeat_interval, so failover is as fast as in a small community.
DEFAULT_HEARTBEAT_FANIN = 4  # live members per heartbeat_interval before members slow down (0: never)
DEFAULT_MAX_HEARTBEAT_INTERVAL_SECONDS = 30.0  # the slowest pace a member takes, and the most a receiver believes
# Idle pace (election-v1 r9, rule 18): a coordinator that knows no round can open for a while beats at
# idle_heartbeat_interval, and its followers follow its pace, so an idle community costs next to nothing.
DEFAULT_IDLE_HEARTBEAT_INTERVAL_SECONDS = 30.0  # 0: off
IDLE_LEAD_INTERVALS = 2.0  # back at heartbeat_interval this many idle intervals before a round may open


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
    # A message is a sign of life at min(receipt, its timestamp + this): an old message replayed
    # by gossip (a late subscriber's catch-up, an IWANT answer) does not make a dead node live.
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW_SECONDS
    max_tick_gap: float = 0.0  # the host feeds an event at least this often (0 = no promise: rule 11 off)
    heartbeat_fanin: int = DEFAULT_HEARTBEAT_FANIN  # rule 14 (0: every member beats every heartbeat_interval)
    max_heartbeat_interval: float = DEFAULT_MAX_HEARTBEAT_INTERVAL_SECONDS  # rule 14
    idle_heartbeat_interval: float = DEFAULT_IDLE_HEARTBEAT_INTERVAL_SECONDS  # rule 18 (0: off)

    def __post_init__(self) -> None:
        if self.mode not in ("elect", "fixed"):
            raise ConfigError(f"coordinator.mode: expected 'elect' or 'fixed', got {self.mode!r}")
        if self.mode == "fixed" and not self.fixed_node_id:
            raise ConfigError("coordinator.fixed_peer_id is required when coordinator.mode = 'fixed'")
        if not (math.isfinite(self.liveness_timeout) and self.liveness_timeout > self.heartbeat_interval > 0):
            raise ConfigError("coordinator: need liveness_timeout > heartbeat_interval > 0")
        if self.max_members < 1 or self.term_history < 1 or self.max_term_jump < 1:
            raise ConfigError("coordinator: max_members, term_history and max_term_jump must be >= 1")
        if not (math.isfinite(self.max_tick_gap) and self.max_tick_gap >= 0):
            raise ConfigError("coordinator: max_tick_gap must be finite and >= 0")
        if self.heartbeat_fanin < 0:
            raise ConfigError("coordinator.heartbeat_fanin must be >= 0")
        if not (math.isfinite(self.max_heartbeat_interval) and self.max_heartbeat_interval >= self.heartbeat_interval):
            raise ConfigError("coordinator: need max_heartbeat_interval >= heartbeat_interval")
        idle = self.idle_heartbeat_interval
        if not (math.isfinite(idle) and idle >= 0):
            raise ConfigError("coordinator: idle_heartbeat_interval must be finite and >= 0 (0 = off)")
        if idle > 0:  # taken between heartbeat_interval and max_heartbeat_interval (what receivers believe)
            object.__setattr__(self, "idle_heartbeat_interval",
                               min(max(idle, self.heartbeat_interval), self.max_heartbeat_interval))

    @property
    def stall_gap(self) -> float | None:
        """Rule 11: a gap between two events longer than this means the node itself was not running
        (None: the host promises no regular ticks, so a gap means nothing)."""
        if self.max_tick_gap <= 0:
            return None
        return max(self.heartbeat_interval, STALL_TICKS * self.max_tick_gap)

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


@dataclass(frozen=True, slots=True)
class SignOfLife:
    """Rule 16: a signed round message from `node_id` (timestamped `sent_at`) that the round layer
    accepted. It shows its author alive as a heartbeat would, and says nothing else."""

    node_id: str
    sent_at: float
    now: float


@dataclass(frozen=True, slots=True)
class TopicReach:
    """Rule 17: how many peers on the community topic the transport says our gossip reaches now
    (gossipsub: our mesh peers), out of how many peers we hold a connection to. The host feeds it
    before its ticks; never fed = the rule is off."""

    peers: int
    connected: int
    now: float


@dataclass(frozen=True, slots=True)
class Quiet:
    """Rule 18: our round layer says that no round of ours can open before `until` (inf: none ever,
    e.g. max_rounds reached; <= now: one may open now, or one is open). The host feeds it when the
    value changes, while it coordinates; never fed = never quiet."""

    until: float
    now: float


ElectionEvent = HeartbeatSeen | ClaimSeen | SignOfLife | TopicReach | Quiet | Tick


@dataclass(frozen=True, slots=True)
class PublishClaim(Effect):
    """Sign and publish a CoordinatorClaim for `term` (we are its candidate); `reason`, in words,
    is why we follow no live coordinator (for the log)."""

    term: int
    reason: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class BeatSoon(Effect):
    """Rule 18: we coordinate at the idle pace and a member joined (or came back): send our next
    heartbeat now (no sooner than heartbeat_interval after the last), so it hears us within its
    start-up grace."""


@dataclass(frozen=True, slots=True)
class ClaimWithheld(Effect):
    """Rule 17: we are the candidate for `term` but no peer on the topic hears us, so we do not
    claim it (said once per term, for the log)."""

    term: int
    reason: str = dataclasses.field(default="", compare=False)




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
    paused: bool = False  # for the close-early rule only (round-v1 r4); the election never reads it

    @classmethod
    def of(cls, hb: Heartbeat, now: float) -> Heard:
        return cls(now, hb.federated_learning, hb.term, hb.coordinator_node_id, hb.open_round_id,
                   hb.last_round_number, hb.latest_merged_sha256, hb.paused)


@dataclass(slots=True)
class _Member:
    # Mutated only by ElectionState, which drops its live-member cache when last_seen, federated or gap change.
    last_seen: float
    federated: bool
    seq: int = -1  # the highest heartbeat seq heard (-1: none yet, e.g. known from a claim only)
    claim: tuple[int, float] = (0, -1.0)  # (term, claimed_at) of the newest CoordinatorClaim heard
    gap: float = 0.0  # recent heartbeat inter-arrival gap: the latest, or the decayed larger one before it
    heartbeat_at: float = -1.0  # reception time of the last fresh heartbeat (-1: none yet)
    interval: float = 0.0  # the pace its latest heartbeat declared (rule 14; 0: heartbeat_interval)
    heard: Heard | None = None  # its newest heartbeat (None: known from a claim only)
    joined_at: float = -math.inf  # rule 15: when it was first heard, or heard again after it was not live


def unendorsed_members(heard: Mapping[str, Heard | None], live: Iterable[str], me: str, term: int, *,
                       since: float, now: float, wait: float) -> frozenset[str]:
    """election-v1 rule 13: the live members (`me` excepted) that stop `me`, coordinator of `term`
    since `since`, from opening a round or concluding one it took over:

    * a member whose latest heartbeat names another coordinator for `term`, or a higher term: it
      follows a rival claimant (two nodes can both believe they coordinate a term while their
      claims have not crossed; gossip has delayed a claim by 16 s in the fault runner);
    * a member whose latest heartbeat names a coordinator of an older term (us included): it has
      not heard our claim, so it may not receive what we publish either (a restarted node's gossip
      can reach nobody for 30 s while it hears everyone);
    * within `wait` of `since`, a member whose latest heartbeat does not name `me` for `term` yet
      (none, an older term, or no coordinator: just restarted): it has not answered our claim, and
      may be about to name a rival.

    After `wait`, a member that names nobody no longer stops us: an honest member adopts our claim
    from our heartbeat within an interval, and a member that never names anyone must not be able to
    halt the community (one that keeps naming an old coordinator can: like one that never answers
    an outcome query, a member can stall the community, never fork it)."""
    blockers = []
    for node_id in live:
        if node_id == me:
            continue
        h = heard.get(node_id)
        if h is not None and (h.term > term or (h.coordinator_node_id != "" and
                                                (h.term < term or h.coordinator_node_id != me))):
            # follows another coordinator of our term, of an older term (it has not heard our claim:
            # it may not hear what we publish), or any later term
            blockers.append(node_id)
        elif now < since + wait and (h is None or h.term < term or h.coordinator_node_id != me):
            blockers.append(node_id)  # has not named us yet
    return frozenset(blockers)


def paced_interval(heartbeat_interval: float, live: int, fanin: int, max_interval: float) -> float:
    """election-v1 rule 14: a member's heartbeat period in a community of `live` live members."""
    if fanin <= 0 or live <= fanin:
        return heartbeat_interval
    return min(max_interval, heartbeat_interval * live / fanin)


def member_timeout(config: ElectionConfig, declared: float, gap: float) -> float:
    """A member's timeout (rules 10 and 14): liveness_timeout scaled to the pace it declared (at most
    max_heartbeat_interval), then stretched by rule 10 with its gaps counted against that pace."""
    pace = min(max(declared, config.heartbeat_interval), config.max_heartbeat_interval)
    return stretched_timeout(config.liveness_timeout * pace / config.heartbeat_interval, pace, gap)


def stretched_timeout(liveness_timeout: float, heartbeat_interval: float, gap: float) -> float:
    """election-v1 rule 10: a member's timeout. `liveness_timeout`, unless its recent heartbeat gap is
    over SLOW_GAP_RATIO intervals: then liveness_timeout x gap / interval (as many missed heartbeats
    as usual, counted at its own pace), at most MAX_SLOW_TIMEOUT_FACTOR x liveness_timeout."""
    ratio = gap / heartbeat_interval
    if ratio <= SLOW_GAP_RATIO:
        return liveness_timeout
    return min(liveness_timeout * ratio, liveness_timeout * MAX_SLOW_TIMEOUT_FACTOR)


@dataclass(frozen=True, slots=True)
class _LiveView:
    """live_members() as computed at `since`, the same for any `now` in [since, until) while the member
    table and the config are unchanged: a dead member stays dead as time passes, and `until` is (a
    margin before) the first timeout of a live one."""

    members: tuple[str, ...]
    since: float
    until: float
    federated: bool
    config: ElectionConfig
    member_set: frozenset[str]


def _before(deadline: float, now: float) -> float:
    """`deadline` less LIVE_CACHE_MARGIN_ULPS ulps: a time before which `now - last_seen < timeout`
    surely still holds for a member whose last_seen + timeout is `deadline`."""
    if not math.isfinite(deadline):
        return deadline
    return deadline - LIVE_CACHE_MARGIN_ULPS * math.ulp(max(abs(deadline), abs(now)))


def next_gap(previous: float, observed: float) -> float:
    """The remembered gap after a heartbeat arrived `observed` seconds after the one before: a longer
    gap is taken at once, a shorter one lets the old value decay by GAP_DECAY per heartbeat."""
    return max(observed, previous * GAP_DECAY)


class ElectionState:
    """Who coordinates, as seen from `node_id`. Feed HeartbeatSeen / ClaimSeen / Tick; call
    `handle(Tick(now))` when `next_timer()` is due. Put `term` and `coordinator` into heartbeats."""

    def __init__(self, node_id: str, config: ElectionConfig | None = None, *, now: float,
                 federated: bool = True, known_term: int = 0) -> None:
        """`known_term`: the highest term this node saw before a restart (rule 12); it starts there,
        with no coordinator known, so it neither claims nor follows an older term."""
        self.node_id = node_id
        self.config = config or ElectionConfig()
        self.federated = federated
        self.started_at = now
        self.term = min(max(0, known_term), MAX_TERM)
        self.members: dict[str, _Member] = {}
        self.claims: dict[int, str] = {}  # term -> best claimant seen (bounded by term_history)
        self._pending: tuple[int, float] | None = None  # (term we wait a claim for, since)
        self._last_now = now
        self._resumed_at = -math.inf  # rule 11: after a stall of our own, suspect nobody for an interval
        self._live: _LiveView | None = None  # live_members() kept (dropped whenever a member's liveness inputs change)
        self.coordinator_since = -math.inf  # when we last became coordinator (rule 13)
        self.paused: set[str] = set()  # members whose latest heartbeat says paused (kept, not rebuilt per tick)
        # rule 12: restarted holding an open round as its coordinator: claim the next term after the
        # start-up grace even if another node is the candidate (set by the host after restoring rounds)
        self.reclaim = False
        self.deaf = False  # rule 17: connected, yet no peer on the topic hears us (TopicReach)
        self._withheld = 0  # the last term rule 17 kept us from claiming (said once)
        self._beat_soon = False  # rule 18: a member joined while we coordinate at the idle pace
        self.quiet_until = -math.inf  # rule 18: no round of ours opens before this (Quiet; while we coordinate)
        # when our start-up grace ends: started_at + startup_grace, extended by rule 18's hearsay
        self.grace_end = now + self.config.effective_startup_grace

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
        """Federated members heard within liveness_timeout, this node included when federated (sorted)."""
        view = self._live
        if (view is None or not view.since <= now < view.until or view.federated != self.federated
                or view.config is not self.config):
            view = self._live = self._live_view(now)
        return list(view.members)

    def _live_view(self, now: float) -> _LiveView:
        out, until = [], math.inf
        for n, m in self.members.items():
            if m.federated and self._is_live(m, now):
                out.append(n)
                until = min(until, m.last_seen + self.timeout_of(m))
        if self.federated and self.node_id not in out:
            out.append(self.node_id)
        return _LiveView(tuple(sorted(out)), now, _before(until, now), self.federated, self.config, frozenset(out))

    def _member_changed(self, node_id: str) -> None:
        """`node_id`'s liveness inputs (last_seen, federated, gap) changed, or it joined the table. The
        usual case, a live member's next heartbeat, keeps the cached view (with its timeout as a bound);
        anything that may change the answer drops it."""
        view = self._live
        if view is None:
            return
        member = self.members.get(node_id)
        if member is None or not member.federated or node_id not in view.member_set or node_id == self.node_id:
            self._live = None
            return
        expiry = _before(member.last_seen + self.timeout_of(member), view.since)
        if expiry < view.until:
            self._live = dataclasses.replace(view, until=expiry)

    def is_live(self, node_id: str, now: float) -> bool:
        """Whether `node_id` counts as alive now: the one liveness decision (rules 10 and A5's
        min(receipt, timestamp + skew)), for the election and for `fednode status` alike."""
        member = self.members.get(node_id)
        return member is not None and self._is_live(member, now)

    def _is_live(self, member: _Member, now: float) -> bool:
        return now - member.last_seen < self.timeout_of(member)

    def timeout_of(self, member: _Member) -> float:
        return member_timeout(self.config, member.interval, member.gap)

    def heartbeat_interval(self, now: float) -> float:
        """Our own heartbeat period now. While we coordinate: heartbeat_interval, or the idle pace
        while our rounds are quiet (rule 18). While we follow no live coordinator: heartbeat_interval
        (an election needs every member's voice at full pace). Else paced by the number of live
        members (rule 14), and never faster than an idle coordinator's declared pace (rule 18)."""
        c = self.config
        coord = self.coordinator
        if coord == self.node_id:
            return c.idle_heartbeat_interval if self.idle(now) else c.heartbeat_interval
        if coord is None or not self.is_live(coord, now):
            return c.heartbeat_interval
        pace = c.heartbeat_interval
        if c.heartbeat_fanin > 0:
            live = 1 + sum(1 for m in self.members.values() if self._is_live(m, now))  # every member beats, us too
            pace = paced_interval(c.heartbeat_interval, live, c.heartbeat_fanin, c.max_heartbeat_interval)
        return max(pace, self._followed_idle_pace(coord))

    def _followed_idle_pace(self, coord: str) -> float:
        """Rule 18: the pace our live coordinator `coord` declares (only an idle one does), up to our own
        idle pace; 0 when rule 18 is off or it declares none."""
        idle = self.config.idle_heartbeat_interval
        return min(self.members[coord].interval, idle) if idle > 0 else 0.0

    def at_idle_pace(self, now: float) -> bool:
        """Rule 18 sets our pace now: we coordinate, idle, or follow a live coordinator that declares an
        idle pace (for `fednode status`)."""
        if self.idle(now):
            return True
        coord = self.coordinator
        return (coord is not None and coord != self.node_id and self.is_live(coord, now)
                and self._followed_idle_pace(coord) > self.config.heartbeat_interval)

    def idle(self, now: float) -> bool:
        """Rule 18: we coordinate and no round of ours can open for IDLE_LEAD_INTERVALS idle intervals."""
        idle = self.config.idle_heartbeat_interval
        return (idle > 0 and self.coordinator == self.node_id
                and self.quiet_until - now >= IDLE_LEAD_INTERVALS * idle)

    def heard(self) -> dict[str, Heard]:
        """Members whose heartbeat we heard, with what it said."""
        return {n: m.heard for n, m in self.members.items() if m.heard is not None}

    def recent_members(self, now: float, window: float) -> frozenset[str]:
        """Federated members heard within `window` seconds of `now` (a sign of life, rule A5's
        min(receipt, timestamp + skew)), ourselves included when federated: the community a new
        coordinator must hear a majority of before it calls a round unpublished (round-v1 r7)."""
        out = {n for n, m in self.members.items() if m.federated and now - m.last_seen < window}
        return frozenset(out | {self.node_id}) if self.federated else frozenset(out)

    def unendorsed(self, now: float) -> frozenset[str]:
        """election-v1 rule 13 (`unendorsed_members`) for us. While we know no coordinator of our
        term (just restarted, rule 12), a round restored as ours is ours to conclude only on the
        same terms, counted from our start. Empty when another node coordinates (nothing of ours to
        endorse) and in fixed mode."""
        if self.config.mode == "fixed" or (self.coordinator is not None and not self.is_coordinator):
            return frozenset()
        since = self.coordinator_since if self.is_coordinator else self.started_at
        return unendorsed_members({n: m.heard for n, m in self.members.items()}, self.live_members(now),
                                  self.node_id, self.term, since=since, now=now,
                                  wait=self.config.liveness_timeout)

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
        times = [self.grace_end]
        coord = self.coordinator
        if coord is not None and coord != self.node_id and coord in self.members:
            times.append(self.members[coord].last_seen + self.timeout_of(self.members[coord]))
        if self._pending is not None:
            times.append(self._pending[1] + self.config.effective_claim_timeout)
            times.extend(m.last_seen + self.timeout_of(m) for m in self.members.values() if m.federated)
        if self._resumed_at > -math.inf:
            times.append(self._resumed_at + self.config.heartbeat_interval)
        future = [t for t in times if t > self._last_now]
        return min(future) if future else None

    # -- the one entry point -------------------------------------------------------------------
    def handle(self, event: ElectionEvent) -> Outcome:
        stall_gap = self.config.stall_gap
        if stall_gap is not None and event.now - self._last_now > stall_gap:
            self._resumed_at = event.now  # we were not running: what we missed may still be queued
        self._last_now = max(self._last_now, event.now)
        effects: list[Effect] = []
        if isinstance(event, HeartbeatSeen):
            validation = self._on_heartbeat(event.heartbeat, event.now, effects)
        elif isinstance(event, ClaimSeen):
            validation = self._on_claim_message(event.claim, event.now, effects)
        elif isinstance(event, SignOfLife):
            validation = self._on_sign_of_life(event.node_id, event.sent_at, event.now)
        elif isinstance(event, TopicReach):
            self.deaf = event.peers <= 0 < event.connected
            validation = ACCEPTED
        elif isinstance(event, Quiet):
            self.quiet_until = event.until
            validation = ACCEPTED
        else:
            validation = ACCEPTED
        self._on_tick(event.now, effects)
        return Outcome(validation, tuple(effects))

    def _see(self, node_id: str, now: float, federated: bool) -> bool:
        member = self.members.get(node_id)
        if member is None:
            if len(self.members) >= self.config.max_members:
                stale = [n for n, m in self.members.items() if not self._is_live(m, now)]
                if not stale:
                    return False
                evicted = min(stale, key=lambda n: self.members[n].last_seen)
                del self.members[evicted]
                self.paused.discard(evicted)
            self.members[node_id] = _Member(now, federated, joined_at=now)
            self._live = None
            self._joined(now)
        else:
            if not self._is_live(member, now):
                member.joined_at = now  # back after a silence: it may have restarted (rule 15)
                self._joined(now)
            member.last_seen = max(member.last_seen, now)
            member.federated = federated
            self._member_changed(node_id)
        return True

    def _joined(self, now: float) -> None:
        """A member joined or came back (rule 15's joined time). Rule 18: if we coordinate at the idle
        pace, it may be in its start-up grace and not hear us for an idle interval: beat soon."""
        if self.idle(now):
            self._beat_soon = True

    def _extend_grace(self, hb: Heartbeat, now: float) -> None:
        """Rule 18: in our start-up grace, knowing no coordinator, a member's heartbeat naming another
        node as coordinator of a term >= ours, at a declared pace p, extends the grace to
        liveness_timeout x p / heartbeat_interval after our start (the time in which that coordinator,
        beating at p, would be judged dead; p at most max_heartbeat_interval)."""
        if (now >= self.grace_end or self.coordinator is not None or hb.interval_ms <= 0 or hb.term < self.term
                or hb.coordinator_node_id in ("", self.node_id)):
            return
        # rule 14's timeout at that pace (no slow gap): liveness_timeout x p / heartbeat_interval
        self.grace_end = max(self.grace_end, self.started_at + member_timeout(self.config, hb.interval_ms / 1000, 0.0))

    def _on_heartbeat(self, hb: Heartbeat, now: float, effects: list[Effect]) -> Validation:
        if hb.node_id == self.node_id:
            return Validation(Verdict.IGNORE, "own_message")
        if self.is_stale(hb):
            return Validation(Verdict.IGNORE, "stale_seq", f"seq {hb.seq} <= {self.members[hb.node_id].seq}")
        seen = self._alive_at(hb.sent_at, now)
        if not self._see(hb.node_id, seen, hb.federated_learning):
            return Validation(Verdict.IGNORE, "member_table_full", f"max_members={self.config.max_members}")
        member = self.members[hb.node_id]
        member.seq = hb.seq
        self._extend_grace(hb, now)
        if member.interval != hb.interval_ms / 1000:
            member.interval = hb.interval_ms / 1000
            self._member_changed(hb.node_id)
        member.heard = Heard.of(hb, now)  # receipt time: status shows when we heard it
        if hb.paused:
            self.paused.add(hb.node_id)
        else:
            self.paused.discard(hb.node_id)
        if member.heartbeat_at >= 0:
            member.gap = next_gap(member.gap, now - member.heartbeat_at)
            self._member_changed(hb.node_id)
        member.heartbeat_at = max(member.heartbeat_at, now)
        if hb.term >= 1 and hb.coordinator_node_id == hb.node_id:  # a coordinator's heartbeat
            return self._on_claim(hb.term, hb.node_id, now, effects, seen=seen)  # renews its claim
        return ACCEPTED

    def _on_sign_of_life(self, node_id: str, sent_at: float, now: float) -> Validation:
        """Rule 16: a known member's accepted round message renews its liveness (last_seen, at
        min(receipt, timestamp + skew) as for a heartbeat), not its heartbeat gap, pace or term.
        Unknown authors are not added: membership comes from heartbeats and claims."""
        member = self.members.get(node_id)
        if node_id == self.node_id or member is None:
            return Validation(Verdict.IGNORE, "not_a_member_sign")
        seen = self._alive_at(sent_at, now)
        if seen > member.last_seen:  # an older message (a sync replay) shows nothing new
            self._see(node_id, seen, member.federated)
        return ACCEPTED

    def _on_claim_message(self, claim: CoordinatorClaim, now: float, effects: list[Effect]) -> Validation:
        """A claim no newer (term, claimed_at) than one already heard from its node is no sign of
        life: a replay that got past a flushed duplicate cache (security.md N8), or a late delivery.
        A late claim for an older term is still recorded for the per-term history."""
        if claim.node_id == self.node_id:
            # Our own claim, replayed to us (after a restart: gossip's catch-up of a late subscriber).
            # Adopting it would make a restarted coordinator coordinator of its old term again on no
            # evidence that the others hear it now (rule 12); our live claims are adopted as we make them.
            return Validation(Verdict.IGNORE, "own_message")
        key = (claim.term, claim.claimed_at)
        known = self.members.get(claim.node_id)
        if known is not None and key <= known.claim:
            if claim.term == known.claim[0]:
                return Validation(Verdict.IGNORE, "stale_claim",
                                  f"term {claim.term} claimed_at {claim.claimed_at} is not newer than the last claim")
            return self._on_claim(claim.term, claim.node_id, now, effects, renew=False)
        validation = self._on_claim(claim.term, claim.node_id, now, effects, seen=self._alive_at(claim.claimed_at, now))
        if claim.node_id in self.members:
            self.members[claim.node_id].claim = key
        return validation

    def _alive_at(self, timestamp: float, now: float) -> float:
        """When a message shows its author alive: on receipt, unless it is older than the clock skew we allow."""
        return min(now, timestamp + self.config.max_clock_skew)

    def _on_claim(self, term: int, node_id: str, now: float, effects: list[Effect], *,
                  renew: bool = True, seen: float | None = None) -> Validation:
        """`renew=False`: record the claim without counting it as a sign of life (a known member's old claim)."""
        if self.config.mode == "fixed":
            return Validation(Verdict.IGNORE, "fixed_mode")
        if renew and node_id != self.node_id and not self._see(node_id, now if seen is None else seen, True):
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
            if after == self.node_id:
                self.coordinator_since = now
        if term < before_term:
            return Validation(Verdict.IGNORE, "stale_term", f"term {term} < {before_term} (recorded)")
        return ACCEPTED

    def _on_tick(self, now: float, effects: list[Effect]) -> None:
        if self._beat_soon:
            self._beat_soon = False
            effects.append(BeatSoon())
        if self.config.mode == "fixed" or now < self.grace_end:
            return
        coord = self.coordinator
        if coord == self.node_id:
            return
        if coord is not None and self.is_live(coord, now):
            self._pending = None
            self.reclaim = False  # a coordinator is known: it takes our round over (or adopts its outcome)
            return
        if now - self._resumed_at < self.config.heartbeat_interval:
            return  # rule 11: just back from a stall of our own; read what queued up first
        # No live coordinator: wait for a claim for the next term, moving on a term per claim_timeout.
        if self._pending is None or self._pending[0] <= self.term:
            self._pending = (self.term + 1, now)
        target, since = self._pending
        candidate = self.candidate(target, now)
        held = self._held_until(candidate)
        if held > since:
            since = held
            self._pending = (target, since)
        steps = int((now - since) // self.config.effective_claim_timeout)
        if steps > 0:
            target, since = target + steps, since + steps * self.config.effective_claim_timeout
            self._pending = (target, since)
            candidate = self.candidate(target, now)
        if self.federated and target <= MAX_TERM and (self.reclaim or candidate == self.node_id):
            if self.deaf:  # rule 17: nobody would hear the claim, nor what we then publish
                if self._withheld != target:
                    self._withheld = target
                    effects.append(ClaimWithheld(target, f"{self.suspicion(now)}; but no peer on the community "
                                                         f"topic hears us, so we do not claim"))
                return
            self.reclaim = False
            effects.append(PublishClaim(target, self.suspicion(now)))
            self._on_claim(target, self.node_id, now, effects)

    def _held_until(self, candidate: str | None) -> float:
        """Rule 15: while the awaited term's `candidate` is another member first heard less than
        startup_grace ago, it may still be in its own start-up grace (and so not claim yet): the wait
        for a claim for that term counts from when it has been heard for startup_grace. -inf: no hold."""
        member = self.members.get(candidate) if candidate is not None and candidate != self.node_id else None
        if member is None:
            return -math.inf
        return member.joined_at + self.config.effective_startup_grace

    def suspicion(self, now: float) -> str:
        """Why this node follows no live coordinator now, in words (for the log line of a claim)."""
        coord = self.coordinator
        if coord is None:
            return f"no coordinator known for term {self.term}"
        member = self.members.get(coord)
        if member is None:
            return f"coordinator {coord[-8:]} of term {self.term} never heard"
        return (f"coordinator {coord[-8:]} of term {self.term} last heard {now - member.last_seen:.1f} s ago "
                f"(timeout {self.timeout_of(member):.1f} s); live members: {len(self.live_members(now))}")

    def heartbeat_fields(self) -> tuple[int, str]:
        """(term, coordinator_node_id) to put into our next Heartbeat."""
        return self.term, self.coordinator or ""
