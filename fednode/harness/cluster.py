"""Start N `fednode run` daemons as separate OS processes over libp2p on 127.0.0.1.

Each node gets its own folder under the run dir: `node-<i>/` with its key, `node.toml`, data
(blobs, state.sqlite, adapters, rounds) and `log.txt`. Nothing here is demo-specific: each node is
the same daemon a community member runs, configured the way an operator would.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.config import dump_toml, load_config
from fednode.identity import load_key_file, write_key_file

LOOPBACK = "127.0.0.1"
STOP_GRACE_SECONDS = 10.0


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768  # Linux's default start of the range the kernel picks outbound ports from
LISTEN_PORT_LOW = 20000  # free_port draws from [this, the ephemeral range's start)
MAX_PORT_TRIES = 200
MAX_REMEMBERED_PORTS = 10_000
_handed_out: set[int] = set()


def ephemeral_port_low() -> int:
    """The first port of the kernel's ephemeral range (outbound connections and port-0 binds)."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def free_port() -> int:
    """A loopback port that is free now and that no outbound connection can take later: drawn below
    the kernel's ephemeral range, never handed out twice by this process. A port-0 port lies *in*
    that range: in bench_scale's 32-daemon run the 30th daemon, started a minute after its port was
    chosen, found it taken by another daemon's outbound connection and exited ("already in use").
    Where the range leaves no room below it, the kernel picks (port 0), as before."""
    high = ephemeral_port_low()
    rng = random.SystemRandom()
    if len(_handed_out) >= MAX_REMEMBERED_PORTS:
        _handed_out.clear()
    for _ in range(MAX_PORT_TRIES):
        wanted = rng.randrange(LISTEN_PORT_LOW, high) if high - LISTEN_PORT_LOW >= MAX_PORT_TRIES else 0
        if wanted in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, wanted))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port below {high} after {MAX_PORT_TRIES} tries")


@dataclass
class NodeProcess:
    index: int
    folder: Path
    config_path: Path
    node_id: str
    federated_learning: bool
    port: int
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False
    log: Any = None

    @property
    def control_socket(self) -> Path:
        return load_config(self.config_path).control_socket_path

    @property
    def data_dir(self) -> Path:
        return load_config(self.config_path).data_dir

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    run_dir: Path
    nodes: list[NodeProcess] = field(default_factory=list)

    @classmethod
    def create(cls, run_dir: Path, *, federated: int, gate_off: int, template: dict[str, dict[str, Any]],
               overrides: dict[str, dict[str, Any]],
               node_overrides: dict[int, dict[str, dict[str, Any]]] | None = None,
               keys_from: Path | None = None, bootstrap_all: bool = False) -> LocalCluster:
        """`node_overrides[i]` applies to node i only (e.g. one straggler); `keys_from` = another run
        dir whose node keys to reuse, so two runs have the same node ids (the aggregation order).
        Nodes 0 and 1 are everyone's bootstrap peers; with `bootstrap_all`, every other node is (so
        restarting both 0 and 1 does not cut them off from the rest until a redial)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        cluster = cls(run_dir)
        total = federated + gate_off
        ports = [free_port() for _ in range(total)]
        ids = []
        for i in range(total):
            folder = run_dir / f"node-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            if keys_from is not None:
                shutil.copyfile(keys_from / f"node-{i}" / "node.key", folder / "node.key")
                os.chmod(folder / "node.key", 0o600)
                ids.append(load_key_file(folder / "node.key").node_id)
            else:
                ids.append(write_key_file(folder / "node.key", overwrite=True).node_id)
        for i in range(total):
            folder = run_dir / f"node-{i}"
            fl = i < federated
            sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in template.items()}
            for name, values in [*overrides.items(), *(node_overrides or {}).get(i, {}).items()]:
                sections.setdefault(name, {}).update(values)
            seeds = range(total) if bootstrap_all else (0, 1)
            bootstrap = [f"/ip4/{LOOPBACK}/tcp/{ports[j]}/p2p/{ids[j]}" for j in seeds if j != i and j < total]
            sections.setdefault("node", {}).update(data_dir=".", key_file="node.key", name=f"node-{i}")
            # Only a per-node override may move a node's data (e.g. onto its own small file system, with
            # key_file then the absolute path of the folder's key); a shared template never does.
            sections["node"].update((node_overrides or {}).get(i, {}).get("node", {}))
            sections.setdefault("network", {}).update(listen=[f"/ip4/{LOOPBACK}/tcp/{ports[i]}"], bootstrap=bootstrap)
            sections.setdefault("research", {})["federated_learning"] = fl
            learning = sections.setdefault("learning", {})
            learning.update(node_index=i if fl else 0, num_nodes=max(federated, 1))
            config_path = folder / "node.toml"
            config_path.write_text(dump_toml(sections))
            load_config(config_path)  # fail here, with the file named, not in a child process
            cluster.nodes.append(NodeProcess(i, folder, config_path, ids[i], fl, ports[i]))
        return cluster

    def start(self, nodes: list[NodeProcess] | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        for node in self.nodes if nodes is None else nodes:
            if node.log is not None:  # a restart: the old process's log handle
                node.log.close()
            node.killed = False
            node.log = (node.folder / "log.txt").open("ab")
            node.process = subprocess.Popen(
                [sys.executable, "-m", "fednode", "run", "--config", str(node.config_path)],
                stdout=node.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)

    def kill(self, node: NodeProcess) -> None:
        if node.process is not None and node.alive:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
        node.killed = True

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> dict[int, int | None]:
        """SIGTERM every node, wait up to `grace_seconds` each, SIGKILL stragglers; return exit codes."""
        for node in self.nodes:
            if node.alive and node.process is not None:
                node.process.send_signal(signal.SIGTERM)
        codes: dict[int, int | None] = {}
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                codes[node.index] = node.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                node.process.kill()
                codes[node.index] = node.process.wait()
            if node.log is not None:
                node.log.close()
        return codes


def load_template(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    load_config(path)  # validate it as a whole first
    return {k: dict(v) for k, v in data.items()}
