"""election-v1 rule 14 end to end (memory transport, virtual clock): in a 12-member community with
heartbeat_fanin = 4, members other than the coordinator beat every ~3 intervals, so an idle
member hears less than half the heartbeats it hears with pacing off; the coordinator keeps its
pace, and when it crashes the community elects another and finishes the next round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from fednode.consensus import ClaimSeen
from fednode.node.daemon import Node
from fednode.wire import CoordinatorClaim, Heartbeat, Message, codec
from tests.node.checks import check_round_agreement
from tests.node.conftest import cluster, seed_identity, wait_until

N = 12
INTERVAL = 1.0  # the test cluster's heartbeat_interval_seconds
IDLE_SECONDS = 60.0


def _sections(fanin: int, rounds: int) -> dict[str, dict[str, Any]]:
    # rule 18 (an idle coordinator's slow pace, followed by its members) off: rule 14 alone is measured
    return {"coordinator": {"heartbeat_fanin": fanin, "max_heartbeat_interval_seconds": 10.0,
                            "idle_heartbeat_interval_seconds": 0},
            # wait_for_members: after the coordinator's crash only N - 1 are left to wait for
            "round": {"max_rounds": rounds, "pause_seconds": 5.0, "wait_for_members": N - 1},
            "learning": {"evaluate": False}}


def _installed(node: Node) -> int:
    return int(node.driver.progress.last_merged.get("round_number", 0))


async def _idle_heartbeat_rate(tmp: Path, fanin: int) -> float:
    """Heartbeats per second an idle member accepts once round 1 is done."""
    async with cluster(tmp, auto_link_degree=3) as c:
        nodes = [await c.start(i, N, **_sections(fanin, 1)) for i in range(N)]
        await wait_until(lambda: all(_installed(n) >= 1 for n in nodes), timeout=300)
        coordinator = nodes[0].driver.coordinator
        member = next(n for n in nodes if n.node_id != coordinator)
        before = member.counters["accepted"]["heartbeat"]
        await trio.sleep(IDLE_SECONDS)
        return (member.counters["accepted"]["heartbeat"] - before) / IDLE_SECONDS


async def test_paced_members_halve_the_idle_heartbeat_rate(tmp_path: Path, autojump_clock,  # type: ignore[no-untyped-def]
                                                          inline_threads) -> None:
    autojump_clock.autojump_threshold = 0.0
    unpaced = await _idle_heartbeat_rate(tmp_path / "off", 0)
    paced = await _idle_heartbeat_rate(tmp_path / "on", 4)
    print(f"idle heartbeats accepted per second by a member: pacing off {unpaced:.2f}, fanin 4 {paced:.2f}")
    assert unpaced >= 0.9 * (N - 1) / INTERVAL  # every other member, every interval
    assert paced <= 0.5 * unpaced


async def test_paced_members_still_fail_over_and_finish_rounds(tmp_path: Path, autojump_clock,  # type: ignore[no-untyped-def]
                                                              inline_threads) -> None:
    autojump_clock.autojump_threshold = 0.0
    async with cluster(tmp_path, auto_link_degree=3) as c:
        nodes = [await c.start(i, N, **_sections(4, 3)) for i in range(N)]
        await wait_until(lambda: all(_installed(n) >= 1 for n in nodes), timeout=300)
        coordinator = nodes[0].driver.coordinator
        assert coordinator is not None and all(n.driver.coordinator == coordinator for n in nodes)
        leader = next(n for n in nodes if n.node_id == coordinator)
        now = leader.clock()
        # the coordinator keeps heartbeat_interval; the members declare ~N/fanin intervals
        assert leader.election.heartbeat_interval(now) == INTERVAL
        declared = [m.interval for node_id, m in leader.election.members.items() if node_id != coordinator]
        assert len(declared) == N - 1 and all(2.0 * INTERVAL <= d <= 3.0 * INTERVAL for d in declared), declared
        # its crash: the others elect a new coordinator, which every member names within an interval
        # of its claim (rule 14's early heartbeat; they beat at full pace once the old one is silent)
        c.kill(next(i for i, n in c.nodes.items() if n.node_id == coordinator))
        live = [n for n in nodes if n.node_id != coordinator]
        await wait_until(lambda: len({n.driver.coordinator for n in live}) == 1
                         and live[0].driver.coordinator not in (None, coordinator), timeout=120)
        successor = next(n for n in live if n.node_id == live[0].driver.coordinator)
        await wait_until(lambda: not successor.election.unendorsed(successor.clock()), timeout=60)
        assert successor.clock() - successor.election.coordinator_since <= 2 * INTERVAL + 0.5
        await wait_until(lambda: all(_installed(n) >= 3 for n in live), timeout=600)
        for number in (1, 2, 3):
            check_round_agreement(live, number)


async def test_a_paced_member_names_a_new_coordinator_within_an_interval(tmp_path: Path, autojump_clock,  # type: ignore[no-untyped-def]
                                                                         inline_threads) -> None:
    """A coordinator change while the old one is live (a later term's claim): a member pacing every ~3
    intervals answers it in a heartbeat one interval after its last, not at its pace (rule 14), so a
    new coordinator is not held back by rule 13 for a whole pace."""
    autojump_clock.autojump_threshold = 0.0
    async with cluster(tmp_path, auto_link_degree=3) as c:
        nodes = [await c.start(i, N, **_sections(4, 1)) for i in range(N)]
        await wait_until(lambda: all(_installed(n) >= 1 for n in nodes), timeout=300)
        coordinator = nodes[0].driver.coordinator
        index, member = next((i, n) for i, n in c.nodes.items() if n.node_id != coordinator)
        rival_index = next(i for i, n in c.nodes.items() if n.node_id not in (coordinator, member.node_id))
        assert member.election.heartbeat_interval(member.clock()) >= 2 * INTERVAL
        sent: list[tuple[float, Heartbeat]] = []
        publish = member.publish

        async def recording(message: Message) -> None:
            if isinstance(message, Heartbeat):
                sent.append((trio.current_time(), message))
            await publish(message)

        member.publish = recording  # type: ignore[method-assign]
        await wait_until(lambda: bool(sent), timeout=60, step=0.01)
        claimed = trio.current_time()  # just after a heartbeat: the next one is a pace away
        rival = c.nodes[rival_index].node_id
        claim = codec.sign(CoordinatorClaim(community_id="test", node_id=rival, term=member.election.term + 1,
                                            claimed_at=member.clock()), seed_identity(rival_index))
        member._election_event(ClaimSeen(claim, member.clock()))
        assert member.driver.coordinator == rival
        await wait_until(lambda: any(hb.coordinator_node_id == rival for _, hb in sent), timeout=60, step=0.01)
        answered = next(at for at, hb in sent if hb.coordinator_node_id == rival)
        assert answered - sent[0][0] <= INTERVAL + 1e-6, (answered - claimed, index)
