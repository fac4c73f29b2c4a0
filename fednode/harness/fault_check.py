"""The checker of `scripts/faults`: what every node's own files say about the rounds (read-only).

Sources, per node: `rounds/round-<n>.json` (the latest record of round n), `state.sqlite` (every
round id it finished, every submission verdict) and its log (every adapter it installed, so an
install later overwritten in the files still counts; tracebacks; work given up). Promises checked:

- fork: a round number has at most one merged sha256 across all nodes and all sources;
- counted_twice: a published record lists each participant at most once;
- lost: every submission the round's final coordinator recorded as accepted is in its published
  record (a submission it rejected after accepting, e.g. unavailable, is recorded as rejected);
- accepted_differs: every node's record of a published round id lists the same contributions;
- traceback: no Python traceback in any log (a crash, or an error logged with its stack);
- gave_up: no round work abandoned on a local blob fault ("_train_and_submit failed: ..." with a
  corrupt or missing blob: the node sat the round out instead of fetching the blob again).

Daemon exit codes are the runner's part (it knows which exits it caused).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from fednode.node.records import read_record
from fednode.node.reports import RoundRecord

INSTALLED_RE = re.compile(r"round (r(\d+)-t\d+) installed: merged ([0-9a-f]{16})")
GUARD_RE = re.compile(r"fednode\.rounds: (_\w+) failed: (.*)")
# A guard failure that means a local blob fault was not repaired (the node sat the round out).
LOCAL_BLOB_FAULT_RE = re.compile(r"BlobIntegrityError|does not match|KeyError|No such file|not found in the store",
                                 re.IGNORECASE)
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Exception Group Traceback", "--- Logging error ---")
LOG_LINE_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
LOGGER_RE = re.compile(r"^\S+ \S+ [A-Z]+ ([\w.]+): ")
# A stack attached to a third-party library's own log record (e.g. libp2p's swarm logging a
# connection refused while it shuts down) is that library's noise, not a fednode failure; a crash
# is caught anyway, as the daemon's unexpected exit.
THIRD_PARTY_LOGGERS = ("libp2p", "multiaddr", "async_service", "anyio")
SHA_PREFIX = 16
MAX_DETAIL_CHARS = 600


@dataclass(frozen=True)
class NodeFiles:
    index: int
    node_id: str
    data_dir: Path
    log_path: Path


@dataclass(frozen=True)
class Violation:
    kind: str
    key: str  # what it is about (dedup across checks of the same run)
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "detail": self.detail[:MAX_DETAIL_CHARS]}


@dataclass(frozen=True)
class PublishedRow:
    round_number: int
    merged_sha256: str
    record: RoundRecord | None


@dataclass
class NodeEvidence:
    node: NodeFiles
    records: dict[int, RoundRecord] = field(default_factory=dict)  # round number -> published record
    db_published: dict[str, PublishedRow] = field(default_factory=dict)  # round id -> row
    db_accepted: dict[str, dict[str, str]] = field(default_factory=dict)  # round id -> node id -> delta sha
    installs: list[tuple[str, int, str]] = field(default_factory=list)  # (round id, number, sha prefix)
    notes: list[str] = field(default_factory=list)


def _read_records(node: NodeFiles, ev: NodeEvidence) -> None:
    folder = node.data_dir / "rounds"
    for path in sorted(folder.glob("round-*.json")) if folder.exists() else []:
        try:
            record = read_record(path)
        except (OSError, ValueError) as exc:  # ReportError is a ValueError: it names the field
            ev.notes.append(f"{path}: unreadable ({exc})")
            continue
        if record.published:
            ev.records[record.round_number] = record


def _read_db(node: NodeFiles, ev: NodeEvidence) -> None:
    path = node.data_dir / "state.sqlite"
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as conn:
            for round_id, number, sha, record in conn.execute(
                    "SELECT round_id, round_number, merged_sha256, record FROM rounds WHERE state = 'published'"):
                ev.db_published[str(round_id)] = PublishedRow(
                    int(number), str(sha), RoundRecord.from_json(json.loads(record)) if record else None)
            for round_id, node_id, sha in conn.execute(
                    "SELECT round_id, node_id, delta_sha256 FROM submissions WHERE status = 'accepted'"):
                ev.db_accepted.setdefault(str(round_id), {})[str(node_id)] = str(sha)
    except (sqlite3.Error, ValueError) as exc:
        ev.notes.append(f"{path}: unreadable ({exc})")


def _read_installs(node: NodeFiles, ev: NodeEvidence) -> None:
    if not node.log_path.exists():
        return
    text = node.log_path.read_text("utf-8", "replace")
    ev.installs = [(m.group(1), int(m.group(2)), m.group(3)) for m in INSTALLED_RE.finditer(text)]


def gather(nodes: list[NodeFiles]) -> list[NodeEvidence]:
    out = []
    for node in nodes:
        ev = NodeEvidence(node)
        _read_records(node, ev)
        _read_db(node, ev)
        _read_installs(node, ev)
        out.append(ev)
    return out


def check_rounds(evidence: list[NodeEvidence]) -> list[Violation]:
    """fork / counted_twice / lost / accepted_differs over every node's files."""
    out: list[Violation] = []
    # round number -> sha prefix -> where it was seen
    merged: dict[int, dict[str, set[str]]] = {}

    def saw(number: int, sha: str, where: str) -> None:
        if sha:
            merged.setdefault(number, {}).setdefault(sha[:SHA_PREFIX], set()).add(where)

    for ev in evidence:
        name = f"node-{ev.node.index}"
        for number, record in ev.records.items():
            saw(number, record.merged_sha256, f"{name} {record.round_id} (record)")
        for round_id, row in ev.db_published.items():
            saw(row.round_number, row.merged_sha256, f"{name} {round_id} (state.sqlite)")
        for round_id, number, sha in ev.installs:
            saw(number, sha, f"{name} {round_id} (log: installed)")
    for number in sorted(merged):
        if len(merged[number]) > 1:
            where = "; ".join(f"{sha}: {', '.join(sorted(w))}" for sha, w in sorted(merged[number].items()))
            out.append(Violation("fork", f"round {number}",
                                 f"round {number} has {len(merged[number])} merged adapters: {where}"))

    by_id = {ev.node.node_id: ev for ev in evidence}
    records_by_round_id: dict[str, dict[int, RoundRecord]] = {}
    for ev in evidence:
        for record in [*ev.records.values(), *(r.record for r in ev.db_published.values() if r.record)]:
            records_by_round_id.setdefault(record.round_id, {}).setdefault(ev.node.index, record)
    for round_id, records in sorted(records_by_round_id.items()):
        views = {}
        for index, record in records.items():
            ids = [a.node_id for a in record.accepted]
            if len(ids) != len(set(ids)):
                twice = sorted({i[-8:] for i in ids if ids.count(i) > 1})
                out.append(Violation("counted_twice", f"{round_id} node-{index}",
                                     f"{round_id}: node-{index}'s record lists {twice} more than once"))
            views[index] = sorted((a.node_id, a.blob_sha256) for a in record.accepted)
        if len({json.dumps(v) for v in views.values()}) > 1:
            shown = {f"node-{i}": [n[-8:] for n, _ in v] for i, v in sorted(views.items())}
            out.append(Violation("accepted_differs", round_id,
                                 f"{round_id}: the nodes' records list different contributions: {shown}"))
        record = next(iter(records.values()))
        final = by_id.get(record.final_coordinator_node_id)
        if final is None:
            continue
        final_record = records.get(final.node.index, record)
        listed = {a.node_id: a.blob_sha256 for a in final_record.accepted}
        rejected = {r.node_id for r in final_record.rejected}
        for node_id, sha in sorted(final.db_accepted.get(round_id, {}).items()):
            if node_id not in listed and node_id not in rejected:
                out.append(Violation("lost", f"{round_id} {node_id}",
                                     f"{round_id}: node-{final.node.index} (final coordinator) accepted "
                                     f"{node_id[-8:]}'s submission {sha[:12]} but its published record neither "
                                     f"lists nor rejects it"))
            elif node_id in listed and listed[node_id] and listed[node_id] != sha:
                out.append(Violation("lost", f"{round_id} {node_id}",
                                     f"{round_id}: {node_id[-8:]} accepted as {sha[:12]}, aggregated as "
                                     f"{listed[node_id][:12]}"))
    return out


def scan_log(node: NodeFiles, offset: int) -> tuple[list[Violation], int]:
    """Tracebacks and abandoned round work in the log from byte `offset` on; returns the new offset."""
    if not node.log_path.exists():
        return [], offset
    with node.log_path.open("rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n") + 1  # a half-written last line is read next time
    lines = data[:end].decode("utf-8", "replace").splitlines()
    out: list[Violation] = []
    owner = ""  # the logger of the last log record: a stack printed after it belongs to that record
    i = 0
    while i < len(lines):
        line = lines[i]
        if LOG_LINE_RE.match(line):
            m = LOGGER_RE.match(line)
            owner = m.group(1) if m else ""
        if any(marker in line for marker in TRACEBACK_MARKERS):
            third_party = owner.startswith(THIRD_PARTY_LOGGERS)
            block = [line]
            i += 1
            while i < len(lines) and not LOG_LINE_RE.match(lines[i]) and not lines[i].startswith("fednode:"):
                block.append(lines[i])
                i += 1
            tail = [b.strip() for b in block if b.strip() and not set(b.strip()) <= set("+-|^~ ")]
            if third_party:
                continue
            out.append(Violation("traceback", f"node-{node.index} @{offset}+{i}",
                                 f"node-{node.index} logged a traceback: ... " + " / ".join(tail[-4:])))
            continue
        m = GUARD_RE.search(line)
        if m and LOCAL_BLOB_FAULT_RE.search(m.group(2)):
            out.append(Violation("gave_up", f"node-{node.index} @{offset}+{i}",
                                 f"node-{node.index} gave up {m.group(1)} on a local blob fault: {m.group(2)}"))
        i += 1
    return out, offset + end
