"""Whom a member asks for a round's merged adapter (issue 12, bench_scale at 32 daemons): first the
coordinator and the members whose heartbeat names the adapter, the round's other participants only
on a retry. Asking every participant at once made each fetch up to max_sources streams, most of them
answered not_found, since right after the publish few participants hold the adapter yet."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from fednode.errors import TransferError
from tests.node.checks import check_round_agreement
from tests.node.conftest import cluster, wait_until

N = 4


@pytest.mark.parametrize("first_fails", [False, True])
async def test_the_merged_adapter_is_asked_of_known_holders_first(tmp_path: Path, autojump_clock: trio.abc.Clock,
                                                                  first_fails: bool) -> None:
    sections = {"round": {"min_participants": N, "max_participants": N, "wait_for_members": N, "max_rounds": 1}}
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, N, **sections) for i in range(N)]
        calls: dict[int, list[tuple[list[str], set[str], set[str]]]] = {i: [] for i in range(N)}

        def spy(i: int) -> None:
            d = nodes[i].driver
            fetch = d._fetch

            async def recording(sha: str, size: int | None, holders: list[str]) -> None:
                state = next((s for s in d.rounds.values() if s.merged_sha256 == sha), None)
                if state is not None:  # the merged adapter (not an update, not a start adapter)
                    participants = {a.participant_node_id for a in state.accepted.values()}
                    calls[i].append((list(holders), set(d.holders(sha)) | {state.coordinator_node_id},
                                     participants))
                    if first_fails and len(calls[i]) == 1:
                        raise TransferError(f"blob {sha}: no holder served it")
                await fetch(sha, size, holders)

            d._fetch = recording  # type: ignore[method-assign]

        for i in range(N):
            spy(i)
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= 1 for n in nodes))
        check_round_agreement(nodes, 1)
        fetched = {i: v for i, v in calls.items() if v}
        assert len(fetched) >= N - 1  # every member but the coordinator fetched it
        for attempts in fetched.values():
            holders, known, participants = attempts[0]
            assert set(holders) <= known  # first: only the coordinator and announced holders
            if first_fails:
                holders, _, participants = attempts[1]
                assert participants <= set(holders)  # the retry asks the participants too
