"""One federation of `fednode run` daemons under fault injection (the engine of scripts/faults).

`FaultCluster` starts 4 fake-task daemons over libp2p on 127.0.0.1 (one with its data dir on a small
tmpfs when we are root), runs a sequence's actions on them (SIGKILL / SIGTERM / restart, a flipped
byte in or the deletion of a blob, a full disk, a control-socket client that hangs up), starts what
is down again, waits for progress and runs the checker (fault_check) over every node's files. It
records every promise broken on the way as a Violation: the daemons' exits it did not cause (or a
SIGTERM that did not end in exit 0) are its own part of the checks.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from fednode.consensus.round_state import Phase
from fednode.harness import fault_check
from fednode.harness.cluster import LocalCluster, NodeProcess
from fednode.harness.fault_plan import (
    ANY_BLOB,
    CLIENT,
    COORDINATOR,
    CORRUPT,
    DELETE,
    DISK_FULL,
    KILL,
    LATEST_MERGED,
    TERM,
    WAIT,
    Action,
)
from fednode.harness.fault_plan import Sequence as FaultSequence
from fednode.harness.run import poll
from fednode.node.records import read_records
from fednode.node.reports import CurrentRound, LastMerged, NodeStatus, TrainingState

T = TypeVar("T")
Status = dict[int, NodeStatus]

DEFAULT_SEQUENCES = 31  # the fixed r36 case + 30 random ones
DEFAULT_TIME_BOUND_SECONDS = 720.0  # then the sequences not started yet FAIL as not run (never a hang)
DEFAULT_CLUSTERS = 2  # 8 daemons at once: with 12, 2 shared cores starve them (stream opens and heartbeats time out)
# Findings about progress, not safety: reported with every sequence, failing it only with strict_liveness
# (issue 13 asks for 0 forks, 0 lost submissions, 0 uninjected exits; a stuck node on a loaded machine is
# worth a look but not the same promise). A federation that stops entirely still FAILs what it could not run.
LIVENESS_KINDS = frozenset({"no_progress"})
MIN_NODES = 4  # one node down (pending restart) + one being hit still leaves min_participants = 2
MIN_ANSWERING = 2  # = min_participants: fewer live nodes make no round
FILL_BLOCK_BYTES = 1 << 20
FILL_SMALL_BYTES = 4096
LOG_TAIL_BYTES = 600
CRASH_SCAN_BYTES = 8000
EXCEPTION_LINE_RE = re.compile(r"^[\s|+]*((?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt|Cancelled)\b.*)$",
                               re.MULTILINE)
SHA_HEX_LEN = 64


@dataclass(frozen=True)
class FaultOptions:
    seed: int = 0
    sequences: int = DEFAULT_SEQUENCES
    clusters: int = DEFAULT_CLUSTERS
    parallel: int = DEFAULT_CLUSTERS  # federations running at once
    nodes: int = MIN_NODES
    heartbeat_seconds: float = 1.0
    liveness_heartbeats: float = 6.0  # failover after 6 s of silence
    step_seconds: float = 0.02  # fake training: node i takes (1 + i mod 4) x this per step
    local_steps: int = 5
    aggregate_delay_seconds: float = 0.5  # the coordinator's aggregating window (a trigger)
    round_timeout_seconds: float = 10.0
    pause_seconds: float = 0.3
    reannounce_seconds: float = 1.0
    disk_bytes: int = 16 << 20  # the tmpfs data dir of the disk-full node
    disk_full: bool = True  # False: never mount a tmpfs (no disk_full actions)
    kinds: tuple[str, ...] | None = None  # fault kinds drawn from (default all)
    r36: bool = True  # sequence 0 is the fixed r36 case
    trigger_timeout_seconds: float = 8.0  # waiting for a round moment; then the action runs anyway
    start_timeout_seconds: float = 240.0  # a new federation: every daemon answers, a first round installed
    recovery_timeout_seconds: float = 90.0  # after a sequence: restarted daemons up, a new round installed
    # SIGTERM -> exit: fednode promises < 5 s; on 2 cores shared with a loaded machine a starved
    # daemon may not even run its signal handler for seconds, so only a hang this long is a violation
    # (the longest SIGTERM -> exit seen is reported in the JSON either way)
    stop_grace_seconds: float = 30.0
    poll_seconds: float = 0.2
    status_timeout_seconds: float = 15.0
    time_bound_seconds: float = DEFAULT_TIME_BOUND_SECONDS
    strict_liveness: bool = False  # a node that stops making progress FAILs its sequence (else it is reported)


@dataclass
class SequenceResult:
    index: int
    name: str
    cluster: int
    passed: bool
    seconds: float
    actions: str
    violations: list[fault_check.Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)  # action kinds that really ran

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "cluster": self.cluster, "passed": self.passed,
                "seconds": round(self.seconds, 2), "actions": self.actions, "executed": self.executed,
                "violations": [v.to_json() for v in self.violations], "notes": self.notes}


class ProgressLost(Exception):
    """The federation did not recover within the bound; its remaining sequences are not run."""


class FaultCluster:
    """One federation of daemons, the faults it takes, and what it must show after each sequence."""

    def __init__(self, index: int, run_dir: Path, opts: FaultOptions, rng: random.Random) -> None:
        self.index = index
        self.run_dir = run_dir
        self.opts = opts
        self.rng = rng
        self.statuses: Status = {}
        self.violations: list[fault_check.Violation] = []  # found since the last take_violations()
        self.notes: list[str] = []
        self.seen_keys: set[str] = set()
        self.log_offsets: dict[int, int] = {}
        self.sigterm_seconds: list[float] = []  # SIGTERM -> exit, each stop we caused
        self.written_off: set[int] = set()  # nodes that stopped making progress (a violation already)
        self.disk_mount: Path | None = None
        self.disk_node: NodeProcess | None = None
        self.disk_reason = ""
        self.cluster = self._create()

    # -- set-up ------------------------------------------------------------------------------
    def _create(self) -> LocalCluster:
        o = self.opts
        n = o.nodes
        overrides: dict[str, dict[str, Any]] = {
            "learning": {"task": "fake", "fake_step_seconds": o.step_seconds,
                         "fake_aggregate_delay_seconds": o.aggregate_delay_seconds},
            "round": {"local_steps": o.local_steps, "round_timeout_seconds": o.round_timeout_seconds,
                      "max_rounds": 0, "min_participants": 2, "wait_for_members": 2, "max_participants": n,
                      "pause_seconds": o.pause_seconds, "reannounce_seconds": o.reannounce_seconds},
            "coordinator": {"heartbeat_interval_seconds": o.heartbeat_seconds,
                            "liveness_timeout_heartbeats": o.liveness_heartbeats},
            "community": {"id": f"faults-{self.index}"},
            "network": {"gossip_heartbeat_seconds": 1.0},
        }
        disk = n - 1
        node_overrides: dict[int, dict[str, dict[str, Any]]] = {}
        mount = self.run_dir / f"node-{disk}" / "data"
        if o.disk_full:
            self.disk_reason = self._mount(mount)
            if not self.disk_reason:
                self.disk_mount = mount
                key = self.run_dir.resolve() / f"node-{disk}" / "node.key"
                node_overrides[disk] = {"node": {"data_dir": "data", "key_file": str(key)}}
        else:
            self.disk_reason = "disk_full off (--no-disk-full)"
        # every node bootstraps to every other: restarting nodes 0 and 1 together must not leave them
        # a partition of their own until the others redial (a partition is not a fault we inject)
        cluster = LocalCluster.create(self.run_dir, federated=n, gate_off=0, template={}, overrides=overrides,
                                      node_overrides=node_overrides, bootstrap_all=True)
        if self.disk_mount is not None:
            self.disk_node = cluster.nodes[disk]
        return cluster

    def _mount(self, mount: Path) -> str:
        """Mount a small tmpfs at `mount`; '' on success, else why not (the disk-full case is skipped)."""
        if os.geteuid() != 0:
            return "not root: mounting a tmpfs needs root (disk-full sequences skipped)"
        mount.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.opts.disk_bytes}", "tmpfs", str(mount)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return (f"mount -t tmpfs failed ({proc.returncode}): {proc.stderr.strip()[:200]} "
                    "(disk-full sequences skipped)")
        return ""

    def unmount(self) -> None:
        if self.disk_mount is not None:
            proc = subprocess.run(["umount", str(self.disk_mount)], capture_output=True, check=False)
            if proc.returncode != 0:
                subprocess.run(["umount", "-l", str(self.disk_mount)], capture_output=True, check=False)
            self.disk_mount = None

    async def start(self) -> None:
        nodes = self.cluster.nodes
        self.cluster.start(nodes[:2])
        await self.wait_for(lambda st: all(n.index in st for n in nodes[:2]), "the bootstrap nodes answer",
                            self.opts.start_timeout_seconds)
        self.cluster.start(nodes[2:])
        # Every daemon answers and a first round is installed (there is a latest merged blob to hit). A
        # node that started late catches up meanwhile; later sequences check that it does.
        await self.wait_for(lambda st: len(st) == len(nodes) and sum(
            s.progress.rounds_completed >= 1 for s in st.values()) >= MIN_ANSWERING,
            "every node answers and a first round is installed", self.opts.start_timeout_seconds)

    async def stop(self) -> None:
        """SIGTERM every running daemon (each must exit 0, as after any SIGTERM we send); one still
        starting up (not answering yet) is just stopped: Python's default SIGTERM ends it before the
        daemon installs its handler."""
        await self.refresh()
        for node in self.cluster.nodes:
            if node.alive and node.index in self.statuses:
                await self.terminate(node)
        self.cluster.stop()

    # -- watching ------------------------------------------------------------------------------
    def _violation(self, kind: str, key: str, detail: str) -> None:
        if f"{kind} {key}" not in self.seen_keys:
            self.seen_keys.add(f"{kind} {key}")
            self.violations.append(fault_check.Violation(kind, key, detail))

    def _log_tail(self, index: int) -> str:
        """The exception lines at the end of a node's log (else its last bytes)."""
        path = self.cluster.nodes[index].folder / "log.txt"
        if not path.exists():
            return "(no log)"
        tail = path.read_bytes()[-CRASH_SCAN_BYTES:].decode("utf-8", "replace")
        errors = [m.group(1) for m in EXCEPTION_LINE_RE.finditer(tail)]
        if errors:
            return " / ".join(dict.fromkeys(errors[-3:]))
        return tail[-LOG_TAIL_BYTES:]

    def check_exits(self) -> None:
        """A daemon that exited without us stopping it is a violation; it is left down for recovery."""
        for node in self.cluster.nodes:
            if node.process is not None and not node.alive and not node.killed:
                node.killed = True
                code = node.process.returncode
                self._violation("unexpected_exit", f"node-{node.index} pid {node.process.pid}",
                                f"node-{node.index} exited on its own with code {code}: {self._log_tail(node.index)}")

    async def refresh(self) -> Status:
        # A patient client, never cancelled mid-query: hanging up on a daemon is a fault of its own
        # (the client_close action), not something the harness does by accident when a wait times out.
        with trio.CancelScope(shield=True):
            self.statuses = await poll(self.cluster, timeout=self.opts.status_timeout_seconds)
        self.check_exits()
        return self.statuses

    async def sleep(self, seconds: float) -> None:
        """Sleep while watching for daemon exits."""
        end = trio.current_time() + seconds
        while True:
            self.check_exits()
            left = end - trio.current_time()
            if left <= 0:
                return
            await trio.sleep(min(left, self.opts.poll_seconds))

    async def wait_for(self, predicate: Callable[[Status], T | bool | None], what: str, timeout: float) -> T:
        with trio.move_on_after(timeout):
            while True:
                value = predicate(await self.refresh())
                if value is not None and value is not False:
                    return value  # type: ignore[return-value]
                await trio.sleep(self.opts.poll_seconds)
        raise ProgressLost(f"cluster {self.index}: timed out after {timeout:.0f} s waiting until {what}; "
                           f"status: {json.dumps(self.summary())}")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for node in self.cluster.nodes:
            s = self.statuses.get(node.index)
            if s is None:
                out[f"node-{node.index}"] = "up, not answering" if node.alive else "down"
                continue
            cur, last = s.progress.current_round, s.progress.last_merged
            out[f"node-{node.index}"] = {"coordinator": s.coordinator[-6:], "term": s.term,
                                         "round": cur.round_number if cur else None,
                                         "state": cur.state.value if cur else None,
                                         "installed": last.round_number if last else None,
                                         "failed": s.progress.rounds_failed}
        return out

    # -- targets -------------------------------------------------------------------------------
    def coordinator(self, st: Status) -> NodeProcess | None:
        """The live node that names itself coordinator (the highest term if several do)."""
        mine = [n for n in self.cluster.nodes if n.alive and n.index in st
                and st[n.index].coordinator == n.node_id]
        return max(mine, key=lambda n: st[n.index].term) if mine else None

    def resolve(self, target: str) -> NodeProcess | None:
        st = self.statuses
        if target == "disk_node":
            node = self.disk_node
            return node if node is not None and node.alive and node.index in st else None
        coordinator = self.coordinator(st)
        if target == COORDINATOR:
            return coordinator
        others = [n for n in self.cluster.nodes if n.alive and n.index in st and n is not coordinator]
        return self.rng.choice(others) if others else None

    async def trigger(self, action: Action) -> None:
        if action.trigger == "delay":
            await self.sleep(action.delay)
            return
        if action.trigger == "now":
            return

        def moment(st: Status) -> bool:
            c = self.coordinator(st)
            cur = st[c.index].progress.current_round if c and c.index in st else None
            if action.trigger == "collecting":
                return cur is not None and cur.state is Phase.COLLECTING
            if action.trigger == "submitted":
                return cur is not None and cur.state is Phase.COLLECTING and cur.submissions >= 1
            if action.trigger == "aggregating":
                return cur is not None and cur.state is Phase.AGGREGATING
            return any((tr := s.progress.training) is not None and tr.state is TrainingState.TRAINING
                       for s in st.values())

        try:
            await self.wait_for(moment, f"moment {action.trigger}", self.opts.trigger_timeout_seconds)
        except ProgressLost:
            self.notes.append(f"moment {action.trigger} not seen within {self.opts.trigger_timeout_seconds:.0f} s;"
                              " acted anyway")

    # -- faults --------------------------------------------------------------------------------
    async def terminate(self, node: NodeProcess) -> None:
        """SIGTERM and wait: the daemon must exit 0 within the grace (fednode promises < 5 s)."""
        if node.process is None or not node.alive:
            return
        node.killed = True
        sent = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.opts.stop_grace_seconds):
            while node.process.poll() is None:
                await trio.sleep(0.05)
        self.sigterm_seconds.append(time.monotonic() - sent)
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait()
            self._violation("sigterm_exit", f"node-{node.index} pid {node.process.pid}",
                            f"node-{node.index} did not exit within {self.opts.stop_grace_seconds:.0f} s of SIGTERM")
        elif node.process.returncode != 0:
            self._violation("sigterm_exit", f"node-{node.index} pid {node.process.pid}",
                            f"node-{node.index} exited {node.process.returncode} on SIGTERM: "
                            f"{self._log_tail(node.index)}")

    def restart_all(self) -> None:
        for node in self.cluster.nodes:
            self.restart(node)

    def restart(self, node: NodeProcess) -> None:
        if not node.alive:
            self.cluster.start([node])

    def blob_file(self, node: NodeProcess, which: str) -> tuple[Path | None, int]:
        """(the blob file to hit, its round number when it is the latest merged adapter, else 0)."""
        data = node.data_dir
        if which == LATEST_MERGED:
            published = [r for r in read_records(data) if r.published and r.merged_sha256]
            if published:
                latest = max(published, key=lambda r: r.round_number)
                path = data / "blobs" / latest.merged_sha256
                if path.exists():
                    return path, latest.round_number
        blobs = sorted(p for p in (data / "blobs").iterdir() if len(p.name) == SHA_HEX_LEN and p.is_file()) \
            if (data / "blobs").exists() else []
        return (self.rng.choice(blobs), 0) if blobs else (None, 0)

    def flip_byte(self, path: Path, offset: int | None = None) -> int:
        size = path.stat().st_size
        at = self.rng.randrange(size) if offset is None else min(offset, size - 1)
        with path.open("r+b") as fh:
            fh.seek(at)
            byte = fh.read(1)
            fh.seek(at)
            fh.write(bytes([byte[0] ^ 0xFF]))
        return at

    async def hit_blob(self, action: Action, node: NodeProcess) -> str:
        if action.while_stopped:
            await self.terminate(node)
        try:
            path, number = self.blob_file(node, action.blob if action.blob else ANY_BLOB)
            if path is None:
                return f"node-{node.index} holds no blob"
            what = f"{'latest merged (round ' + str(number) + ')' if number else 'blob'} {path.name[:12]}"
            if action.kind == DELETE:
                path.unlink()
                return f"deleted node-{node.index}'s {what}"
            at = self.flip_byte(path)
            extra = ""
            if action.with_adapter and number:
                adapter = node.data_dir / "adapters" / f"round-{number}" / "adapter_model.safetensors"
                if adapter.exists():
                    self.flip_byte(adapter, at)
                    extra = f" and in adapters/round-{number}"
            return f"flipped byte {at} of node-{node.index}'s {what}{extra}"
        finally:
            if action.while_stopped:
                self.restart(node)

    async def fill_disk(self, action: Action) -> str:
        assert self.disk_mount is not None and self.disk_node is not None
        filler = self.disk_mount / ".filler"
        written = 0
        with filler.open("wb", buffering=0) as fh:
            for block in (FILL_BLOCK_BYTES, FILL_SMALL_BYTES, 1):
                chunk = b"\0" * block
                while True:
                    try:
                        written += fh.write(chunk) or 0
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        try:
            await self.sleep(action.hold)
        finally:
            filler.unlink()
        return f"filled node-{self.disk_node.index}'s {self.opts.disk_bytes >> 20} MiB tmpfs ({written} bytes) " \
               f"for {action.hold:.1f} s"

    async def act(self, action: Action, pending: list[NodeProcess]) -> str:
        """Run one action; returns what it did ('' = skipped: no such target now)."""
        if action.kind == WAIT:
            await self.sleep(action.delay)
            return f"waited {action.delay:.1f} s"
        await self.trigger(action)
        await self.refresh()
        if action.kind == DISK_FULL:
            return await self.fill_disk(action) if self.disk_mount is not None else ""
        node = self.resolve(action.target)
        if node is None:  # e.g. no coordinator elected right now, or the others still starting: wait a bit
            try:
                node = await self.wait_for(lambda st: self.resolve(action.target), f"a {action.target} answers",
                                           self.opts.trigger_timeout_seconds)
            except ProgressLost:
                return ""
        role = f"{action.target} node-{node.index}"
        if action.kind in (KILL, TERM):
            if action.kind == KILL:
                self.cluster.kill(node)
            else:
                await self.terminate(node)
            if action.restart_after is None:
                pending.append(node)
                return f"{action.kind} {role}; restart at the end"
            await self.sleep(action.restart_after)
            self.restart(node)
            return f"{action.kind} {role}; restarted after {action.restart_after:.1f} s"
        if action.kind == CLIENT:
            sock = await trio.open_unix_socket(str(node.control_socket))
            await sock.send_all(b"status\n")
            await sock.aclose()  # without reading the answer
            await self.sleep(self.opts.poll_seconds)
            return f"asked {role} for its status over the control socket and closed without reading"
        if action.kind in (CORRUPT, DELETE):
            how = "stopped" if action.while_stopped else "running"
            return await self.hit_blob(action, node) + f" ({action.target}, {how})"
        raise ValueError(f"unknown action {action.kind}")

    # -- one sequence ----------------------------------------------------------------------------
    async def recover(self, *, full: bool) -> None:
        """Start every stopped node again, then wait until a round opened after the faults is installed
        on every node that answers (at least two; a restarted daemon needs seconds to import its
        stack and is checked by a later sequence). `full`: first wait until all nodes are up and see
        each other live, and check all of them."""
        ids = {n.node_id for n in self.cluster.nodes}
        self.restart_all()

        def settled(st: Status) -> bool:
            self.restart_all()  # also a daemon that died on its own meanwhile (a violation already)
            if any(n.index not in st or not n.alive for n in self.cluster.nodes):
                return False
            for n in self.cluster.nodes:
                live = {m.node_id for m in st[n.index].alive_members()}
                if n.index not in self.written_off and not (ids - {n.node_id}) <= live:
                    return False
            return True

        if full:
            await self.wait_for(settled, "every node is up and sees the others live",
                                self.opts.recovery_timeout_seconds)
        st = await self.wait_for(lambda st: st if len(st) >= MIN_ANSWERING else None,
                                 f"at least {MIN_ANSWERING} nodes answer", self.opts.recovery_timeout_seconds)
        top = max(max(_round_number(s.progress.current_round), _round_number(s.progress.last_merged))
                  for s in st.values()) if st else 0
        must = [n for n in self.cluster.nodes if (full or n.index in st) and n.index not in self.written_off]

        def behind(st: Status) -> list[NodeProcess]:
            return [n for n in must if _round_number(_last_merged(st.get(n.index))) <= top]

        def progressed(st: Status) -> bool:
            self.restart_all()
            return not behind(st)

        what = f"nodes {[n.index for n in must]} installed a round after round {top}"
        try:
            await self.wait_for(progressed, what, self.opts.recovery_timeout_seconds)
        except ProgressLost as exc:
            stuck = behind(self.statuses)
            if len(self.cluster.nodes) - len(self.written_off) - len(stuck) < MIN_ANSWERING:
                raise  # the federation as a whole is stuck: its remaining sequences are not run
            # The others go on: the stuck nodes' files are still checked, they just no longer have to progress.
            self.written_off.update(n.index for n in stuck)
            self._violation("no_progress", f"nodes {[n.index for n in stuck]} after round {top}",
                            f"{exc}; nodes {[n.index for n in stuck]} are written off (the others go on)")

    def check(self) -> None:
        files = [fault_check.NodeFiles(n.index, n.node_id, n.data_dir, n.folder / "log.txt")
                 for n in self.cluster.nodes]
        evidence = fault_check.gather(files)
        for v in fault_check.check_rounds(evidence):
            self._violation(v.kind, v.key, v.detail)
        for f in files:
            found, self.log_offsets[f.index] = fault_check.scan_log(f, self.log_offsets.get(f.index, 0))
            for v in found:
                self._violation(v.kind, v.key, v.detail)

    async def run_sequence(self, seq: FaultSequence, *, full: bool) -> SequenceResult:
        started = time.monotonic()
        self.violations, self.notes = [], []
        executed: list[str] = []
        pending: list[NodeProcess] = []
        lost = ""
        try:
            for action in seq.actions:
                did = await self.act(action, pending)
                if did:
                    executed.append(action.kind)
                    self.notes.append(did)
                else:
                    self.notes.append(f"skipped ({action.describe()}): no such target now")
            await self.recover(full=full)
        except ProgressLost as exc:
            lost = str(exc)
            self._violation("no_progress", f"sequence {seq.index}", lost)
        finally:
            self.check()
        failing = [v for v in self.violations if self.opts.strict_liveness or v.kind not in LIVENESS_KINDS]
        result = SequenceResult(seq.index, seq.name, self.index, not failing, time.monotonic() - started,
                                seq.describe(), list(self.violations), list(self.notes), executed)
        self.violations, self.notes = [], []
        if lost:
            raise SequenceStopped(result)
        return result


class SequenceStopped(Exception):
    """A sequence after which its federation made no progress: the rest of its sequences are not run."""

    def __init__(self, result: SequenceResult) -> None:
        super().__init__(result.name)
        self.result = result


def _round_number(what: CurrentRound | LastMerged | None) -> int:
    return what.round_number if what is not None else 0


def _last_merged(status: NodeStatus | None) -> LastMerged | None:
    return status.progress.last_merged if status is not None else None
