from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_give_every_arm_equal_steps_under_one_schedule(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert args.arms == list(bench.ARMS) and args.schedule == "linear" and args.threads == 2
    # centralized runs nodes*rounds*local_steps steps in one call; a node the same in total over its calls
    assert args.nodes * args.rounds * args.local_steps == 120


def test_goals_judge_the_arms_that_ran(bench: ModuleType) -> None:
    fig = {"centralized": 0.96, "local_only": 0.53, "fedavg": 0.945, "exact": 0.955}
    assert bench.goals(fig) == dict.fromkeys(
        ("exact_within_2pt_of_centralized", "federated_10pt_above_local_only", "exact_ge_fedavg"), True
    )
    worse = {**fig, "exact": 0.935, "fedavg": 0.62}  # 2.5 points below centralized; fedavg < local-only + 10
    assert bench.goals(worse) == {
        "exact_within_2pt_of_centralized": False,
        "federated_10pt_above_local_only": False,
        "exact_ge_fedavg": True,
    }
    assert bench.goals({"centralized": 0.9}) == {}
