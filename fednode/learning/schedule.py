"""Learning-rate schedules inside one `LocalTrainer.train` call.

A federated node trains a few steps per round from the merged adapter. With a constant rate the
last steps of every round still move far, so the merged adapter overshoots and per-round accuracy
bounces; a rate that decays within the call ends each round near a local minimum instead.

    constant   every step at the peak rate
    linear     from the peak on the first step down to floor * peak on the last
    cosine     the same end points along a half cosine

The schedule is a pure function of (step, steps): equal inputs and seed still give equal bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from fednode.errors import ConfigError

LrScheduleKind = Literal["constant", "linear", "cosine"]
LR_SCHEDULE_KINDS: tuple[str, ...] = get_args(LrScheduleKind)

DEFAULT_LR_SCHEDULE: LrScheduleKind = "linear"
DEFAULT_LR_FLOOR = 0.1  # the last step of a call runs at this fraction of the peak rate


@dataclass(frozen=True)
class LrSchedule:
    """How the rate moves from `learning_rate` (the peak) over the steps of one train call."""

    kind: LrScheduleKind = DEFAULT_LR_SCHEDULE
    floor: float = DEFAULT_LR_FLOOR

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULE_KINDS:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULE_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ConfigError(f"lr_floor must be in [0, 1], got {self.floor!r}")

    def factor(self, step: int, steps: int) -> float:
        """Multiplier of the peak rate for the 0-based `step` of `steps`: 1 first, `floor` last."""
        if self.kind == "constant" or steps <= 1:
            return 1.0
        t = min(max(step / (steps - 1), 0.0), 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.floor) * t
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


CONSTANT_LR = LrSchedule("constant", 1.0)
