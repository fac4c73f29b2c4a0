"""One job per round: everything the daemon does for a round besides its pure `RoundState`, so
that forgetting a round drops one object. And the one helper that runs blocking work in a thread."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from fednode.consensus import StartAggregation

T = TypeVar("T")


@dataclass
class RoundJob:
    round_id: str
    prefetched: dict[str, trio.Event] = field(default_factory=dict)  # participant -> its update is checked
    update_errors: dict[str, BaseException] = field(default_factory=dict)  # participant -> why its update is bad
    aggregating: bool = False
    replan: StartAggregation | None = None  # a re-plan issued while the aggregation ran
    installing: bool = False
    settling: bool = False  # a _settle task is asking for the round's outcome
    discarded_energy: float | None = None  # of the aggregation (for the record)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # "local"/"merged" -> figures
    unsaved: bool = False  # a full disk kept the round's snapshot out of state.sqlite
    unsaved_outcome: bytes | None = None  # the signed outcome a full disk kept out of state.sqlite
    deferred_training: bool = False  # the round opened while we were paused: train on resume

    def size(self) -> int:
        """Entries in its per-participant structures (the soak test bounds them)."""
        return len(self.prefetched) + len(self.update_errors) + len(self.metrics)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


async def run_blocking(fn: Callable[[], T], *, inline: bool, abandon: bool = False) -> T:
    """Blocking work in a worker thread (`inline`: on the event loop, for tests on trio's virtual
    clock). `abandon`: a cancel does not wait for the thread (a stop must not wait for training)."""
    if inline:
        return fn()
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=abandon)  # type: ignore[call-arg]
