"""Durable node state in `state.sqlite` (stdlib sqlite3, WAL, synchronous=FULL; a member's record of
others' submissions is committed without an fsync, see `StateDB._tx`).

What a node must not lose across a crash: the highest election term it has seen, every round it took part
in (the signed manifest, state, outcome), every submission it accepted or rejected (with the
signed announce, so a restarted coordinator re-validates nothing and counts nothing twice),
and the deltas it trained itself (so a restarted participant re-announces instead of
retraining). Blobs themselves live in the blob store; rows here reference them by sha256.
Each method is one transaction, so a kill at any instant leaves either the old or the new row.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednode.errors import CorruptState, DiskFull

SCHEMA_VERSION = 1
MAX_INTEGRITY_PROBLEMS_SHOWN = 3  # quick_check findings named in the error
# sqlite reports a full disk met while opening a WAL database (creating its -shm/-wal files) as a
# plain "disk I/O error", not SQLITE_FULL: with less free space than this, that is a full disk, not corruption.
MIN_FREE_BYTES_TO_OPEN = 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY, round_number INTEGER NOT NULL, term INTEGER NOT NULL,
    coordinator TEXT NOT NULL, manifest BLOB NOT NULL, state TEXT NOT NULL,
    merged_sha256 TEXT NOT NULL DEFAULT '', outcome BLOB, record TEXT, updated_at REAL NOT NULL,
    snapshot TEXT
);
CREATE INDEX IF NOT EXISTS rounds_by_number ON rounds (round_number);
CREATE TABLE IF NOT EXISTS submissions (
    round_id TEXT NOT NULL, node_id TEXT NOT NULL, announce BLOB NOT NULL, delta_sha256 TEXT NOT NULL,
    num_samples INTEGER NOT NULL, status TEXT NOT NULL CHECK (status IN ('accepted', 'rejected')),
    reason TEXT NOT NULL DEFAULT '', received_at REAL NOT NULL,
    PRIMARY KEY (round_id, node_id)
);
CREATE TABLE IF NOT EXISTS own_updates (
    round_number INTEGER NOT NULL, start_adapter_sha256 TEXT NOT NULL, delta_sha256 TEXT NOT NULL,
    num_samples INTEGER NOT NULL, train_loss REAL NOT NULL, metrics TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (round_number, start_adapter_sha256)
);
"""

OPEN_STATES = ("collecting", "aggregating")


@dataclass(frozen=True, slots=True)
class RoundRow:
    round_id: str
    round_number: int
    term: int
    coordinator: str
    manifest: bytes
    state: str
    merged_sha256: str
    outcome: bytes | None
    record: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class RoundCounts:
    """Totals over every recorded round, without reading each one (the next-round rule asks per tick)."""

    highest_round_number: int  # 0: none
    published: int
    installed: int  # published and recorded
    last_finished: RoundRow | None  # the latest published or failed round


@dataclass(frozen=True, slots=True)
class SubmissionRow:
    round_id: str
    node_id: str
    announce: bytes
    delta_sha256: str
    num_samples: int
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class OwnUpdate:
    round_number: int
    start_adapter_sha256: str
    delta_sha256: str
    num_samples: int
    train_loss: float
    metrics: dict[str, Any]


class StateDB:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=5000")
            problems = [str(r[0]) for r in self._conn.execute(f"PRAGMA quick_check({MAX_INTEGRITY_PROBLEMS_SHOWN})")]
            if problems != ["ok"]:
                raise CorruptState(self._corrupt_message("; ".join(problems)))
            self._conn.executescript(_SCHEMA)  # idempotent; executescript commits on its own
            with self._tx() as c:
                c.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                _fold_old_members_table(c)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if _is_full(exc) or _nearly_full(path.parent):
                raise DiskFull(f"{path}: {exc}; free space on its filesystem and start again") from None
            raise CorruptState(self._corrupt_message(str(exc))) from None
        except BaseException:
            self._conn.close()
            raise

    def _corrupt_message(self, problem: str) -> str:
        p = self.path
        return (f"{p} is corrupt ({problem[:300]}); the node will not start from it. Move it aside "
                f"(mv {p} {p}.corrupt, and {p.name}-wal / {p.name}-shm next to it if present) and start the node "
                f"again: it creates a new state.sqlite and resyncs members and the open round from its peers "
                f"(blobs/, adapters/ and rounds/ are kept)")

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. SQLITE_FULL (disk or quota full) becomes DiskFull, nothing written.

        `durable=False`: committed without an fsync (synchronous=NORMAL for this one commit). It
        survives a crash of the process (WAL in the OS page cache) and becomes durable with the next
        durable commit (which fsyncs the WAL up to it); only a power loss or OS crash before that can
        lose it. For what a node can learn again from its peers (others' submissions to a round it
        does not coordinate): at 32 daemons on one disk those fsyncs were most of a round's time."""
        if not durable:
            self._conn.execute("PRAGMA synchronous=NORMAL")
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # sqlite may have rolled back already (SQLITE_FULL does)
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if _is_full(exc):
                raise DiskFull(f"{self.path}: {exc}") from exc
            raise
        finally:
            if not durable:
                self._conn.execute("PRAGMA synchronous=FULL")

    def probe_write(self, now: float) -> None:
        """One small committed write (raises DiskFull while the disk is still full)."""
        self.set_meta("disk_probe_at", repr(now))

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str = "") -> str:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                      (key, value))

    # -- rounds ----------------------------------------------------------------------------
    def put_round(self, *, round_id: str, round_number: int, term: int, coordinator: str, manifest: bytes,
                  state: str, now: float) -> bool:
        """Insert a round; False (and no change) if it is already known."""
        with self._tx() as c:
            cur = c.execute("INSERT OR IGNORE INTO rounds VALUES (?, ?, ?, ?, ?, ?, '', NULL, NULL, ?, NULL)",
                            (round_id, round_number, term, coordinator, manifest, state, now))
            return cur.rowcount == 1

    def set_round_state(self, round_id: str, state: str, now: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE rounds SET state = ?, updated_at = ? WHERE round_id = ?", (state, now, round_id))

    def save_snapshot(self, round_id: str, *, state: str, term: int, coordinator: str, snapshot: dict[str, Any],
                      now: float) -> None:
        """Persist a round state machine's snapshot (and its phase) in one transaction."""
        with self._tx() as c:
            c.execute("UPDATE rounds SET state = ?, term = ?, coordinator = ?, snapshot = ?, updated_at = ? "
                      "WHERE round_id = ?", (state, term, coordinator, json.dumps(snapshot), now, round_id))

    def load_snapshot(self, round_id: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT snapshot FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def finish_round(self, round_id: str, *, state: str, merged_sha256: str, outcome: bytes,
                     record: dict[str, Any], now: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE rounds SET state = ?, merged_sha256 = ?, outcome = ?, record = ?, updated_at = ? "
                      "WHERE round_id = ?",
                      (state, merged_sha256, outcome, json.dumps(record, sort_keys=True), now, round_id))

    def get_round(self, round_id: str) -> RoundRow | None:
        row = self._conn.execute("SELECT * FROM rounds WHERE round_id = ?", (round_id,)).fetchone()
        return _round_row(row) if row else None

    def rounds(self, *, states: tuple[str, ...] | None = None) -> list[RoundRow]:
        rows = self._conn.execute("SELECT * FROM rounds ORDER BY round_number, term, round_id").fetchall()
        out = [_round_row(r) for r in rows]
        return [r for r in out if states is None or r.state in states]

    def round_counts(self) -> RoundCounts:
        c = self._conn
        highest, published, installed = c.execute(
            "SELECT coalesce(max(round_number), 0), coalesce(sum(state = 'published'), 0), "
            "coalesce(sum(state = 'published' AND record IS NOT NULL), 0) FROM rounds").fetchone()
        last = c.execute("SELECT * FROM rounds WHERE state IN ('published', 'failed') "
                         "ORDER BY round_number DESC, term DESC, round_id DESC LIMIT 1").fetchone()
        return RoundCounts(int(highest), int(published), int(installed), _round_row(last) if last else None)

    def set_outcome(self, round_id: str, outcome: bytes) -> None:
        """Remember the signed AggregateAnnounce / RoundFailed we published or received."""
        with self._tx() as c:
            c.execute("UPDATE rounds SET outcome = ? WHERE round_id = ?", (outcome, round_id))

    def unfinished_rounds(self) -> list[RoundRow]:
        """Rounds still open, or decided but not yet installed/recorded (a crash came in between)."""
        rows = self._conn.execute("SELECT * FROM rounds WHERE record IS NULL ORDER BY round_number, term").fetchall()
        return [_round_row(r) for r in rows]

    def highest_term(self) -> int:
        """The highest term this node has seen (election-v1 rule 12): the stored one (meta election_term,
        which save_term raises for our own and members' reported terms) or a round's. A node restarted
        from this database starts its election there."""
        row = self._conn.execute(
            "SELECT max(coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'election_term'), 0), "
            "coalesce((SELECT max(term) FROM rounds), 0))").fetchone()
        return int(row[0] or 0)

    def save_term(self, term: int) -> None:
        """Remember `term` if it is higher than the stored one (one small write per term change)."""
        with self._tx() as c:
            c.execute(_SAVE_TERM_SQL, (str(term),))

    def latest_published(self) -> RoundRow | None:
        row = self._conn.execute("SELECT * FROM rounds WHERE state = 'published' AND record IS NOT NULL "
                                 "ORDER BY round_number DESC, term DESC LIMIT 1").fetchone()
        return _round_row(row) if row else None

    # -- submissions -----------------------------------------------------------------------
    def add_submission(self, *, round_id: str, node_id: str, announce: bytes, delta_sha256: str,
                       num_samples: int, status: str, reason: str, now: float, durable: bool = True) -> bool:
        """Record a verdict on a submission; the first verdict for (round, node) wins. True if new.
        `durable=False`: see `_tx` (a member recording others' submissions)."""
        with self._tx(durable=durable) as c:
            cur = c.execute("INSERT OR IGNORE INTO submissions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (round_id, node_id, announce, delta_sha256, num_samples, status, reason, now))
            return cur.rowcount == 1

    def reject_submission(self, round_id: str, node_id: str, reason: str) -> None:
        """Turn an accepted submission into a rejected one: its blob later proved unavailable or
        invalid, and the coordinator aggregated without it (the one verdict that may change)."""
        with self._tx() as c:
            c.execute("UPDATE submissions SET status = 'rejected', reason = ? WHERE round_id = ? AND node_id = ?",
                      (reason, round_id, node_id))

    def submissions(self, round_id: str, status: str | None = None) -> list[SubmissionRow]:
        rows = self._conn.execute(
            "SELECT round_id, node_id, announce, delta_sha256, num_samples, status, reason FROM submissions "
            "WHERE round_id = ? ORDER BY node_id", (round_id,)).fetchall()
        return [SubmissionRow(*r) for r in rows if status is None or r[5] == status]

    # -- own trained updates ---------------------------------------------------------------
    def put_own_update(self, update: OwnUpdate) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO own_updates VALUES (?, ?, ?, ?, ?, ?)",
                      (update.round_number, update.start_adapter_sha256, update.delta_sha256, update.num_samples,
                       update.train_loss, json.dumps(update.metrics, sort_keys=True)))

    def get_own_update(self, round_number: int, start_adapter_sha256: str) -> OwnUpdate | None:
        row = self._conn.execute("SELECT * FROM own_updates WHERE round_number = ? AND start_adapter_sha256 = ?",
                                 (round_number, start_adapter_sha256)).fetchone()
        if row is None:
            return None
        return OwnUpdate(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]))


_SAVE_TERM_SQL = ("INSERT INTO meta VALUES ('election_term', ?) ON CONFLICT(key) DO UPDATE SET value = "
                  "CAST(max(CAST(meta.value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)")


def _fold_old_members_table(c: sqlite3.Connection) -> None:
    """A state.sqlite written before the daemon stopped keeping a members table: its highest member
    term moves into meta election_term (rule 12 keeps it) and the table goes."""
    if c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'members'").fetchone() is None:
        return
    (term,) = c.execute("SELECT coalesce(max(term), 0) FROM members").fetchone()
    c.execute(_SAVE_TERM_SQL, (str(int(term)),))
    c.execute("DROP TABLE members")


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _nearly_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < MIN_FREE_BYTES_TO_OPEN


def _round_row(row: tuple[Any, ...]) -> RoundRow:
    return RoundRow(round_id=row[0], round_number=row[1], term=row[2], coordinator=row[3], manifest=bytes(row[4]),
                    state=row[5], merged_sha256=row[6], outcome=bytes(row[7]) if row[7] is not None else None,
                    record=json.loads(row[8]) if row[8] else None)
