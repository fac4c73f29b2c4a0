"""The chaos scenarios of `scripts/chaos` on 4 nodes: real `fednode run` daemons as OS processes over
libp2p on 127.0.0.1 (fake task), each fault injected by SIGKILL / restart / a slow node, each promise
checked by the scenario itself (see fednode/harness/chaos_scenarios.py); here we also pin the figures
that show the fault really happened where it was meant to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fednode.harness.chaos import run_scenario
from fednode.harness.chaos_support import ChaosOptions

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

OPTIONS = ChaosOptions(nodes=4)


async def run(name: str, tmp_path: Path) -> dict[str, Any]:
    # a short run dir: each daemon binds a unix control socket below it (at most 107 bytes)
    result = await run_scenario(name, OPTIONS, tmp_path / "run")
    assert result.passed, result.error
    return result.metrics


async def test_coordinator_killed_mid_collection_is_replaced_and_the_round_completes(tmp_path: Path) -> None:
    m = await run("coordinator_killed", tmp_path)
    assert m["submissions_at_kill"] >= 1 and m["new_coordinator"] != m["killed_node"]
    assert m["contributions"] == OPTIONS.nodes - 1
    assert 0 < m["failover_seconds"] <= m["recovery_seconds"] <= OPTIONS.recovery_bound_seconds


async def test_participants_killed_mid_upload_and_mid_training_round_completes_without_them(tmp_path: Path) -> None:
    m = await run("participant_killed", tmp_path)
    assert m["coordinator"] not in (m["killed_after_announce"], m["killed_mid_training"])
    assert m["min_participants"] <= m["contributions"] <= OPTIONS.nodes - 1


async def test_node_restarted_mid_round_rejoins_with_the_same_merged_adapters(tmp_path: Path) -> None:
    m = await run("node_restarted", tmp_path)
    assert m["restarted_node"] != m["coordinator"]
    assert m["round_1_merged_sha256"] != m["round_2_merged_sha256"]
    assert m["round_2_restarted_node_contributed"]  # back in time for the next round


async def test_straggler_is_excluded_and_the_round_closes_at_its_deadline(tmp_path: Path) -> None:
    m = await run("straggler", tmp_path)
    assert m["contributions"] == OPTIONS.nodes - 1
    assert m["round_wall_seconds"] < m["straggler_training_seconds"]


async def test_coordinator_restarted_before_aggregating_loses_nothing_and_merges_the_same(tmp_path: Path) -> None:
    m = await run("coordinator_restarted", tmp_path)
    assert m["submissions_at_kill"] == OPTIONS.nodes
    assert m["merged_sha256"] == m["uninterrupted_merged_sha256"]
