"""election-v1 rule 18 end to end (memory transport, virtual clock): once a community has nothing
to do (max_rounds reached), its coordinator and members beat at the idle pace, a member that joins
then follows the coordinator without a new term, and a coordinator that dies meanwhile is replaced
after the liveness timeout at the idle pace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from fednode.cli import _format_status
from fednode.node.daemon import Node
from tests.node.conftest import cluster, wait_until

N = 3
INTERVAL = 1.0  # the test cluster's heartbeat_interval_seconds
IDLE = 20.0
IDLE_SECONDS = 120.0


def _sections(idle: float) -> dict[str, dict[str, Any]]:
    return {"coordinator": {"idle_heartbeat_interval_seconds": idle},
            "round": {"max_rounds": 1, "pause_seconds": 5.0, "wait_for_members": N},
            "learning": {"evaluate": False}}


def _installed(node: Node) -> int:
    return int(node.driver.progress.last_merged.get("round_number", 0))


async def _idle_run(tmp: Path, idle: float) -> dict[str, Any]:
    async with cluster(tmp) as c:
        nodes = [await c.start(i, N + 1, **_sections(idle)) for i in range(N)]
        await wait_until(lambda: all(_installed(n) >= 1 for n in nodes), timeout=300)
        coordinator = nodes[0].driver.coordinator
        member = next(n for n in nodes if n.node_id != coordinator)
        await trio.sleep(5 * INTERVAL)  # the first heartbeat at the idle pace
        before = member.counters["accepted"]["heartbeat"]
        await trio.sleep(IDLE_SECONDS)
        rate = (member.counters["accepted"]["heartbeat"] - before) / IDLE_SECONDS
        paces = {n.node_id[-6:]: n.election.heartbeat_interval(n.clock()) for n in nodes}
        statuses = [n.status() for n in nodes]  # what `fednode status` shows
        shown = {(st.heartbeat_interval_seconds, st.idle) for st in statuses}
        text = _format_status(statuses[0])
        # a member joins the idle community: it hears the coordinator within its start-up grace
        joiner = await c.start(N, N + 1, **_sections(idle))
        await trio.sleep(3 * IDLE)
        joined = {"coordinator": joiner.driver.coordinator, "terms": {n.election.term for n in [*nodes, joiner]}}
        # the coordinator dies: the others elect another, after its liveness timeout at its pace
        c.kill(next(i for i, n in c.nodes.items() if n.node_id == coordinator))
        died = trio.current_time()
        live = [n for n in [*nodes, joiner] if n.node_id != coordinator]
        await wait_until(lambda: all(n.driver.coordinator not in (None, coordinator) for n in live)
                         and len({n.driver.coordinator for n in live}) == 1, timeout=300)
        return {"rate": rate, "paces": paces, "shown": shown, "text": text, "coordinator": coordinator,
                "joined": joined, "failover": trio.current_time() - died}


async def test_an_idle_community_beats_at_the_idle_pace_and_still_fails_over(
        tmp_path: Path, autojump_clock, inline_threads) -> None:  # type: ignore[no-untyped-def]
    autojump_clock.autojump_threshold = 0.0
    off = await _idle_run(tmp_path / "off", 0.0)
    on = await _idle_run(tmp_path / "on", IDLE)
    print(f"idle heartbeats accepted per second by a member: rule 18 off {off['rate']:.2f}, on {on['rate']:.2f}; "
          f"failover after the coordinator's death: off {off['failover']:.1f} s, on {on['failover']:.1f} s")
    assert off["rate"] >= 0.9 * (N - 1) / INTERVAL  # the control: every other member, every interval
    assert on["rate"] <= 1.5 * (N - 1) / IDLE  # at the idle pace
    assert set(on["paces"].values()) == {IDLE} and set(off["paces"].values()) == {INTERVAL}
    assert on["shown"] == {(IDLE, True)} and off["shown"] == {(INTERVAL, False)}
    assert f"heartbeat every {IDLE:g} s (idle: no round due)" in on["text"]
    assert f"heartbeat every {INTERVAL:g} s" in off["text"] and "(idle" not in off["text"]
    for run in (off, on):  # the joiner followed the coordinator: no new term
        assert run["joined"] == {"coordinator": run["coordinator"], "terms": {1}}
    liveness = 2.5 * INTERVAL
    assert off["failover"] <= liveness + 2 * liveness + 2  # detection + a claim timeout or so
    # its last heartbeat was up to IDLE before its death, and counts for liveness x its pace
    assert liveness * IDLE / INTERVAL - IDLE <= on["failover"] <= liveness * IDLE / INTERVAL + 2 * liveness + 2
