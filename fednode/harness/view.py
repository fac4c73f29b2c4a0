"""Live progress of a local federation (rich): one row per node, refreshed from its status.

On a terminal it is a live table; elsewhere (CI logs, pipes) a one-line summary every few
seconds, so long runs still show that they move.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from fednode.node.reports import NodeStatus, TrainingState

if TYPE_CHECKING:
    from fednode.harness.cluster import LocalCluster

PLAIN_PRINT_INTERVAL_SECONDS = 5.0


def _short(node_id: str) -> str:
    return node_id[-6:] if node_id else "-"


class LiveView:
    def __init__(self, cluster: LocalCluster, rounds: int, *, enabled: bool = True,
                 console: Console | None = None) -> None:
        self.cluster = cluster
        self.rounds = rounds
        self.enabled = enabled
        self.console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 200)
        self._live: Live | None = None
        self._last_plain = 0.0

    def __enter__(self) -> LiveView:
        if self.enabled and self.console.is_terminal:
            self._live = Live(self._table({}, 0.0), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(et, e, tb)

    def update(self, statuses: dict[int, NodeStatus], elapsed: float) -> None:
        if not self.enabled:
            return
        if self._live is not None:
            self._live.update(self._table(statuses, elapsed))
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_PRINT_INTERVAL_SECONDS:
            self._last_plain = now
            self.console.print(self._line(statuses, elapsed), highlight=False)

    def _line(self, statuses: dict[int, NodeStatus], elapsed: float) -> str:
        parts = [f"[{elapsed:6.1f}s]"]
        for node in self.cluster.nodes:
            s = statuses.get(node.index)
            if node.killed:
                parts.append(f"n{node.index}:KILLED")
            elif s is None:
                parts.append(f"n{node.index}:starting")
            elif not s.federated_learning:
                parts.append(f"n{node.index}:member-only")
            else:
                cur, tr = s.progress.current_round, s.progress.training
                step = f" step {tr.step}/{tr.steps}" if tr and tr.state is TrainingState.TRAINING else ""
                parts.append(f"n{node.index}:r{cur.round_number if cur else '-'} "
                             f"{cur.state.value if cur else 'waiting'} sub={cur.submissions if cur else 0} "
                             f"done={s.progress.rounds_completed}/{self.rounds}{step}")
        return " | ".join(parts)

    def _table(self, statuses: dict[int, NodeStatus], elapsed: float) -> Table:
        joined = max((len(s.alive_members()) + 1 for s in statuses.values()), default=0)
        table = Table(title=f"fednode local federation — {elapsed:5.0f} s — {joined}/{len(self.cluster.nodes)} "
                            f"nodes joined — target {self.rounds} rounds", title_justify="left")
        for col in ("node", "id", "role", "round", "state", "submissions", "training", "transfer", "done"):
            table.add_column(col)
        for node in self.cluster.nodes:
            s = statuses.get(node.index)
            if node.killed:
                table.add_row(f"node-{node.index}", _short(node.node_id), "[red]SIGKILLed", "", "", "", "", "", "")
                continue
            if s is None:
                table.add_row(f"node-{node.index}", _short(node.node_id), "starting…", "", "", "", "", "", "")
                continue
            if not s.federated_learning:
                table.add_row(f"node-{node.index}", _short(node.node_id), "member (FL off)", "-", "-", "-", "-", "-",
                              "-")
                continue
            cur = s.progress.current_round
            role = "coordinator" if s.coordinator == node.node_id else "participant"
            tr = s.progress.training
            training = ""
            if tr:
                loss_text = f" loss {tr.loss:.3f}" if tr.loss is not None else ""
                training = f"{tr.state.value} {tr.step}/{tr.steps}{loss_text}"
            xfer = s.progress.transfer
            transfer = f"{xfer.done / 1e6:.2f}/{xfer.size / 1e6:.2f} MB" if xfer else ""
            table.add_row(f"node-{node.index}", _short(node.node_id), role, str(cur.round_number if cur else "-"),
                          cur.state.value if cur else "waiting", str(cur.submissions if cur else 0), training,
                          transfer, f"{s.progress.rounds_completed}/{self.rounds}")
        return table
