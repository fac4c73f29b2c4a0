"""Soak over real daemons (issue 12): 4 `fednode run` processes over libp2p on 127.0.0.1, fake task,
300 rounds. After round 20 (warm-up: imports, caches, first retention passes) each daemon's RSS
grows by at most 10 MB, its open fds and threads stay flat, and blobs/ and state.sqlite stay
within the retention bound of `fednode/node/retention.py` (`retention_bound`).

Settings (for wall time; the protocol is the default one): 1 s heartbeats (the harness's), no pause
between rounds, learning.evaluate = false, node.keep_rounds = 10 (so retention runs ~290 times).
Set FEDNODE_DAEMON_SOAK_ROUNDS to soak longer.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import statistics
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from fednode.harness.cluster import LocalCluster
from fednode.harness.run import HarnessOptions, default_overrides, poll
from fednode.node.retention import retention_bound

N_DAEMONS = 4
SOAK_ROUNDS = int(os.environ.get("FEDNODE_DAEMON_SOAK_ROUNDS", "300"))
WARM_UP_ROUNDS = 20
KEEP_ROUNDS = 10
RSS_GROWTH_LIMIT_BYTES = 10 * 1000 * 1000  # 10 MB after the warm-up
FD_SLACK = 4  # a control-socket query or a stream being opened at the moment of a sample
FD_BURST = 16  # at most this many more at one sample: a round's blob and sync streams in flight
TREND_SAMPLES = 10  # "flat" compares the median of this many first and last samples after the warm-up
THREAD_SLACK = 2  # trio's idle worker-thread cache may hold one more or less at a sample
SQLITE_SIZE_SLACK = 1.25  # freed pages are reused, not returned: the file plateaus, within this factor
SAMPLE_SECONDS = 2.0
SOAK_TIMEOUT_SECONDS = 30.0 + 2.0 * SOAK_ROUNDS  # ~0.3 s a round alone on 2 cores; generous under load


@dataclass
class Sample:
    rounds: int
    rss: int
    fds: int
    threads: int
    blobs: int
    blob_bytes: int
    sqlite_bytes: int
    round_rows: int
    submission_rows: int


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS in bytes, threads) of a live process."""
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return rss, threads


def sample(pid: int, data_dir: Path, rounds: int) -> Sample:
    rss, threads = proc_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    blobs = [p for p in (data_dir / "blobs").iterdir() if p.is_file()] if (data_dir / "blobs").is_dir() else []
    blob_bytes = 0
    for p in blobs:
        with contextlib.suppress(FileNotFoundError):  # collected between listing and stat
            blob_bytes += p.stat().st_size
    db = data_dir / "state.sqlite"
    sqlite_bytes = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)) as conn:
        round_rows = int(conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
        submission_rows = int(conn.execute("SELECT COUNT(*) FROM submissions").fetchone()[0])
    return Sample(rounds, rss, fds, threads, len(blobs), blob_bytes, sqlite_bytes, round_rows, submission_rows)


@pytest.mark.slow
@pytest.mark.timeout(int(SOAK_TIMEOUT_SECONDS) + 120)
async def test_four_daemons_three_hundred_rounds_stay_flat(tmp_path: Path) -> None:
    wall = time.monotonic()
    overrides = default_overrides(HarnessOptions(nodes=N_DAEMONS, rounds=SOAK_ROUNDS))
    overrides["round"].update(pause_seconds=0.0)
    overrides.setdefault("learning", {}).update(task="fake", evaluate=False)
    overrides.setdefault("node", {}).update(keep_rounds=KEEP_ROUNDS)
    cluster = LocalCluster.create(tmp_path / "run", federated=N_DAEMONS, gate_off=0, template={},
                                  overrides=overrides)
    samples: dict[int, list[Sample]] = {nd.index: [] for nd in cluster.nodes}
    try:
        cluster.start(cluster.nodes[:2])
        cluster.start(cluster.nodes[2:])
        with trio.fail_after(SOAK_TIMEOUT_SECONDS):
            while True:
                statuses = await poll(cluster, timeout=10.0)
                dead = [nd.index for nd in cluster.nodes if not nd.alive]
                assert not dead, f"daemons {dead} exited; see {tmp_path / 'run'}/node-*/log.txt"
                if len(statuses) == N_DAEMONS:
                    for nd in cluster.nodes:
                        assert nd.process is not None
                        done = statuses[nd.index].progress.rounds_completed
                        samples[nd.index].append(sample(nd.process.pid, nd.data_dir, done))
                    if all(s.progress.rounds_completed >= SOAK_ROUNDS for s in statuses.values()):
                        break
                await trio.sleep(SAMPLE_SECONDS)
    finally:
        codes = cluster.stop()
    assert all(c == 0 for c in codes.values()), codes
    max_participants = int(overrides["round"]["max_participants"])
    bound = retention_bound(KEEP_ROUNDS, max_participants)
    for index, rows in samples.items():
        after = [s for s in rows if s.rounds >= WARM_UP_ROUNDS]
        assert len(after) >= 3, f"node-{index}: too few samples after round {WARM_UP_ROUNDS}: {len(after)}"
        base, last = after[0], after[-1]
        growth = max(s.rss for s in after) - base.rss
        assert growth <= RSS_GROWTH_LIMIT_BYTES, \
            f"node-{index}: RSS grew {growth / 1e6:.1f} MB from round {base.rounds} to {last.rounds}"
        # flat: no trend (first vs last samples), and no burst beyond a round's streams. A single
        # sample 5 above the base (node-3, 2026-12-02) was a round's streams, not growth.
        fds = [s.fds for s in after]
        first, final = statistics.median(fds[:TREND_SAMPLES]), statistics.median(fds[-TREND_SAMPLES:])
        assert final <= first + FD_SLACK, (index, first, final, fds)
        assert max(fds) <= base.fds + FD_BURST, (index, fds)
        assert max(s.threads for s in after) <= base.threads + THREAD_SLACK, (index, [s.threads for s in after])
        for s in rows:
            assert s.blobs <= bound.blobs, f"node-{index} at round {s.rounds}: {s.blobs} blobs > {bound.blobs}"
            assert s.round_rows <= bound.round_rows, (index, s.rounds, s.round_rows, bound.round_rows)
            assert s.submission_rows <= bound.submission_rows, (index, s.rounds, s.submission_rows)
        steady = [s for s in after if s.rounds >= 2 * KEEP_ROUNDS + WARM_UP_ROUNDS]
        assert steady, f"node-{index}: no sample after round {2 * KEEP_ROUNDS + WARM_UP_ROUNDS}"
        assert max(s.blob_bytes for s in steady) <= SQLITE_SIZE_SLACK * max(steady[0].blob_bytes, 1), index
        assert last.sqlite_bytes <= SQLITE_SIZE_SLACK * steady[0].sqlite_bytes, \
            f"node-{index}: state.sqlite(+wal) grew {steady[0].sqlite_bytes} -> {last.sqlite_bytes} bytes"
        print(f"node-{index}: rounds {base.rounds}->{last.rounds} RSS {base.rss / 1e6:.1f}->{last.rss / 1e6:.1f} MB "
              f"(max growth {growth / 1e6:.2f}) fds {base.fds}->{last.fds} threads {base.threads}->{last.threads} "
              f"blobs {last.blobs} ({last.blob_bytes} B) sqlite {steady[0].sqlite_bytes}->{last.sqlite_bytes} B")
    print(f"soak: {SOAK_ROUNDS} rounds x {N_DAEMONS} daemons in {time.monotonic() - wall:.0f} s wall")
