"""A deterministic discrete-event network for ElectionState: every node heartbeats on its own
phase, every message gets a delay chosen by the test, nodes may crash. Pure Python (no trio) so
hypothesis can run many examples quickly; messages are unsigned (signatures are the wire layer's job)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from fednode.consensus import ClaimSeen, ElectionConfig, ElectionState, HeartbeatSeen, PublishClaim, Tick
from fednode.wire import CoordinatorClaim, Heartbeat

from .helpers import COMMUNITY, EPOCH

Message = Heartbeat | CoordinatorClaim


@dataclass
class Simulation:
    node_ids: list[str]
    config: ElectionConfig
    delay: Callable[[int, float], float]  # (message index, send time) -> delay
    phases: list[float]
    crash_at: dict[str, float] = field(default_factory=dict)
    paused: Callable[[str, float], bool] | None = None  # (node, time) -> its heartbeat says `paused`
    start_at: dict[str, float] = field(default_factory=dict)  # a node absent here starts at 0
    now: float = 0.0
    queue: list[tuple[float, int, str, str, object]] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)
    sent: int = 0

    def __post_init__(self) -> None:
        self.nodes: dict[str, ElectionState] = {}
        self.hb_seq = dict.fromkeys(self.node_ids, 0)
        for n, phase in zip(self.node_ids, self.phases, strict=True):
            if self.start_at.get(n, 0.0) > 0:
                self._push(self.start_at[n], "start", n, phase)
            else:
                self._start(n, 0.0, phase)

    def _start(self, n: str, when: float, phase: float) -> None:
        """Node n comes up at `when`: its state, its first heartbeat `phase` later, its timer."""
        self.nodes[n] = ElectionState(n, self.config, now=EPOCH + when)
        self._push(when + phase, "heartbeat", n, None)
        self._schedule_timer(n)

    def alive(self, n: str, at: float | None = None) -> bool:
        """Started and not crashed: a message to a node that has not started yet is lost."""
        at = at if at is not None else self.now
        return self.start_at.get(n, 0.0) <= at < self.crash_at.get(n, float("inf"))

    def _push(self, when: float, kind: str, node: str, payload: object) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), kind, node, payload))

    def _schedule_timer(self, n: str) -> None:
        when = self.nodes[n].next_timer()
        if when is not None:
            self._push(max(when - EPOCH, self.now), "tick", n, None)

    def _broadcast(self, sender: str, message: Message) -> None:
        for n in self.node_ids:
            if n != sender:
                self._push(self.now + self.delay(self.sent, self.now), "deliver", n, message)
                self.sent += 1

    def _apply(self, n: str, effects: tuple[object, ...]) -> None:
        for effect in effects:
            if isinstance(effect, PublishClaim):
                self._broadcast(n, CoordinatorClaim(community_id=COMMUNITY, node_id=n, term=effect.term,
                                                    claimed_at=EPOCH + self.now))
        self._schedule_timer(n)

    def run_until(self, end: float) -> None:
        while self.queue and self.queue[0][0] <= end:
            when, _, kind, n, payload = heapq.heappop(self.queue)
            self.now = when
            if not self.alive(n):
                continue
            if kind == "start":
                self._start(n, when, float(payload))  # type: ignore[arg-type]
                continue
            state, now = self.nodes[n], EPOCH + when
            if kind == "heartbeat":
                term, coordinator = state.heartbeat_fields()
                self.hb_seq[n] += 1
                self._broadcast(n, Heartbeat(community_id=COMMUNITY, node_id=n, term=term, seq=self.hb_seq[n],
                                             sent_at=now, federated_learning=True, coordinator_node_id=coordinator,
                                             paused=bool(self.paused and self.paused(n, when))))
                self._push(when + self.config.heartbeat_interval, "heartbeat", n, None)
                self._apply(n, state.handle(Tick(now)).effects)
            elif kind == "deliver":
                event = HeartbeatSeen(payload, now) if isinstance(payload, Heartbeat) else ClaimSeen(payload, now)  # type: ignore[arg-type]
                self._apply(n, state.handle(event).effects)
            else:
                self._apply(n, state.handle(Tick(now)).effects)
        self.now = end

    def live(self) -> list[ElectionState]:
        return [self.nodes[n] for n in self.node_ids if self.alive(n)]
