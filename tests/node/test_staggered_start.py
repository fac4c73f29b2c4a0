"""election-v1 rule 15 at the daemon: members started one after another elect term 1.

bench_scale starts daemons one by one; in one 8-daemon run the first election ended at term 2
("claiming term 2: no coordinator known for term 0"). The chain: A's start-up grace ends while B,
better ranked for term 1, is still in its own grace; C, better still, starts before B's grace ends,
so B waits for C; A's claim_timeout for term 1 ran out before C's grace did, and A moved on to term
2. With rule 15, A's wait for term 1 counts from the end of C's presumed grace. The control runs
the same schedule with the rule switched off and sees term 2, so the schedule is the failing one."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio

from fednode.consensus import election, rank
from tests.node.conftest import cluster, seed_identity, wait_until

CANDIDATES = 10
# node_config's 1 s heartbeats: liveness_timeout = claim_timeout = 2.5 s, startup_grace = 2.5 + 1 s (gossip heartbeat)
STARTS = (0.0, 1.2, 4.0)  # A; B while A is in its grace; C after A's grace, before B's grace ends
SECTIONS = {"round": {"max_rounds": 0}}


def chain() -> list[int]:
    """Three test identities A, B, C: worst to best rank for term 1, and A best for term 2 (so that,
    without rule 15, A claims term 2 as soon as its claim_timeout for term 1 runs out)."""
    for a, b, c in itertools.permutations(range(CANDIDATES), 3):
        ids = [seed_identity(i).node_id for i in (a, b, c)]
        if rank(1, ids[0]) > rank(1, ids[1]) > rank(1, ids[2]) and min(ids, key=lambda n: rank(2, n)) == ids[0]:
            return [a, b, c]
    raise AssertionError("no such three among the test identities")


async def staggered_terms(tmp_path: Path) -> tuple[dict[int, tuple[int, str | None]], str]:
    order = chain()
    async with cluster(tmp_path) as c:
        t0 = trio.current_time()
        nodes = []
        for index, at in zip(order, STARTS, strict=True):
            await trio.sleep_until(t0 + at)
            nodes.append(await c.start(index, CANDIDATES, **SECTIONS))
        await wait_until(lambda: all(n.election.coordinator is not None for n in nodes), timeout=60.0)
        await trio.sleep(10.0)  # long enough for any further step to show
        return {i: (n.election.term, n.election.coordinator) for i, n in zip(order, nodes, strict=True)}, \
            nodes[-1].node_id


async def test_members_started_one_after_another_elect_term_1(tmp_path: Path, autojump_clock,  # type: ignore[no-untyped-def]
                                                               inline_threads) -> None:
    views, best = await staggered_terms(tmp_path)
    assert set(views.values()) == {(1, best)}, views


async def test_control_without_rule_15_the_same_schedule_skips_to_term_2(  # type: ignore[no-untyped-def]
        tmp_path: Path, autojump_clock, inline_threads, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(election.ElectionState, "_held_until", lambda self, candidate: float("-inf"))
    views, _ = await staggered_terms(tmp_path)
    assert max(term for term, _ in views.values()) >= 2, views
