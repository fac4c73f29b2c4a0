"""The safety rule for a round's outcome (round-v1.md "One outcome per round"), as pure functions.

A round has at most one outcome: once any node has seen a signed AggregateAnnounce (or RoundFailed)
for a round, no node may publish a different one. Two things keep it:

* A coordinator that *takes a round over* (the election made it coordinator of a round another node
  coordinated) does not know whether its predecessor already concluded it. It may aggregate or fail
  the round only once the outcome is *settled*: either a signed outcome reached it (gossip or sync;
  it adopts that one), or `may_conclude_unpublished` holds: every live member other than itself has
  answered an outcome query for the round with none. Until then it keeps asking; a failed query
  proves nothing.
* A node that meets two different signed outcomes for one round keeps the earlier one by
  `precedence` (earlier term first), records the conflict and reports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fednode.wire.messages import AggregateAnnounce, RoundFailed

PUBLISHED = "published"
FAILED = "failed"
MAX_RECORDED_CONFLICTS = 16  # conflicts kept per round (each one is already an alarm)


@dataclass(frozen=True, slots=True)
class SignedOutcome:
    """What a signed AggregateAnnounce / RoundFailed concluded, without its signature."""

    kind: str  # PUBLISHED or FAILED
    term: int
    coordinator_node_id: str
    merged_sha256: str = ""

    @classmethod
    def of(cls, message: AggregateAnnounce | RoundFailed) -> SignedOutcome:
        if isinstance(message, AggregateAnnounce):
            return cls(PUBLISHED, message.term, message.coordinator_node_id, message.merged_sha256)
        return cls(FAILED, message.term, message.coordinator_node_id)

    def same_result(self, other: SignedOutcome) -> bool:
        """The same merged adapter (or both failures): a coordinator that re-aggregated the same
        updates deterministically in a later term concluded nothing different."""
        return (self.kind, self.merged_sha256) == (other.kind, other.merged_sha256)

    def precedence(self) -> tuple[int, str, str, str]:
        """Lower wins: the earlier term; within one term (two nodes briefly both believed they
        coordinated it) a fixed order every node computes alike."""
        return (self.term, self.coordinator_node_id, self.kind, self.merged_sha256)

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "term": self.term, "coordinator_node_id": self.coordinator_node_id,
                "merged_sha256": self.merged_sha256}


@dataclass(frozen=True, slots=True)
class OutcomeConflict:
    """Two different signed outcomes met for one round; `kept` is the one that stands."""

    kept: SignedOutcome
    other: SignedOutcome

    def as_dict(self) -> dict[str, object]:
        return {"kept": self.kept.as_dict(), "other": self.other.as_dict()}


def earlier(a: SignedOutcome, b: SignedOutcome) -> SignedOutcome:
    return a if a.precedence() <= b.precedence() else b


def may_conclude_unpublished(answered: Iterable[str], live_members: Iterable[str], me: str,
                             recent: Iterable[str] = (), former: Iterable[str] = ()) -> bool:
    """A coordinator that took a round over may conclude that no outcome was published when every
    live member other than itself (at least one) has answered its outcome query with none, and
    those answers with itself are a strict majority of the `recent` members (heard within the
    rejoin wait, itself included; round-v1 r7). A live view can be a minority: members that were
    restarting, or whose gossip mesh had not re-formed, may hold an outcome the live ones never
    received (fault seed 1038748767, s19: the term-8 coordinator heard only one member and re-ran a
    round the restarted term-7 coordinator had concluded). An outcome that exists only at a node
    that stays unreachable for the whole rejoin wait can still surface later; the conflict rule
    (earlier term wins) then settles the round.

    `former`: the round's earlier coordinators. One of them still among the recent members must
    have answered itself: it is the node that may have concluded the round, and a coordinator that
    just restarted can publish an announce that reaches nobody while its gossip mesh re-forms (fault
    seed 1038748767, s11 on r7: the term-3 coordinator, restarted, concluded round 14; nobody heard
    it for 15 s, and the term-4 coordinator concluded the round again from the three others)."""
    others = set(live_members) - {me}
    answered_set = set(answered)
    if not others or not others <= answered_set:
        return False
    voters = set(recent) | others | {me}
    if not (set(former) & voters) - {me} <= answered_set:
        return False
    return 2 * len((answered_set & voters) | {me}) > len(voters)


def legitimate_signer(*, term: int, signer: str, manifest_term: int, current_term: int, current_coordinator: str,
                      known_coordinators: dict[int, str], concluded: bool) -> bool:
    """May `signer` conclude the round in `term`? Never in a term before the manifest's. In the
    round's current term, only its current coordinator (round-v1.md). In an earlier term, the
    coordinator this node knew for that term, or anyone for a term it never saw (it slept through
    it: the signed announce is the evidence). A later term it has not followed yet: not while the
    round is open (the election will tell); a concluded round listens, but only to report a conflict
    (a later term never wins one)."""
    if term < manifest_term:
        return False
    if term == current_term:
        return signer == current_coordinator
    if term > current_term:
        return concluded
    known = known_coordinators.get(term)
    return known is None or known == signer


def close_early_due(*, accepted: Iterable[str], refused: Iterable[str], live_members: Iterable[str],
                    min_participants: int) -> bool:
    """Waiting for the deadline gains nothing once every live federated member has been either
    accepted or refused (REJECTed: an invalid update, equivocation, another's delta) and at least
    min_participants are accepted."""
    accepted_set = set(accepted)
    return len(accepted_set) >= min_participants and set(live_members) <= accepted_set | set(refused)
