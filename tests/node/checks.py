"""Independent checks of what a cluster of fake-trainer nodes produced (used by several tests).

Nothing here trusts the daemon's own arithmetic: each node's delta is recomputed from a fresh
`FakeTrainer` (deterministic per node/round/start adapter), and FedAvg is done by hand in float64.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import torch

from fednode.aggregation.delta import load_delta
from fednode.node.daemon import Node
from fednode.node.trainers import FakeTrainer

FEDAVG_ATOL = 1e-6  # the daemon aggregates in float32 and stores float32; we compute in float64


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_record(node: Node, number: int) -> dict[str, Any]:
    path = node.config.data_dir / "rounds" / f"round-{number}.json"
    return dict(json.loads(path.read_text()))


def flip_first_byte(path: Path) -> None:
    """Bit rot: the file's first byte inverted (its sha256 no longer matches)."""
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def fedavg_float64(blobs: list[bytes], weights: list[int]) -> dict[str, torch.Tensor]:
    tensors = [load_delta(b) for b in blobs]
    total = float(sum(weights))
    return {k: sum((t[k].double() * (w / total) for t, w in zip(tensors, weights, strict=True)),
                   torch.zeros(tensors[0][k].shape, dtype=torch.float64))
            for k in tensors[0]}


def check_round_agreement(nodes: list[Node], number: int) -> dict[str, Any]:
    """Every node holds round `number`'s record, the merged blob (hash-verified) and the installed
    adapter dir; the merged sha256 is the same everywhere. Returns one record."""
    records = [read_record(node, number) for node in nodes]
    shas = {r["merged_sha256"] for r in records}
    assert len(shas) == 1, f"round {number}: nodes disagree on the merged adapter: {shas}"
    (merged_sha,) = shas
    assert merged_sha, f"round {number} has no merged adapter"
    for node, record in zip(nodes, records, strict=True):
        assert record["state"] == "published", (node.config.node.name, record["state"])
        assert node.store.has(merged_sha), (node.config.node.name, number)
        assert sha256(node.store.read(merged_sha)) == merged_sha
        installed = node.config.data_dir / "adapters" / f"round-{number}" / "adapter_model.safetensors"
        assert sha256(installed.read_bytes()) == merged_sha, (node.config.node.name, number)
        ids = [a["node_id"] for a in record["accepted"]]
        assert len(ids) == len(set(ids)), f"round {number}: a submission counted twice: {ids}"
    return records[0]


def check_fedavg(record: dict[str, Any], merged: bytes, start: bytes | None, index_of: dict[str, int],
                 *, seed: int = 0) -> None:
    """Recompute every accepted delta with a fresh FakeTrainer, check its sha256 and num_samples
    against the record, and compare the merged adapter with a float64 FedAvg of them."""
    manifest = record["manifest"]
    assert manifest["start_adapter_sha256"] == (sha256(start) if start is not None else "")
    blobs, weights = [], []
    for a in record["accepted"]:
        out = FakeTrainer(index_of[a["node_id"]]).train(
            start, round_number=record["round_number"], steps=manifest["local_steps"],
            learning_rate=manifest["learning_rate"], seed=seed)
        assert sha256(out.delta_bytes) == a["blob_sha256"], f"{a['node_id']}: the accepted blob is not its update"
        assert out.num_samples == a["num_samples"]
        blobs.append(out.delta_bytes)
        weights.append(out.num_samples)
    total = sum(weights)
    for a, w in zip(record["accepted"], weights, strict=True):
        assert abs(a["weight"] - w / total) < 1e-12
    expected = fedavg_float64(blobs, weights)
    got = load_delta(merged)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32
        assert torch.allclose(got[k].double(), v, atol=FEDAVG_ATOL, rtol=0), (k, (got[k].double() - v).abs().max())


def db_submissions(node: Node, round_id: str) -> list[tuple[str, str, str]]:
    """(node_id, status, delta_sha256) rows of state.sqlite's submissions for a round (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{node.config.data_dir / 'state.sqlite'}?mode=ro",
                                            uri=True)) as conn:
        rows = conn.execute("SELECT node_id, status, delta_sha256 FROM submissions WHERE round_id = ? "
                            "ORDER BY node_id", (round_id,)).fetchall()
    return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]


def data_dir_of(tmp: Path, i: int) -> Path:
    return tmp / f"node-{i}"


def db_accepted_all(data_dir: Path) -> dict[str, set[str]]:
    """round id -> node ids whose submission state.sqlite records as accepted (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / 'state.sqlite'}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT round_id, node_id FROM submissions WHERE status = 'accepted'").fetchall()
    out: dict[str, set[str]] = {}
    for round_id, node_id in rows:
        out.setdefault(str(round_id), set()).add(str(node_id))
    return out
