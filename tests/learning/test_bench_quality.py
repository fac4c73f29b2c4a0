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
    assert (args.rounds, args.local_steps, args.batch, args.round_schedule) == (8, 2, 4, "run")
    # no fixed rate: every arm is tuned over the same grid on the validation split
    assert (args.lr, args.central_lr, args.lr_grid) == (None, None, list(bench.CHAT_LR_GRID))
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

    # each arm's rate: the lowest validation perplexity; a fixed --lr / --central-lr skips the grid
    assert chat.pick_lr({3e-4: 1.10, 1e-3: 1.04, 3e-3: 1.07}) == 1e-3
    assert chat.pick_lr({3e-4: 1.05, 1e-3: 1.05}) == 3e-4
    with pytest.raises(ValueError, match="lr-grid"):
        chat.pick_lr({})
    bench_args = importlib.util.spec_from_file_location("bq", SCRIPT)
    assert bench_args is not None and bench_args.loader is not None
    bq = importlib.util.module_from_spec(bench_args)
    bench_args.loader.exec_module(bq)
    grid_args = bq.parse_args(["--suite", "chat", "--central-lr", "5e-4"])
    assert chat.lr_grid(grid_args, "centralized") == [5e-4]
    assert chat.lr_grid(grid_args, "fedavg") == chat.lr_grid(grid_args, "local_only") == list(bq.CHAT_LR_GRID)
    # the validation, held-out and training draws of a node differ (own seeds), same distribution
    salts = dict(chat.SPLITS)
    drawn = [chat.chat_rows(node=0, count=16, skew=0.8, seed=salts[s]) for s in ("train", "eval", "validation")]
    assert drawn[0] != drawn[1] != drawn[2] != drawn[0]

    rows = chat.chat_rows(node=1, count=400, skew=0.8, seed=0)
    assert rows == chat.chat_rows(node=1, count=400, skew=0.8, seed=0)  # seeded
    own = sum(" plus " in r["messages"][0]["content"] for r in rows)  # node 1's topic: arithmetic
    assert 0.72 * 400 < own < 0.88 * 400
    assert {m["role"] for r in rows for m in r["messages"]} == {"user", "assistant"}


def test_lora_toy_shows_why_exact_can_trail_fedavg() -> None:
    """From the same client factors: small AdamW steps -> the mean of the products (and exact, its
    best rank-r approximation) beat fedavg's mean(B) mean(A); large steps -> the order turns over
    (each client's own dB_i dA_i overshoots; fedavg damps it). scripts/bench_quality_lora_toy.py."""
    spec = importlib.util.spec_from_file_location("bench_quality_lora_toy",
                                                  SCRIPT.parent / "bench_quality_lora_toy.py")
    assert spec is not None and spec.loader is not None
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)

    def first_round(lr: float) -> dict[str, float]:
        runs = [toy.toy_round_losses(seed, lr, upto=1)[0] for seed in range(3)]
        return {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}

    small, large = first_round(0.1), first_round(0.3)
    assert small["mean_products"] <= small["exact"] < small["fedavg"]
    assert large["fedavg"] < large["exact"] < large["mean_products"]
    assert 0 < small["discarded_energy"] < large["discarded_energy"] < 1
