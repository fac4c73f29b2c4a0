"""The round protocol's messages: frozen dataclasses that validate in their constructor,
so an invalid message cannot exist. Encoding and signing live in codec.py; the normative
description is protocols/round-v1.md and protocols/election-v1.md.

Every message names its author (`SIGNER_FIELD`, a peer id) and carries the author's Ed25519
signature (`SIG_FIELD`, empty until signed) and a timestamp (`TIME_FIELD`, seconds since the
epoch) used by the replay window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NewType

from fednode.errors import InvalidMessage
from fednode.wire import fields as f

PROTOCOL_VERSION = 1
RoundID = NewType("RoundID", str)

# Wire names of the aggregation rules (implemented in fednode.aggregation).
AGGREGATION_METHODS = ("fedavg", "exact", "stacked", "median", "trimmed_mean", "clipped_fedavg")

# Range limits of round parameters.
MAX_LORA_RANK = 1024
MAX_PARTICIPANTS_LIMIT = 10_000
MAX_ROUND_TIMEOUT_SECONDS = 7 * 24 * 3600.0
MAX_LOCAL_STEPS = 1_000_000
MAX_NUM_SAMPLES = 2**40
MAX_BLOB_SIZE_LIMIT = 2**40
MAX_TERM = 2**53
MAX_REASON_CHARS = 200
MAX_HEARTBEAT_INTERVAL_MS = 3_600_000  # a heartbeat may declare a pace of at most one hour (receivers cap it lower)


VERSION = "`uint`; v1 sends `1` (others: IGNORE `unsupported_version`)"
METHODS = "one of the [methods](#aggregation-methods)"


def _version() -> Any:
    return f.wire("uint", PROTOCOL_VERSION, lo=0, hi=2**16, display=VERSION, doc="message format version")


def _community() -> Any:
    return f.wire("id", doc="the community (equals the receiver's)")


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses whose fields are declared
    with `fields.wire` (kind, range, default, meaning): the constructor checks each from its
    declaration, then the cross-field rules in `_check_rules`."""

    TYPE: ClassVar[str]
    SIGNER_FIELD: ClassVar[str]
    SIG_FIELD: ClassVar[str]
    TIME_FIELD: ClassVar[str]

    version: int
    community_id: str

    @property
    def signer(self) -> str:
        return str(getattr(self, self.SIGNER_FIELD))

    @property
    def signature(self) -> bytes:
        return bytes(getattr(self, self.SIG_FIELD))

    @property
    def timestamp(self) -> float:
        return float(getattr(self, self.TIME_FIELD))

    def __post_init__(self) -> None:
        f.check_declared(self)
        self._check_rules()

    def _check_rules(self) -> None:
        """Cross-field rules (round-v1.md); none by default."""


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness and view of a member, sent every heartbeat interval."""

    TYPE: ClassVar[str] = "heartbeat"
    SIGNER_FIELD: ClassVar[str] = "node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "sent_at"

    community_id: str = _community()
    node_id: str = f.wire("peer_id", signer=True, doc="the sender")
    term: int = f.wire("uint", lo=0, hi=MAX_TERM, doc="the highest election term the sender knows")
    seq: int = f.wire("uint", lo=0, doc="sender's heartbeat counter, increasing across restarts (daemons start it "
                      "at the wall clock in µs); a receiver ignores a heartbeat whose `seq` is not above the last it "
                      "heard from that node (`stale_seq`, election-v1.md); also makes each id unique")
    sent_at: float = f.wire("timestamp", doc="when sent")
    federated_learning: bool = f.wire("bool", False, doc="does the sender take part in rounds "
                                      "(`[research] federated_learning`)")
    coordinator_node_id: str = f.wire("peer_id?", "", doc="whom the sender follows as coordinator in `term` "
                                      "(`\"\"`: nobody yet)")
    last_round_number: int = f.wire("uint", 0, lo=0, doc="highest round the sender has finished (0: none)")
    latest_merged_sha256: str = f.wire("sha256?", "", doc="merged adapter the sender holds and serves "
                                       "(`\"\"`: none)")
    open_round_id: str = f.wire("id?", "", doc="round the sender is working on (`\"\"`: none); lets a peer that "
                                "missed a manifest ask for it (sync-v1.md)")
    paused: bool = f.wire("bool", False, omit_default=True,
                          note="the key is absent when `false` (envelope-v1.md rule 1)",
                          doc="the sender has paused participation (e.g. its disk is full): a coordinator "
                          "does not wait for its update ([close early](#round-lifecycle)); it is still a live "
                          "member and a candidate (election-v1.md)")
    interval_ms: int = f.wire("uint", 0, lo=0, hi=MAX_HEARTBEAT_INTERVAL_MS, omit_default=True,
                              note="the key is absent when `0` (envelope-v1.md rule 1)",
                              doc="the sender's heartbeat period in milliseconds when it paces slower than the "
                              "community's `heartbeat_interval` (a member of a large community, election-v1.md "
                              "rule 14); `0`: it beats every `heartbeat_interval`")
    version: int = _version()
    sig: bytes = f.wire("sig", b"", doc="Ed25519 signature of `node_id`")


@dataclass(frozen=True, kw_only=True)
class CoordinatorClaim(Message):
    """A node's claim to coordinate `term` (see election-v1.md)."""

    TYPE: ClassVar[str] = "coordinator_claim"
    SIGNER_FIELD: ClassVar[str] = "node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "claimed_at"

    community_id: str = _community()
    node_id: str = f.wire("peer_id", signer=True, doc="the claimant")
    term: int = f.wire("uint", lo=1, hi=MAX_TERM, doc="the term claimed")
    claimed_at: float = f.wire("timestamp", doc="when claimed")
    last_round_number: int = f.wire("uint", 0, lo=0, doc="highest round the claimant has finished")
    version: int = _version()
    sig: bytes = f.wire("sig", b"", doc="signature of `node_id`")


@dataclass(frozen=True, kw_only=True)
class RoundManifest(Message):
    """The coordinator's announcement of a round. The first twelve fields are the original
    design's, with its defaults; the rest are what a real round needs."""

    TYPE: ClassVar[str] = "round_manifest"
    SIGNER_FIELD: ClassVar[str] = "coordinator_node_id"
    SIG_FIELD: ClassVar[str] = "coordinator_sig"
    TIME_FIELD: ClassVar[str] = "created_at"

    round_id: str = f.wire("id", doc="the round's unique name in the community")
    base_model_id: str = f.wire("text", lo=1, hi=f.MAX_TEXT_CHARS,
                                doc="base model name (informative; the hash below binds it)")
    coordinator_node_id: str = f.wire("peer_id", signer=True, doc="the coordinator of `term`")
    community_id: str = _community()
    lora_rank: int = f.wire("uint", 16, lo=1, hi=MAX_LORA_RANK, doc="LoRA rank r participants train with")
    lora_alpha: float = f.wire("float", 32.0, lo=0.0, hi=1e6, lo_open=True, doc="LoRA alpha (scale alpha / r)")
    learning_rate: float = f.wire("float", 2e-4, lo=0.0, hi=10.0, lo_open=True, doc="local optimiser learning rate")
    min_participants: int = f.wire("uint", 2, lo=1, hi=MAX_PARTICIPANTS_LIMIT, note="`<= max_participants`",
                                   doc="fewest accepted submissions for the round to aggregate")
    max_participants: int = f.wire("uint", 20, lo=1, hi=MAX_PARTICIPANTS_LIMIT,
                                   doc="most submissions accepted; reaching it closes collection")
    round_timeout_seconds: float = f.wire("float", 3600.0, lo=0.0, hi=MAX_ROUND_TIMEOUT_SECONDS, lo_open=True,
                                          doc="longest a round may run")
    created_at: float = f.wire("timestamp", 0.0, doc="when the manifest was made")
    coordinator_sig: bytes = f.wire("sig", b"", doc="signature of `coordinator_node_id`")
    version: int = _version()
    term: int = f.wire("uint", 0, lo=0, hi=MAX_TERM, doc="election term the coordinator holds (election-v1.md)")
    round_number: int = f.wire("uint", 1, lo=1, doc="position in the community's sequence of rounds")
    base_model_hash: str = f.wire("sha256?", "", doc="sha256 over the base model's weight files "
                                  "(`\"\"`: not checked)")
    start_adapter_sha256: str = f.wire("sha256?", "", doc="blob of the adapter this round starts from "
                                       "(`\"\"`: a fresh adapter)")
    start_adapter_size: int = f.wire("uint", 0, lo=0, hi=MAX_BLOB_SIZE_LIMIT,
                                     note="`> 0` exactly when `start_adapter_sha256` is set",
                                     doc="size of that blob in bytes")
    local_steps: int = f.wire("uint", 20, lo=1, hi=MAX_LOCAL_STEPS, doc="optimiser steps each participant runs")
    aggregation: str = f.wire("choice", "fedavg", choices=AGGREGATION_METHODS, display=METHODS,
                              doc="how updates are combined")
    deadline: float = f.wire("timestamp", 0.0, default_doc="created_at + round_timeout_seconds",
                             note="`created_at < deadline <= created_at + round_timeout_seconds + 1e-6`; "
                                  "0 is the local spelling of the default, never sent",
                             doc="end of collection")

    def _check_rules(self) -> None:
        if self.min_participants > self.max_participants:
            raise InvalidMessage(
                "min_participants",
                f"{self.min_participants} exceeds max_participants {self.max_participants}",
            )
        if bool(self.start_adapter_sha256) != (self.start_adapter_size > 0):
            raise InvalidMessage("start_adapter_size", "must be > 0 exactly when start_adapter_sha256 is set")
        # `deadline` was checked as a float like any other (-0.0, NaN, inf: malformed); 0 means "the default".
        if self.deadline == 0.0:
            f.set_(self, "deadline", self.created_at + float(self.round_timeout_seconds))
        if not self.created_at < self.deadline <= self.created_at + self.round_timeout_seconds + 1e-6:
            raise InvalidMessage("deadline", "must lie in (created_at, created_at + round_timeout_seconds]")


@dataclass(frozen=True, kw_only=True)
class SubmissionAnnounce(Message):
    """A participant's trained update, referenced by its blob's sha256 and size."""

    TYPE: ClassVar[str] = "submission_announce"
    SIGNER_FIELD: ClassVar[str] = "participant_node_id"
    SIG_FIELD: ClassVar[str] = "participant_sig"
    TIME_FIELD: ClassVar[str] = "submitted_at"

    round_id: str = f.wire("id", doc="the round")
    participant_node_id: str = f.wire("peer_id", signer=True, doc="the participant")
    num_samples: int = f.wire("uint", lo=1, hi=MAX_NUM_SAMPLES,
                              doc="training examples used: the update's aggregation weight")
    submitted_at: float = f.wire("timestamp", doc="when submitted")
    participant_sig: bytes = f.wire("sig", b"", doc="signature of `participant_node_id`")
    community_id: str = _community()
    delta_sha256: str = f.wire("sha256", doc="sha256 of the delta blob (lowercase hex)")
    delta_size: int = f.wire("uint", lo=1, hi=MAX_BLOB_SIZE_LIMIT, doc="its size in bytes")
    train_loss: float = f.wire("float", 0.0, lo=0.0, hi=1e9, doc="final local training loss (informative)")
    version: int = _version()


@dataclass(frozen=True, slots=True)
class Contribution:
    """One accepted submission as recorded in an AggregateAnnounce."""

    node_id: str = f.wire("peer_id", doc="the participant")
    delta_sha256: str = f.wire("sha256", doc="the update's blob, as in its SubmissionAnnounce")
    num_samples: int = f.wire("uint", lo=1, hi=MAX_NUM_SAMPLES, doc="its weight, as in its SubmissionAnnounce")


@dataclass(frozen=True, kw_only=True)
class AggregateAnnounce(Message):
    """The coordinator's merged adapter for a round, and exactly which updates went into it."""

    TYPE: ClassVar[str] = "aggregate_announce"
    SIGNER_FIELD: ClassVar[str] = "coordinator_node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "announced_at"

    community_id: str = _community()
    round_id: str = f.wire("id", doc="the round")
    round_number: int = f.wire("uint", lo=1, doc="the manifest's `round_number`")
    coordinator_node_id: str = f.wire("peer_id", signer=True, doc="the coordinator")
    term: int = f.wire("uint", lo=0, hi=MAX_TERM, doc="the coordinator's term")
    merged_sha256: str = f.wire("sha256", doc="blob of the merged adapter")
    merged_size: int = f.wire("uint", lo=1, hi=MAX_BLOB_SIZE_LIMIT, doc="its size in bytes")
    aggregation: str = f.wire("choice", choices=AGGREGATION_METHODS, display=METHODS,
                              doc="the method used (the manifest's)")
    contributions: tuple[Contribution, ...] = f.wire(
        "custom", default_factory=tuple, display=f"1..{MAX_PARTICIPANTS_LIMIT} entries, distinct `node_id`s (and "
        "see [Abuse limits](#abuse-limits))", doc="the updates aggregated")
    announced_at: float = f.wire("timestamp", doc="when announced")
    version: int = _version()
    sig: bytes = f.wire("sig", b"", doc="signature of `coordinator_node_id`")

    def _check_rules(self) -> None:
        if not isinstance(self.contributions, tuple):
            raise InvalidMessage("contributions", "expected a tuple of Contribution")
        if not 1 <= len(self.contributions) <= MAX_PARTICIPANTS_LIMIT:
            raise InvalidMessage("contributions", f"must hold 1..{MAX_PARTICIPANTS_LIMIT} entries")
        seen: set[str] = set()
        for i, c in enumerate(self.contributions):
            name = f"contributions[{i}]"
            if not isinstance(c, Contribution):
                raise InvalidMessage(name, "expected a Contribution")
            for attr, spec in f.declared(Contribution):
                try:
                    f.check_field(c, attr, spec)
                except InvalidMessage as exc:
                    raise InvalidMessage(f"{name}.{attr}", exc.problem) from None
            if c.node_id in seen:
                raise InvalidMessage(name, f"duplicate participant {c.node_id}")
            seen.add(c.node_id)


@dataclass(frozen=True, kw_only=True)
class RoundFailed(Message):
    """The coordinator gives a round up (e.g. too few participants by the deadline)."""

    TYPE: ClassVar[str] = "round_failed"
    SIGNER_FIELD: ClassVar[str] = "coordinator_node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "failed_at"

    community_id: str = _community()
    round_id: str = f.wire("id", doc="the round")
    round_number: int = f.wire("uint", lo=1, doc="the manifest's `round_number`")
    coordinator_node_id: str = f.wire("peer_id", signer=True, doc="the coordinator")
    term: int = f.wire("uint", lo=0, hi=MAX_TERM, doc="the coordinator's term")
    reason: str = f.wire("text", lo=1, hi=MAX_REASON_CHARS, doc="why, for humans (e.g. `deadline passed with 1 "
                         "accepted submissions, fewer than min_participants=2`)")
    failed_at: float = f.wire("timestamp", doc="when")
    version: int = _version()
    sig: bytes = f.wire("sig", b"", doc="signature of `coordinator_node_id`")


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Heartbeat, CoordinatorClaim, RoundManifest, SubmissionAnnounce, AggregateAnnounce, RoundFailed)
}


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def aggregate_announce_bytes(contributions: int) -> int:
    """Encoded size of a signed AggregateAnnounce naming `contributions` updates, worst case for
    fednode nodes (Ed25519 peer ids of 52 characters, ids of 64, the largest counts and sizes).
    A coordinator whose aggregate would exceed the community's max_message_bytes could never
    announce it, so max_participants is bounded by this (config check)."""
    from fednode.wire import codec

    def peer(i: int) -> str:
        digits = ""
        while True:
            i, d = divmod(i, 58)
            digits = _B58[d] + digits
            if not i:
                return "12D3KooW" + digits.rjust(44, "1")

    a = AggregateAnnounce(
        community_id="c" * f.MAX_ID_CHARS, round_id="r" * f.MAX_ID_CHARS, round_number=f.MAX_INT,
        coordinator_node_id=peer(0), term=MAX_TERM, merged_sha256="0" * 64, merged_size=MAX_BLOB_SIZE_LIMIT,
        aggregation="clipped_fedavg", announced_at=f.MAX_TIMESTAMP, sig=bytes(64),
        contributions=tuple(Contribution(peer(i), f"{i:064x}", MAX_NUM_SAMPLES) for i in range(contributions)))
    return len(codec.encode(a))
