"""Per-round records a user (and a checker) can read: `rounds/round-<n>.json` in the data dir.

A record names the manifest, every accepted submission (node id, blob sha256, num_samples,
weight), every rejected one with its reason, the aggregation method and the merged blob's
sha256. `fednode rounds --config FILE [N]` prints the same JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fednode.fsutil import atomic_write_text
from fednode.wire.messages import RoundManifest


def manifest_json(manifest: RoundManifest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(manifest):
        value = getattr(manifest, f.name)
        out[f.name] = value.hex() if isinstance(value, bytes) else value
    return out


def round_record(*, manifest: RoundManifest, state: str, accepted: list[dict[str, Any]],
                 rejected: list[dict[str, Any]], merged_sha256: str, merged_size: int, discarded_energy: float | None,
                 reason: str = "", metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    total = sum(int(a["num_samples"]) for a in accepted) or 1
    accepted = [{**a, "weight": int(a["num_samples"]) / total} for a in sorted(accepted, key=lambda a: a["node_id"])]
    return {
        "round_number": manifest.round_number,
        "round_id": manifest.round_id,
        "state": state,
        "coordinator_node_id": manifest.coordinator_node_id,
        "term": manifest.term,
        "aggregation": manifest.aggregation,
        "manifest": manifest_json(manifest),
        "accepted": accepted,
        "rejected": sorted(rejected, key=lambda r: (r["node_id"], r.get("reason", ""))),
        "merged_sha256": merged_sha256,
        "merged_size": merged_size,
        "discarded_energy": discarded_energy,
        "failure_reason": reason,
        "metrics": metrics or {},
    }


def record_path(data_dir: Path, round_number: int) -> Path:
    return data_dir / "rounds" / f"round-{round_number}.json"


def write_record(data_dir: Path, record: dict[str, Any]) -> Path:
    path = record_path(data_dir, int(record["round_number"]))
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path
