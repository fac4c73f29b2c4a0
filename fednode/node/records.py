"""Per-round records a user (and a checker) can read: `rounds/round-<n>.json` in the data dir.

A record names the manifest, every accepted submission (node id, blob sha256, num_samples,
weight), every rejected one with its reason, the aggregation method and the merged blob's
sha256 (a `RoundRecord`, fednode/node/reports.py). `fednode rounds --config FILE [N]` prints the same JSON.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fednode.consensus.outcome import OutcomeConflict
from fednode.consensus.round_state import Rejection
from fednode.fsutil import atomic_write_text
from fednode.node.reports import (
    AcceptedSubmission,
    OutcomeConflictRecord,
    RecordState,
    RejectedSubmission,
    ReportError,
    RoundRecord,
)
from fednode.wire.messages import Contribution, RoundManifest


def manifest_json(manifest: RoundManifest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(manifest):
        value = getattr(manifest, f.name)
        out[f.name] = value.hex() if isinstance(value, bytes) else value
    return out


def round_record(*, manifest: RoundManifest, state: RecordState, accepted: Iterable[Contribution],
                 rejected: Iterable[Rejection], merged_sha256: str, merged_size: int, discarded_energy: float | None,
                 final_coordinator_node_id: str, final_term: int, recorded_by: str, finished_at: float,
                 reason: str = "", metrics: dict[str, dict[str, Any]] | None = None,
                 conflicts: Iterable[OutcomeConflict] = ()) -> RoundRecord:
    accepted = sorted(accepted, key=lambda c: c.node_id)
    total = sum(c.num_samples for c in accepted) or 1
    return RoundRecord(
        round_number=manifest.round_number,
        round_id=manifest.round_id,
        state=state,
        coordinator_node_id=manifest.coordinator_node_id,
        term=manifest.term,
        aggregation=manifest.aggregation,
        manifest=manifest_json(manifest),
        accepted=[AcceptedSubmission(c.node_id, c.delta_sha256, c.num_samples, c.num_samples / total)
                  for c in accepted],
        rejected=sorted((RejectedSubmission(r.node_id, r.reason, r.detail, r.delta_sha256) for r in rejected),
                        key=lambda r: (r.node_id, r.reason)),
        merged_sha256=merged_sha256,
        merged_size=merged_size,
        discarded_energy=discarded_energy,
        failure_reason=reason,
        metrics=metrics or {},
        final_coordinator_node_id=final_coordinator_node_id,
        final_term=final_term,
        recorded_by=recorded_by,
        finished_at=finished_at,
        outcome_conflicts=[OutcomeConflictRecord.of(c) for c in conflicts],
    )


def record_path(data_dir: Path, round_number: int) -> Path:
    return data_dir / "rounds" / f"round-{round_number}.json"


def write_record(data_dir: Path, record: RoundRecord) -> Path:
    path = record_path(data_dir, record.round_number)
    atomic_write_text(path, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def read_record(path: Path) -> RoundRecord:
    """A `round-<n>.json`; ReportError names the field that does not fit (the path is in the message)."""
    try:
        return RoundRecord.from_json(json.loads(path.read_text()))
    except ReportError as exc:
        raise ReportError(f"{path}: {exc.field}", exc.problem) from None


def read_records(data_dir: Path) -> list[RoundRecord]:
    """Every round record in a data dir, by round number."""
    folder = data_dir / "rounds"
    paths = sorted(folder.glob("round-*.json"), key=lambda p: int(p.stem.split("-")[1])) if folder.is_dir() else []
    return [read_record(p) for p in paths]
