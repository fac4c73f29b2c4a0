"""The fault-injection plan and checker on their own (fast: no daemons): the plan is reproducible from
its seed and covers every fault kind; the checker finds a fork, a lost or twice-counted submission,
a traceback and abandoned work in files laid out the way daemons write them, and nothing in clean ones."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from fednode.harness.fault_check import NodeFiles, check_rounds, gather, scan_log
from fednode.harness.fault_plan import ACTION_KINDS, CORRUPT, DISK_FULL, LATEST_MERGED, TERM, WAIT, make_plan
from fednode.state import StateDB

IDS = [f"12D3KooWnode{i}" + "x" * 20 for i in range(3)]


def sha(c: str) -> str:
    return c * 64


RECORD = Path(__file__).parents[1] / "node" / "data" / "round-record-published-v0.json"  # a daemon-written record


def record(number: int, merged: str, accepted: list[str], *, by: str, final: str = IDS[0],
           rejected: list[str] | None = None) -> dict[str, Any]:
    """A published record as daemons write it (every field), with these contributions."""
    out: dict[str, Any] = json.loads(RECORD.read_text())
    out.update({"round_number": number, "round_id": f"r{number}-t1", "state": "published", "merged_sha256": merged,
                "accepted": [{"node_id": n, "blob_sha256": sha(str(IDS.index(n))), "num_samples": 10, "weight": 0.5}
                             for n in accepted],
                "rejected": [{"node_id": n, "reason": "unavailable", "detail": "", "blob_sha256": ""}
                             for n in rejected or []],
                "final_coordinator_node_id": final, "recorded_by": by})
    return out


def lay_out(root: Path, i: int, records: list[dict[str, Any]], accepted_db: dict[str, list[str]] | None = None,
            log: str = "") -> NodeFiles:
    data = root / f"node-{i}"
    (data / "rounds").mkdir(parents=True)
    for r in records:
        (data / "rounds" / f"round-{r['round_number']}.json").write_text(json.dumps(r))
    StateDB(data / "state.sqlite").close()
    with contextlib.closing(sqlite3.connect(data / "state.sqlite")) as conn, conn:
        for r in records:
            conn.execute("INSERT INTO rounds (round_id, round_number, term, coordinator, manifest, state, "
                         "merged_sha256, record, updated_at) VALUES (?, ?, 1, '', x'', 'published', ?, ?, 0)",
                         (r["round_id"], r["round_number"], r["merged_sha256"], json.dumps(r)))
        for round_id, nodes in (accepted_db or {}).items():
            for n in nodes:
                conn.execute("INSERT INTO submissions VALUES (?, ?, x'', ?, 10, 'accepted', '', 0)",
                             (round_id, n, sha(str(IDS.index(n)))))
    (data / "log.txt").write_text(log)
    return NodeFiles(i, IDS[i], data, data / "log.txt")


def installed(number: int, merged: str) -> str:
    return f"2026-01-01 00:00:00,000 INFO fednode.rounds: round r{number}-t1 installed: merged {merged[:16]}\n"


def test_plan_is_reproducible_starts_with_r36_and_covers_every_kind() -> None:
    plan = make_plan(7, 30)
    assert [s.to_json() for s in plan] == [s.to_json() for s in make_plan(7, 30)]
    assert [s.to_json() for s in plan] != [s.to_json() for s in make_plan(8, 30)]
    r36 = plan[0].actions
    assert plan[0].name == "r36" and [a.kind for a in r36] == [CORRUPT, WAIT, TERM]
    assert r36[0].blob == LATEST_MERGED and r36[0].while_stopped and r36[0].with_adapter
    assert r36[2].target == "coordinator" and r36[2].restart_after == 0.0
    kinds = {a.kind for s in plan for a in s.actions}
    assert set(ACTION_KINDS) <= kinds
    assert DISK_FULL not in {a.kind for s in make_plan(7, 30, disk_full=False) for a in s.actions}
    # never two nodes left down until the end of a sequence
    assert all(sum(a.restart_after is None for a in s.actions if a.kind in ("sigkill", "sigterm")) <= 1 for s in plan)


def test_checker_finds_nothing_in_agreeing_nodes(tmp_path: Path) -> None:
    recs = [record(1, sha("a"), IDS[:2], by=""), record(2, sha("b"), IDS, by="")]
    nodes = [lay_out(tmp_path, i, recs, {"r1-t1": IDS[:2], "r2-t1": IDS} if i == 0 else None,
                     installed(1, sha("a")) + installed(2, sha("b"))) for i in range(3)]
    assert check_rounds(gather(nodes)) == []
    assert all(scan_log(n, 0)[0] == [] for n in nodes)


def test_checker_finds_a_fork_even_when_the_record_file_was_overwritten(tmp_path: Path) -> None:
    good = [record(1, sha("a"), IDS, by="")]
    # node 2 re-aggregated round 1 under another sha256 and then overwrote its file back: only its log says so
    nodes = [lay_out(tmp_path, i, good, log=installed(1, sha("a"))) for i in range(2)]
    nodes.append(lay_out(tmp_path, 2, good, log=installed(1, sha("c")) + installed(1, sha("a"))))
    found = check_rounds(gather(nodes))
    assert [v.kind for v in found] == ["fork"]
    assert "round 1 has 2 merged adapters" in found[0].detail and "node-2 r1-t1 (log: installed)" in found[0].detail


def test_checker_finds_lost_and_twice_counted_submissions(tmp_path: Path) -> None:
    lost = record(1, sha("a"), IDS[:2], by="")  # the coordinator accepted all three
    twice = record(2, sha("b"), [IDS[0], IDS[1], IDS[1]], by="")
    nodes = [lay_out(tmp_path, 0, [lost, twice], {"r1-t1": IDS, "r2-t1": IDS[:2]})]
    kinds = sorted(v.kind for v in check_rounds(gather(nodes)))
    assert kinds == ["counted_twice", "lost"]
    # a submission the coordinator rejected after accepting it (recorded as rejected) is not lost
    ok = record(1, sha("a"), IDS[:2], by="", rejected=[IDS[2]])
    assert check_rounds(gather([lay_out(tmp_path / "ok", 0, [ok], {"r1-t1": IDS})])) == []


def test_checker_finds_differing_contributions(tmp_path: Path) -> None:
    nodes = [lay_out(tmp_path, 0, [record(1, sha("a"), IDS, by="")]),
             lay_out(tmp_path, 1, [record(1, sha("a"), IDS[:2], by="")])]
    assert [v.kind for v in check_rounds(gather(nodes))] == ["accepted_differs"]


def test_log_scan_finds_tracebacks_and_abandoned_work_once(tmp_path: Path) -> None:
    log = ("2026-01-01 00:00:00,000 INFO fednode.run: up\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
           "sqlite3.OperationalError: database or disk is full\n"
           "2026-01-01 00:00:01,000 WARNING fednode.rounds: _train_and_submit failed: blob 1234 on disk does "
           "not match its address\n"
           "2026-01-01 00:00:02,000 WARNING fednode.rounds: _train_and_submit failed: blob 99: no holder left\n")
    log += ("2026-01-01 00:00:03,000 WARNING libp2p.network.swarm: add_conn failed: LifecycleError('stopped')\n"
            "Traceback (most recent call last):\n  File \"swarm.py\", line 2617, in add_conn\n"
            "libp2p.tools.anyio_service.exceptions.LifecycleError: Cannot schedule task after service has stopped\n"
            "\nDuring handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\ntrio.Cancelled: cancelled\n")
    node = lay_out(tmp_path, 0, [], log=log)
    found, offset = scan_log(node, 0)
    assert [v.kind for v in found] == ["traceback", "gave_up"]  # not libp2p's own logged stack
    assert "OperationalError: database or disk is full" in found[0].detail
    assert offset == len(log.encode())
    assert scan_log(node, offset) == ([], offset)  # what was read is not reported again


def test_a_record_that_does_not_fit_is_noted_naming_its_field(tmp_path: Path) -> None:
    broken = record(1, sha("a"), IDS, by="")
    del broken["finished_at"]
    node = lay_out(tmp_path, 0, [])
    (node.data_dir / "rounds" / "round-1.json").write_text(json.dumps(broken))
    (ev,) = gather([node])
    assert ev.records == {} and len(ev.notes) == 1
    assert "round-1.json: record.finished_at: missing" in ev.notes[0], ev.notes
