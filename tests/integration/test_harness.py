"""`fednode harness` end to end: daemons as OS processes over libp2p on 127.0.0.1 (fake task, so it is
about the protocol, not the learning). Issue 6: the kill-the-coordinator run completes every round,
and a member with federated_learning = false appears in no round record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FAKE_TEMPLATE = """\
[learning]
task = "fake"
fake_step_seconds = 0.1

[round]
round_timeout_seconds = 60.0
local_steps = 10
"""


def run_harness(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
    template = tmp_path / "fake.toml"
    template.write_text(FAKE_TEMPLATE)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fednode", "harness", "--config", str(template), "--run-dir", str(run_dir),
         "--timeout", "240", "--quiet", *args],
        capture_output=True, text=True, timeout=300, check=False)
    summary = json.loads((run_dir / "harness.json").read_text())
    return proc, summary


def test_kill_coordinator_mid_round_and_still_complete_every_round(tmp_path: Path) -> None:
    proc, summary = run_harness(tmp_path, "--nodes", "4", "--rounds", "2", "--kill-coordinator-at", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["completed"] and not summary["problems"]
    assert len(summary["killed"]) == 1, "the coordinator was never caught mid-collection"
    killed = summary["killed"][0]
    assert killed["round_number"] == 1 and killed["submissions_at_kill"] >= 1
    rounds = summary["rounds"]
    assert [r["round_number"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["merged_sha256_by_node"]) == 1, r["merged_sha256_by_node"]  # one merged adapter
        holders = next(iter(r["merged_sha256_by_node"].values()))
        assert killed["node"] not in holders and len(holders) == 3  # every survivor installed it
        assert r["coordinator"] != killed["node_id"]  # a new coordinator finished the round
        assert killed["node_id"] not in r["participants"] or r["round_number"] == 1


def test_gate_off_member_joins_but_is_in_no_round(tmp_path: Path) -> None:
    proc, summary = run_harness(tmp_path, "--nodes", "3", "--rounds", "2", "--gate-off-nodes", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    off = [n for n in summary["nodes"] if not n["federated_learning"]]
    assert len(off) == 1
    off_id, off_dir = off[0]["node_id"], Path(off[0]["folder"])
    on = [n for n in summary["nodes"] if n["federated_learning"]]
    for n in on:
        records = sorted((Path(n["folder"]) / "rounds").glob("round-*.json"))
        assert len(records) == 2
        for path in records:
            record = json.loads(path.read_text())
            ids = {a["node_id"] for a in record["accepted"]} | {r["node_id"] for r in record["rejected"]}
            assert off_id not in ids and record["coordinator_node_id"] != off_id
        # ...yet the others list it as a member
        status = summary["final_status"][str(n["index"])]
        assert any(m["node_id"] == off_id and not m["federated_learning"] for m in status["members"])
    off_status = summary["final_status"][str(off[0]["index"])]
    assert off_status["federated_learning"] is False and "federated_learning = false" in off_status["rounds"]
    assert not (off_dir / "rounds").exists() and not (off_dir / "adapters").exists()
