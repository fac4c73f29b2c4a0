"""`fednode status --json` against running daemons, through the real control socket.

The cluster runs on the memory transport and trio's virtual clock until a round is done; then the
clock is switched to real time (rate 1, no autojump) so the unix-socket I/O and its timeouts behave
as they do in production.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fednode.cli import _format_status
from fednode.cli import main as cli_main
from fednode.config import config_to_dict, dump_toml
from fednode.node.control import (
    DEFAULT_CONTROL_TIMEOUT_SECONDS,
    MAX_REQUEST_BYTES,
    ControlError,
    query_control,
    query_status,
    serve_control,
)
from fednode.node.reports import NodeStatus, ReportError
from fednode.transport.memory import open_memory_transport
from tests.node.checks import read_record
from tests.node.conftest import cluster, wait_until

N = 3
AUTOJUMP_THRESHOLD = 0.01  # see test_crash.py


async def test_status_over_the_control_socket(tmp_path: Path, autojump_clock: trio.testing.MockClock,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    autojump_clock.autojump_threshold = AUTOJUMP_THRESHOLD
    sections: dict[str, dict[str, Any]] = {"round": {"max_rounds": 1}}
    async with cluster(tmp_path) as c:
        nodes = [await c.start(i, N, **sections) for i in range(N)]
        await wait_until(lambda: all(n.driver.progress.rounds_completed >= 1 for n in nodes))
        # an intruder publishes garbage: every node REJECTs it and counts the reason
        async with open_memory_transport(c.network, "intruder") as intruder:
            await intruder.publish(nodes[0].topic, b"\x93not a fednode message")
            await wait_until(lambda: all(sum(n.counters["rejected"].values()) >= 1 for n in nodes))
        await trio.sleep(2.0)  # a couple of heartbeats after the round

        autojump_clock.autojump_threshold = math.inf  # from here on: real time, real socket I/O
        autojump_clock.rate = 1.0
        record = read_record(nodes[0], 1)
        statuses = [await query_control(n.config.control_socket_path) for n in nodes]
        coordinator = record["final_coordinator_node_id"]
        for node, s in zip(nodes, statuses, strict=True):
            assert s["node_id"] == node.node_id and s["federated_learning"] is True
            assert NodeStatus.from_json(s).to_json() == s  # the wire form is the typed status, key for key
            others = {n.node_id for n in nodes} - {node.node_id}
            assert {m["node_id"] for m in s["members"]} == others
            assert all(m["alive"] and m["federated_learning"] for m in s["members"])
            assert s["coordinator"] == coordinator and s["term"] >= 1
            assert s["current_round"]["round_id"] == record["round_id"]
            assert s["current_round"]["state"] == "published"
            assert s["current_round"]["coordinator_node_id"] == coordinator
            assert s["rounds_completed"] == 1
            assert s["last_merged"]["round_number"] == 1
            assert s["last_merged"]["sha256"] == record["merged_sha256"]
            assert Path(s["last_merged"]["path"]) == node.config.data_dir / "adapters" / "round-1"
            accepted = s["counters"]["accepted"]
            assert accepted["heartbeat"] > 0 and accepted["submission_announce"] >= 1
            assert accepted["round_manifest"] >= 1 and accepted["aggregate_announce"] >= 1
            rejected = s["counters"]["rejected"]
            assert sum(rejected.values()) >= 1 and all(isinstance(k, str) and k for k in rejected)
            b = s["bytes"]
            assert b["transport_sent"] > 0 and b["transport_received"] > 0
            assert s["gossip_copies_received"] >= s["gossip_delivered_from_peers"] > 0
            if node.node_id == coordinator:  # it pulled every participant's delta
                assert b["blob_fetched"] > 0
            else:  # it served its delta to the coordinator and pulled the merged adapter
                assert b["blob_served"] > 0 and b["blob_fetched"] > 0
        assert {s["node_id"] for s in statuses} == {n.node_id for n in nodes}

        # the CLI prints the same, given the node's config file
        node = nodes[1]
        config_path = tmp_path / "node-1.toml"
        config_path.write_text(dump_toml(config_to_dict(node.config)))
        capsys.readouterr()
        rc = await trio.to_thread.run_sync(cli_main, ["status", "--config", str(config_path), "--json"])
        assert rc == 0
        printed = json.loads(capsys.readouterr().out)
        for key in ("node_id", "coordinator", "term", "last_merged", "rounds_completed"):
            assert printed[key] == statuses[1][key], key
        assert [m["node_id"] for m in printed["members"]] == [m["node_id"] for m in statuses[1]["members"]]
        assert printed["current_round"]["state"] == "published"
        assert set(printed["counters"]) >= {"accepted", "rejected"} and set(printed["bytes"]) >= {
            "transport_sent", "transport_received", "blob_served", "blob_fetched"}


def _rude_client(path: Path, payload: bytes) -> None:
    """A blocking client that sends `payload` and closes at once, before the daemon answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the daemon stopped reading first
            s.sendall(payload)


async def test_misbehaving_control_clients_cannot_take_the_daemon_down(tmp_path: Path) -> None:
    """Before: `status\\n` then close made the daemon's answer hit EPIPE, and the BrokenResourceError
    escaped the handler into the node's nursery: the daemon died. Now each client costs only its
    connection and is counted by reason. (Real clock: real unix-socket I/O.)"""
    async with cluster(tmp_path) as c:
        node = await c.start(0, 1, research={"federated_learning": False})
        path = node.config.control_socket_path
        hung = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await hung.connect(str(path))  # connects, never sends a line: the server gives up on it
        for payload in (b"status\n", b"status\n", b"", b"\xff\xfe garbage \x00\n", b"s" * 10_000):
            await trio.to_thread.run_sync(_rude_client, path, payload)
        # an oversize line answered (the client reads): an error naming the limit
        stream = await trio.open_unix_socket(str(path))
        await stream.send_all(b"x" * (MAX_REQUEST_BYTES + 1))  # no line end, and no more: unread bytes would reset
        await stream.send_eof()
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
        await stream.aclose()
        assert "MAX_REQUEST_BYTES" in json.loads(answer)["error"]
        await wait_until(lambda: node.control_server.statistics().failed_by_reason.get("timeout", 0) >= 1,
                         timeout=DEFAULT_CONTROL_TIMEOUT_SECONDS * 4, step=0.05)
        hung.close()
        status = await query_control(path)  # the daemon is still up and answers
        assert status["node_id"] == node.node_id
        failed = status["handler_errors"]["control"]
        assert failed["peer_gone"] >= 2  # the two early closes (and maybe the empty one)
        assert failed["too_large"] == 2 and failed["unknown_command"] >= 1 and failed["timeout"] == 1
        assert "internal_error" not in failed
        assert "control:peer_gone=" in _format_status(NodeStatus.from_json(status))  # `fednode status` too


async def test_a_failing_control_command_is_answered_and_counted(tmp_path: Path) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug in status")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(functools.partial(
            serve_control, tmp_path / "c.sock", {"status": broken, "ok": lambda: {"ok": True}}))
        answer = await query_control(tmp_path / "c.sock")
        assert "RuntimeError: a bug in status" in answer["error"]
        assert await query_control(tmp_path / "c.sock", "ok") == {"ok": True}
        assert server.statistics().failed_by_reason == {"internal_error": 1}
        nursery.cancel_scope.cancel()


async def test_query_status_names_the_field_a_daemon_gets_wrong(tmp_path: Path) -> None:
    """A daemon whose status lost or renamed a field is a bug to show, not a node to wait for (the
    harness used to read the default and time out)."""
    recorded = json.loads((Path(__file__).parent / "data" / "status-v0.json").read_text())
    renamed = {**{k: v for k, v in recorded.items() if k != "rounds_completed"}, "rounds_done": 1}
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_control, tmp_path / "c.sock", {
            "status": lambda: renamed}))
        with pytest.raises(ReportError, match=r"status\.rounds_completed: missing"):
            await query_status(tmp_path / "c.sock")
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(serve_control, tmp_path / "d.sock", {"status": lambda: recorded}))
        assert (await query_status(tmp_path / "d.sock")).to_json() == recorded
        nursery.cancel_scope.cancel()


async def test_query_control_turns_a_reset_into_a_control_error(tmp_path: Path) -> None:
    """Before: a daemon that closed the connection unread (e.g. its handler gave up) made the
    harness's status poller die with trio.BrokenResourceError (ECONNRESET)."""
    path = tmp_path / "rude.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(1)

    async def close_unread() -> None:
        conn, _ = await listener.accept()
        await trio.lowlevel.wait_readable(conn)  # the request has arrived; closing it unread resets
        conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_unread)
        with pytest.raises(ControlError, match="no daemon answers"):
            await query_control(path)
    listener.close()
