"""Prometheus `/metrics` (prometheus_client): off by default, on by config, 127.0.0.1 only,
figures taken from the same status snapshot as `fednode status`."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import trio
import trio.testing

from fednode.node.metrics import METRICS_BIND_ADDRESS, MetricsServer
from fednode.node.reports import NodeStatus
from tests.node.conftest import cluster, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_metrics_server_exposes_status_figures_and_stops_cleanly() -> None:
    import threading

    data = json.loads((Path(__file__).parent / "data" / "status-v0.json").read_text())
    data.update(term=3, rounds_completed=2, outcome_conflicts=1,
                counters={"rejected": {"bad_signature": 4}, "accepted": {"heartbeat": 9}})
    data["bytes"]["blob_served"] = 1234
    status = NodeStatus.from_json(data)
    before = set(threading.enumerate())
    server = MetricsServer(_free_port(), lambda: status)
    try:
        assert METRICS_BIND_ADDRESS == "127.0.0.1"
        text = _scrape(server.port)
    finally:
        server.close()
    assert "fednode_members 2.0" in text
    assert "fednode_term 3.0" in text
    assert "fednode_rounds_completed 2.0" in text
    assert 'fednode_messages_rejected_total{reason="bad_signature"} 4.0' in text
    assert 'fednode_bytes_total{direction="blob_served"} 1234.0' in text
    assert "fednode_outcome_conflicts_total 1.0" in text  # round-v1.md: one outcome per round
    assert set(threading.enumerate()) <= before  # no thread left behind


async def test_daemon_serves_metrics_only_when_enabled(tmp_path: Path,
                                                       autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.autojump_threshold = 0.01
    port = _free_port()
    async with cluster(tmp_path) as c:
        on = await c.start(0, 2, metrics={"enabled": True, "port": port}, round={"max_rounds": 1})
        off = await c.start(1, 2, round={"max_rounds": 1})
        await wait_until(lambda: on.driver.progress.rounds_completed >= 1 and off.driver.progress.rounds_completed >= 1)
        text = await trio.to_thread.run_sync(_scrape, port)
        assert "fednode_rounds_completed 1.0" in text
        assert "fednode_outcome_conflicts_total 0.0" in text
        assert 'fednode_messages_accepted_total{reason="heartbeat"}' in text
        assert off.config.metrics.enabled is False
