"""Randomised fault injection over real daemons (issue 13): 30+ seeded sequences of SIGKILL / SIGTERM /
restart of the coordinator and participants, corrupted and deleted blobs (the latest merged one too,
node running or stopped), a control-socket client that hangs up, and a full disk (a small tmpfs data
dir; root only), spread over two federations of 4 `fednode run` processes (fake task, rounds of
about a second). After each sequence the checker compares every node's round records, state.sqlite
and log: one merged adapter per round, no accepted submission lost or counted twice, no daemon exit
but the injected ones, no traceback, no round sat out over a local blob fault. A node that stops
making progress is reported (printed), not failed (FaultOptions.strict_liveness); a federation that
stops entirely fails the sequences it could not run. Sequence 0 is the fixed r36 case. The seed is
random per run and printed on failure; FEDNODE_FAULTS_SEED=<seed> replays one (also `scripts/faults
--seed <seed>`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fednode.harness.fault_plan import CLIENT, CORRUPT, DELETE, DISK_FULL, KILL, TERM
from fednode.harness.faults import SEED_ENV, FaultOptions, default_seed, run_faults

# In ./scripts/test (a new seed each run). Seed 1038748767 found three forks over three runs on 2026-12-02, each
# fixed by a rule with a memory-transport reproduction in tests/node/test_fork.py: two claimants of one term
# (election-v1 rule 13), a new coordinator that heard a minority, and a restarted coordinator that concluded a
# round nobody heard it conclude (round-v1 r7).
pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SEQUENCES = 31  # the fixed r36 case + 30 random sequences
CLUSTERS = 2
TIME_BOUND_SECONDS = 720.0  # sequences not started by then FAIL as not run: the test never hangs the suite


@pytest.mark.timeout(TIME_BOUND_SECONDS + 180)
async def test_random_fault_sequences_keep_one_merged_adapter_per_round_and_lose_nothing(tmp_path: Path) -> None:
    seed = default_seed()
    print(f"fault plan seed {seed} (replay: {SEED_ENV}={seed})")
    # a short run dir: each daemon binds a unix control socket below it (at most 107 bytes)
    opts = FaultOptions(seed=seed, sequences=SEQUENCES, clusters=CLUSTERS, time_bound_seconds=TIME_BOUND_SECONDS)
    run = await run_faults(opts, tmp_path / "f")
    failed = [r for r in run.results if not r.passed]
    for r in run.results:
        for v in r.violations:
            if r.passed:  # a liveness finding only
                print(f"{r.name}: {v.kind}: {v.detail[:400]}")
    report = "\n".join(f"{r.name} [cluster {r.cluster}] {r.actions}\n" +
                       "\n".join(f"    {v.kind}: {v.detail[:400]}" for v in r.violations) +
                       "".join(f"\n    note: {n}" for n in r.notes if n.startswith("not run")) for r in failed)
    assert len(run.results) == run.planned == SEQUENCES
    assert not failed, (f"seed {seed} ({SEED_ENV}={seed} to replay): {len(failed)}/{SEQUENCES} sequences failed; "
                        f"violations {run.violations_by_kind()}\n{report}")
    assert run.results[0].name == "r36" and run.results[0].executed[:1] == [CORRUPT]
    executed = {kind for r in run.results for kind in r.executed}
    assert {KILL, TERM, CORRUPT, DELETE, CLIENT} <= executed, f"seed {seed}: only {sorted(executed)} ran"
    if os.geteuid() == 0:
        assert run.disk == "tmpfs" and DISK_FULL in executed, (run.disk, sorted(executed))
    else:  # the disk-full case needs a tmpfs mount; the reason is stated, not counted as a pass
        assert DISK_FULL not in executed and "not root" in run.disk
        print(f"disk-full sequences skipped: {run.disk}")
