from __future__ import annotations

import json
from pathlib import Path

import torch

from fednode.aggregation.delta import dump_delta, load_delta
from tests.node.conftest import cluster, wait_until


def fedavg_by_hand(blobs: list[bytes], weights: list[int]) -> bytes:
    tensors = [load_delta(b) for b in blobs]
    total = sum(weights)
    out = {k: sum(t[k].double() * (w / total) for t, w in zip(tensors, weights, strict=True)) for k in tensors[0]}
    return dump_delta({k: v.float() for k, v in out.items()})


async def test_three_nodes_two_rounds_agree_on_merged_adapter(tmp_path: Path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    n = 3
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, n) for i in range(n)]
        await wait_until(lambda: all(node.driver.progress.rounds_completed >= 2 for node in nodes))
        for number in (1, 2):
            records = [json.loads((node.config.data_dir / "rounds" / f"round-{number}.json").read_text())
                       for node in nodes]
            shas = {r["merged_sha256"] for r in records}
            assert len(shas) == 1, shas
            record = records[0]
            assert record["state"] == "published"
            assert len(record["accepted"]) == n
            coordinator = next(node for node in nodes if node.node_id == record["final_coordinator_node_id"])
            blobs = [coordinator.store.read(a["blob_sha256"]) for a in record["accepted"]]
            expected = fedavg_by_hand(blobs, [a["num_samples"] for a in record["accepted"]])
            merged = coordinator.store.read(record["merged_sha256"])
            for k, v in load_delta(expected).items():
                assert torch.allclose(load_delta(merged)[k], v, atol=1e-6)
