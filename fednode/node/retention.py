"""Retention: what a node keeps of old rounds, so that disk and memory stay bounded over months.

Measured before (issue 12, 3 daemons, fake task, 1,154 rounds in 21 minutes): the data dir grew by
46-64 kB per round and RSS by 21-34 kB per round, with nothing ever reclaimed.

After each installed round, rounds more than `node.keep_rounds` below the newest finished one are
collected: their sqlite rows (rounds, submissions, own updates), `rounds/round-<n>.json`,
`adapters/round-<n>/` (never the one `adapters/latest` names), the blobs only they referenced
(a merged adapter or a delta still named by a kept round stays), those blobs' cached manifests, and
the round driver's in-memory entries for them. `keep_rounds = 0` keeps everything.

The number of collected published rounds is kept in the `meta` table (`collected_published_rounds`),
so `rounds_completed` still counts every round this node installed.

Bound (`retention_bound`): with K = keep_rounds and P = max_participants, a node holds at most K + 2
rounds: K finished ones, the newest one installed before this pass runs, and the open one. Each has
one sqlite row, up to P submission rows, one record, one adapter dir, its merged blob and up to P
delta blobs: at most (K + 2) * (P + 1) complete blobs in blobs/. Deleted rows' pages are reused by
sqlite, so state.sqlite plateaus once the first rounds are collected.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fednode.blobs.store import BlobStore
from fednode.state import OPEN_STATES, StateDB

logger = logging.getLogger("fednode.node")

COLLECTED_META_KEY = "collected_published_rounds"
ROUNDS_BEYOND_KEPT = 2  # the newest round before its retention pass, and the open one


@dataclass(frozen=True, slots=True)
class RetentionBound:
    """The most a node holds at any moment under node.keep_rounds (the module docstring's bound)."""

    round_rows: int
    submission_rows: int
    blobs: int  # complete blobs in blobs/ (not manifests/, partial/, quarantine/)


def retention_bound(keep_rounds: int, max_participants: int) -> RetentionBound:
    if keep_rounds <= 0:
        raise ValueError("keep_rounds = 0 keeps every round: there is no bound")
    rounds = keep_rounds + ROUNDS_BEYOND_KEPT
    return RetentionBound(round_rows=rounds, submission_rows=rounds * max_participants,
                          blobs=rounds * (max_participants + 1))


class ForgetsRounds(Protocol):
    """The round driver's side of retention: drop collected rounds from memory (the round book's
    rounds and pending manifests, and each round's RoundJob: fednode/node/driver_base.py)."""

    def forget_rounds(self, round_ids: Set[str]) -> None: ...


def collected_published(db: StateDB) -> int:
    """Published rounds this node has collected (rounds_completed and max_rounds count them)."""
    try:
        return int(db.get_meta(COLLECTED_META_KEY, "0") or 0)
    except ValueError:
        return 0


def collect_old_rounds(*, data_dir: Path, db: StateDB, store: BlobStore, keep_rounds: int,
                       driver: ForgetsRounds | None = None) -> int:
    """Collect every finished round numbered more than `keep_rounds` below the newest finished
    round. Returns the number of rounds collected. Safe to call at any time (idempotent)."""
    if keep_rounds <= 0:
        return 0
    rows = db.rounds()
    finished = [r for r in rows if r.state not in OPEN_STATES]
    if not finished:
        return 0
    newest = max(r.round_number for r in finished)
    cutoff = newest - keep_rounds  # rounds numbered <= cutoff go
    old = [r for r in finished if r.round_number <= cutoff]
    if not old:
        return 0
    kept = [r for r in rows if r.round_number > cutoff or r.state in OPEN_STATES]
    old_ids = {r.round_id for r in old}
    referenced: set[str] = {r.merged_sha256 for r in kept if r.merged_sha256}
    for r in kept:
        referenced.update(s.delta_sha256 for s in db.submissions(r.round_id))
    candidates: set[str] = {r.merged_sha256 for r in old if r.merged_sha256}
    for r in old:
        candidates.update(s.delta_sha256 for s in db.submissions(r.round_id))
    own_old, own_kept = _own_update_blobs(db, cutoff)
    candidates |= own_old
    referenced |= own_kept
    latest = _latest_name(data_dir / "adapters")
    published = sum(1 for r in old if r.state == "published")
    _delete_rows(db, old_ids, cutoff, published)
    for r in old:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / "rounds" / f"round-{r.round_number}.json").unlink()
        name = f"round-{r.round_number}"
        if name != latest and not any(k.round_number == r.round_number for k in kept):
            shutil.rmtree(data_dir / "adapters" / name, ignore_errors=True)
    for sha in sorted(candidates - referenced):
        with contextlib.suppress(OSError):
            store.delete(sha)
    if driver is not None:
        driver.forget_rounds(old_ids)
    logger.info("retention: collected %d round(s) numbered <= %d (keep_rounds = %d)", len(old), cutoff, keep_rounds)
    return len(old)


def _own_update_blobs(db: StateDB, cutoff: int) -> tuple[set[str], set[str]]:
    rows = db._conn.execute("SELECT round_number, delta_sha256 FROM own_updates").fetchall()
    old = {sha for number, sha in rows if number <= cutoff}
    kept = {sha for number, sha in rows if number > cutoff}
    return old, kept


def _delete_rows(db: StateDB, round_ids: set[str], cutoff: int, published: int) -> None:
    ids = sorted(round_ids)
    with db._tx() as con:
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            con.execute(f"DELETE FROM submissions WHERE round_id IN ({marks})", part)
            con.execute(f"DELETE FROM rounds WHERE round_id IN ({marks})", part)
        con.execute("DELETE FROM own_updates WHERE round_number <= ?", (cutoff,))
        row = con.execute("SELECT value FROM meta WHERE key = ?", (COLLECTED_META_KEY,)).fetchone()
        total = (int(row[0]) if row and str(row[0]).isdigit() else 0) + published
        con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (COLLECTED_META_KEY, str(total)))


def _latest_name(adapters: Path) -> str:
    try:
        return str((adapters / "latest").readlink())
    except OSError:
        return ""
