from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fednode.errors import ConfigError
from fednode.learning import LocalTrainer
from fednode.learning.schedule import CONSTANT_LR, DEFAULT_LR_FLOOR, LrSchedule


@given(steps=st.integers(2, 500), floor=st.floats(0.0, 1.0), kind=st.sampled_from(["linear", "cosine"]))
def test_decay_runs_from_the_peak_to_the_floor_without_rising(steps: int, floor: float, kind: str) -> None:
    s = LrSchedule(kind, floor)  # type: ignore[arg-type]
    factors = [s.factor(i, steps) for i in range(steps)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(floor)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(factors))
    assert all(floor - 1e-12 <= f <= 1.0 + 1e-12 for f in factors)


def test_linear_midpoint_constant_and_single_step() -> None:
    assert LrSchedule("linear", 0.0).factor(5, 11) == pytest.approx(0.5)
    assert LrSchedule("cosine", 0.0).factor(5, 11) == pytest.approx(0.5)
    assert LrSchedule("cosine", 0.0).factor(1, 11) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert [CONSTANT_LR.factor(i, 7) for i in range(7)] == [1.0] * 7
    assert LrSchedule().factor(0, 1) == 1.0  # one step: the peak
    assert LrSchedule().kind == "linear" and LrSchedule().floor == DEFAULT_LR_FLOOR


@pytest.mark.parametrize(("kind", "floor"), [("step", 0.1), ("linear", -0.1), ("linear", 1.5), ("cosine", math.nan)])
def test_bad_schedules_are_config_errors(kind: str, floor: float) -> None:
    with pytest.raises(ConfigError):
        LrSchedule(kind, floor)  # type: ignore[arg-type]


def test_trainer_applies_the_schedule_deterministically(trainer: LocalTrainer) -> None:
    lr = 5e-3
    linear = trainer.train(None, steps=3, learning_rate=lr, seed=3)
    assert linear.metrics["lr_last"] == pytest.approx(lr * DEFAULT_LR_FLOOR)  # the trainer's default schedule
    assert trainer.train(None, steps=3, learning_rate=lr, seed=3).delta_bytes == linear.delta_bytes
    constant = trainer.train(None, steps=3, learning_rate=lr, seed=3, lr_schedule=CONSTANT_LR)
    assert constant.metrics["lr_last"] == pytest.approx(lr)
    assert constant.delta_bytes != linear.delta_bytes
    flat = trainer.train(None, steps=3, learning_rate=lr, seed=3, lr_schedule=LrSchedule("linear", 1.0))
    assert flat.delta_bytes == constant.delta_bytes  # a linear decay to 1.0x is the constant rate


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_windows_slice_one_schedule_over_several_calls(kind: str) -> None:
    whole = LrSchedule(kind, 0.1)  # type: ignore[arg-type]
    rounds, steps = 5, 3
    sliced = [whole.window(r * steps, rounds * steps).factor(i, steps) for r in range(rounds) for i in range(steps)]
    assert sliced == [whole.factor(i, rounds * steps) for i in range(rounds * steps)]
    assert whole.window(12, 15).factor(5, 3) == pytest.approx(0.1 if kind != "constant" else 1.0)  # past the end
    with pytest.raises(ConfigError, match="offset < span"):
        whole.window(15, 15)
