"""StateDB's memory of the election term across restarts (election-v1 rule 12)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fednode.state import StateDB


def test_highest_term_survives_a_reopen_and_never_goes_down(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.sqlite")
    assert db.highest_term() == 0
    db.save_term(4)
    db.save_term(2)  # an older term heard late does not lower it
    db.close()
    again = StateDB(tmp_path / "state.sqlite")
    assert again.highest_term() == 4
    again.save_term(7)  # a member reported a newer term (the daemon stores it with save_term)
    assert again.highest_term() == 7
    again.close()


def test_a_rounds_term_counts(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.sqlite")
    db.save_term(3)
    db.put_round(round_id="r9", round_number=9, term=9, coordinator="c" * 52, manifest=b"m", state="collecting",
                 now=1.0)
    assert db.highest_term() == 9
    db.close()


def test_an_old_members_table_is_folded_into_the_stored_term(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    StateDB(path).close()
    with sqlite3.connect(path) as old:  # what a daemon before the one-member-table change left behind
        old.execute("CREATE TABLE members (node_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT "
                    "NULL, federated_learning INTEGER NOT NULL, term INTEGER NOT NULL DEFAULT 0)")
        old.execute("INSERT INTO members VALUES (?, 1.0, 2.0, 1, 6)", ("x" * 52,))
    old.close()
    db = StateDB(path)
    assert db.highest_term() == 6
    db.close()
    with sqlite3.connect(path) as check:
        assert check.execute("SELECT name FROM sqlite_master WHERE name = 'members'").fetchone() is None
    check.close()
    reopened = StateDB(path)
    assert reopened.highest_term() == 6  # the fold kept it in meta
    reopened.close()


def _submission(db: StateDB, node: str, *, durable: bool) -> bool:
    return db.add_submission(round_id="r1-t1", node_id=node, announce=b"a", delta_sha256="d" * 64, num_samples=3,
                             status="accepted", reason="", now=1.0, durable=durable)


def test_a_submission_recorded_without_fsync_survives_a_killed_process_and_leaves_full_sync_on(
        tmp_path: Path) -> None:
    """A member's copy of others' submissions is committed with synchronous=NORMAL (no fsync: at 32
    daemons on one disk those fsyncs were most of a round). It must still survive a crash of the
    process, and every other write must stay synchronous=FULL."""
    import subprocess
    import sys

    path = tmp_path / "state.sqlite"
    code = ("import os, sys; from pathlib import Path; from fednode.state import StateDB\n"
            "db = StateDB(Path(sys.argv[1]))\n"
            "db.add_submission(round_id='r1-t1', node_id='other', announce=b'a', delta_sha256='d' * 64, num_samples=3,"
            " status='accepted', reason='', now=1.0, durable=False)\n"
            "os._exit(0)  # no close, no checkpoint: as a killed daemon\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    db = StateDB(path)
    assert [s.node_id for s in db.submissions("r1-t1")] == ["other"]
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert _submission(db, "another", durable=False)
    assert db._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # back to FULL after the fsync-free commit
    assert not _submission(db, "another", durable=True)  # the first verdict still wins
    db.close()
