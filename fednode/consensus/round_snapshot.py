"""RoundState <-> plain data (JSON-able dicts) for the persistence layer. Signed messages are
stored as hex of their canonical bytes, so a restored round still holds verifiable announcements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fednode.consensus.outcome import OutcomeConflict, SignedOutcome
from fednode.errors import LocalProtocolError
from fednode.wire import codec
from fednode.wire.messages import RoundManifest, SubmissionAnnounce
from fednode.wire.verdict import Validation, Verdict

if TYPE_CHECKING:
    from fednode.consensus.round_state import RoundState

SNAPSHOT_VERSION = 1


def snapshot(state: RoundState) -> dict[str, Any]:
    """Plain data (JSON-able): signed messages as hex of their canonical bytes."""
    return {
        "version": SNAPSHOT_VERSION,
        "node_id": state.node_id,
        "role": state.role.value,
        "phase": state.phase.value,
        "term": state.term,
        "coordinator_node_id": state.coordinator_node_id,
        "manifest": codec.encode(state.manifest).hex(),
        "accepted": [codec.encode(a).hex() for _, a in sorted(state.accepted.items())],
        "excluded": {n: [v.verdict.value, v.reason, v.detail] for n, v in sorted(state.excluded.items())},
        "own_submission": codec.encode(state.own_submission).hex() if state.own_submission else "",
        "rejections": [[r.node_id, r.reason, r.detail, r.delta_sha256] for r in state.rejections],
        "rejected_by_reason": dict(state.rejected_by_reason),
        "aggregation_started": state.aggregation_started,
        "merged_sha256": state.merged_sha256,
        "merged_size": state.merged_size,
        "failure_reason": state.failure_reason,
        # one outcome per round (outcome.py); absent in snapshots written before round-v1 r1
        "coordinators": {str(t): n for t, n in sorted(state.coordinators.items())},
        "outcome": state.outcome.as_dict() if state.outcome else None,
        "outcome_unknown": state.outcome_unknown,
        "sync_answered": sorted(state.sync_answered),
        "refused": sorted(state.refused),
        "conflicts": [c.as_dict() for c in state.conflicts],
    }


def restore(cls: type[RoundState], data: Mapping[str, Any], *, max_recorded_rejections: int,
            reannounce_seconds: float) -> RoundState:
    from fednode.consensus.round_state import Phase, Rejection, Role

    if data.get("version") != SNAPSHOT_VERSION:
        raise LocalProtocolError(f"round snapshot version {data.get('version')!r} is not {SNAPSHOT_VERSION}")
    manifest = codec.decode(bytes.fromhex(data["manifest"]))
    if not isinstance(manifest, RoundManifest):
        raise LocalProtocolError("round snapshot: manifest is not a RoundManifest")
    state = cls(manifest, node_id=data["node_id"], role=Role(data["role"]),
                max_recorded_rejections=max_recorded_rejections, reannounce_seconds=reannounce_seconds)
    state.phase = Phase(data["phase"])
    state.term, state.coordinator_node_id = int(data["term"]), str(data["coordinator_node_id"])
    for hexed in data["accepted"]:
        a = codec.decode(bytes.fromhex(hexed))
        if not isinstance(a, SubmissionAnnounce):
            raise LocalProtocolError("round snapshot: accepted entry is not a SubmissionAnnounce")
        state.accepted[a.participant_node_id] = a
    state.excluded = {n: Validation(Verdict(v), r, d) for n, (v, r, d) in data["excluded"].items()}
    if data["own_submission"]:
        own = codec.decode(bytes.fromhex(data["own_submission"]))
        state.own_submission = own if isinstance(own, SubmissionAnnounce) else None
    state.rejections = [Rejection(*r) for r in data["rejections"]][:max_recorded_rejections]
    state.rejected_by_reason = {str(k): int(v) for k, v in data["rejected_by_reason"].items()}
    state.aggregation_started = bool(data["aggregation_started"]) and state.phase is not Phase.AGGREGATING
    state.merged_sha256, state.merged_size = str(data["merged_sha256"]), int(data["merged_size"])
    state.failure_reason = str(data["failure_reason"])
    state.coordinators.update({int(t): str(n) for t, n in data.get("coordinators", {}).items()})
    state.outcome = _outcome(data["outcome"]) if data.get("outcome") else None
    state.outcome_unknown = bool(data.get("outcome_unknown", False))
    state.sync_answered = {str(n) for n in data.get("sync_answered", [])}
    state.refused = {str(n) for n in data.get("refused", [])}
    state.conflicts = [OutcomeConflict(_outcome(c["kept"]), _outcome(c["other"])) for c in data.get("conflicts", [])]
    return state


def _outcome(d: Mapping[str, Any]) -> SignedOutcome:
    return SignedOutcome(str(d["kind"]), int(d["term"]), str(d["coordinator_node_id"]), str(d["merged_sha256"]))
