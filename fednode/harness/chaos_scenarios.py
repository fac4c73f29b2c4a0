"""The five chaos scenarios over real `fednode run` daemons (libp2p on 127.0.0.1, fake task).

Each takes the options and a fresh run dir, raises ScenarioFailed when a promise is broken and
returns what it measured. Victims are chosen by what the daemons report (role, training state),
never by index, because the coordinator is elected.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from fednode.consensus.round_state import Phase, Role
from fednode.harness.chaos_support import (
    ChaosOptions,
    Federation,
    ScenarioFailed,
    Statuses,
    accepted_ids,
    check,
    completed,
    current_round,
    one_merged_hash,
    training,
)
from fednode.harness.cluster import NodeProcess
from fednode.node.reports import CurrentRound, TrainingState

Status = Statuses


def _slowness(node: NodeProcess) -> int:
    return 1 + node.index % 4  # FakeTrainer: node i's steps take (1 + i mod 4) x fake_step_seconds


def _collecting(fed: Federation, st: Status, round_number: int) -> NodeProcess | None:
    """The agreed coordinator, once it is collecting round `round_number`."""
    coordinator = fed.agreed_coordinator(st)
    cur = current_round(st.get(coordinator.index)) if coordinator else None
    if coordinator and cur and cur.round_number == round_number and cur.state is Phase.COLLECTING \
            and cur.role is Role.COORDINATOR:
        return coordinator
    return None


def _training(fed: Federation, st: Status, round_number: int, exclude: set[int]) -> list[NodeProcess]:
    """Live nodes (not in `exclude`) training round `round_number` right now, slowest first."""
    out = []
    for node in fed.nodes:
        tr = training(st.get(node.index))
        if node.alive and node.index not in exclude and tr and tr.round_number == round_number \
                and tr.state is TrainingState.TRAINING and tr.step >= 1:
            out.append(node)
    return sorted(out, key=lambda n: -_slowness(n))


async def coordinator_killed(opts: ChaosOptions, run_dir: Path) -> dict[str, Any]:
    """a. SIGKILL the coordinator mid-collection (>= 1 submission accepted): a new coordinator is
    elected and the round completes on every survivor; time to recovery is bounded."""
    n = opts.nodes
    fed = Federation.create(run_dir, opts, rounds=1, min_participants=n - 1)
    try:
        await fed.start()

        def mid_collection(st: Status) -> tuple[NodeProcess, CurrentRound] | None:
            coordinator = _collecting(fed, st, 1)
            if coordinator is None:
                return None
            cur = current_round(st[coordinator.index])
            return (coordinator, cur) if cur and cur.submissions >= 1 else None

        victim, cur = await fed.wait_for(mid_collection, "the coordinator has accepted a submission of round 1")
        old_term = fed.statuses[victim.index].term
        killed_at = fed.kill(victim)
        t0 = time.monotonic()
        survivors = [node for node in fed.nodes if node is not victim]
        successor = await fed.wait_for(lambda st: fed.agreed_coordinator(st, survivors),
                                       "the survivors agree on a new coordinator")
        failover = time.monotonic() - t0
        await fed.wait_for(completed(survivors, 1), "every survivor installed round 1")
        records = fed.published(survivors, 1)
        merged = one_merged_hash(records, "round 1")
        recovery = max(r.finished_at for r in records.values()) - killed_at
        final = records[successor.index]
        check(successor is not victim, "the killed coordinator is still named coordinator")
        check(final.final_coordinator_node_id == successor.node_id != victim.node_id,
              "the round was not finished by the new coordinator")
        check(fed.statuses[successor.index].term > old_term, "the term did not grow")
        check(len(final.accepted) >= n - 1, f"only {len(final.accepted)} contributions, min {n - 1}")
        check(victim.node_id not in accepted_ids(final), "the dead coordinator's update was aggregated")
        check(recovery <= opts.recovery_bound_seconds,
              f"recovery took {recovery:.1f} s > bound {opts.recovery_bound_seconds:.0f} s")
        return {"killed_node": victim.index, "submissions_at_kill": cur.submissions,
                "new_coordinator": successor.index, "continued": final.round_id == cur.round_id,
                "round_id_at_kill": cur.round_id, "round_id_final": final.round_id,
                "failover_seconds": round(failover, 2), "recovery_seconds": round(recovery, 2),
                "recovery_bound_seconds": opts.recovery_bound_seconds,
                "contributions": len(final.accepted), "merged_sha256": merged}
    finally:
        fed.stop()


async def participant_killed(opts: ChaosOptions, run_dir: Path) -> dict[str, Any]:
    """b. SIGKILL one participant right after it announced its update (the coordinator is pulling
    the blob) and another one mid-training: the round completes with the rest (>= min_participants)."""
    n = opts.nodes
    min_participants = n - 2
    fed = Federation.create(run_dir, opts, rounds=1, min_participants=min_participants)
    try:
        await fed.start()
        coordinator = await fed.wait_for(lambda st: _collecting(fed, st, 1), "round 1 is collecting")

        def announced(st: Status) -> NodeProcess | None:
            for node in fed.nodes:
                tr = training(st.get(node.index))
                if node is not coordinator and tr and tr.round_number == 1 and tr.state is TrainingState.SUBMITTED:
                    return node
            return None

        uploader = await fed.wait_for(announced, "a participant announced its round-1 update")
        fed.kill(uploader)
        trainer = await fed.wait_for(
            lambda st: next(iter(_training(fed, st, 1, {coordinator.index, uploader.index})), None),
            "another participant is training round 1")
        killed_at = fed.kill(trainer)
        survivors = [node for node in fed.nodes if node not in (uploader, trainer)]
        await fed.wait_for(completed(survivors, 1), "every survivor installed round 1")
        records = fed.published(survivors, 1)
        merged = one_merged_hash(records, "round 1")
        final = records[coordinator.index]
        ids = accepted_ids(final)
        check(trainer.node_id not in ids, "the participant killed mid-training was aggregated")
        check({s.node_id for s in survivors} <= ids, "a surviving participant's update is missing")
        check(len(ids) >= min_participants, f"{len(ids)} contributions < min_participants {min_participants}")
        return {"coordinator": coordinator.index, "killed_after_announce": uploader.index,
                "killed_mid_training": trainer.index, "announced_update_included": uploader.node_id in ids,
                "contributions": len(ids), "min_participants": min_participants,
                "kill_to_published_seconds": round(max(r.finished_at for r in records.values()) - killed_at, 2),
                "merged_sha256": merged}
    finally:
        fed.stop()


async def node_restarted(opts: ChaosOptions, run_dir: Path) -> dict[str, Any]:
    """c. SIGKILL a participant mid-training and start it again on the same data dir: it rejoins and
    ends with the same merged adapter as everyone, for that round and the next."""
    n = opts.nodes
    fed = Federation.create(run_dir, opts, rounds=2, min_participants=n - 1)
    try:
        await fed.start()
        coordinator = await fed.wait_for(lambda st: _collecting(fed, st, 1), "round 1 is collecting")
        victim = await fed.wait_for(lambda st: next(iter(_training(fed, st, 1, {coordinator.index})), None),
                                    "a participant is training round 1")
        fed.kill(victim)
        t0 = time.monotonic()
        fed.cluster.start([victim])
        await fed.wait_for(lambda st: victim.index in st, "the restarted node answers")
        back = time.monotonic() - t0
        await fed.wait_for(completed(fed.nodes, 2), "every node installed rounds 1 and 2")
        out: dict[str, Any] = {"coordinator": coordinator.index, "restarted_node": victim.index,
                               "restart_seconds": round(back, 2)}
        for number in (1, 2):
            records = fed.published(fed.nodes, number)
            out[f"round_{number}_merged_sha256"] = one_merged_hash(records, f"round {number}")
            final = next((r for r in records.values() if r.final_coordinator_node_id == r.recorded_by), None)
            check(final is not None, f"round {number}: no record from the node that finished it")
            assert final is not None
            out[f"round_{number}_restarted_node_contributed"] = victim.node_id in accepted_ids(final)
            check(len(final.accepted) >= n - 1, f"round {number}: {len(final.accepted)} contributions")
        return out
    finally:
        fed.stop()


async def straggler(opts: ChaosOptions, run_dir: Path) -> dict[str, Any]:
    """d. One node trains far slower than the deadline: it is left out and the round is published at
    the deadline, not when the straggler would be done."""
    n = opts.nodes
    deadline = opts.straggler_deadline_seconds
    slow = n - 1  # started last, so it is never the coordinator (terms change only on silence)
    factor = 1 + slow % 4
    step = max(opts.step_seconds, 3 * deadline / (opts.local_steps * factor))
    fed = Federation.create(run_dir, opts, rounds=1, min_participants=n - 1,
                            overrides={"round": {"round_timeout_seconds": deadline}},
                            node_overrides={slow: {"learning": {"fake_step_seconds": step}}})
    laggard = fed.nodes[slow]
    try:
        others = fed.nodes[:slow]
        await fed.start(others)
        coordinator = await fed.wait_for(lambda st: fed.agreed_coordinator(st, others),
                                         "the others agree on a coordinator")
        await fed.start([laggard])
        await fed.wait_for(completed(others, 1), "every other node installed round 1",
                           timeout=opts.scenario_timeout_seconds + deadline)
        late = training(fed.statuses.get(slow))
        records = fed.published(others, 1)
        merged = one_merged_hash(records, "round 1")
        final = records[coordinator.index]
        wall = final.finished_at - final.created_at
        ids = accepted_ids(final)
        check(laggard.node_id not in ids, "the straggler's update was aggregated")
        check(ids == {o.node_id for o in others}, "an on-time participant's update is missing")
        check(deadline - 0.5 <= wall <= deadline + opts.straggler_slack_seconds,
              f"round took {wall:.1f} s; deadline {deadline:.0f} s (+{opts.straggler_slack_seconds:.0f} s slack)")
        check(late is not None and late.state is TrainingState.TRAINING,
              f"the straggler was not still training when the round was published: {late}")
        assert late is not None
        return {"coordinator": coordinator.index, "straggler": slow, "deadline_seconds": deadline,
                "round_wall_seconds": round(wall, 2), "straggler_training_seconds": round(step * factor *
                                                                                          opts.local_steps, 1),
                "straggler_step_at_publish": f"{late.step}/{late.steps}",
                "contributions": len(ids), "merged_sha256": merged}
    finally:
        if laggard.alive:
            fed.kill(laggard)  # its worker thread sleeps through SIGTERM; nothing to flush
        fed.stop()


async def coordinator_restarted(opts: ChaosOptions, run_dir: Path) -> dict[str, Any]:
    """e. Kill the coordinator while it holds the closed submissions but has not aggregated, restart it
    at once: no accepted submission is lost and the merged adapter is bit-identical to an
    uninterrupted run of the same configuration (same keys, deterministic fake training), which
    runs alongside."""
    n = opts.nodes
    kwargs: dict[str, Any] = {
        "rounds": 1, "min_participants": n - 1, "liveness_heartbeats": opts.restart_liveness_heartbeats,
        "overrides": {"learning": {"fake_aggregate_delay_seconds": opts.aggregate_delay_seconds}}}
    reference = Federation.create(run_dir / "ref", opts, **kwargs)
    fed = Federation.create(run_dir / "run", opts, keys_from=run_dir / "ref", **kwargs)
    outcomes: dict[str, Any] = {}

    async def outcome(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            outcomes[name] = await fn()
        except ScenarioFailed as exc:  # reported after both runs ended, not as an exception group
            outcomes[name] = exc

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outcome, "uninterrupted", lambda: _uninterrupted(reference))
            nursery.start_soon(outcome, "restarted", lambda: _kill_and_restart_aggregating(fed))
    finally:
        reference.stop()
        fed.stop()
    for value in outcomes.values():
        if isinstance(value, ScenarioFailed):
            raise value
    ref_merged, ref_ids = outcomes["uninterrupted"]
    out, merged, ids = outcomes["restarted"]
    check(ref_ids == {node.node_id for node in reference.nodes}, "the uninterrupted run left someone out")
    check(ids == ref_ids, "the aggregated set differs from the uninterrupted run's")
    check(merged == ref_merged, f"merged {merged[:16]} != uninterrupted {ref_merged[:16]}")
    return {**out, "merged_sha256": merged, "uninterrupted_merged_sha256": ref_merged}


async def _uninterrupted(fed: Federation) -> tuple[str, set[str]]:
    await fed.start()
    await fed.wait_for(completed(fed.nodes, 1), "the uninterrupted run installed round 1")
    records = fed.published(fed.nodes, 1)
    return one_merged_hash(records, "uninterrupted round 1"), accepted_ids(next(iter(records.values())))


async def _kill_and_restart_aggregating(fed: Federation) -> tuple[dict[str, Any], str, set[str]]:
    await fed.start()

    def aggregating(st: Status) -> tuple[NodeProcess, CurrentRound] | None:
        coordinator = fed.agreed_coordinator(st)
        cur = current_round(st.get(coordinator.index)) if coordinator else None
        if coordinator and cur and cur.round_number == 1 and cur.state is Phase.AGGREGATING \
                and cur.role is Role.COORDINATOR:
            return coordinator, cur
        return None

    victim, cur = await fed.wait_for(aggregating, "the coordinator closed round 1 and is aggregating")
    killed_at = fed.kill(victim)
    t0 = time.monotonic()
    fed.cluster.start([victim])
    await fed.wait_for(lambda st: victim.index in st, "the restarted coordinator answers")
    back = time.monotonic() - t0
    await fed.wait_for(completed(fed.nodes, 1), "every node installed round 1")
    records = fed.published(fed.nodes, 1)
    merged = one_merged_hash(records, "round 1")
    final = records[victim.index]
    ids = accepted_ids(final)
    check(len(ids) == cur.submissions, f"{cur.submissions} submissions accepted at the kill, {len(ids)} aggregated")
    out = {"coordinator": victim.index, "submissions_at_kill": cur.submissions,
           "failover": final.final_coordinator_node_id != victim.node_id, "restart_seconds": round(back, 2),
           "kill_to_published_seconds": round(max(r.finished_at for r in records.values()) - killed_at, 2)}
    return out, merged, ids


SCENARIOS = {
    "coordinator_killed": coordinator_killed,
    "participant_killed": participant_killed,
    "node_restarted": node_restarted,
    "straggler": straggler,
    "coordinator_restarted": coordinator_restarted,
}
