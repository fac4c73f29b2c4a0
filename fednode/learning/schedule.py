"""Learning-rate schedules inside one `LocalTrainer.train` call.

A federated node trains a few steps per round from the merged adapter. With a constant rate the
last steps of every round still move far, so the merged adapter overshoots and per-round accuracy
bounces; a rate that decays within the call ends each round near a local minimum instead.

    constant   every step at the peak rate
    linear     from the peak on the first step down to floor * peak on the last
    cosine     the same end points along a half cosine

The schedule is a pure function of (step, steps): equal inputs and seed still give equal bytes.
`window(offset, span)` makes one call a slice of a longer schedule (e.g. round n's local steps of a
run of rounds, as scripts/bench_quality.py gives its federated arms the decay its centralized arm
has over the whole run instead of a restart every round)."""

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
    offset: int = 0
    """With span > 0: a call's step 0 is step `offset` of a `span`-step schedule."""
    span: int = 0
    """0 = the schedule spans each call's own steps."""

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULE_KINDS:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULE_KINDS}, got {self.kind!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ConfigError(f"lr_floor must be in [0, 1], got {self.floor!r}")
        if not 0 <= self.offset < max(self.span, 1) or self.span < 0:
            raise ConfigError(f"lr schedule window: need 0 <= offset < span (or both 0), got {self.offset}, "
                              f"{self.span}")

    def window(self, offset: int, span: int) -> LrSchedule:
        """This schedule over `span` steps, of which a call runs those from `offset` on."""
        return LrSchedule(self.kind, self.floor, offset, span)

    def factor(self, step: int, steps: int) -> float:
        """Multiplier of the peak rate for the 0-based `step` of `steps`: 1 first, `floor` last
        (of the whole window when there is one; steps past its end run at the floor)."""
        if self.span:
            step, steps = self.offset + step, self.span
        if self.kind == "constant" or steps <= 1:
            return 1.0
        t = min(max(step / (steps - 1), 0.0), 1.0)
        if self.kind == "linear":
            return 1.0 - (1.0 - self.floor) * t
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


CONSTANT_LR = LrSchedule("constant", 1.0)
