"""Makes py-libp2p 0.8.1's task manager find a new task's parent in O(1) (part of the libp2p adapter).

py-libp2p runs every background task through `TrioManager.run_task`, which first looks for the
FunctionTask the calling trio task belongs to (`_find_parent_task`): a walk over *every* task the
manager holds, comparing each one's trio task with the caller's. Pubsub calls `run_task` once per
gossip message it reads (`push_msg`), and holds two or more long-lived tasks per connected peer
plus one per message in flight, so the walk is paid per message, grows with the number of peers,
and sits in the read loop. py-spy, one of 32 daemons during rounds: 4.5% of its samples in
`run_task`, most of them in the walk (`FunctionTask.iterate_tasks`).

The walk's answer is, by construction, the FunctionTask whose `run()` the calling trio task is
executing, if this manager started it: a FunctionTask sets its trio task at the start of `run()`,
is in the manager's hierarchy from `run_task` until its `run()` has returned (orphans are moved to
their grandparent, not dropped), and a trio task runs at most one `run()`. So the manager keeps a
map from trio task to the FunctionTask running in it, filled and emptied by
`_run_and_manage_task` around `task.run()`, and `_find_parent_task` reads the map. The control
test (`tests/transport/test_libp2p_tasks.py`) compares both answers on a nested task tree.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.tools.anyio_service.trio_manager import TrioManager
from libp2p.tools.anyio_service.trio_tasks import FunctionTask

_RUNNING_ATTR = "_fednode_running_tasks"
_original_run_and_manage_task = TrioManager._run_and_manage_task
_original_find_parent_task = TrioManager._find_parent_task


def running_tasks(manager: TrioManager) -> dict[trio.lowlevel.Task, FunctionTask]:
    running: dict[trio.lowlevel.Task, FunctionTask] | None = getattr(manager, _RUNNING_ATTR, None)
    if running is None:
        running = {}
        setattr(manager, _RUNNING_ATTR, running)
    return running


async def _run_and_manage_task_indexed(self: TrioManager, task: Any) -> None:
    if not isinstance(task, FunctionTask):
        await _original_run_and_manage_task(self, task)
        return
    running = running_tasks(self)
    me = trio.lowlevel.current_task()
    running[me] = task
    try:
        await _original_run_and_manage_task(self, task)
    finally:
        running.pop(me, None)


def _find_parent_task_indexed(self: TrioManager, trio_task: trio.lowlevel.Task) -> FunctionTask | None:
    return running_tasks(self).get(trio_task)


def index_running_tasks() -> None:
    """Install the O(1) parent lookup on every TrioManager (idempotent)."""
    TrioManager._run_and_manage_task = _run_and_manage_task_indexed  # type: ignore[method-assign]
    TrioManager._find_parent_task = _find_parent_task_indexed  # type: ignore[method-assign]


def walk_parent_task(manager: TrioManager, trio_task: trio.lowlevel.Task) -> Any:
    """py-libp2p's own walk, kept for the control test."""
    return _original_find_parent_task(manager, trio_task)
