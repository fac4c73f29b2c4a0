"""What a node reports about itself, as typed values.

`NodeStatus` is what `fednode status` answers on the control socket, what `/metrics` scrapes and what
the harness polls; `RoundRecord` is a finished round as `rounds/round-<n>.json` and state.sqlite keep
it. Producers build these dataclasses and consumers read attributes, so a renamed field is a mypy
error, not a `.get(key, default)` that quietly reads the default until a harness times out.

`to_json()` gives the wire form: the same keys as the dicts these replaced, so records on disk and
tools that read the JSON keep working. `from_json()` checks that form against the declared types and
raises `ReportError` naming the first field that is missing or of the wrong type
(`status.current_round.submissions: expected int, got str`). The codec below is generic over these
dataclasses: a field's type hint is its schema, and three field options cover the wire's habits:

- `key=`: the JSON key, where it differs from the attribute name;
- `empty_as_none=True`: `None` is written and read as `{}` (`training`, `transfer`, `last_merged`);
- `omit_default=True`: the key is written only when the value is not the default, and may be absent
  when read (`outcome_conflicts` in a record, `rounds` of a node that does no federated learning).

A field of a dataclass type with `flatten=True` shares its parent's JSON object (`NodeStatus.progress`).
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from fednode.consensus.outcome import OutcomeConflict
from fednode.consensus.round_state import Phase, Role
from fednode.errors import DecodeError, FednodeError, InvalidUpdate

T = TypeVar("T")


class ReportError(FednodeError, ValueError):
    """A status or round record in JSON form does not fit its declared type. `field` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _opt(default: Any = dataclasses.MISSING, *, key: str | None = None, empty_as_none: bool = False,
         omit_default: bool = False, flatten: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    metadata = {"key": key, "empty_as_none": empty_as_none, "omit_default": omit_default, "flatten": flatten}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# -- the codec --------------------------------------------------------------------------------------------
@cache
def _hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


def _key(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("key") or f.name


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_object(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _encode_object(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("flatten"):
            out.update(_encode_object(value))
        elif f.metadata.get("omit_default") and value == _default(f):
            continue
        elif value is None and f.metadata.get("empty_as_none"):
            out[_key(f)] = {}
        else:
            out[_key(f)] = _encode(value)
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _decode(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = (a for a in args if a is not type(None))  # only `X | None` is used
        return _decode(inner, value, path)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ReportError(path, f"expected an object ({tp.__name__}), got {type(value).__name__}")
        return _decode_object(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ReportError(path, f"expected a list, got {type(value).__name__}")
        (item,) = get_args(tp)
        return [_decode(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ReportError(path, f"expected an object, got {type(value).__name__}")
        _, item = get_args(tp)
        for k in value:
            if not isinstance(k, str):
                raise ReportError(path, f"key {k!r} is not a string")
        return {k: _decode(item, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise ReportError(path, f"{value!r} is not one of {allowed}") from None
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(tp)
    if ok is None:
        raise TypeError(f"{path}: reports cannot decode type {_type_name(tp)}")  # a bug in this module
    if not ok(value):
        raise ReportError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r:.60}")
    return value


def _decode_object(cls: type[T], data: Mapping[str, Any], path: str) -> T:
    hints = _hints(cls)  # type: ignore[arg-type]  # a dataclass is hashable; mypy cannot see that of type[T]
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        where = f"{path}.{_key(f)}"
        if f.metadata.get("flatten"):
            kwargs[f.name] = _decode_object(tp, data, path)
            continue
        if _key(f) not in data:
            if f.metadata.get("omit_default"):
                continue
            raise ReportError(where, "missing")
        value = data[_key(f)]
        if f.metadata.get("empty_as_none") and value == {}:
            value = None
        kwargs[f.name] = _decode(tp, value, where)
    return cls(**kwargs)


class JsonForm:
    """`to_json()` / `from_json()` for the dataclasses below (see the module docstring)."""

    _json_name = "report"

    def to_json(self) -> dict[str, Any]:
        return _encode_object(self)

    @classmethod
    def from_json(cls: type[T], data: Any) -> T:
        name = getattr(cls, "_json_name", cls.__name__)
        if not isinstance(data, Mapping):
            raise ReportError(name, f"expected an object, got {type(data).__name__}")
        return _decode_object(cls, data, name)


# -- NodeStatus -------------------------------------------------------------------------------------------
class TrainingState(enum.Enum):
    TRAINING = "training"
    SUBMITTED = "submitted"


@dataclass(frozen=True, slots=True)
class MemberStatus(JsonForm):
    node_id: str
    federated_learning: bool
    last_seen_seconds_ago: float  # since its last heartbeat arrived
    alive: bool  # the election's own decision (ElectionState.is_live: stretched timeout, late-heartbeat rule)


@dataclass(frozen=True, slots=True)
class PauseStatus(JsonForm):
    """Why the node does not take part now (a full disk) and since when."""

    reason: str
    detail: str
    since: float
    seconds: float
    retry_every_seconds: float


@dataclass(frozen=True, slots=True)
class ByteCounts(JsonForm):
    transport_sent: int
    transport_received: int
    blob_served: int
    blob_fetched: int


@dataclass(frozen=True, slots=True)
class TrainingProgress(JsonForm):
    """This node's local training in the latest round it trained for."""

    round_id: str
    round_number: int
    state: TrainingState
    step: int
    steps: int
    loss: float | None
    metrics: dict[str, float] = _opt(factory=dict, omit_default=True)  # set once submitted


@dataclass(frozen=True, slots=True)
class TransferProgress(JsonForm):
    """The latest blob download."""

    sha256: str
    size: int
    done: int
    state: str = _opt("", omit_default=True)  # "verified" once checked


@dataclass(frozen=True, slots=True)
class LastMerged(JsonForm):
    """The latest round whose merged adapter this node installed."""

    round_number: int
    sha256: str
    path: str
    metrics: dict[str, Any] = _opt(factory=dict)


@dataclass(frozen=True, slots=True)
class CurrentRound(JsonForm):
    """The open round, else the latest one this node knows."""

    round_id: str
    round_number: int
    state: Phase
    role: Role
    term: int
    coordinator_node_id: str
    submissions: int
    min_participants: int
    deadline_in_seconds: float


@dataclass(frozen=True, slots=True)
class RoundProgress(JsonForm):
    """The round driver's part of the status (all zero/empty on a node without federated learning,
    which says why in `disabled_reason`, key `rounds`)."""

    rounds_completed: int = 0
    rounds_failed: int = 0
    last_merged: LastMerged | None = _opt(None, empty_as_none=True)
    training: TrainingProgress | None = _opt(None, empty_as_none=True)
    transfer: TransferProgress | None = _opt(None, empty_as_none=True)
    refused: dict[str, int] = _opt(factory=dict)  # rounds refused, by reason (e.g. base_model_mismatch)
    pending_evaluations: int = 0
    outcome_conflicts: int = 0
    unsettled_rounds: list[str] = _opt(factory=list)
    # published rounds whose merged adapter no holder served yet -> why; rebuilt: how many merged adapters
    # this node recomputed from the contributed updates (round-v1, "A merged adapter no holder has")
    merged_recovery: dict[str, str] = _opt(factory=dict, omit_default=True)
    merged_rebuilt: int = _opt(0, omit_default=True)
    current_round: CurrentRound | None = None
    disabled_reason: str = _opt("", key="rounds", omit_default=True)


@dataclass(frozen=True, slots=True)
class NodeStatus(JsonForm):
    """`fednode status --json`; see the README's status section for what each number means."""

    _json_name = "status"

    node_id: str
    name: str
    community_id: str
    federated_learning: bool
    members: list[MemberStatus]
    coordinator: str
    term: int
    counters: dict[str, dict[str, int]]  # our validator's verdicts (accepted/rejected/ignored) by reason
    peers: list[str]
    paused: PauseStatus | None  # None while participating
    disk_full_events: int
    bytes: ByteCounts
    gossip_dropped: int
    gossip_rejected: dict[str, int]  # the transport's verdicts by reason, including its own (too_large)
    streams_refused: dict[str, dict[str, int]]  # refused before served, by server and reason
    handler_errors: dict[str, dict[str, int]]  # clients that failed or misbehaved, by server and reason
    progress: RoundProgress = _opt(flatten=True)
    # gossip messages neighbours handed this node, duplicates included, and the new, accepted ones
    # among them: copies / delivered is what one message costs this node in copies (its mesh size)
    # (both absent from a status written before they were counted)
    gossip_copies_received: int = _opt(0, omit_default=True)
    gossip_delivered_from_peers: int = _opt(0, omit_default=True)
    # this node's heartbeat period now (election-v1 rules 14 and 18: paced in a large community, slow
    # while idle), and whether it is the idle pace of rule 18 (0: a status written before it was shown)
    heartbeat_interval_seconds: float = _opt(0.0, omit_default=True)
    idle: bool = _opt(False, omit_default=True)

    def alive_members(self) -> list[MemberStatus]:
        return [m for m in self.members if m.alive]


# -- RoundRecord ------------------------------------------------------------------------------------------
class RecordState(enum.Enum):
    PUBLISHED = "published"
    FAILED = "failed"


class RejectionKind(enum.Enum):
    """Why the driver dropped a submission it had accepted (the `reason` of a `RejectedSubmission`;
    the state machine's own rejections use the envelope's verdict reasons)."""

    INVALID_UPDATE = "invalid_update"  # the blob fails update validation: the participant's fault
    UNAVAILABLE = "unavailable"  # the blob could not be fetched: nobody's fault we can tell

    @classmethod
    def of(cls, exc: BaseException) -> RejectionKind:
        """Classify the error that made an accepted submission unusable (by type, never by message)."""
        return cls.INVALID_UPDATE if isinstance(exc, InvalidUpdate | DecodeError) else cls.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class AcceptedSubmission(JsonForm):
    node_id: str
    blob_sha256: str
    num_samples: int
    weight: float  # num_samples over the round's total


@dataclass(frozen=True, slots=True)
class RejectedSubmission(JsonForm):
    node_id: str
    reason: str  # a verdict reason (round:duplicate_delta, ...) or a RejectionKind value
    detail: str
    blob_sha256: str


@dataclass(frozen=True, slots=True)
class OutcomeSeen(JsonForm):
    kind: str
    term: int
    coordinator_node_id: str
    merged_sha256: str


@dataclass(frozen=True, slots=True)
class OutcomeConflictRecord(JsonForm):
    kept: OutcomeSeen
    other: OutcomeSeen

    @classmethod
    def of(cls, conflict: OutcomeConflict) -> OutcomeConflictRecord:
        return cls.from_json(conflict.as_dict())


@dataclass(frozen=True, slots=True)
class RoundRecord(JsonForm):
    """One finished round (see fednode/node/records.py)."""

    _json_name = "record"

    round_number: int
    round_id: str
    state: RecordState
    coordinator_node_id: str  # the manifest's
    term: int  # the manifest's
    aggregation: str
    manifest: dict[str, Any]  # the RoundManifest's fields, bytes as hex
    accepted: list[AcceptedSubmission]
    rejected: list[RejectedSubmission]
    merged_sha256: str
    merged_size: int
    discarded_energy: float | None
    failure_reason: str
    metrics: dict[str, dict[str, Any]]  # "train", "local", "merged" -> figures
    final_coordinator_node_id: str  # who concluded it (differs after a failover)
    final_term: int
    recorded_by: str
    finished_at: float
    outcome_conflicts: list[OutcomeConflictRecord] = _opt(factory=list, omit_default=True)

    @property
    def published(self) -> bool:
        return self.state is RecordState.PUBLISHED

    @property
    def created_at(self) -> float:
        """The manifest's creation time."""
        value = self.manifest.get("created_at")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ReportError("record.manifest.created_at", f"expected float, got {value!r:.60}")
        return float(value)

    def accepted_ids(self) -> set[str]:
        return {a.node_id for a in self.accepted}

    def with_metrics(self, kind: str, figures: Mapping[str, Any]) -> RoundRecord:
        return dataclasses.replace(self, metrics={**self.metrics, kind: dict(figures)})

    def with_conflicts(self, conflicts: Iterable[OutcomeConflict]) -> RoundRecord:
        return dataclasses.replace(self, outcome_conflicts=[OutcomeConflictRecord.of(c) for c in conflicts])
