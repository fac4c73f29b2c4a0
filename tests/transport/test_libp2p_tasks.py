"""fednode.transport.libp2p_tasks: py-libp2p's task manager finds a task's parent by a map, with the
same answers as its own walk over every task."""

from __future__ import annotations

import time
from typing import Any

import trio
from libp2p.tools.anyio_service import Service, TrioManager, background_trio_service

from fednode.transport.libp2p_tasks import index_running_tasks, running_tasks, walk_parent_task


class _Tree(Service):
    """Root tasks that each start children, which start grandchildren; every task records what the
    map and the walk say its parent is (the caller's FunctionTask), then waits to be released."""

    def __init__(self, roots: int, fanout: int) -> None:
        super().__init__()
        self.roots = roots
        self.fanout = fanout
        self.answers: list[tuple[Any, Any]] = []
        self.started = 0
        self.release = trio.Event()

    async def run(self) -> None:
        for _ in range(self.roots):
            self.manager.run_task(self._node, 2)
        await self.release.wait()

    async def _node(self, depth: int) -> None:
        manager = self.manager
        me = trio.lowlevel.current_task()
        self.answers.append((manager._find_parent_task(me), walk_parent_task(manager, me)))
        self.started += 1
        if depth > 0:
            for _ in range(self.fanout):
                manager.run_task(self._node, depth - 1)
        await self.release.wait()


async def test_the_map_answers_as_the_walk_does() -> None:
    index_running_tasks()
    tree = _Tree(roots=3, fanout=3)
    async with background_trio_service(tree) as manager:
        assert isinstance(manager, TrioManager)
        expected = 3 * (1 + 3 + 9)
        while tree.started < expected:
            await trio.sleep(0.01)
        # a task outside the manager (this test's own) has no parent in it: both say None
        outsider = trio.lowlevel.current_task()
        assert manager._find_parent_task(outsider) is None
        assert walk_parent_task(manager, outsider) is None
        assert len(tree.answers) == expected
        assert all(fast is slow for fast, slow in tree.answers)
        assert sum(fast is not None for fast, _ in tree.answers) == expected  # every task found itself
        tree.release.set()
        tasks = {id(fast) for fast, _ in tree.answers}
        running = running_tasks(manager)
        with trio.fail_after(10):
            while any(id(task) in tasks for task in running.values()):
                await trio.sleep(0.01)
        # a task that ended is not found again (nothing left behind, the map does not grow)
        assert all(id(task) not in tasks for task in running.values())


async def test_a_lookup_does_not_grow_with_the_tasks_held() -> None:
    """The point of it: 2,000 running tasks (pubsub holds a few per peer, one per message in flight)
    and the lookup stays a dict read, where the walk visits every task."""
    index_running_tasks()
    tree = _Tree(roots=0, fanout=0)
    async with background_trio_service(tree) as manager:
        async def leaf() -> None:
            await tree.release.wait()

        for _ in range(2000):
            manager.run_task(leaf)
        await trio.sleep(0.2)
        me = trio.lowlevel.current_task()
        t = time.perf_counter()
        for _ in range(200):
            manager._find_parent_task(me)
        fast = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(200):
            walk_parent_task(manager, me)
        slow = time.perf_counter() - t
        tree.release.set()
    assert fast * 50 < slow, (fast, slow)
