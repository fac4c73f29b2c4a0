"""Kill switches for crash tests: abandon a node (Cluster.kill) at a chosen point of a round.

A switch wraps one of the node's own methods on the instance (the daemon and the driver look
them up on `self`, so the wrapper sees every call) and, the first time its condition holds on a
node of the wanted role, kills that node right there: the call never returns, exactly as if the
process died at that await point. Arm the switch on every node; it fires once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import trio

from fednode.node.daemon import Node
from fednode.wire.messages import Message, SubmissionAnnounce
from tests.node.conftest import Cluster

COORDINATOR, PARTICIPANT = "coordinator", "participant"


@dataclasses.dataclass
class KillSwitch:
    role: str
    fired: trio.Event = dataclasses.field(default_factory=trio.Event)
    victim: int = -1
    killed_at: float = 0.0

    def wants(self, node: Node) -> bool:
        if self.fired.is_set() or node.config.research.federated_learning is False:
            return False
        is_coordinator = node.driver.coordinator == node.node_id
        return is_coordinator if self.role == COORDINATOR else not is_coordinator

    def claim(self, i: int) -> None:
        """Pick the victim (before any await, so that no other node fires too)."""
        self.fired.set()
        self.victim = i

    def kill(self, c: Cluster, i: int) -> None:
        if self.victim != i:
            self.claim(i)
        self.killed_at = trio.current_time()
        c.kill(i)


def arm_publish(c: Cluster, switch: KillSwitch, kind: type[Message], *, after: bool) -> None:
    """Kill when the node publishes a `kind` message: just before it leaves, or just after."""
    for i, node in list(c.nodes.items()):
        original = node.publish

        async def publish(message: Message, i: int = i, node: Node = node,
                          original: Callable[[Message], Any] = original) -> None:
            if isinstance(message, kind) and switch.wants(node):
                switch.claim(i)
                if after:
                    await original(message)
                switch.kill(c, i)
                await trio.lowlevel.checkpoint()  # raises Cancelled: the node is gone
            await original(message)

        node.publish = publish  # type: ignore[method-assign]
        node.driver.publish = publish


def arm_method(c: Cluster, switch: KillSwitch, name: str) -> None:
    """Kill when the driver enters its async method `name` (e.g. _aggregate, _install)."""
    for i, node in list(c.nodes.items()):
        original = getattr(node.driver, name)

        async def wrapper(*args: Any, i: int = i, node: Node = node, original: Any = original) -> None:
            if switch.wants(node):
                switch.kill(c, i)
                await trio.lowlevel.checkpoint()
            await original(*args)

        setattr(node.driver, name, wrapper)


def arm_accepted(c: Cluster, switch: KillSwitch, count: int) -> None:
    """Kill the coordinator right after it accepted its `count`-th submission (mid-collection)."""
    for i, node in list(c.nodes.items()):
        original = node.driver.on_message

        def on_message(message: Message, i: int = i, node: Node = node, original: Any = original) -> Any:
            verdict = original(message)
            if isinstance(message, SubmissionAnnounce) and verdict.accepted and switch.wants(node):
                state = node.driver.rounds.get(message.round_id)
                if state is not None and len(state.accepted) >= count:
                    switch.kill(c, i)
            return verdict

        node.driver.on_message = on_message  # type: ignore[method-assign]


def arm_dispatch(c: Cluster, switch: KillSwitch, count: int) -> None:
    """Kill the node after it has routed `count` gossip messages of a round (a sweep over the
    message sequence of a round: manifest, submissions, aggregate, in whatever order they come)."""
    for i, node in list(c.nodes.items()):
        original = node.dispatch
        seen = [0]

        def dispatch(message: Message, i: int = i, node: Node = node, original: Any = original,
                     seen: list[int] = seen) -> Any:
            verdict = original(message)
            if hasattr(message, "round_id"):
                seen[0] += 1
                if seen[0] >= count and switch.wants(node):
                    switch.kill(c, i)
            return verdict

        node.dispatch = dispatch  # type: ignore[method-assign]
