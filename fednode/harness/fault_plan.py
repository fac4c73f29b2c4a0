"""Seeded fault sequences for `scripts/faults` (pure: no processes, no I/O).

A plan is a list of `Sequence`s; each is a few `Action`s run one after another on a live federation,
after which the federation must recover and the checker (fault_check) must find nothing wrong.
The same seed always gives the same plan, so a failing run is replayed with `--seed`. Targets are
roles ("coordinator", "participant"), resolved when the action runs, because the coordinator is
elected; the runner draws a participant with a random generator derived from the same seed.

Sequence 0 is always the fixed r36 case (see R36_*): a participant restarted with a byte flipped in
its latest merged adapter (blob and adapters/ dir), then the coordinator SIGTERMed and restarted about
a round later. Seen once with the real task: the participant's sync failed, it later became
coordinator and re-aggregated an already-published round under a different merged sha256 (a fork).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

KILL = "sigkill"
TERM = "sigterm"
CORRUPT = "corrupt"
DELETE = "delete"
DISK_FULL = "disk_full"
CLIENT = "client_close"  # a control-socket client that asks for status and closes without reading
WAIT = "wait"
ACTION_KINDS = (KILL, TERM, CORRUPT, DELETE, DISK_FULL, CLIENT)

COORDINATOR = "coordinator"
PARTICIPANT = "participant"
DISK_NODE = "disk_node"  # the node whose data dir is a small tmpfs

# When an action fires, relative to the round in progress (the runner waits for it, with a bound).
TRIGGERS = ("now", "delay", "collecting", "submitted", "aggregating", "training")
LATEST_MERGED = "latest_merged"
ANY_BLOB = "any_blob"

MIN_ACTIONS, MAX_ACTIONS = 1, 3
MAX_DELAY_SECONDS = 1.5  # trigger "delay": this long at most after the previous action
MAX_RESTART_AFTER_SECONDS = 2.5  # a killed node is started again this long after at most
DISK_FULL_HOLD_SECONDS = (1.0, 3.0)  # the disk stays full this long (a round or two)
# The r36 case, scaled to the fake task: "about a round later" (55 s of MiniLM ~ 1.5 s here).
R36_GAP_SECONDS = 1.5


@dataclass(frozen=True)
class Action:
    kind: str
    target: str = ""
    trigger: str = "now"
    delay: float = 0.0  # trigger "delay" / kind "wait": seconds
    restart_after: float | None = 0.0  # kill/term: seconds until restart; None = at the end of the sequence
    blob: str = ""  # corrupt/delete: LATEST_MERGED or ANY_BLOB
    while_stopped: bool = False  # corrupt/delete: with the node stopped (SIGTERM, change, start)
    with_adapter: bool = False  # corrupt LATEST_MERGED: the same byte in adapters/round-<n>/ too
    hold: float = 0.0  # disk_full: seconds the disk stays full

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", False) and
                not (k in ("delay", "hold") and v == 0.0)}

    def describe(self) -> str:
        if self.kind == WAIT:
            return f"wait {self.delay:.1f}s"
        when = f"@{self.trigger}" + (f"+{self.delay:.1f}s" if self.trigger == "delay" else "")
        if self.kind in (KILL, TERM):
            back = "restart at end" if self.restart_after is None else f"restart after {self.restart_after:.1f}s"
            return f"{self.kind} {self.target} {when}, {back}"
        if self.kind in (CORRUPT, DELETE):
            how = "stopped" if self.while_stopped else "running"
            extra = " (+adapter dir)" if self.with_adapter else ""
            return f"{self.kind} {self.blob}{extra} of {self.target} ({how}) {when}"
        if self.kind == DISK_FULL:
            return f"fill {self.target}'s disk for {self.hold:.1f}s {when}"
        if self.kind == CLIENT:
            return f"status client closes early on {self.target} {when}"
        return f"{self.kind} {when}"


@dataclass(frozen=True)
class Sequence:
    index: int
    name: str
    actions: tuple[Action, ...]

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "actions": [a.to_json() for a in self.actions]}

    def describe(self) -> str:
        return "; ".join(a.describe() for a in self.actions)


def r36_sequence(index: int = 0) -> Sequence:
    """The fixed case: restart a participant with a byte flipped in its latest merged blob and adapter
    dir, SIGTERM the coordinator about a round later and start it again."""
    return Sequence(index, "r36", (
        Action(CORRUPT, PARTICIPANT, "now", blob=LATEST_MERGED, while_stopped=True, with_adapter=True),
        Action(WAIT, delay=R36_GAP_SECONDS),
        Action(TERM, COORDINATOR, "now", restart_after=0.0),
    ))


def _trigger(rng: random.Random) -> tuple[str, float]:
    trigger = rng.choice(TRIGGERS)
    return trigger, round(rng.uniform(0.0, MAX_DELAY_SECONDS), 2) if trigger == "delay" else 0.0


def random_action(rng: random.Random, kind: str, *, pending_restart: bool) -> Action:
    trigger, delay = _trigger(rng)
    if kind in (KILL, TERM):
        # at most one node left down until the end of the sequence: >= min_participants stay up
        later = not pending_restart and rng.random() < 0.25
        restart = None if later else round(rng.choice([0.0, rng.uniform(0.2, MAX_RESTART_AFTER_SECONDS)]), 2)
        return Action(kind, rng.choice([COORDINATOR, PARTICIPANT]), trigger, delay, restart_after=restart)
    if kind in (CORRUPT, DELETE):
        blob = rng.choice([LATEST_MERGED, LATEST_MERGED, ANY_BLOB])
        return Action(kind, rng.choice([COORDINATOR, PARTICIPANT]), trigger, delay, blob=blob,
                      while_stopped=rng.random() < 0.4,
                      with_adapter=kind == CORRUPT and blob == LATEST_MERGED and rng.random() < 0.5)
    if kind == DISK_FULL:
        return Action(kind, DISK_NODE, trigger, delay, hold=round(rng.uniform(*DISK_FULL_HOLD_SECONDS), 2))
    if kind == CLIENT:
        return Action(kind, rng.choice([COORDINATOR, PARTICIPANT]), trigger, delay)
    raise ValueError(f"unknown action kind {kind!r}; expected one of {ACTION_KINDS}")


def make_plan(seed: int, count: int, *, disk_full: bool = True, kinds: tuple[str, ...] | None = None,
              r36: bool = True) -> list[Sequence]:
    """`count` sequences: the r36 case first (unless `r36` is False), then random ones of `kinds`
    (default all). Each kind leads at least one sequence (the first ones cycle through the kinds in a
    seeded order) so a short plan covers all. With `disk_full` False (not root, or no tmpfs) no
    sequence fills a disk."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    unknown = set(kinds or ()) - set(ACTION_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; expected some of {ACTION_KINDS}")
    rng = random.Random(seed)
    pool = [k for k in (kinds or ACTION_KINDS) if disk_full or k != DISK_FULL]
    if not pool:
        raise ValueError("no fault kind left to draw from (disk_full is the only one asked for, and off)")
    leads = rng.sample(pool, len(pool))
    plan = [r36_sequence(0)] if r36 else []
    while len(plan) < count:
        index = len(plan)
        n = rng.randint(MIN_ACTIONS, MAX_ACTIONS)
        k = index - (1 if r36 else 0)
        chosen = [leads[k] if k < len(leads) else rng.choice(pool)]
        chosen += [rng.choice(pool) for _ in range(n - 1)]
        actions: list[Action] = []
        for kind in chosen:
            pending = any(a.kind in (KILL, TERM) and a.restart_after is None for a in actions)
            actions.append(random_action(rng, kind, pending_restart=pending))
        plan.append(Sequence(index, f"s{index}", tuple(actions)))
    return plan
