"""README.md's "Running a community on several machines", run as written (issue 13).

The commands come out of README.md itself, so a doc edit that breaks the guide fails here. Only what
differs between the reader's machines and this one is substituted: each machine is a home folder
under tmp_path (so the guide's `~/fednode` is that machine's folder, expanded by bash as for a
reader), port 4001 becomes a free port per machine, and the address machine A's `fednode init`
printed (0.0.0.0 replaced by 127.0.0.1, as its output says) stands in for the guide's example
address of A. The daemons are real `fednode` processes over libp2p on this host; every node must
complete 2 rounds, each with all three members' updates (distinct data shares: none refused as
duplicate_delta) and one merged adapter. A's `fednode init` output must match the guide word for word.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from fednode.config import load_config
from fednode.identity import load_key_file
from fednode.node.control import ControlError, query_control
from tests.readme_guide import GUIDE_PORT, read_guide

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 2
# Generous: three model-loading daemons and their training share two busy cores with the rest of the suite.
ROUNDS_DEADLINE_SECONDS = 900.0
# A daemon stopped mid-round first finishes the local training under way (it runs in a worker thread).
STOP_GRACE_SECONDS = 120.0


@dataclass
class Machine:
    letter: str
    home: Path
    port: int
    init_output: str = ""
    daemon: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def config(self) -> Path:
        return self.home / "fednode" / "node.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shim(tmp_path: Path) -> dict[str, str]:
    """The environment of every guide command: `fednode` on PATH is this checkout's, run by this Python."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "fednode"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fednode "$@"\n')
    exe.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def on_this_host(command: str, machine: Machine, a_address: str, guide_a_address: str) -> str:
    """The machine-specific values of the guide's command for this host: A's real address (as its
    output says to give it) for the guide's example of it, this machine's port for 4001."""
    if guide_a_address in command:
        assert a_address, f"machine {machine.letter} needs A's address before A's `fednode init` ran: {command}"
        command = command.replace(guide_a_address, a_address)
    return command.replace(f"/tcp/{GUIDE_PORT}", f"/tcp/{machine.port}")


def run_command(command: str, machine: Machine, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=machine.home, env={**env, "HOME": str(machine.home)},
                          capture_output=True, text=True, timeout=120, check=False)


async def wait_rounds(machines: list[Machine], rounds: int, deadline: float) -> dict[str, dict[str, Any]]:
    statuses: dict[str, dict[str, Any]] = {}
    sockets = {m.letter: load_config(m.config).control_socket_path for m in machines}
    with trio.move_on_after(deadline):
        while True:
            for m in machines:
                assert m.daemon is not None and m.daemon.poll() is None, \
                    f"machine {m.letter}'s daemon exited ({m.daemon and m.daemon.returncode}): " + logs_tail(m)
                with contextlib.suppress(ControlError):  # not up yet
                    statuses[m.letter] = await query_control(sockets[m.letter], timeout=5.0)
            if len(statuses) == len(machines) and all(s.get("rounds_completed", 0) >= rounds
                                                      for s in statuses.values()):
                return statuses
            await trio.sleep(1.0)
    raise AssertionError(f"not every node completed {rounds} rounds in {deadline:.0f} s: "
                         + json.dumps({k: {f: s.get(f) for f in ("rounds_completed", "current_round", "counters")}
                                       for k, s in statuses.items()}) + "\n" + "\n".join(logs_tail(m)
                                                                                         for m in machines))


def logs_tail(m: Machine) -> str:
    return "\n".join(f"--- {p}\n" + p.read_text(errors="replace")[-3000:] for p in m.logs if p.exists())


def test_readme_multi_machine_guide_runs_as_written(tmp_path: Path) -> None:
    guide = read_guide((ROOT / "README.md").read_text())
    assert sorted(guide.commands) == ["A", "B", "C"], guide.commands
    expected_init = guide.init_output
    guide_a_address = guide.bootstrap_address

    env = shim(tmp_path)
    machines = {m: Machine(m, tmp_path / m.lower(), free_port()) for m in sorted(guide.commands)}
    for m in machines.values():
        m.home.mkdir()
    a = machines["A"]
    a_address = ""
    daemons_started = False
    try:
        for m in machines.values():  # A first: its printed address is what B and C need
            for command in guide.commands[m.letter]:
                command = on_this_host(command, m, a_address, guide_a_address)
                argv = shlex.split(command)
                assert argv[0] == "fednode", command
                if argv[1] == "init":
                    done = run_command(command, m, env)
                    assert done.returncode == 0, f"machine {m.letter}: {command}\n{done.stdout}{done.stderr}"
                    m.init_output = done.stdout
                    if m is a:
                        printed = re.search(r"^address:\s+(\S+)$", done.stdout, flags=re.M)
                        assert printed, done.stdout
                        # What A's output says to do with its address before giving it to the others.
                        assert "with 0.0.0.0 replaced by this machine's reachable IP" in done.stdout
                        a_address = printed[1].replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/")
                elif argv[1] == "run":
                    log = m.home / "daemon.log"
                    m.logs.append(log)
                    with log.open("ab") as fh:
                        m.daemon = subprocess.Popen(["bash", "-c", command], cwd=m.home,
                                                    env={**env, "HOME": str(m.home)}, stdout=fh,
                                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                    start_new_session=True)
                    daemons_started = True
                else:  # run below, once the daemons are up; a new kind of step needs this test to learn it
                    assert argv[1] == "status", f"the guide has a step this test does not run: {command}"

        # A's `fednode init` output is the guide's, word for word, but for this machine's values.
        a_id = load_key_file(a.home / "fednode" / "node.key").node_id
        want = (expected_init.replace(guide.example_node_id, a_id).replace(guide.example_home, str(a.home))
                .replace(f"/tcp/{GUIDE_PORT}/", f"/tcp/{a.port}/"))
        assert a.init_output.rstrip("\n").splitlines() == want.splitlines()

        # Every member got its own share of the data (the defect: all of them trained share 0 of 1).
        shares = {(c.learning.node_index, c.learning.num_nodes) for c in (load_config(m.config)
                                                                           for m in machines.values())}
        assert shares == {(0, 3), (1, 3), (2, 3)}, shares
        assert daemons_started, "the guide starts no daemon"

        statuses = trio.run(wait_rounds, list(machines.values()), ROUNDS, ROUNDS_DEADLINE_SECONDS)

        node_ids = {m.letter: load_key_file(m.home / "fednode" / "node.key").node_id for m in machines.values()}
        for m in machines.values():
            assert statuses[m.letter]["node_id"] == node_ids[m.letter]
            assert statuses[m.letter]["community_id"] == "my-community"
            for n in range(1, ROUNDS + 1):
                record = json.loads((m.home / "fednode" / "rounds" / f"round-{n}.json").read_text())
                assert record["state"] == "published"
                assert {s["node_id"] for s in record["accepted"]} == set(node_ids.values()), record["accepted"]
                assert record["rejected"] == []
                assert (m.home / "fednode" / "adapters" / f"round-{n}" / "adapter_model.safetensors").exists()
        for n in range(1, ROUNDS + 1):  # one merged adapter per round, the same on every node
            merged = {json.loads((m.home / "fednode" / "rounds" / f"round-{n}.json").read_text())["merged_sha256"]
                      for m in machines.values()}
            assert len(merged) == 1, merged

        # The guide's status command, as written, on every machine (at once: each is a Python start-up).
        asked = [(m, subprocess.Popen(["bash", "-c", on_this_host(command, m, a_address, guide_a_address)],
                                      cwd=m.home, env={**env, "HOME": str(m.home)}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
                 for m in machines.values() for command in guide.commands[m.letter]
                 if shlex.split(command)[1] == "status"]
        assert len(asked) == len(machines), "the guide shows no `fednode status` for every machine"
        for m, proc in asked:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert node_ids[m.letter] in out
    finally:
        stop(list(machines.values()))
    for m in machines.values():
        assert m.daemon is not None and m.daemon.returncode == 0, f"machine {m.letter}: " + logs_tail(m)


def stop(machines: list[Machine]) -> None:
    for m in machines:
        if m.daemon is not None and m.daemon.poll() is None:
            os.killpg(m.daemon.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for m in machines:
        if m.daemon is None:
            continue
        try:
            m.daemon.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(m.daemon.pid, signal.SIGKILL)
            m.daemon.wait()
