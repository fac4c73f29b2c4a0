"""The r36 fork of issue 13, reproduced on the memory transport and the virtual clock.

Round r36-t1 was published in term 1 with merged adapter 80b543de on two nodes. A third node had
missed the announce (restarted with a corrupt latest merged blob) and its sync of the round kept
failing ("No known addresses to peer"). When the coordinator was stopped, that node became
coordinator in term 2, aggregated r36 again from a different set of updates and published 197cd0ce:
two merged adapters for one round.

Here: 4 nodes; node X (the one the election picks next) never receives the coordinator K's own
submission nor its AggregateAnnounce over gossip (so its accepted set differs), and every sync
request it makes fails until the test lifts that. K is killed after the others installed the
round. X becomes coordinator; it must not aggregate the round while it cannot learn its outcome,
and once sync works it must adopt K's announce: every node ends with K's merged sha256, and X never
publishes an AggregateAnnounce for the round. (Before round-v1 r1, X aggregated its own set as soon
as it took over, published a second merged adapter for the round, and its record disagreed.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fednode.consensus import Phase, Role, rank
from fednode.errors import PeerUnavailable
from fednode.node import daemon as daemon_module
from fednode.node.daemon import Node
from fednode.wire import codec
from fednode.wire.messages import AggregateAnnounce, Message, RoundFailed, RoundManifest, SubmissionAnnounce
from fednode.wire.verdict import Validation, Verdict
from tests.node.checks import check_round_agreement, read_record
from tests.node.conftest import clock as clock_now
from tests.node.conftest import cluster, seed_identity, wait_until

N = 4
SECTIONS: dict[str, dict[str, Any]] = {
    "round": {"min_participants": 2, "max_participants": N, "wait_for_members": N, "max_rounds": 1,
              "round_timeout_seconds": 60.0},
}
BROKEN_SYNC_SECONDS = 40.0  # virtual seconds X stays coordinator of a round it cannot settle


@pytest.fixture
def clock(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    autojump_clock.autojump_threshold = 0.01  # real disk work must not jump the virtual clock
    return autojump_clock


def next_coordinator(coordinator: str, term: int) -> str:
    """Who the election picks for term + 1 once `coordinator` is dead (every other node live)."""
    others = [seed_identity(i).node_id for i in range(N) if seed_identity(i).node_id != coordinator]
    return min(others, key=lambda n: rank(term + 1, n))


class Fault:
    """X's view: K's submission and aggregate never arrive by gossip; its sync requests fail."""

    def __init__(self) -> None:
        self.coordinator = ""  # K, the first coordinator elected
        self.victim = ""  # X
        self.sync_broken = True
        self.dropped: list[str] = []
        self.failed_syncs = 0

    def drops(self, node_id: str, message: Message) -> bool:
        if not self.victim or node_id != self.victim:
            return False
        if isinstance(message, AggregateAnnounce):
            return message.coordinator_node_id == self.coordinator
        return isinstance(message, SubmissionAnnounce) and message.participant_node_id == self.coordinator


async def test_new_coordinator_that_missed_the_announce_adopts_it(tmp_path: Path, clock: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fault = Fault()
    validate = Node._validate

    def lossy_validate(self: Node, data: bytes, received_from: str) -> Validation:
        if fault.victim == self.node_id:
            message = codec.decode(data)
            if fault.drops(self.node_id, message):
                fault.dropped.append(type(message).__name__)
                return Validation(Verdict.IGNORE, "test_dropped")
        return validate(self, data, received_from)

    request_sync = daemon_module.request_sync

    async def failing_sync(transport: Any, peer_id: str, round_id: str, *args: Any, **kwargs: Any) -> list[bytes]:
        if fault.sync_broken and transport.local_peer_id == fault.victim:
            fault.failed_syncs += 1
            raise PeerUnavailable(f"failed to open stream to {peer_id}: No known addresses to peer")
        return await request_sync(transport, peer_id, round_id, *args, **kwargs)

    monkeypatch.setattr(Node, "_validate", lossy_validate)
    monkeypatch.setattr(daemon_module, "request_sync", failing_sync)

    async with cluster(tmp_path) as c:
        for i in range(N):
            await c.start(i, N, **SECTIONS)
        nodes = dict(c.nodes)

        def elected() -> bool:  # K is elected a heartbeat interval before it opens the first round
            for node in nodes.values():
                if node.driver.coordinator:
                    fault.coordinator = node.driver.coordinator
                    fault.victim = next_coordinator(fault.coordinator, node.driver.term)
                    return True
            return False

        # From K's election on, X loses K's submission and aggregate (and every sync request).
        await wait_until(elected, step=0.01)
        await wait_until(lambda: any(n.driver.rounds for n in nodes.values()))
        k = next(i for i, n in nodes.items() if n.node_id == fault.coordinator)
        x = next(i for i, n in nodes.items() if n.node_id == fault.victim)
        others = [i for i in nodes if i not in (k, x)]
        round_id = next(iter(nodes[k].driver.rounds))
        assert nodes[k].driver.rounds[round_id].role is Role.COORDINATOR
        published_by_x: list[Message] = []
        original_publish = nodes[x].publish

        async def recording_publish(message: Message) -> None:
            published_by_x.append(message)
            await original_publish(message)

        nodes[x].publish = recording_publish  # type: ignore[method-assign]
        nodes[x].driver.publish = recording_publish

        # K and the two others install the round; X waits for an outcome it never hears
        await wait_until(lambda: all(nodes[i].driver.progress.rounds_completed >= 1 for i in (k, *others)),
                         timeout=300.0)
        merged = read_record(nodes[k], 1)["merged_sha256"]
        assert "AggregateAnnounce" in fault.dropped and "SubmissionAnnounce" in fault.dropped
        assert nodes[x].driver.rounds[round_id].phase not in (Phase.PUBLISHED, Phase.FAILED)
        assert fault.coordinator not in nodes[x].driver.rounds[round_id].accepted  # a different set

        c.kill(k)  # the coordinator goes away; X is next in line
        await wait_until(lambda: nodes[x].driver.coordinator == nodes[x].node_id, timeout=120.0)
        state = nodes[x].driver.rounds[round_id]
        took_over = trio.current_time()
        waited = max(BROKEN_SYNC_SECONDS, state.deadline - clock_now() + 5.0)
        await trio.sleep(waited)  # past the round's deadline too
        assert fault.failed_syncs > 0
        # the fork: X aggregated its own set and announced a second merged adapter for the round
        assert not [m for m in published_by_x if isinstance(m, AggregateAnnounce)]
        assert state.role is Role.COORDINATOR and state.outcome_unknown and not state.aggregation_started
        assert state.phase is Phase.AGGREGATING  # collection ended at the deadline; nothing concluded
        assert nodes[x].status().progress.unsettled_rounds == [round_id]

        fault.sync_broken = False  # the network heals: X's next query reaches a holder
        await wait_until(lambda: nodes[x].driver.progress.rounds_completed >= 1, timeout=120.0)
        assert trio.current_time() - took_over < waited + 30.0
        survivors = [nodes[i] for i in (x, *others)]
        record = check_round_agreement(survivors, 1)
        assert record["merged_sha256"] == merged
        x_record = read_record(nodes[x], 1)
        assert x_record["merged_sha256"] == merged and "outcome_conflicts" not in x_record
        assert fault.coordinator in [a["node_id"] for a in x_record["accepted"]]  # K's announce is the record
        assert (x_record["final_coordinator_node_id"], x_record["final_term"]) == (fault.coordinator, 1)  # K concluded
        assert not any(isinstance(m, AggregateAnnounce) for m in published_by_x)  # no second announce
        for node in survivors:
            assert node.status().progress.outcome_conflicts == 0


# ---- two claimants of one term (fault seed 1038748767, sequence s21) ---------------------------------

RIVAL_SECTIONS: dict[str, dict[str, Any]] = {
    "round": {"min_participants": 2, "max_participants": N, "wait_for_members": N, "max_rounds": 3,
              "round_timeout_seconds": 60.0},
    "learning": {"fake_aggregate_delay_seconds": 20.0},  # the first coordinator dies while aggregating
}
CUT_SECONDS = 90.0  # virtual seconds B hears nothing from A after the coordinator died


class OneWayCut:
    """B receives nothing A signs over gossip (claims, heartbeats, round messages) until lifted;
    everything else flows. In the fault runner's seed 1038748767, node-3 did not receive node-1's
    claim for term 9 for 16 s while node-0 had both."""

    def __init__(self) -> None:
        self.a = ""
        self.b = ""
        self.dropped = 0

    def drops(self, node_id: str, message: Message) -> bool:
        if not self.b or node_id != self.b:
            return False
        return bool(getattr(message, message.SIGNER_FIELD, "") == self.a)


async def test_two_claimants_of_one_term_do_not_both_conclude(tmp_path: Path, clock: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator K of term t dies while aggregating round 1. A is the candidate for t+1 in
    every view but B's: B hears nothing from A, so B is its own candidate. Both claim t+1; C and A
    see both claims and follow A; B follows itself. Before election-v1 rule 13, each asked the live
    members it knew for round 1's outcome, heard "none", aggregated and announced it, and each opened
    round 2 of term t+1: two outcomes for r2. Now neither concludes nor opens a round while a live
    member follows the other (A hears B's heartbeats naming B; B hears C's naming A). When the cut
    lifts, B adopts A's better claim and A concludes round 1: one outcome, the same on every node."""
    cut = OneWayCut()
    validate = Node._validate

    def lossy_validate(self: Node, data: bytes, received_from: str) -> Validation:
        if cut.b == self.node_id and cut.drops(self.node_id, codec.decode(data)):
            cut.dropped += 1
            return Validation(Verdict.IGNORE, "test_dropped")
        return validate(self, data, received_from)

    monkeypatch.setattr(Node, "_validate", lossy_validate)

    async with cluster(tmp_path) as c:
        for i in range(N):
            await c.start(i, N, **RIVAL_SECTIONS)
        nodes = dict(c.nodes)
        await wait_until(lambda: any(n.driver.rounds for n in nodes.values()))
        k = next(i for i, n in nodes.items() if n.driver.coordinator == n.node_id)
        term = nodes[k].driver.term
        round_id = next(iter(nodes[k].driver.rounds))
        rest = sorted((nodes[i].node_id for i in nodes if i != k), key=lambda n: rank(term + 1, n))
        a_id, b_id, c_id = rest  # A: the candidate for t+1 with everyone live; B: with A unheard
        index = {n.node_id: i for i, n in nodes.items()}
        a, b, cc = index[a_id], index[b_id], index[c_id]
        published: dict[str, list[Message]] = {a_id: [], b_id: []}
        for who in (a, b):
            original = nodes[who].publish

            async def recording(message: Message, original: Any = original, who: str = nodes[who].node_id) -> None:
                published[who].append(message)
                await original(message)

            nodes[who].publish = recording  # type: ignore[method-assign]
            nodes[who].driver.publish = recording

        # every submission is in and K aggregates (slowly); B stops hearing A, then K dies
        await wait_until(lambda: nodes[k].driver.rounds[round_id].phase is Phase.AGGREGATING, step=0.05)
        cut.a, cut.b = a_id, b_id
        await trio.sleep(5.0)  # A's last heartbeat ages out at B (liveness timeout 2.5 s)
        c.kill(k)
        await wait_until(lambda: nodes[a].driver.coordinator == a_id and nodes[b].driver.coordinator == b_id
                         and nodes[cc].driver.coordinator == a_id, timeout=60.0, step=0.05)
        assert nodes[a].driver.term == nodes[b].driver.term == term + 1  # two claimants of one term
        await trio.sleep(CUT_SECONDS)
        assert cut.dropped > 0
        concluded = (AggregateAnnounce, RoundFailed, RoundManifest)
        assert not [m for m in published[b_id] if isinstance(m, concluded)], \
            "B concluded or opened a round while C followed A"
        assert not [m for m in published[a_id] if isinstance(m, concluded)], \
            "A concluded or opened a round while B followed itself"
        assert nodes[a].driver.rounds[round_id].outcome_unknown

        cut.a = cut.b = ""  # the claims cross: B adopts A, A is endorsed by every live member
        await wait_until(lambda: all(nodes[i].driver.progress.rounds_completed >= 1 for i in (a, b, cc)),
                         timeout=120.0)
        survivors = [nodes[i] for i in (a, b, cc)]
        record = check_round_agreement(survivors, 1)
        assert record["final_coordinator_node_id"] == a_id
        assert not [m for m in published[b_id] if isinstance(m, concluded)]
        assert {a_id, b_id, c_id} <= {x["node_id"] for x in record["accepted"]}  # K's blob died with it
        for node in survivors:
            assert node.status().progress.outcome_conflicts == 0


# ---- a live view that is a minority (fault seed 1038748767, sequence s19) ----------------------------

MINORITY_SECTIONS: dict[str, dict[str, Any]] = {
    "round": {"min_participants": 2, "max_participants": N, "wait_for_members": N, "max_rounds": 1,
              "round_timeout_seconds": 60.0},
}
HEAL_AFTER_SECONDS = 15.0  # well inside the rejoin wait (30 heartbeat intervals of 1 s)


async def test_a_coordinator_that_hears_a_minority_does_not_call_a_round_unpublished(
        tmp_path: Path, clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """K concludes round 1 and only D receives its AggregateAnnounce (X and C lose it, and their
    syncs to K fail). D is cut off from X and C, then K dies. X wins the next term hearing C alone;
    C answers "no outcome". Before round-v1 r7 that settled the round (every live member had
    answered) and X published a second merged adapter. Now X and C are 2 of the 4 members heard
    within the rejoin wait, so X keeps asking; once D is reachable again its answer holds K's
    announce, and every node ends with K's merged adapter."""
    state: dict[str, Any] = {"k": "", "blind": set(), "broken_to": ""}
    validate = Node._validate
    request_sync = daemon_module.request_sync

    def lossy_validate(self: Node, data: bytes, received_from: str) -> Validation:
        if self.node_id in state["blind"]:
            message = codec.decode(data)
            if isinstance(message, AggregateAnnounce) and message.coordinator_node_id == state["k"]:
                return Validation(Verdict.IGNORE, "test_dropped")
        return validate(self, data, received_from)

    async def failing_sync(transport: Any, peer_id: str, round_id: str, *args: Any, **kwargs: Any) -> list[bytes]:
        if transport.local_peer_id in state["blind"] and peer_id == state["broken_to"]:
            raise PeerUnavailable(f"failed to open stream to {peer_id}: No known addresses to peer")
        return await request_sync(transport, peer_id, round_id, *args, **kwargs)

    monkeypatch.setattr(Node, "_validate", lossy_validate)
    monkeypatch.setattr(daemon_module, "request_sync", failing_sync)

    async with cluster(tmp_path) as c:
        for i in range(N):
            await c.start(i, N, **MINORITY_SECTIONS)
        nodes = dict(c.nodes)
        # K is elected a heartbeat interval before it opens the round: the cut starts at once
        await wait_until(lambda: any(n.driver.coordinator for n in nodes.values()), step=0.01)
        k_id = next(n.driver.coordinator for n in nodes.values() if n.driver.coordinator)
        k = next(i for i, n in nodes.items() if n.node_id == k_id)
        term = next(n.driver.term for n in nodes.values() if n.driver.coordinator)
        others = sorted((i for i in nodes if i != k), key=lambda i: rank(term + 1, nodes[i].node_id))
        x, cc, d = others  # X and C will see each other only; D holds K's announce
        state["k"], state["broken_to"] = nodes[k].node_id, nodes[k].node_id
        state["blind"] = {nodes[x].node_id, nodes[cc].node_id}
        c.network.partition({nodes[d].node_id}, {nodes[x].node_id, nodes[cc].node_id})
        published_by_x: list[Message] = []
        original = nodes[x].publish

        async def recording(message: Message) -> None:
            published_by_x.append(message)
            await original(message)

        nodes[x].publish = recording  # type: ignore[method-assign]
        nodes[x].driver.publish = recording
        await wait_until(lambda: all(nodes[i].driver.progress.rounds_completed >= 1 for i in (k, d)), timeout=300.0)
        merged = read_record(nodes[k], 1)["merged_sha256"]
        assert nodes[x].driver.progress.rounds_completed == nodes[cc].driver.progress.rounds_completed == 0

        c.kill(k)
        await wait_until(lambda: nodes[x].driver.coordinator == nodes[x].node_id
                         and nodes[cc].driver.coordinator == nodes[x].node_id, timeout=60.0)
        await trio.sleep(HEAL_AFTER_SECONDS)
        assert not [m for m in published_by_x if isinstance(m, AggregateAnnounce | RoundFailed)], \
            "X called the round unpublished from a minority's answers"
        assert nodes[x].driver.rounds[next(iter(nodes[x].driver.rounds))].outcome_unknown

        c.network.heal()
        c.network.link(nodes[d].node_id, nodes[x].node_id)  # D's only link was to K
        await wait_until(lambda: all(nodes[i].driver.progress.rounds_completed >= 1 for i in (x, cc)), timeout=120.0)
        survivors = [nodes[i] for i in (x, cc, d)]
        record = check_round_agreement(survivors, 1)
        assert record["merged_sha256"] == merged
        assert not [m for m in published_by_x if isinstance(m, AggregateAnnounce)]
        for node in survivors:
            assert node.status().progress.outcome_conflicts == 0
