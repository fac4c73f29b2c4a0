from __future__ import annotations

import importlib.util
import sys
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


def test_chat_suite_has_its_own_defaults_and_equal_steps(bench: ModuleType) -> None:
    args = bench.parse_args(["--suite", "chat"])
    assert (args.rounds, args.local_steps, args.lr, args.batch, args.round_schedule) == (8, 2, 1e-3, 4, "run")
    assert bench.parse_args([]).round_schedule == "call"  # classification: the decay restarts every call
    assert bench.parse_args(["--suite", "chat", "--lr", "0.01"]).lr == 0.01  # a flag given wins
    assert bench.parse_args([]).lr == bench.DEFAULT_LR  # the classification defaults are untouched


def test_chat_goals_and_topic_skew() -> None:
    spec = importlib.util.spec_from_file_location("bench_quality_chat", SCRIPT.parent / "bench_quality_chat.py")
    assert spec is not None and spec.loader is not None
    chat = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = chat  # its dataclasses look their module up
    spec.loader.exec_module(chat)

    fig = {"centralized": {"pooled": 4.0}, "local_only": {"pooled": 6.0},
           "fedavg": {"pooled": 4.1}, "exact": {"pooled": 4.19}}
    assert chat.chat_goals(fig) == {"federated_within_5pct_of_centralized_pooled_ppl": True,
                                    "federated_below_local_only_pooled_ppl": True}
    worse = chat.chat_goals({**fig, "exact": {"pooled": 4.3}})
    assert worse["federated_within_5pct_of_centralized_pooled_ppl"] is False
    assert chat.chat_goals({**fig, "local_only": {"pooled": 4.15}})["federated_below_local_only_pooled_ppl"] is False

    rows = chat.chat_rows(node=1, count=400, skew=0.8, seed=0)
    assert rows == chat.chat_rows(node=1, count=400, skew=0.8, seed=0)  # seeded
    own = sum(" plus " in r["messages"][0]["content"] for r in rows)  # node 1's topic: arithmetic
    assert 0.72 * 400 < own < 0.88 * 400
    assert {m["role"] for r in rows for m in r["messages"]} == {"user", "assistant"}
