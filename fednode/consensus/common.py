"""What both consensus machines share: the clock event and the shape of their answers.

Sans-IO contract (h11 style): a machine is fed *events* that carry the current clock value
(`now`, seconds, any monotonic-enough float the driver chooses: wall clock in the daemon, trio's
virtual clock in tests) and answers with an `Outcome`: a verdict for the event (meaningful for
messages from the network) and a tuple of *effects* — things the driver must do (publish a
message, start aggregating, install an adapter). A machine never sleeps, reads a clock or does
I/O; `next_timer()` tells the driver when to feed the next `Tick`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fednode.wire.verdict import ACCEPTED, Validation


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: the driver feeds one when `next_timer()` is due (extra ticks are harmless)."""

    now: float


class Effect:
    """Base of everything a machine asks its driver to do."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """A machine's answer to one event."""

    validation: Validation = ACCEPTED
    effects: tuple[Effect, ...] = field(default_factory=tuple)

    @property
    def accepted(self) -> bool:
        return self.validation.accepted


@dataclass(frozen=True, slots=True)
class CoordinatorChanged(Effect):
    """The election's effect when the coordinator we follow changes, and the event a RoundState
    takes for it (pass it straight through). The open round is *continued* (election-v1.md): a
    new coordinator keeps the accepted set it has seen; participants re-announce their submission."""

    term: int
    coordinator_node_id: str
    now: float
    previous_node_id: str = ""
