"""The round protocol's messages: frozen dataclasses that validate in their constructor,
so an invalid message cannot exist. Encoding and signing live in codec.py; the normative
description is protocols/round-v1.md and protocols/election-v1.md.

Every message names its author (`SIGNER_FIELD`, a peer id) and carries the author's Ed25519
signature (`SIG_FIELD`, empty until signed) and a timestamp (`TIME_FIELD`, seconds since the
epoch) used by the replay window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NewType

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


class Message:
    """Base of every wire message. Subclasses are frozen dataclasses."""

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

    def _check_common(self) -> None:
        f.check_int(self, "version", 0, 2**16)
        f.check_id(self, "community_id")
        f.check_peer_id(self, self.SIGNER_FIELD)
        f.check_timestamp(self, self.TIME_FIELD)
        f.check_sig(self, self.SIG_FIELD)


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness and view of a member, sent every heartbeat interval."""

    TYPE: ClassVar[str] = "heartbeat"
    SIGNER_FIELD: ClassVar[str] = "node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "sent_at"

    community_id: str
    node_id: str
    term: int
    seq: int
    sent_at: float
    federated_learning: bool = False  # does this node take part in rounds
    coordinator_node_id: str = ""  # who the sender follows in `term` ("" = nobody yet)
    last_round_number: int = 0  # highest round the sender has finished (0 = none)
    latest_merged_sha256: str = ""  # merged adapter the sender holds and serves
    open_round_id: str = ""  # round the sender is working on ("" = none); peers sync what they lack
    version: int = PROTOCOL_VERSION
    sig: bytes = b""

    def __post_init__(self) -> None:
        self._check_common()
        f.check_int(self, "term", 0, MAX_TERM)
        f.check_int(self, "seq", 0)
        f.check_text(self, "open_round_id", f.MAX_ID_CHARS)  # type first: a falsy 0 must not slip through
        if self.open_round_id:
            f.check_id(self, "open_round_id")
        f.check_bool(self, "federated_learning")
        f.check_peer_id(self, "coordinator_node_id", allow_empty=True)
        f.check_int(self, "last_round_number", 0)
        f.check_sha256(self, "latest_merged_sha256", allow_empty=True)


@dataclass(frozen=True, kw_only=True)
class CoordinatorClaim(Message):
    """A node's claim to coordinate `term` (see election-v1.md)."""

    TYPE: ClassVar[str] = "coordinator_claim"
    SIGNER_FIELD: ClassVar[str] = "node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "claimed_at"

    community_id: str
    node_id: str
    term: int
    claimed_at: float
    last_round_number: int = 0
    version: int = PROTOCOL_VERSION
    sig: bytes = b""

    def __post_init__(self) -> None:
        self._check_common()
        f.check_int(self, "term", 1, MAX_TERM)
        f.check_int(self, "last_round_number", 0)


@dataclass(frozen=True, kw_only=True)
class RoundManifest(Message):
    """The coordinator's announcement of a round. The first twelve fields are the original
    design's, with its defaults; the rest are what a real round needs."""

    TYPE: ClassVar[str] = "round_manifest"
    SIGNER_FIELD: ClassVar[str] = "coordinator_node_id"
    SIG_FIELD: ClassVar[str] = "coordinator_sig"
    TIME_FIELD: ClassVar[str] = "created_at"

    round_id: str
    base_model_id: str
    coordinator_node_id: str
    community_id: str
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 2e-4
    min_participants: int = 2
    max_participants: int = 20
    round_timeout_seconds: float = 3600.0
    created_at: float = 0.0
    coordinator_sig: bytes = b""
    version: int = PROTOCOL_VERSION
    term: int = 0
    round_number: int = 1
    base_model_hash: str = ""  # sha256 over the base model's weight files ("" = not checked)
    start_adapter_sha256: str = ""  # global adapter this round starts from ("" = fresh adapter)
    start_adapter_size: int = 0
    local_steps: int = 20
    aggregation: str = "fedavg"
    deadline: float = 0.0  # 0 = created_at + round_timeout_seconds

    def __post_init__(self) -> None:
        self._check_common()
        f.check_id(self, "round_id")
        f.check_text(self, "base_model_id", f.MAX_TEXT_CHARS, allow_empty=False)
        f.check_int(self, "lora_rank", 1, MAX_LORA_RANK)
        f.check_float(self, "lora_alpha", 0.0, 1e6, lo_open=True)
        f.check_float(self, "learning_rate", 0.0, 10.0, lo_open=True)
        f.check_int(self, "min_participants", 1, MAX_PARTICIPANTS_LIMIT)
        f.check_int(self, "max_participants", 1, MAX_PARTICIPANTS_LIMIT)
        if self.min_participants > self.max_participants:
            raise InvalidMessage(
                "min_participants",
                f"{self.min_participants} exceeds max_participants {self.max_participants}",
            )
        f.check_float(self, "round_timeout_seconds", 0.0, MAX_ROUND_TIMEOUT_SECONDS, lo_open=True)
        f.check_int(self, "term", 0, MAX_TERM)
        f.check_int(self, "round_number", 1)
        f.check_sha256(self, "base_model_hash", allow_empty=True)
        f.check_sha256(self, "start_adapter_sha256", allow_empty=True)
        f.check_int(self, "start_adapter_size", 0, MAX_BLOB_SIZE_LIMIT)
        if bool(self.start_adapter_sha256) != (self.start_adapter_size > 0):
            raise InvalidMessage("start_adapter_size", "must be > 0 exactly when start_adapter_sha256 is set")
        f.check_int(self, "local_steps", 1, MAX_LOCAL_STEPS)
        if self.aggregation not in AGGREGATION_METHODS:
            raise InvalidMessage("aggregation", f"{self.aggregation!r} is not one of {AGGREGATION_METHODS}")
        # A float like any other first (-0.0, NaN, inf: malformed); then 0 means "the default".
        f.check_timestamp(self, "deadline")
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

    round_id: str
    participant_node_id: str
    num_samples: int
    submitted_at: float
    participant_sig: bytes = b""
    community_id: str
    delta_sha256: str
    delta_size: int
    train_loss: float = 0.0
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        self._check_common()
        f.check_id(self, "round_id")
        f.check_int(self, "num_samples", 1, MAX_NUM_SAMPLES)
        f.check_sha256(self, "delta_sha256")
        f.check_int(self, "delta_size", 1, MAX_BLOB_SIZE_LIMIT)
        f.check_float(self, "train_loss", 0.0, 1e9)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One accepted submission as recorded in an AggregateAnnounce."""

    node_id: str
    delta_sha256: str
    num_samples: int


@dataclass(frozen=True, kw_only=True)
class AggregateAnnounce(Message):
    """The coordinator's merged adapter for a round, and exactly which updates went into it."""

    TYPE: ClassVar[str] = "aggregate_announce"
    SIGNER_FIELD: ClassVar[str] = "coordinator_node_id"
    SIG_FIELD: ClassVar[str] = "sig"
    TIME_FIELD: ClassVar[str] = "announced_at"

    community_id: str
    round_id: str
    round_number: int
    coordinator_node_id: str
    term: int
    merged_sha256: str
    merged_size: int
    aggregation: str
    contributions: tuple[Contribution, ...] = field(default_factory=tuple)
    announced_at: float
    version: int = PROTOCOL_VERSION
    sig: bytes = b""

    def __post_init__(self) -> None:
        self._check_common()
        f.check_id(self, "round_id")
        f.check_int(self, "round_number", 1)
        f.check_int(self, "term", 0, MAX_TERM)
        f.check_sha256(self, "merged_sha256")
        f.check_int(self, "merged_size", 1, MAX_BLOB_SIZE_LIMIT)
        if self.aggregation not in AGGREGATION_METHODS:
            raise InvalidMessage("aggregation", f"{self.aggregation!r} is not one of {AGGREGATION_METHODS}")
        if not isinstance(self.contributions, tuple):
            raise InvalidMessage("contributions", "expected a tuple of Contribution")
        if not 1 <= len(self.contributions) <= MAX_PARTICIPANTS_LIMIT:
            raise InvalidMessage("contributions", f"must hold 1..{MAX_PARTICIPANTS_LIMIT} entries")
        seen: set[str] = set()
        for i, c in enumerate(self.contributions):
            name = f"contributions[{i}]"
            if not isinstance(c, Contribution):
                raise InvalidMessage(name, "expected a Contribution")
            for attr, check in (("node_id", f.check_peer_id), ("delta_sha256", f.check_sha256)):
                try:
                    check(c, attr)
                except InvalidMessage as exc:
                    raise InvalidMessage(f"{name}.{attr}", exc.problem) from None
            try:
                f.check_int(c, "num_samples", 1, MAX_NUM_SAMPLES)
            except InvalidMessage as exc:
                raise InvalidMessage(f"{name}.num_samples", exc.problem) from None
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

    community_id: str
    round_id: str
    round_number: int
    coordinator_node_id: str
    term: int
    reason: str
    failed_at: float
    version: int = PROTOCOL_VERSION
    sig: bytes = b""

    def __post_init__(self) -> None:
        self._check_common()
        f.check_id(self, "round_id")
        f.check_int(self, "round_number", 1)
        f.check_int(self, "term", 0, MAX_TERM)
        f.check_text(self, "reason", MAX_REASON_CHARS, allow_empty=False)


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
